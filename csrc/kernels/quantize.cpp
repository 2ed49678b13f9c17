// Asymmetric uniform quantization kernels; conventions in quantize.hpp.
//
// Optimized path: the hot loops below are plain per-element loops with __restrict pointers and
// ternary clamps so GCC vectorizes them; target_clones picks AVX2 or the SSE2 baseline at run
// time. Rounding half to even uses the float32 "magic number" trick, (v + 1.5*2^23) - 1.5*2^23,
// which is exact round-half-even in the default rounding mode for |v| < 2^22; v is clamped to
// the code range first (|v| <= 2^16), and clamping before rounding equals clamping after it
// because the clamp bounds are integers and rounding is monotone. NaN/Inf inputs are detected
// in the same pass (an OR-reduction) so validation costs no extra pass over the data.
#include "kernels/quantize.hpp"

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "kernels/parallel.hpp"

#define PYZEROQ_SIMD_CLONES __attribute__((target_clones("avx2", "default")))

namespace pyzeroq::quant {
namespace {

constexpr float kRoundMagic = 12582912.0f;            // 1.5 * 2^23
constexpr std::size_t kGrain = grain_for_cost(1);  // elements per chunk: one operation each (parallel.hpp)
constexpr float kInf = std::numeric_limits<float>::infinity();

// 1 when x is NaN or +-Inf.
inline unsigned nonfinite(float x) { return !(std::fabs(x) <= FLT_MAX); }

// rne(clamp(x / s, lo, hi)) with integer-valued lo = -zp, hi = qmax - zp; NaN maps to lo.
[[gnu::always_inline]] inline float code_offset(float x, float s, float lo, float hi) {
  float v = x / s;
  v = v > lo ? v : lo;
  v = v < hi ? v : hi;
  return (v + kRoundMagic) - kRoundMagic;
}

// Per-channel constants in the form the loops use.
struct ChannelTable {
  std::vector<float> scale, lo, hi, zp, real_lo, real_hi;
  ChannelTable(std::size_t channels, const AffineParams& p)
      : scale(channels), lo(channels), hi(channels), zp(channels), real_lo(channels), real_hi(channels) {
    for (std::size_t c = 0; c < channels; ++c) {
      const std::int32_t z = p.zero_point[c];
      scale[c] = p.scale[c];
      zp[c] = static_cast<float>(z);
      lo[c] = static_cast<float>(-z);
      hi[c] = static_cast<float>(p.qmax - z);
      real_lo[c] = scale[c] * static_cast<float>(0 - z);       // scale * (0 - zp)
      real_hi[c] = scale[c] * static_cast<float>(p.qmax - z);  // scale * (qmax - zp)
    }
  }
};

// One channel's parameters over a contiguous run ("scalar") or one parameter per element
// ("vec": used when inner == 1, where consecutive elements belong to consecutive channels).
// ---------------------------------------------------------------- quantize
template <class Code>
[[gnu::always_inline]] inline unsigned quant_scalar(const float* __restrict x, Code* __restrict q, std::size_t n,
                                                    float s, float lo, float hi, float zp) {
  unsigned bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    bad |= nonfinite(x[i]);
    q[i] = static_cast<Code>(static_cast<std::int32_t>(code_offset(x[i], s, lo, hi) + zp));
  }
  return bad;
}
template <class Code>
[[gnu::always_inline]] inline unsigned quant_vec(const float* __restrict x, Code* __restrict q, std::size_t n,
                                                 const float* __restrict s, const float* __restrict lo,
                                                 const float* __restrict hi, const float* __restrict zp) {
  unsigned bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    bad |= nonfinite(x[i]);
    q[i] = static_cast<Code>(static_cast<std::int32_t>(code_offset(x[i], s[i], lo[i], hi[i]) + zp[i]));
  }
  return bad;
}
PYZEROQ_SIMD_CLONES unsigned quant_scalar_u8(const float* x, std::uint8_t* q, std::size_t n, float s, float lo,
                                             float hi, float zp) {
  return quant_scalar(x, q, n, s, lo, hi, zp);
}
PYZEROQ_SIMD_CLONES unsigned quant_scalar_u16(const float* x, std::uint16_t* q, std::size_t n, float s, float lo,
                                              float hi, float zp) {
  return quant_scalar(x, q, n, s, lo, hi, zp);
}
PYZEROQ_SIMD_CLONES unsigned quant_vec_u8(const float* x, std::uint8_t* q, std::size_t n, const float* s,
                                          const float* lo, const float* hi, const float* zp) {
  return quant_vec(x, q, n, s, lo, hi, zp);
}
PYZEROQ_SIMD_CLONES unsigned quant_vec_u16(const float* x, std::uint16_t* q, std::size_t n, const float* s,
                                           const float* lo, const float* hi, const float* zp) {
  return quant_vec(x, q, n, s, lo, hi, zp);
}
unsigned quant_scalar_any(const float* x, std::uint8_t* q, std::size_t n, float s, float lo, float hi, float zp) {
  return quant_scalar_u8(x, q, n, s, lo, hi, zp);
}
unsigned quant_scalar_any(const float* x, std::uint16_t* q, std::size_t n, float s, float lo, float hi, float zp) {
  return quant_scalar_u16(x, q, n, s, lo, hi, zp);
}
unsigned quant_vec_any(const float* x, std::uint8_t* q, std::size_t n, const float* s, const float* lo,
                       const float* hi, const float* zp) {
  return quant_vec_u8(x, q, n, s, lo, hi, zp);
}
unsigned quant_vec_any(const float* x, std::uint16_t* q, std::size_t n, const float* s, const float* lo,
                       const float* hi, const float* zp) {
  return quant_vec_u16(x, q, n, s, lo, hi, zp);
}

