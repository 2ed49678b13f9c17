// Uniform affine quantization kernels (unsigned and signed codes); conventions in quantize.hpp.
//
// Optimized path: the hot loops below are plain per-element loops with __restrict pointers and
// ternary clamps so GCC vectorizes them; target_clones picks AVX2 or the SSE2 baseline at run
// time. Rounding half to even uses the float32 "magic number" trick, (v + 1.5*2^23) - 1.5*2^23,
// which is exact round-half-even in the default rounding mode for |v| < 2^22; v is clamped to
// the code range first (|v| <= 2^17 - 1), and clamping before rounding equals clamping after it
// because the clamp bounds are integers and rounding is monotone. NaN/Inf inputs are detected
// in the same pass (an OR-reduction) so validation costs no extra pass over the data.
#include "kernels/quantize.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "kernels/quantize_common.hpp"

namespace pyzeroq::quant {
namespace {

using detail::kGrain;
using detail::nonfinite;
using detail::normalized;

constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

// rne(clamp(x / s, lo, hi)) with integer-valued lo = qmin - zp, hi = qmax - zp; NaN maps to lo.
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
      lo[c] = static_cast<float>(p.qmin - z);
      hi[c] = static_cast<float>(p.qmax - z);
      real_lo[c] = scale[c] * static_cast<float>(p.qmin - z);  // scale * (qmin - zp)
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
// One SIMD-cloned entry point per code type (target_clones needs plain functions), and an
// overload set *_any that picks it by the code pointer's type.
#define PYZEROQ_QUANT_KERNELS(Code, suffix)                                                                     \
  PYZEROQ_SIMD_CLONES unsigned quant_scalar_##suffix(const float* x, Code* q, std::size_t n, float s, float lo,   \
                                                     float hi, float zp) {                                      \
    return quant_scalar(x, q, n, s, lo, hi, zp);                                                                \
  }                                                                                                             \
  PYZEROQ_SIMD_CLONES unsigned quant_vec_##suffix(const float* x, Code* q, std::size_t n, const float* s,         \
                                                  const float* lo, const float* hi, const float* zp) {          \
    return quant_vec(x, q, n, s, lo, hi, zp);                                                                   \
  }                                                                                                             \
  unsigned quant_scalar_any(const float* x, Code* q, std::size_t n, float s, float lo, float hi, float zp) {      \
    return quant_scalar_##suffix(x, q, n, s, lo, hi, zp);                                                        \
  }                                                                                                             \
  unsigned quant_vec_any(const float* x, Code* q, std::size_t n, const float* s, const float* lo, const float* hi, \
                         const float* zp) {                                                                     \
    return quant_vec_##suffix(x, q, n, s, lo, hi, zp);                                                          \
  }
PYZEROQ_QUANT_KERNELS(std::uint8_t, u8)
PYZEROQ_QUANT_KERNELS(std::uint16_t, u16)
PYZEROQ_QUANT_KERNELS(std::int8_t, s8)
PYZEROQ_QUANT_KERNELS(std::int16_t, s16)
#undef PYZEROQ_QUANT_KERNELS

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
#define PYZEROQ_DEQUANT_KERNELS(Code, suffix)                                                                 \
  PYZEROQ_SIMD_CLONES void deq_scalar_##suffix(const Code* q, float* y, std::size_t n, float s, float zp) {    \
    deq_scalar(q, y, n, s, zp);                                                                              \
  }                                                                                                          \
  PYZEROQ_SIMD_CLONES void deq_vec_##suffix(const Code* q, float* y, std::size_t n, const float* s,            \
                                            const float* zp) {                                               \
    deq_vec(q, y, n, s, zp);                                                                                 \
  }                                                                                                          \
  void deq_scalar_any(const Code* q, float* y, std::size_t n, float s, float zp) {                             \
    deq_scalar_##suffix(q, y, n, s, zp);                                                                     \
  }                                                                                                          \
  void deq_vec_any(const Code* q, float* y, std::size_t n, const float* s, const float* zp) {                  \
    deq_vec_##suffix(q, y, n, s, zp);                                                                        \
  }
PYZEROQ_DEQUANT_KERNELS(std::uint8_t, u8)
PYZEROQ_DEQUANT_KERNELS(std::uint16_t, u16)
PYZEROQ_DEQUANT_KERNELS(std::int8_t, s8)
PYZEROQ_DEQUANT_KERNELS(std::int16_t, s16)
#undef PYZEROQ_DEQUANT_KERNELS

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

// ---------------------------------------------------------------- driver
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
inline double clamp_code(double r, const AffineParams& p) {
  return r < p.qmin ? static_cast<double>(p.qmin) : (r > p.qmax ? static_cast<double>(p.qmax) : r);
}

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
    q[i] = static_cast<Code>(clamp_code(r, p));
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

}  // namespace

#define PYZEROQ_CODE_ENTRY_POINTS(Code)                                                  \
  bool quantize(const float* x, Code* q, const Layout& l, const AffineParams& p) {       \
    return quantize_impl(x, q, l, p);                                                    \
  }                                                                                      \
  void dequantize(const Code* q, float* y, const Layout& l, const AffineParams& p) {     \
    dequantize_impl(q, y, l, p);                                                         \
  }                                                                                      \
  bool quantize_reference(const float* x, Code* q, const Layout& l, const AffineParams& p) { \
    return quantize_reference_impl(x, q, l, p);                                          \
  }                                                                                      \
  void dequantize_reference(const Code* q, float* y, const Layout& l, const AffineParams& p) { \
    dequantize_reference_impl(q, y, l, p);                                               \
  }
PYZEROQ_CODE_ENTRY_POINTS(std::uint8_t)
PYZEROQ_CODE_ENTRY_POINTS(std::uint16_t)
PYZEROQ_CODE_ENTRY_POINTS(std::int8_t)
PYZEROQ_CODE_ENTRY_POINTS(std::int16_t)
#undef PYZEROQ_CODE_ENTRY_POINTS

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

bool fake_quantize_reference(const float* x, float* y, const Layout& l, const AffineParams& p) {
  bool bad = false;
  for (std::size_t i = 0; i < l.size(); ++i) {
    const std::size_t c = (i / l.inner) % l.channels;
    if (!std::isfinite(x[i])) bad = true;
    const float v = x[i] / p.scale[c];
    const double r = static_cast<double>(std::nearbyint(v)) + p.zero_point[c];
    const double code = std::isnan(r) ? static_cast<double>(p.qmin) : clamp_code(r, p);
    y[i] = p.scale[c] * static_cast<float>(static_cast<std::int32_t>(code) - p.zero_point[c]);
  }
  return bad;
}

void ste_grad_reference(const float* dy, const float* x, float* dx, const Layout& l, const AffineParams& p) {
  for (std::size_t i = 0; i < l.size(); ++i) {
    const std::size_t c = (i / l.inner) % l.channels;
    const float lo = p.scale[c] * static_cast<float>(p.qmin - p.zero_point[c]);
    const float hi = p.scale[c] * static_cast<float>(p.qmax - p.zero_point[c]);
    dx[i] = (x[i] >= lo && x[i] <= hi) ? dy[i] : 0.0f;
  }
}

}  // namespace pyzeroq::quant
