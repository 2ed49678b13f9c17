// Integer ALU simulator: requantization and accumulator model (pure C++).
//
// Every function here is exact integer / IEEE float32 arithmetic, so the
// reference loops and the fast kernels that share these helpers agree bit for bit.
// No FMA target is ever enabled in the integer_* sources (a contracted
// multiply-add would change float32_rne results).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/parallel.hpp"

namespace pyzeroq {
namespace integer {

enum class Rounding { Float32Rne, Gemmlowp, Dyadic };
// Tie rule of the dyadic shift: half_even (torch.round / HAWQ-V3's fixed-point
// multiply), half_up = ties toward +inf (floor(v + 1/2), the "add 2^(n-1) then
// arithmetic shift" of most accelerators), half_away = ties away from zero.
enum class DyadicRound { HalfEven, HalfUp, HalfAway };
enum class Overflow { Wrap, Saturate, Error };

constexpr int kQ31Bits = 31;
constexpr int kMaxDyadicShift = 62;       // b * acc must fit int64 (|acc| < 2^31, b < 2^32)
constexpr int kMaxDyadicBits = 32;
constexpr int kMaxGemmlowpLeftShift = 30;  // TFLite QuantizeMultiplier clamps shift to 30
// 1.5 * 2^23: adding it to a float32 of magnitude <= 2^22 rounds to an integer,
// half to even (the MLAS_ROUNDING_BIAS_MAGIC trick of onnxruntime's requantizer).
constexpr float kRoundMagic = 12582912.0f;

struct RequantSpec {
  Rounding mode = Rounding::Float32Rne;
  DyadicRound dyadic_round = DyadicRound::HalfEven;
  int dyadic_bits = 31;   // bits of the normalized integer b (when dyadic_shift < 0)
  int dyadic_shift = -1;  // >= 0: fixed n, b = round(M * 2^n)
};

// One output channel's multiplier in every representation the modes use.
struct ChannelMultiplier {
  float m32 = 0.0f;   // float32_rne: M as float32
  int32_t q31 = 0;    // gemmlowp: Q31 significand
  int shift = 0;      // gemmlowp: exponent (>0 left shift, <0 rounding right shift)
  int64_t dy_b = 0;   // dyadic: M ~ dy_b / 2^dy_n
  int dy_n = 0;
};

// TFLite QuantizeMultiplier(double): M = q31 * 2^(shift - 31), q31 in [2^30, 2^31).
// frexp, std::round (half away from zero) of the significand, renormalize on
// carry, flush tiny multipliers to 0, clamp huge ones to shift 30.
inline void quantize_multiplier(double m, int32_t* q31, int* shift) {
  if (m == 0.0) {
    *q31 = 0;
    *shift = 0;
    return;
  }
  int e = 0;
  const double f = std::frexp(m, &e);
  int64_t q = static_cast<int64_t>(std::round(f * static_cast<double>(int64_t{1} << kQ31Bits)));
  if (q == (int64_t{1} << kQ31Bits)) {
    q /= 2;
    ++e;
  }
  if (e < -kQ31Bits) {
    e = 0;
    q = 0;
  }
  if (e > kMaxGemmlowpLeftShift) {
    e = kMaxGemmlowpLeftShift;
    q = (int64_t{1} << kQ31Bits) - 1;
  }
  *q31 = static_cast<int32_t>(q);
  *shift = e;
}

// Dyadic multiplier M ~ b / 2^n. Fixed shift n: b = round_half_even(M * 2^n).
// Otherwise b is normalized to `bits` bits (HAWQ-V3 style: M = f*2^e, f in
// [0.5,1), b = round_half_even(f*2^bits), n = bits - e), n clamped to [0, 62].
inline void dyadic_multiplier(double m, int bits, int fixed_shift, int64_t* b, int* n) {
  int shift = fixed_shift;
  if (shift < 0) {
    int e = 0;
    std::frexp(m, &e);
    shift = bits - e;
  }
  if (shift > kMaxDyadicShift) shift = kMaxDyadicShift;
  if (shift < 0) shift = 0;
  const double scaled = std::nearbyint(std::ldexp(m, shift));
  if (!(scaled < std::ldexp(1.0, kMaxDyadicBits)))
    throw std::invalid_argument("dyadic multiplier b = round(M * 2^n) does not fit 32 bits; use a smaller dyadic_shift");
  *b = static_cast<int64_t>(scaled);
  *n = shift;
}

// m32: the float32 multiplier f32(f32(sx*sw)/sy); m64: the same in double
// (sx*sw/sy, TFLite's effective_output_scale) used by gemmlowp and dyadic.
inline ChannelMultiplier make_multiplier(const RequantSpec& spec, float m32, double m64) {
  ChannelMultiplier c;
  c.m32 = m32;
  if (spec.mode == Rounding::Gemmlowp) quantize_multiplier(m64, &c.q31, &c.shift);
  if (spec.mode == Rounding::Dyadic) dyadic_multiplier(m64, spec.dyadic_bits, spec.dyadic_shift, &c.dy_b, &c.dy_n);
  return c;
}

// gemmlowp SaturatingRoundingDoublingHighMul: round(a*b / 2^31) via the nudge
// (+2^30 for ab >= 0, 1 - 2^30 below) and truncating division, so ties go
// toward +inf (9.5 -> 10, -9.5 -> -9); INT32_MIN * INT32_MIN saturates.
inline int32_t srdhm(int32_t a, int32_t b) {
  if (a == b && a == std::numeric_limits<int32_t>::min()) return std::numeric_limits<int32_t>::max();
  const int64_t ab = static_cast<int64_t>(a) * static_cast<int64_t>(b);
  const int64_t nudge = ab >= 0 ? (int64_t{1} << 30) : (1 - (int64_t{1} << 30));
  return static_cast<int32_t>((ab + nudge) / (int64_t{1} << kQ31Bits));
}

// gemmlowp RoundingDivideByPOT: x / 2^e rounded half away from zero.
inline int32_t rounding_divide_by_pot(int32_t x, int e) {
  if (e <= 0) return x;
  const int64_t mask = (int64_t{1} << e) - 1;
  const int64_t remainder = static_cast<int64_t>(x) & mask;
  const int64_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
  return static_cast<int32_t>((static_cast<int64_t>(x) >> e) + (remainder > threshold ? 1 : 0));
}

// TFLite MultiplyByQuantizedMultiplier (double-rounding reference form):
// RoundingDivideByPOT(SRDHM(x * 2^left, q31), right). The left shift wraps
// modulo 2^32 like the int32 multiply of the reference kernel.
inline int32_t multiply_by_quantized_multiplier(int32_t x, int32_t q31, int shift) {
  const int left = shift > 0 ? shift : 0;
  const int right = shift > 0 ? 0 : -shift;
  const int32_t shifted = static_cast<int32_t>(static_cast<uint32_t>(x) << left);
  return rounding_divide_by_pot(srdhm(shifted, q31), right);
}

// Exact round(p / 2^n) for int64 p with the chosen tie rule.
inline int64_t round_shift(int64_t p, int n, DyadicRound r) {
  if (n <= 0) return p;
  const int64_t q = p >> n;  // floor (arithmetic shift)
  const int64_t rem = static_cast<int64_t>(static_cast<uint64_t>(p) & ((uint64_t{1} << n) - 1));  // p - q * 2^n
  const int64_t half = int64_t{1} << (n - 1);
  switch (r) {
    case DyadicRound::HalfUp: return q + (rem >= half ? 1 : 0);
    case DyadicRound::HalfAway: return q + ((rem > half || (rem == half && p >= 0)) ? 1 : 0);
    case DyadicRound::HalfEven: default: return q + ((rem > half || (rem == half && (q & 1))) ? 1 : 0);
  }
}

// Requantizer: int32 accumulator -> output code in [lo, hi] (lo = zero point with relu).
//  float32_rne (onnxruntime MlasRequantizeOutput, torch fbgemm/qnnpack requantize):
//      v = f32(acc) * m32 (one float32 multiply), clamped to [lo-zp, hi-zp],
//      rounded half to even, + zp.
//  gemmlowp (TFLite reference kernels):
//      MultiplyByQuantizedMultiplier(acc, q31, shift) + zp, clamped.
//  dyadic (HAWQ-V3): round(acc * b / 2^n) with the tie rule, + zp, clamped.
struct Requantizer {
  RequantSpec spec;
  int32_t zero_point = 0;
  int32_t lo = 0;
  int32_t hi = 255;
  std::vector<ChannelMultiplier> ch;

