// Reference (plain-loop) QLinearConv / QLinearMatMul; formulas in integer_conv.hpp.
#include "kernels/integer_conv.hpp"

namespace pyzeroq {
namespace integer {

// acc = sat(bias); for ci, ki, kj: acc = sat(acc + (x - zx) * (w - zw)).
// The exact int64 sum is kept beside it: it feeds the stats and, for wrap /
// error, the accumulator (wrapping is order independent, so wrap(exact) is the
// value any summation order gives in an acc_bits register).
void conv_output_sequential(const QConvArgs& a, int64_t n, int64_t o, int64_t p, AccStats& st) {
  const ConvGeom& g = a.g;
  const int64_t Cg = g.Cg();
  const int64_t grp = o / g.Og();
  const int64_t oh = p / g.OW, ow = p % g.OW;
  const int32_t zw = a.w_zero_point[o];
  const bool sat = a.acc.mode == Overflow::Saturate;
  const int64_t bias = a.bias ? a.bias[o] : 0;
  int64_t exact = bias;
  int64_t sacc = a.acc.saturate(bias);
  bool saturated = sacc != bias;
  const uint8_t* xn = a.x + n * g.in_sn;
  const uint8_t* wo = a.w + o * Cg * g.KH * g.KW;
  for (int64_t ci = 0; ci < Cg; ++ci) {
    const uint8_t* xc = xn + (grp * Cg + ci) * g.in_sc;
    for (int64_t ki = 0; ki < g.KH; ++ki) {
      const int64_t ih = oh * g.sh - g.pt + ki * g.dh;
      for (int64_t kj = 0; kj < g.KW; ++kj) {
        const int64_t iw = ow * g.sw - g.pl + kj * g.dw;
        int64_t prod = 0;
        if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
          const int64_t xv = static_cast<int64_t>(xc[ih * g.in_sh + iw * g.in_sw]) - a.x_zero_point;
          const int64_t wv = static_cast<int64_t>(wo[(ci * g.KH + ki) * g.KW + kj]) - zw;
          prod = xv * wv;
        }
        exact += prod;
        if (sat) {
          const int64_t s = sacc + prod;
          sacc = a.acc.saturate(s);
          saturated = saturated || sacc != s;
        }
      }
    }
  }
  const int64_t idx = n * g.out_sn + o * g.out_so + p * g.out_sp;
  if (!sat) {
    finish_output(a, exact, o, idx, st);
    return;
  }
  st.add(exact);
  if (saturated) ++st.overflow_count;
  store_output(a, static_cast<int32_t>(sacc), o, idx);
}

AccStats qconv_reference(const QConvArgs& a) {
  AccStats st;
  const int64_t P = a.g.OH * a.g.OW;
  for (int64_t n = 0; n < a.g.N; ++n)
    for (int64_t o = 0; o < a.g.O; ++o)
      for (int64_t p = 0; p < P; ++p) conv_output_sequential(a, n, o, p, st);
  return st;
}

}  // namespace integer
}  // namespace pyzeroq