// ---------------------------------------------------------------- dequantize
template <class Code>
[[gnu::always_inline]] inline void deq_scalar(const Code* __restrict q, float* __restrict y, std::size_t n, float s,
                                              float zp) {
  for (std::size_t i = 0; i < n; ++i) y[i] = s * (static_cast<float>(q[i]) - zp);
}
template <class Code>
[[gnu::always_inline]] inline void deq_vec(const Code* __restrict q, float* __restrict y, std::size_t n,
                                           const float* __restrict s, const float* __restrict zp) {
  for (std::size_t i = 0; i < n; ++i) y[i] = s[i] * (static_cast<float>(q[i]) - zp[i]);
}
PYZEROQ_SIMD_CLONES void deq_scalar_u8(const std::uint8_t* q, float* y, std::size_t n, float s, float zp) {
  deq_scalar(q, y, n, s, zp);
}
PYZEROQ_SIMD_CLONES void deq_scalar_u16(const std::uint16_t* q, float* y, std::size_t n, float s, float zp) {
  deq_scalar(q, y, n, s, zp);
}
PYZEROQ_SIMD_CLONES void deq_vec_u8(const std::uint8_t* q, float* y, std::size_t n, const float* s,
                                    const float* zp) {
  deq_vec(q, y, n, s, zp);
}
PYZEROQ_SIMD_CLONES void deq_vec_u16(const std::uint16_t* q, float* y, std::size_t n, const float* s,
                                     const float* zp) {
  deq_vec(q, y, n, s, zp);
}
void deq_scalar_any(const std::uint8_t* q, float* y, std::size_t n, float s, float zp) {
  deq_scalar_u8(q, y, n, s, zp);
}
void deq_scalar_any(const std::uint16_t* q, float* y, std::size_t n, float s, float zp) {
  deq_scalar_u16(q, y, n, s, zp);
}
void deq_vec_any(const std::uint8_t* q, float* y, std::size_t n, const float* s, const float* zp) {
  deq_vec_u8(q, y, n, s, zp);
}
void deq_vec_any(const std::uint16_t* q, float* y, std::size_t n, const float* s, const float* zp) {
  deq_vec_u16(q, y, n, s, zp);
}

// ---------------------------------------------------------------- fake quantize
PYZEROQ_SIMD_CLONES unsigned fq_scalar(const float* __restrict x, float* __restrict y, std::size_t n, float s,
                                       float lo, float hi) {
  unsigned bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    bad |= nonfinite(x[i]);
    y[i] = s * code_offset(x[i], s, lo, hi);  // s * (q - zp); q - zp is the rounded offset
  }
  return bad;
}
PYZEROQ_SIMD_CLONES unsigned fq_vec(const float* __restrict x, float* __restrict y, std::size_t n,
                                    const float* __restrict s, const float* __restrict lo,
                                    const float* __restrict hi) {
  unsigned bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    bad |= nonfinite(x[i]);
    y[i] = s[i] * code_offset(x[i], s[i], lo[i], hi[i]);
  }
  return bad;
}

// ---------------------------------------------------------------- straight-through gradient
PYZEROQ_SIMD_CLONES void ste_scalar(const float* __restrict dy, const float* __restrict x, float* __restrict dx,
                                    std::size_t n, float lo, float hi) {
  for (std::size_t i = 0; i < n; ++i) dx[i] = (x[i] >= lo && x[i] <= hi) ? dy[i] : 0.0f;
}
PYZEROQ_SIMD_CLONES void ste_vec(const float* __restrict dy, const float* __restrict x, float* __restrict dx,
                                 std::size_t n, const float* __restrict lo, const float* __restrict hi) {
  for (std::size_t i = 0; i < n; ++i) dx[i] = (x[i] >= lo[i] && x[i] <= hi[i]) ? dy[i] : 0.0f;
}

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