  int32_t apply(int32_t acc, std::size_t c) const {
    const ChannelMultiplier& m = ch[c];
    int64_t v;
    switch (spec.mode) {
      case Rounding::Float32Rne: {
        float f = static_cast<float>(acc) * m.m32;
        const float flo = static_cast<float>(lo - zero_point);
        const float fhi = static_cast<float>(hi - zero_point);
        f = f < flo ? flo : f;
        f = f > fhi ? fhi : f;
        // volatile-free magic rounding: exact for |f| <= 2^22 (guaranteed by the clamp)
        const float r = (f + kRoundMagic) - kRoundMagic;
        return static_cast<int32_t>(r) + zero_point;
      }
      case Rounding::Gemmlowp:
        v = static_cast<int64_t>(multiply_by_quantized_multiplier(acc, m.q31, m.shift)) + zero_point;
        break;
      case Rounding::Dyadic:
      default:
        v = round_shift(static_cast<int64_t>(acc) * m.dy_b, m.dy_n, spec.dyadic_round) + zero_point;
        break;
    }
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    return static_cast<int32_t>(v);
  }
};

// Accumulator of `bits` bits (2..32). Wrap: two's-complement modulo 2^bits
// (order independent). Saturate: clamp after every addition (order dependent,
// see the conv kernels for the order). Error: like wrap, caller raises.
struct AccModel {
  int bits = 32;
  Overflow mode = Overflow::Wrap;
  int64_t min() const { return -(int64_t{1} << (bits - 1)); }
  int64_t max() const { return (int64_t{1} << (bits - 1)) - 1; }
  bool fits(int64_t v) const { return v >= min() && v <= max(); }
  int64_t wrap(int64_t v) const {
    const uint64_t mask = (uint64_t{1} << bits) - 1;
    uint64_t u = static_cast<uint64_t>(v) & mask;
    if (u >> (bits - 1)) u |= ~mask;
    return static_cast<int64_t>(u);
  }
  int64_t saturate(int64_t v) const { return v < min() ? min() : (v > max() ? max() : v); }
};

// max |acc|, the signed bits needed to hold every final accumulator value,
// and how many outputs overflowed acc_bits.
struct AccStats {
  int64_t max_abs = 0;
  int64_t min_acc = 0;
  int64_t max_acc = 0;
  int64_t overflow_count = 0;
  void add(int64_t v) {
    min_acc = v < min_acc ? v : min_acc;
    max_acc = v > max_acc ? v : max_acc;
  }
  void merge(const AccStats& o) {
    min_acc = o.min_acc < min_acc ? o.min_acc : min_acc;
    max_acc = o.max_acc > max_acc ? o.max_acc : max_acc;
    overflow_count += o.overflow_count;
  }
  int64_t max_abs_acc() const { return -min_acc > max_acc ? -min_acc : max_acc; }
  int bits_needed() const {
    int b = 1;
    while (b < 64 && !(min_acc >= -(int64_t{1} << (b - 1)) && max_acc <= (int64_t{1} << (b - 1)) - 1)) ++b;
    return b;
  }
};

// Final accumulator value under the wrap/error model, counting overflows.
inline int32_t model_accumulator(int64_t exact, const AccModel& acc, AccStats& st) {
  st.add(exact);
  if (!acc.fits(exact)) {
    ++st.overflow_count;
    return static_cast<int32_t>(acc.wrap(exact));
  }
  return static_cast<int32_t>(exact);
}

inline std::string overflow_message(const AccStats& st, const AccModel& acc) {
  return "accumulator overflow: " + std::to_string(st.overflow_count) + " accumulator values exceed acc_bits=" +
         std::to_string(acc.bits) + "; bits needed: " + std::to_string(st.bits_needed()) +
         " (max |acc| = " + std::to_string(st.max_abs_acc()) + ")";
}

}  // namespace integer
}  // namespace pyzeroq
