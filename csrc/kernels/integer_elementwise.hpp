// Integer ALU simulator: requantize, residual add, pooling (pure C++).
#pragma once
#include <cstdint>

#include "kernels/integer_requant.hpp"

namespace pyzeroq {
namespace integer {

// Output codes: uint8 (out_bits <= 8) or uint16.
struct CodeOut {
  void* y = nullptr;
  bool y16 = false;
  void store(int64_t i, int32_t v) const {
    if (y16)
      static_cast<uint16_t*>(y)[i] = static_cast<uint16_t>(v);
    else
      static_cast<uint8_t*>(y)[i] = static_cast<uint8_t>(v);
  }
};

// y[o, c, i] = rq.apply(acc[o, c, i], c) for acc viewed as [outer, channels, inner].
void requantize_tensor(const int32_t* acc, int64_t outer, int64_t channels, int64_t inner, const Requantizer& rq,
                       CodeOut out);

// Residual add of two code tensors with their own scales, requantized to (sy, zy).
//  float32_rne (onnxruntime MLAS QLinearAdd portable helper):
//      va = f32(sa * (a - za)), vb = f32(sb * (b - zb)),
//      y = clamp(round_half_even(f32(f32(va + vb) / sy)) + zy)
//  gemmlowp (TFLite reference Add, uint8): left_shift = 20,
//      twice_max = 2 * max(sa, sb) (double), ma = sa / twice_max, mb = sb / twice_max,
//      mo = twice_max / (2^20 * sy), each QuantizeMultiplier'd;
//      s = MBQM((a - za) << 20, ma) + MBQM((b - zb) << 20, mb);
//      y = clamp(MBQM(s, mo) + zy)
//  dyadic: one shared shift n (dyadic_shift, or chosen so max(ba, bb) has
//      dyadic_bits bits), ba = round(sa/sy * 2^n), bb = round(sb/sy * 2^n) (half even):
//      y = clamp(round_shift((a - za) * ba + (b - zb) * bb, n) + zy)  (one rounding)
struct QAddParams {
  float sa = 1, sb = 1, sy = 1;
  int32_t za = 0, zb = 0, zy = 0;
  int32_t lo = 0, hi = 255;  // output clamp (lo = zy with relu)
  RequantSpec spec;
};
constexpr int kQAddLeftShift = 20;
void qadd(const uint8_t* a, const uint8_t* b, int64_t n, const QAddParams& p, CodeOut out);

// Elementwise product of two same-shape code tensors (squeeze-excite gating), requantized
// to (sy, zy); the parameters and clamp are QAddParams'.
//  float32_rne (the fake-quant model's float formula, as qadd):
//      va = f32(sa * (a - za)), vb = f32(sb * (b - zb)),
//      y = clamp(round_half_even(f32(f32(va * vb) / sy)) + zy)
//  gemmlowp (TFLite reference Mul, uint8): acc = (a - za) * (b - zb) (exact int32),
//      y = clamp(MultiplyByQuantizedMultiplier(acc, QuantizeMultiplier(sa * sb / sy)) + zy)
//  dyadic: M = sa * sb / sy ~ b / 2^n, y = clamp(round(acc * b / 2^n) + zy)
void qmul(const uint8_t* a, const uint8_t* b, int64_t n, const QAddParams& p, CodeOut out);

// Pooling over x [N*C planes, H, W] of codes (same scale / zero point out).
struct PoolGeom {
  int64_t planes = 1, H = 1, W = 1;
  int64_t KH = 1, KW = 1, sh = 1, sw = 1;
  int64_t pt = 0, pl = 0, pb = 0, pr = 0;
  int64_t OH = 1, OW = 1;
};
// max of the codes in the window; padded positions are ignored.
void max_pool(const uint8_t* x, const PoolGeom& g, uint8_t* y);
// Average of codes: s = sum of codes in the window (padding counts as the input
// zero point when count_include_pad, else is skipped), d = number of counted
// positions; y = round(s / d) with half_up ((s + d/2) / d, TFLite's integer
// AveragePool) or half_even.
void avg_pool(const uint8_t* x, const PoolGeom& g, int32_t x_zero_point, bool count_include_pad, bool half_even,
              uint8_t* y);
// Global average pool: acc = sum_{h,w} (x - zx) (exact int32), then ONE
// requantization with M = sx / (sy * H * W): float32 m32 = f32(f32(sx / sy) / f32(H*W)),
// double for gemmlowp / dyadic; rq.ch has one entry per channel.
void global_avg_pool(const uint8_t* x, int64_t N, int64_t C, int64_t HW, int32_t x_zero_point, const Requantizer& rq,
                     CodeOut out);

}  // namespace integer
}  // namespace pyzeroq