// ---------------------------------------------------------------- driver
// Channels == 1 means one parameter set for everything: fold outer into inner.
Layout normalized(const Layout& l) {
  if (l.channels == 1) return Layout{1, 1, l.outer * l.inner};
  return l;
}

// Splits [0, n) over threads; each chunk is cut into runs of constant channel (scalar(i, len, c))
// or, when inner == 1, into runs over consecutive channels (vec(i, len, first_channel)).
// Returns true when any run reported a non-finite value.
template <class Scalar, class Vec>
bool run_segments(const Layout& l, Scalar&& scalar, Vec&& vec) {
  std::atomic<bool> any_bad{false};
  const std::size_t channels = l.channels, inner = l.inner;
  parallel_for(l.size(), kGrain, [&](std::size_t begin, std::size_t end) {
    unsigned bad = 0;
    std::size_t i = begin;
    if (inner == 1 && channels > 1) {
      while (i < end) {
        const std::size_t c = i % channels;
        const std::size_t len = std::min(end - i, channels - c);
        bad |= vec(i, len, c);
        i += len;
      }
    } else {
      while (i < end) {
        const std::size_t row = i / inner;
        const std::size_t len = std::min(end, (row + 1) * inner) - i;
        bad |= scalar(i, len, row % channels);
        i += len;
      }
    }
    if (bad) any_bad.store(true, std::memory_order_relaxed);
  });
  return any_bad.load();
}

template <class Code>
bool quantize_impl(const float* x, Code* q, const Layout& layout, const AffineParams& p) {
  const Layout l = normalized(layout);
  const ChannelTable t(l.channels, p);
  return run_segments(
      l,
      [&](std::size_t i, std::size_t n, std::size_t c) {
        return quant_scalar_any(x + i, q + i, n, t.scale[c], t.lo[c], t.hi[c], t.zp[c]);
      },
      [&](std::size_t i, std::size_t n, std::size_t c) {
        return quant_vec_any(x + i, q + i, n, &t.scale[c], &t.lo[c], &t.hi[c], &t.zp[c]);
      });
}

template <class Code>
void dequantize_impl(const Code* q, float* y, const Layout& layout, const AffineParams& p) {
  const Layout l = normalized(layout);
  const ChannelTable t(l.channels, p);
  run_segments(
      l,
      [&](std::size_t i, std::size_t n, std::size_t c) {
        deq_scalar_any(q + i, y + i, n, t.scale[c], t.zp[c]);
        return 0u;
      },
      [&](std::size_t i, std::size_t n, std::size_t c) {
        deq_vec_any(q + i, y + i, n, &t.scale[c], &t.zp[c]);
        return 0u;
      });
}

// ---------------------------------------------------------------- references (plain loops)
template <class Code>
bool quantize_reference_impl(const float* x, Code* q, const Layout& l, const AffineParams& p) {
  bool bad = false;
  for (std::size_t i = 0; i < l.size(); ++i) {
    const std::size_t c = (i / l.inner) % l.channels;
    if (!std::isfinite(x[i])) {
      bad = true;
      q[i] = 0;
      continue;
    }
    const float v = x[i] / p.scale[c];  // one float32 division (may overflow to +-inf: clamped)
    const double r = static_cast<double>(std::nearbyint(v)) + p.zero_point[c];
    q[i] = static_cast<Code>(r < 0 ? 0.0 : (r > p.qmax ? static_cast<double>(p.qmax) : r));
  }
  return bad;
}

template <class Code>
void dequantize_reference_impl(const Code* q, float* y, const Layout& l, const AffineParams& p) {
  for (std::size_t i = 0; i < l.size(); ++i) {
    const std::size_t c = (i / l.inner) % l.channels;
    y[i] = p.scale[c] * static_cast<float>(static_cast<std::int32_t>(q[i]) - p.zero_point[c]);
  }
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

}  // namespace

bool quantize(const float* x, std::uint8_t* q, const Layout& l, const AffineParams& p) {
  return quantize_impl(x, q, l, p);
}
bool quantize(const float* x, std::uint16_t* q, const Layout& l, const AffineParams& p) {
  return quantize_impl(x, q, l, p);
}
void dequantize(const std::uint8_t* q, float* y, const Layout& l, const AffineParams& p) {
  dequantize_impl(q, y, l, p);
}
void dequantize(const std::uint16_t* q, float* y, const Layout& l, const AffineParams& p) {
  dequantize_impl(q, y, l, p);
}

