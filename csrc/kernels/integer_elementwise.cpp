// Requantize, residual add, pooling; formulas in integer_elementwise.hpp.
#include "kernels/integer_elementwise.hpp"

#include <algorithm>

namespace pyzeroq {
namespace integer {
namespace {

int32_t clamp32(int64_t v, int32_t lo, int32_t hi) {
  return static_cast<int32_t>(v < lo ? lo : (v > hi ? hi : v));
}

// float32_rne add / mul: va = f32(sa * (a - za)), vb = f32(sb * (b - zb)),
// y = clamp(round_half_even(f32(f32(combine(va, vb)) / sy)) + zy) (the fake-quant model's formula).
template <class Combine>
void float32_binary(const uint8_t* a, const uint8_t* b, int64_t n, const QAddParams& p, CodeOut out,
                    Combine combine) {
  const float flo = static_cast<float>(p.lo - p.zy), fhi = static_cast<float>(p.hi - p.zy);
  parallel_for(static_cast<std::size_t>(n), grain_for_cost(1), [&](std::size_t s, std::size_t e) {
    for (std::size_t i = s; i < e; ++i) {
      const float va = p.sa * static_cast<float>(static_cast<int32_t>(a[i]) - p.za);
      const float vb = p.sb * static_cast<float>(static_cast<int32_t>(b[i]) - p.zb);
      const float v = combine(va, vb);
      float f = v / p.sy;
      f = f < flo ? flo : f;
      f = f > fhi ? fhi : f;
      const float r = (f + kRoundMagic) - kRoundMagic;
      out.store(static_cast<int64_t>(i), static_cast<int32_t>(r) + p.zy);
    }
  });
}

// Work per plane of a pooling: one operation per window tap of every output.
std::size_t plane_cost(const PoolGeom& g) { return static_cast<std::size_t>(g.OH * g.OW * g.KH * g.KW); }
}  // namespace

void requantize_tensor(const int32_t* acc, int64_t outer, int64_t channels, int64_t inner, const Requantizer& rq,
                       CodeOut out) {
  const int64_t total = outer * channels * inner;
  parallel_for(static_cast<std::size_t>(total), grain_for_cost(1), [&](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; ++i) {
      const int64_t c = (static_cast<int64_t>(i) / inner) % channels;
      out.store(static_cast<int64_t>(i), rq.apply(acc[i], static_cast<std::size_t>(c)));
    }
  });
}

void qadd(const uint8_t* a, const uint8_t* b, int64_t n, const QAddParams& p, CodeOut out) {
  if (p.spec.mode == Rounding::Float32Rne) {
    float32_binary(a, b, n, p, out, [](float va, float vb) { return va + vb; });
    return;
  }
  if (p.spec.mode == Rounding::Gemmlowp) {
    const double twice_max = 2.0 * static_cast<double>(std::max(p.sa, p.sb));
    int32_t qa, qb, qo;
    int ea, eb, eo;
    quantize_multiplier(static_cast<double>(p.sa) / twice_max, &qa, &ea);
    quantize_multiplier(static_cast<double>(p.sb) / twice_max, &qb, &eb);
    quantize_multiplier(twice_max / (static_cast<double>(int64_t{1} << kQAddLeftShift) * p.sy), &qo, &eo);
    parallel_for(static_cast<std::size_t>(n), grain_for_cost(1), [&](std::size_t s, std::size_t e) {
      for (std::size_t i = s; i < e; ++i) {
        const int32_t xa = (static_cast<int32_t>(a[i]) - p.za) * (1 << kQAddLeftShift);
        const int32_t xb = (static_cast<int32_t>(b[i]) - p.zb) * (1 << kQAddLeftShift);
        const int32_t sa = multiply_by_quantized_multiplier(xa, qa, ea);
        const int32_t sb = multiply_by_quantized_multiplier(xb, qb, eb);
        // |sa|, |sb| < 2^28: the int32 sum cannot overflow
        const int64_t v = static_cast<int64_t>(multiply_by_quantized_multiplier(sa + sb, qo, eo)) + p.zy;
        out.store(static_cast<int64_t>(i), clamp32(v, p.lo, p.hi));
      }
    });
    return;
  }
  // dyadic: a shared shift n for both multipliers
  const double ma = static_cast<double>(p.sa) / p.sy, mb = static_cast<double>(p.sb) / p.sy;
  int64_t ba, bb;
  int n_shift, unused;
  dyadic_multiplier(std::max(ma, mb), p.spec.dyadic_bits, p.spec.dyadic_shift, &ba, &n_shift);
  dyadic_multiplier(ma, p.spec.dyadic_bits, n_shift, &ba, &unused);
  dyadic_multiplier(mb, p.spec.dyadic_bits, n_shift, &bb, &unused);
  parallel_for(static_cast<std::size_t>(n), grain_for_cost(1), [&](std::size_t s, std::size_t e) {
    for (std::size_t i = s; i < e; ++i) {
      const int64_t v = (static_cast<int64_t>(a[i]) - p.za) * ba + (static_cast<int64_t>(b[i]) - p.zb) * bb;
      out.store(static_cast<int64_t>(i), clamp32(round_shift(v, n_shift, p.spec.dyadic_round) + p.zy, p.lo, p.hi));
    }
  });
}

void max_pool(const uint8_t* x, const PoolGeom& g, uint8_t* y) {
  parallel_for(static_cast<std::size_t>(g.planes), grain_for_cost(plane_cost(g)), [&](std::size_t b, std::size_t e) {
    for (std::size_t pl = b; pl < e; ++pl) {
      const uint8_t* xp = x + static_cast<int64_t>(pl) * g.H * g.W;
      uint8_t* yp = y + static_cast<int64_t>(pl) * g.OH * g.OW;
      for (int64_t oh = 0; oh < g.OH; ++oh)
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          int32_t m = 0;
          for (int64_t ki = 0; ki < g.KH; ++ki) {
            const int64_t ih = oh * g.sh - g.pt + ki;
            if (ih < 0 || ih >= g.H) continue;
            for (int64_t kj = 0; kj < g.KW; ++kj) {
              const int64_t iw = ow * g.sw - g.pl + kj;
              if (iw >= 0 && iw < g.W) m = std::max<int32_t>(m, xp[ih * g.W + iw]);
            }
          }
          yp[oh * g.OW + ow] = static_cast<uint8_t>(m);
        }
    }
  });
}

