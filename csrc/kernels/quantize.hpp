// Uniform affine quantization kernels (pure C++, no Python headers).
//
// Conventions (DESIGN.md, one meaning everywhere):
//   q    = clamp(round_half_even(x / scale) + zp, qmin, qmax)   x / scale: ONE float32 division
//   real = scale * (q - zp)                                     one float32 multiply
// Code ranges (code_range()):
//   unsigned: [0, 2^bits - 1], stored in uint8 (bits 2..8) or uint16 (9..16)
//   signed  : [-2^(bits-1), 2^(bits-1) - 1], stored in int8 / int16
//   narrow_range raises qmin by one (unsigned [1, 2^bits - 1], signed [-2^(bits-1) + 1, ...]:
//   the symmetric-weight range of TFLite / TensorRT).
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

// [qmin, qmax] of bits-bit codes (see the header comment).
struct CodeRange {
  std::int32_t qmin = 0;
  std::int32_t qmax = 255;
};
inline CodeRange code_range(int bits, bool is_signed, bool narrow_range) {
  CodeRange r;
  if (is_signed) {
    r.qmin = -(std::int32_t{1} << (bits - 1));
    r.qmax = (std::int32_t{1} << (bits - 1)) - 1;
  } else {
    r.qmin = 0;
    r.qmax = qmax_for_bits(bits);
  }
  if (narrow_range) r.qmin += 1;
  return r;
}
// Largest magnitude of a symmetric code: 2^(bits-1) - 1 (127 for 8 bits), for signed and unsigned.
inline std::int32_t symmetric_qmax(int bits) { return (std::int32_t{1} << (bits - 1)) - 1; }

// Shape seen as [outer, channels, inner].
struct Layout {
  std::size_t outer = 1;
  std::size_t channels = 1;
  std::size_t inner = 1;
  std::size_t size() const { return outer * channels * inner; }
};

// Per-channel affine parameters; both arrays hold `channels` entries (validated by the caller:
// scale finite and > 0, qmin <= zero_point <= qmax, and [qmin, qmax] within the code type).
struct AffineParams {
  const float* scale = nullptr;
  const std::int32_t* zero_point = nullptr;
  std::int32_t qmin = 0;
  std::int32_t qmax = 255;
};

// All kernels return true when some input value was NaN or +-Inf (outputs for those
// elements are then unspecified but defined; the caller raises). Multi-threaded.

// q = clamp(rne(x / s) + zp, qmin, qmax)
bool quantize(const float* x, std::uint8_t* q, const Layout& layout, const AffineParams& p);
bool quantize(const float* x, std::uint16_t* q, const Layout& layout, const AffineParams& p);
bool quantize(const float* x, std::int8_t* q, const Layout& layout, const AffineParams& p);
bool quantize(const float* x, std::int16_t* q, const Layout& layout, const AffineParams& p);
// y = s * (q - zp)   (p.qmin / p.qmax unused)
void dequantize(const std::uint8_t* q, float* y, const Layout& layout, const AffineParams& p);
void dequantize(const std::uint16_t* q, float* y, const Layout& layout, const AffineParams& p);
void dequantize(const std::int8_t* q, float* y, const Layout& layout, const AffineParams& p);
void dequantize(const std::int16_t* q, float* y, const Layout& layout, const AffineParams& p);
// y = s * (clamp(rne(x / s) + zp, qmin, qmax) - zp)
bool fake_quantize(const float* x, float* y, const Layout& layout, const AffineParams& p);
// Straight-through estimator: dx = (s*(qmin-zp) <= x <= s*(qmax-zp)) ? dy : 0
void ste_grad(const float* dy, const float* x, float* dx, const Layout& layout, const AffineParams& p);

bool quantize_reference(const float* x, std::uint8_t* q, const Layout& layout, const AffineParams& p);
bool quantize_reference(const float* x, std::uint16_t* q, const Layout& layout, const AffineParams& p);
bool quantize_reference(const float* x, std::int8_t* q, const Layout& layout, const AffineParams& p);
bool quantize_reference(const float* x, std::int16_t* q, const Layout& layout, const AffineParams& p);
void dequantize_reference(const std::uint8_t* q, float* y, const Layout& layout, const AffineParams& p);
void dequantize_reference(const std::uint16_t* q, float* y, const Layout& layout, const AffineParams& p);
void dequantize_reference(const std::int8_t* q, float* y, const Layout& layout, const AffineParams& p);
void dequantize_reference(const std::int16_t* q, float* y, const Layout& layout, const AffineParams& p);
bool fake_quantize_reference(const float* x, float* y, const Layout& layout, const AffineParams& p);
void ste_grad_reference(const float* dy, const float* x, float* dx, const Layout& layout, const AffineParams& p);

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

// Symmetric parameters per channel (TFLite / TensorRT weight rule; onnxruntime's U8 symmetric):
//   percentile < 0 (none): amax = max |x|
//   else                 : amax = P(percentile) of |x|, P = numpy.percentile with method="linear"
//                          on the magnitudes as float64
//   scale = f32(amax / (2^(bits-1) - 1))   (float64 division, one rounding to float32; the same
//                                           divisor for full and narrow range: 127 for 8 bits)
//   zp    = 0 (signed) or 2^(bits-1) (unsigned: the middle code, onnxruntime's U8 symmetric)
//   amax == 0 (all-zero or empty channel) or scale underflowing to 0: scale = 1, zp as above.
// Writes `channels` entries; returns true when a value was NaN or Inf.
bool symmetric_params(const float* x, const Layout& layout, int bits, bool is_signed, double percentile,
                      float* scale, std::int32_t* zero_point);
// Plain single-threaded twin of symmetric_params (tests compare them for equality).
bool symmetric_params_reference(const float* x, const Layout& layout, int bits, bool is_signed, double percentile,
                                float* scale, std::int32_t* zero_point);

}  // namespace pyzeroq::quant
