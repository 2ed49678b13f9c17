// Quantization parameters from data: asymmetric (min/max or percentile range) and symmetric
// (max |x| or percentile of |x|); formulas in quantize.hpp.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

#include "kernels/quantize.hpp"
#include "kernels/quantize_common.hpp"

namespace pyzeroq::quant {
namespace {

using detail::kGrain;
using detail::kInf;
using detail::nonfinite;
using detail::normalized;

// ---------------------------------------------------------------- min / max
// Min/max reductions need reassociation GCC will not do without -ffinite-math-only, so they are
// written with GCC vector extensions (8 floats; two SSE registers on the baseline clone).
// (v - v) != 0 is true exactly for NaN and +-Inf.
using V8f = float __attribute__((vector_size(32)));
using V8i = std::int32_t __attribute__((vector_size(32)));
constexpr std::size_t kVecWidth = 8;

PYZEROQ_SIMD_CLONES unsigned minmax_scalar(const float* __restrict x, std::size_t n, float* mn_out, float* mx_out) {
  const V8f zero = {};
  V8f mn0 = zero + kInf, mn1 = mn0, mx0 = zero - kInf, mx1 = mx0;
  V8i bad = {};
  std::size_t i = 0;
  for (; i + 2 * kVecWidth <= n; i += 2 * kVecWidth) {
    V8f a, b;
    std::memcpy(&a, x + i, sizeof a);
    std::memcpy(&b, x + i + kVecWidth, sizeof b);
    bad |= ((a - a) != zero) | ((b - b) != zero);
    mn0 = a < mn0 ? a : mn0;
    mn1 = b < mn1 ? b : mn1;
    mx0 = a > mx0 ? a : mx0;
    mx1 = b > mx1 ? b : mx1;
  }
  mn0 = mn1 < mn0 ? mn1 : mn0;
  mx0 = mx1 > mx0 ? mx1 : mx0;
  unsigned any_bad = 0;
  for (std::size_t j = 0; j < kVecWidth; ++j) {
    any_bad |= bad[j] != 0;
    *mn_out = mn0[j] < *mn_out ? mn0[j] : *mn_out;
    *mx_out = mx0[j] > *mx_out ? mx0[j] : *mx_out;
  }
  for (; i < n; ++i) {
    any_bad |= nonfinite(x[i]);
    *mn_out = x[i] < *mn_out ? x[i] : *mn_out;
    *mx_out = x[i] > *mx_out ? x[i] : *mx_out;
  }
  return any_bad;
}
PYZEROQ_SIMD_CLONES unsigned minmax_vec(const float* __restrict x, std::size_t n, float* __restrict mn,
                                        float* __restrict mx) {
  unsigned bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    bad |= nonfinite(x[i]);
    mn[i] = x[i] < mn[i] ? x[i] : mn[i];
    mx[i] = x[i] > mx[i] ? x[i] : mx[i];
  }
  return bad;
}

// numpy.percentile(values, 100 * quantile, method="linear") on float64 values (reorders them).
double percentile_linear(std::vector<double>& v, double quantile) {
  const std::size_t n = v.size();
  const double virtual_index = static_cast<double>(n - 1) * quantile;
  if (virtual_index >= static_cast<double>(n - 1)) return *std::max_element(v.begin(), v.end());
  const double previous = std::floor(virtual_index);
  const auto k = static_cast<std::size_t>(previous);
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  const double a = v[k];
  const double b = *std::min_element(v.begin() + static_cast<std::ptrdiff_t>(k) + 1, v.end());
  const double gamma = virtual_index - previous;
  const double diff = b - a;
  return gamma >= 0.5 ? b - diff * (1.0 - gamma) : a + diff * gamma;  // numpy's _lerp
}

void params_from_range(double lo, double hi, int bits, float* scale, std::int32_t* zero_point) {
  lo = lo < 0.0 ? lo : 0.0;
  hi = hi > 0.0 ? hi : 0.0;
  const std::int32_t qmax = qmax_for_bits(bits);
  const auto s = static_cast<float>((hi - lo) / qmax);
  if (!(s > 0.0f)) {  // constant (all-zero) or empty channel, or a range that underflows
    *scale = 1.0f;
    *zero_point = 0;
    return;
  }
  const double z = std::nearbyint(-lo / static_cast<double>(s));
  *scale = s;
  *zero_point = static_cast<std::int32_t>(z < 0.0 ? 0.0 : (z > qmax ? qmax : z));
}

constexpr double kPercentScale = 100.0;


// Per-channel [min, max] of the values (an empty channel keeps [0, 0]) by the vectorized
// reductions above, threads merging their partial results. Returns true when a value is NaN or Inf.
bool channel_minmax(const float* x, const Layout& l, std::vector<double>& lo, std::vector<double>& hi) {
  const std::size_t channels = l.channels, inner = l.inner;
  std::vector<float> mn(channels, kInf), mx(channels, -kInf);
  std::atomic<bool> any_bad{false};
  std::mutex merge;
  parallel_for(l.size(), kGrain, [&](std::size_t begin, std::size_t end) {
    std::vector<float> lmn(channels, kInf), lmx(channels, -kInf);
    unsigned bad = 0;
    std::size_t i = begin;
    while (i < end) {
      if (inner == 1 && channels > 1) {
        const std::size_t c = i % channels;
        const std::size_t len = std::min(end - i, channels - c);
        bad |= minmax_vec(x + i, len, &lmn[c], &lmx[c]);
        i += len;
      } else {
        const std::size_t row = i / inner;
        const std::size_t len = std::min(end, (row + 1) * inner) - i;
        const std::size_t c = row % channels;
        bad |= minmax_scalar(x + i, len, &lmn[c], &lmx[c]);
        i += len;
      }
    }
    if (bad) any_bad.store(true, std::memory_order_relaxed);
    const std::lock_guard<std::mutex> lock(merge);
    for (std::size_t c = 0; c < channels; ++c) {
      mn[c] = std::min(mn[c], lmn[c]);
      mx[c] = std::max(mx[c], lmx[c]);
    }
  });
  lo.assign(channels, 0.0);
  hi.assign(channels, 0.0);
  for (std::size_t c = 0; c < channels; ++c) {
    if (mn[c] <= mx[c]) {  // channel not empty
      lo[c] = mn[c];
      hi[c] = mx[c];
    }
  }
  return any_bad.load();
}

// fn(c, values) for every non-empty channel c, `values` holding the channel's elements as float64
// (their magnitudes |x| when `magnitude`), in memory order; fn may reorder them. Chunks of whole
// channels run in parallel. Returns true when a value is NaN or Inf (fn is then not called for it).
template <class Fn>
bool for_channel_values(const float* x, const Layout& l, bool magnitude, Fn&& fn) {
  const std::size_t channels = l.channels, per_channel = l.outer * l.inner;
  std::atomic<bool> any_bad{false};
  if (per_channel == 0) return false;
  // chunks of whole channels, each of at least kMinParallelWork values
  parallel_for(channels, grain_for_cost(per_channel), [&](std::size_t c_begin, std::size_t c_end) {
    std::vector<double> values(per_channel);
    for (std::size_t c = c_begin; c < c_end; ++c) {
      unsigned bad = 0;
      std::size_t k = 0;
      for (std::size_t o = 0; o < l.outer; ++o) {
        const float* row = x + (o * channels + c) * l.inner;
        for (std::size_t j = 0; j < l.inner; ++j) {
          bad |= nonfinite(row[j]);
          values[k++] = magnitude ? std::fabs(static_cast<double>(row[j])) : row[j];
        }
      }
      if (bad) {
        any_bad.store(true, std::memory_order_relaxed);
        return;
      }
      fn(c, values);
    }
  });
  return any_bad.load();
}

// scale = f32(amax / (2^(bits-1) - 1)) (float64 quotient), zp = 0 or 2^(bits-1); degenerate: scale 1.
void symmetric_from_amax(double amax, int bits, bool is_signed, float* scale, std::int32_t* zero_point) {
  const auto s = static_cast<float>(amax / symmetric_qmax(bits));
  *scale = s > 0.0f ? s : 1.0f;  // all-zero or empty channel, or an amax that underflows
  *zero_point = is_signed ? 0 : (std::int32_t{1} << (bits - 1));
}

// Sort-based numpy.percentile(values, 100 * quantile, method="linear") (reference twin of
// percentile_linear: the same interpolation formula, the order statistics found by sorting).
double percentile_sorted(std::vector<double> v, double quantile) {
  std::sort(v.begin(), v.end());
  const double virtual_index = static_cast<double>(v.size() - 1) * quantile;
  if (virtual_index >= static_cast<double>(v.size() - 1)) return v.back();
  const double previous = std::floor(virtual_index);
  const auto k = static_cast<std::size_t>(previous);
  const double a = v[k], b = v[k + 1], gamma = virtual_index - previous, diff = b - a;
  return gamma >= 0.5 ? b - diff * (1.0 - gamma) : a + diff * gamma;
}

}  // namespace