bool fake_quantize(const float* x, float* y, const Layout& layout, const AffineParams& p) {
  const Layout l = normalized(layout);
  const ChannelTable t(l.channels, p);
  return run_segments(
      l,
      [&](std::size_t i, std::size_t n, std::size_t c) {
        return fq_scalar(x + i, y + i, n, t.scale[c], t.lo[c], t.hi[c]);
      },
      [&](std::size_t i, std::size_t n, std::size_t c) {
        return fq_vec(x + i, y + i, n, &t.scale[c], &t.lo[c], &t.hi[c]);
      });
}

void ste_grad(const float* dy, const float* x, float* dx, const Layout& layout, const AffineParams& p) {
  const Layout l = normalized(layout);
  const ChannelTable t(l.channels, p);
  run_segments(
      l,
      [&](std::size_t i, std::size_t n, std::size_t c) {
        ste_scalar(dy + i, x + i, dx + i, n, t.real_lo[c], t.real_hi[c]);
        return 0u;
      },
      [&](std::size_t i, std::size_t n, std::size_t c) {
        ste_vec(dy + i, x + i, dx + i, n, &t.real_lo[c], &t.real_hi[c]);
        return 0u;
      });
}

bool quantize_reference(const float* x, std::uint8_t* q, const Layout& l, const AffineParams& p) {
  return quantize_reference_impl(x, q, l, p);
}
bool quantize_reference(const float* x, std::uint16_t* q, const Layout& l, const AffineParams& p) {
  return quantize_reference_impl(x, q, l, p);
}
void dequantize_reference(const std::uint8_t* q, float* y, const Layout& l, const AffineParams& p) {
  dequantize_reference_impl(q, y, l, p);
}
void dequantize_reference(const std::uint16_t* q, float* y, const Layout& l, const AffineParams& p) {
  dequantize_reference_impl(q, y, l, p);
}

bool fake_quantize_reference(const float* x, float* y, const Layout& l, const AffineParams& p) {
  bool bad = false;
  for (std::size_t i = 0; i < l.size(); ++i) {
    const std::size_t c = (i / l.inner) % l.channels;
    if (!std::isfinite(x[i])) bad = true;
    const float v = x[i] / p.scale[c];
    const double r = static_cast<double>(std::nearbyint(v)) + p.zero_point[c];
    const double code = std::isnan(r) ? 0.0 : (r < 0 ? 0.0 : (r > p.qmax ? static_cast<double>(p.qmax) : r));
    y[i] = p.scale[c] * static_cast<float>(static_cast<std::int32_t>(code) - p.zero_point[c]);
  }
  return bad;
}

bool asymmetric_params(const float* x, const Layout& layout, int bits, double percentile, float* scale,
                       std::int32_t* zero_point) {
  const Layout l = normalized(layout);
  const std::size_t channels = l.channels;
  std::vector<double> lo(channels, 0.0), hi(channels, 0.0);
  std::atomic<bool> any_bad{false};
  if (percentile < 0.0) {
    std::vector<float> mn(channels, kInf), mx(channels, -kInf);
    std::mutex merge;
    const std::size_t inner = l.inner;
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
    for (std::size_t c = 0; c < channels; ++c) {
      if (mn[c] <= mx[c]) {  // channel not empty
        lo[c] = mn[c];
        hi[c] = mx[c];
      }
    }
  } else {
    const double q_hi = percentile / kPercentScale;
    const double q_lo = (kPercentScale - percentile) / kPercentScale;
    const std::size_t per_channel = l.outer * l.inner;
    // chunks of whole channels, each of at least kMinParallelWork values
    parallel_for(channels, grain_for_cost(per_channel), [&](std::size_t c_begin, std::size_t c_end) {
      std::vector<double> values(per_channel);
      for (std::size_t c = c_begin; c < c_end; ++c) {
        if (per_channel == 0) continue;
        unsigned bad = 0;
        std::size_t k = 0;
        for (std::size_t o = 0; o < l.outer; ++o) {
          const float* row = x + (o * channels + c) * l.inner;
          for (std::size_t j = 0; j < l.inner; ++j) {
            bad |= nonfinite(row[j]);
            values[k++] = row[j];
          }
        }
        if (bad) {
          any_bad.store(true, std::memory_order_relaxed);
          return;
        }
        lo[c] = percentile_linear(values, q_lo);
        hi[c] = percentile_linear(values, q_hi);
      }
    });
  }
  if (any_bad.load()) return true;
  for (std::size_t c = 0; c < channels; ++c) params_from_range(lo[c], hi[c], bits, scale + c, zero_point + c);
  return false;
}

}  // namespace pyzeroq::quant
