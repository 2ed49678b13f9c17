// Asymmetric uniform quantization kernels (pure C++, no Python headers).
//
// Conventions (DESIGN.md, one meaning everywhere):
//   q    = clamp(round_half_even(x / scale) + zp, 0, 2^bits - 1)   x / scale: ONE float32 division
//   real = scale * (q - zp)                                        one float32 multiply
// Codes are unsigned: bits 2..8 stored in uint8, 9..16 in uint16.
//
// A tensor is seen as [outer, channels, inner]: channel c owns scale[c] and zero_point[c]
// (per tensor: channels == 1). Every optimized kernel has a plain reference twin
// (`*_reference`) that the tests compare for exact equality.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pyzeroq::quant {

constexpr int kMinBits = 2;
constexpr int kMaxBits = 16;
constexpr int kMaxBitsUint8 = 8;  // bits <= 8 -> uint8 codes, above -> uint16

inline std::int32_t qmax_for_bits(int bits) { return (std::int32_t{1} << bits) - 1; }

// Shape seen as [outer, channels, inner].
struct Layout {
  std::size_t outer = 1;
  std::size_t channels = 1;
  std::size_t inner = 1;
  std::size_t size() const { return outer * channels * inner; }
};

// Per-channel affine parameters; both arrays hold `channels` entries (validated by the caller:
// scale finite and > 0, 0 <= zero_point <= qmax).
struct AffineParams {
  const float* scale = nullptr;
  const std::int32_t* zero_point = nullptr;
  std::int32_t qmax = 255;
};

// All kernels return true when some input value was NaN or +-Inf (outputs for those
// elements are then unspecified but defined; the caller raises). Multi-threaded.

// q = clamp(rne(x / s) + zp, 0, qmax)
bool quantize(const float* x, std::uint8_t* q, const Layout& layout, const AffineParams& p);
bool quantize(const float* x, std::uint16_t* q, const Layout& layout, const AffineParams& p);
// y = s * (q - zp)
void dequantize(const std::uint8_t* q, float* y, const Layout& layout, const AffineParams& p);
void dequantize(const std::uint16_t* q, float* y, const Layout& layout, const AffineParams& p);
// y = s * (clamp(rne(x / s) + zp, 0, qmax) - zp)
bool fake_quantize(const float* x, float* y, const Layout& layout, const AffineParams& p);
// Straight-through estimator: dx = (s*(0-zp) <= x <= s*(qmax-zp)) ? dy : 0
void ste_grad(const float* dy, const float* x, float* dx, const Layout& layout, const AffineParams& p);

bool quantize_reference(const float* x, std::uint8_t* q, const Layout& layout, const AffineParams& p);
bool quantize_reference(const float* x, std::uint16_t* q, const Layout& layout, const AffineParams& p);
void dequantize_reference(const std::uint8_t* q, float* y, const Layout& layout, const AffineParams& p);
void dequantize_reference(const std::uint16_t* q, float* y, const Layout& layout, const AffineParams& p);
bool fake_quantize_reference(const float* x, float* y, const Layout& layout, const AffineParams& p);

// Asymmetric parameters per channel from the clipping range [lo, hi] of the channel's values:
//   percentile < 0 (none): lo = min, hi = max
//   else                 : lo = P(100 - percentile), hi = P(percentile), P = numpy.percentile
//                          with method="linear" on the values as float64
//   lo = min(lo, 0), hi = max(hi, 0)            (real 0 representable)
//   scale = f32((hi - lo) / qmax)   (float64 arithmetic, one rounding to float32)
//   zp    = clamp(rne(-lo / scale), 0, qmax)    (float64)
//   hi == lo (all-zero or empty channel) or scale underflowing to 0: scale = 1, zp = 0.
// Writes `channels` entries to scale/zero_point; returns true when a value was NaN or Inf.
constexpr double kNoPercentile = -1.0;
bool asymmetric_params(const float* x, const Layout& layout, int bits, double percentile, float* scale,
                       std::int32_t* zero_point);

}  // namespace pyzeroq::quant