bool asymmetric_params(const float* x, const Layout& layout, int bits, double percentile, float* scale,
                       std::int32_t* zero_point) {
  const Layout l = normalized(layout);
  const std::size_t channels = l.channels;
  std::vector<double> lo(channels, 0.0), hi(channels, 0.0);
  bool bad;
  if (percentile < 0.0) {
    bad = channel_minmax(x, l, lo, hi);
  } else {
    const double q_hi = percentile / kPercentScale;
    const double q_lo = (kPercentScale - percentile) / kPercentScale;
    bad = for_channel_values(x, l, false, [&](std::size_t c, std::vector<double>& values) {
      lo[c] = percentile_linear(values, q_lo);
      hi[c] = percentile_linear(values, q_hi);
    });
  }
  if (bad) return true;
  for (std::size_t c = 0; c < channels; ++c) params_from_range(lo[c], hi[c], bits, scale + c, zero_point + c);
  return false;
}

bool symmetric_params(const float* x, const Layout& layout, int bits, bool is_signed, double percentile,
                      float* scale, std::int32_t* zero_point) {
  const Layout l = normalized(layout);
  std::vector<double> amax(l.channels, 0.0);
  bool bad;
  if (percentile < 0.0) {
    std::vector<double> lo, hi;
    bad = channel_minmax(x, l, lo, hi);
    for (std::size_t c = 0; c < l.channels; ++c) amax[c] = std::max(-lo[c], hi[c]);  // max |x|
  } else {
    bad = for_channel_values(x, l, true, [&](std::size_t c, std::vector<double>& magnitudes) {
      amax[c] = percentile_linear(magnitudes, percentile / kPercentScale);
    });
  }
  if (bad) return true;
  for (std::size_t c = 0; c < l.channels; ++c) symmetric_from_amax(amax[c], bits, is_signed, scale + c, zero_point + c);
  return false;
}

bool symmetric_params_reference(const float* x, const Layout& l, int bits, bool is_signed, double percentile,
                                float* scale, std::int32_t* zero_point) {
  std::vector<std::vector<double>> magnitudes(l.channels);
  for (std::size_t i = 0; i < l.size(); ++i) {
    if (!std::isfinite(x[i])) return true;
    magnitudes[(i / l.inner) % l.channels].push_back(std::fabs(static_cast<double>(x[i])));
  }
  for (std::size_t c = 0; c < l.channels; ++c) {
    const std::vector<double>& m = magnitudes[c];
    double amax = 0.0;
    if (!m.empty())
      amax = percentile < 0.0 ? *std::max_element(m.begin(), m.end()) : percentile_sorted(m, percentile / kPercentScale);
    symmetric_from_amax(amax, bits, is_signed, scale + c, zero_point + c);
  }
  return false;
}

}  // namespace pyzeroq::quant