void avg_pool(const uint8_t* x, const PoolGeom& g, int32_t x_zero_point, bool count_include_pad, bool half_even,
              uint8_t* y) {
  parallel_for(static_cast<std::size_t>(g.planes), grain_for_cost(plane_cost(g)), [&](std::size_t b, std::size_t e) {
    for (std::size_t pl = b; pl < e; ++pl) {
      const uint8_t* xp = x + static_cast<int64_t>(pl) * g.H * g.W;
      uint8_t* yp = y + static_cast<int64_t>(pl) * g.OH * g.OW;
      for (int64_t oh = 0; oh < g.OH; ++oh)
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          int64_t s = 0, d = 0;
          for (int64_t ki = 0; ki < g.KH; ++ki) {
            const int64_t ih = oh * g.sh - g.pt + ki;
            for (int64_t kj = 0; kj < g.KW; ++kj) {
              const int64_t iw = ow * g.sw - g.pl + kj;
              if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
                s += xp[ih * g.W + iw];
                ++d;
              } else if (count_include_pad) {
                s += x_zero_point;
                ++d;
              }
            }
          }
          int64_t q = s / d;  // s >= 0, d >= 1
          const int64_t r = s - q * d;
          if (2 * r > d || (2 * r == d && (!half_even || (q & 1)))) ++q;
          yp[oh * g.OW + ow] = static_cast<uint8_t>(q);
        }
    }
  });
}

void qmul(const uint8_t* a, const uint8_t* b, int64_t n, const QAddParams& p, CodeOut out) {
  if (p.spec.mode == Rounding::Float32Rne) {
    float32_binary(a, b, n, p, out, [](float va, float vb) { return va * vb; });
    return;
  }
  Requantizer rq;
  rq.spec = p.spec, rq.zero_point = p.zy, rq.lo = p.lo, rq.hi = p.hi;
  const double m64 = static_cast<double>(p.sa) * static_cast<double>(p.sb) / static_cast<double>(p.sy);
  rq.ch.push_back(make_multiplier(p.spec, static_cast<float>(m64), m64));
  parallel_for(static_cast<std::size_t>(n), grain_for_cost(1), [&](std::size_t s, std::size_t e) {
    for (std::size_t i = s; i < e; ++i) {
      // |(a - za) * (b - zb)| <= 255 * 255: exact in int32
      const int32_t acc = (static_cast<int32_t>(a[i]) - p.za) * (static_cast<int32_t>(b[i]) - p.zb);
      out.store(static_cast<int64_t>(i), rq.apply(acc, 0));
    }
  });
}

void global_avg_pool(const uint8_t* x, int64_t N, int64_t C, int64_t HW, int32_t x_zero_point, const Requantizer& rq,
                     CodeOut out) {
  parallel_for(static_cast<std::size_t>(N * C), grain_for_cost(static_cast<std::size_t>(HW)), [&](std::size_t b, std::size_t e) {
    for (std::size_t pl = b; pl < e; ++pl) {
      const uint8_t* xp = x + static_cast<int64_t>(pl) * HW;
      int64_t s = 0;
      for (int64_t i = 0; i < HW; ++i) s += xp[i];
      const int64_t acc = s - static_cast<int64_t>(x_zero_point) * HW;
      const int64_t c = static_cast<int64_t>(pl) % C;
      out.store(static_cast<int64_t>(pl), rq.apply(static_cast<int32_t>(acc), static_cast<std::size_t>(c)));
    }
  });
}

}  // namespace integer
}  // namespace pyzeroq
