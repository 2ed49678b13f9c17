// Fast QLinearConv / QLinearMatMul: same results as qconv_reference, bit for bit.
//
// Layout: each image is copied once into a zero-padded int16 "HWC" buffer holding
// x - zx (padding = 0, i.e. the input zero point), channels innermost; the
// weights are packed as int16 w - zw[o]. Then an implicit GEMM: for MR output
// positions x NR output channels, for every tap and every input-channel pair,
//   acc[i][j] += x_i[c] * w_j[c] + x_i[c+1] * w_j[c+1]
// which is one _mm256_madd_epi16 of a broadcast activation pair with a vector of
// NR/8 weight pairs. |x - zx|, |w - zw| <= 255, so a pair is below 2^17 and an
// int32 lane holds kMaxPairs pairs exactly; larger reductions take the
// per-output reference loop. int32 sums of exact products are order
// independent, so every kernel below gives the reference's exact value.
// Depthwise (one input and one output channel per group) vectorizes over
// channels instead. Saturate mode is order dependent: it runs the reference
// loop (conv_output_sequential) in parallel.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <vector>

#include "kernels/integer_conv.hpp"
#include "kernels/integer_conv_vnni.hpp"

namespace pyzeroq {
namespace integer {
namespace {

constexpr int64_t kMR = 6;    // output positions per micro-tile
constexpr int64_t kNR = 16;   // output channels per micro-tile (two 8-lane int32 vectors)
constexpr int64_t kDwC = 16;  // channels per depthwise vector block
// Pairs per int32 lane: 16384 * 2 * 255 * 255 < 2^31.
constexpr int64_t kMaxPairs = 16384;
constexpr int64_t kBlocksPerTask = 8;  // micro-tiles of positions per parallel task
constexpr int64_t kImagesPerThread = 2;  // batch size per thread above which tasks are whole images

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }


// ---- general micro-kernels ------------------------------------------------
// xp[i]: position i's top-left in the padded buffer (group channel offset
// included); tapoff[t]: offset of tap t; wp: [taps][cpairs][kNR][2] int16.
using MicroKernel = void (*)(const int16_t* const* xp, const int64_t* tapoff, int64_t taps, int64_t cpairs,
                             const int16_t* wp, int32_t* out);

void micro_generic(const int16_t* const* xp, const int64_t* tapoff, int64_t taps, int64_t cpairs,
                   const int16_t* wp, int32_t* out) {
  int32_t acc[kMR * kNR] = {};
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t cp = 0; cp < cpairs; ++cp) {
      const int16_t* w = wp + (t * cpairs + cp) * kNR * 2;
      for (int64_t i = 0; i < kMR; ++i) {
        const int16_t* x = xp[i] + tapoff[t] + 2 * cp;
        const int32_t x0 = x[0], x1 = x[1];
        for (int64_t j = 0; j < kNR; ++j) acc[i * kNR + j] += x0 * w[2 * j] + x1 * w[2 * j + 1];
      }
    }
  }
  std::memcpy(out, acc, sizeof(acc));
}

__attribute__((target("avx2"))) inline __m256i bcast_pair(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

__attribute__((target("avx2"))) void micro_avx2(const int16_t* const* xp, const int64_t* tapoff, int64_t taps,
                                                 int64_t cpairs, const int16_t* wp, int32_t* out) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t t = 0; t < taps; ++t) {
    const int16_t* x0 = xp[0] + tapoff[t];
    const int16_t* x1 = xp[1] + tapoff[t];
    const int16_t* x2 = xp[2] + tapoff[t];
    const int16_t* x3 = xp[3] + tapoff[t];
    const int16_t* x4 = xp[4] + tapoff[t];
    const int16_t* x5 = xp[5] + tapoff[t];
    const int16_t* w = wp + t * cpairs * kNR * 2;
    for (int64_t cp = 0; cp < cpairs; ++cp, w += kNR * 2) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kNR));
      __m256i a = bcast_pair(x0 + 2 * cp);
      c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(a, w0));
      c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(a, w1));
      a = bcast_pair(x1 + 2 * cp);
      c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(a, w0));
      c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(a, w1));
      a = bcast_pair(x2 + 2 * cp);
      c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(a, w0));
      c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(a, w1));
      a = bcast_pair(x3 + 2 * cp);
      c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(a, w0));
      c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(a, w1));
      a = bcast_pair(x4 + 2 * cp);
      c40 = _mm256_add_epi32(c40, _mm256_madd_epi16(a, w0));
      c41 = _mm256_add_epi32(c41, _mm256_madd_epi16(a, w1));
      a = bcast_pair(x5 + 2 * cp);
      c50 = _mm256_add_epi32(c50, _mm256_madd_epi16(a, w0));
      c51 = _mm256_add_epi32(c51, _mm256_madd_epi16(a, w1));
    }
  }
  __m256i* o = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(o + 0, c00); _mm256_storeu_si256(o + 1, c01);
  _mm256_storeu_si256(o + 2, c10); _mm256_storeu_si256(o + 3, c11);
  _mm256_storeu_si256(o + 4, c20); _mm256_storeu_si256(o + 5, c21);
  _mm256_storeu_si256(o + 6, c30); _mm256_storeu_si256(o + 7, c31);
  _mm256_storeu_si256(o + 8, c40); _mm256_storeu_si256(o + 9, c41);
  _mm256_storeu_si256(o + 10, c50); _mm256_storeu_si256(o + 11, c51);
}

// ---- depthwise micro-kernels: one position, kDwC channels --------------------
// x: position's top-left + channel block offset; wp: [taps][kDwC] int32.
using DwKernel = void (*)(const int16_t* x, const int64_t* tapoff, int64_t taps, const int32_t* wp, int32_t* out);

void dw_generic(const int16_t* x, const int64_t* tapoff, int64_t taps, const int32_t* wp, int32_t* out) {
  int32_t acc[kDwC] = {};
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t c = 0; c < kDwC; ++c) acc[c] += static_cast<int32_t>(x[tapoff[t] + c]) * wp[t * kDwC + c];
  std::memcpy(out, acc, sizeof(acc));
}

__attribute__((target("avx2"))) void dw_avx2(const int16_t* x, const int64_t* tapoff, int64_t taps,
                                              const int32_t* wp, int32_t* out) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0;
  for (int64_t t = 0; t < taps; ++t) {
    const int16_t* xt = x + tapoff[t];
    const __m256i x0 = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt)));
    const __m256i x1 = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt + 8)));
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + t * kDwC));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + t * kDwC + 8));
    a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(x0, w0));
    a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(x1, w1));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), a0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), a1);
}

// ---- epilogue: exact accumulators of consecutive channels -> codes -----------
// (or -> modeled accumulators, when QConvArgs::acc_out is set)
constexpr int64_t kMaxRow = 16;  // channels per epilogue row (kNR, kDwC)

// float32_rne requantization of one row (same arithmetic as Requantizer::apply).
__attribute__((target_clones("avx2", "default"))) void requant_row_f32(
    const int64_t* __restrict e, const float* __restrict m, int64_t n, float flo, float fhi, int32_t zp,
    int32_t* __restrict codes) {
  for (int64_t j = 0; j < n; ++j) {
    float f = static_cast<float>(static_cast<int32_t>(e[j])) * m[j];
    f = f < flo ? flo : f;
    f = f > fhi ? fhi : f;
    codes[j] = static_cast<int32_t>((f + kRoundMagic) - kRoundMagic) + zp;
  }
}

// Rows of e = acc + bias when that provably fits the accumulator: int32
// throughout, one vectorizable loop that tracks the min / max for the stats and
// hands every e to `emit(position, channel, e)`.
// `rows` rows of `n` channels, row i at acc + i * ld (outputs at the same offsets).
template <class Emit>
__attribute__((always_inline)) inline void for_each_biased(const int32_t* __restrict acc, int64_t rows, int64_t ld,
                                                           const int32_t* __restrict bias, int64_t n,
                                                           int32_t* mn_out, int32_t* mx_out, Emit emit) {
  int32_t mn = *mn_out, mx = *mx_out;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const int32_t e = acc[i * ld + j] + bias[j];
      mn = e < mn ? e : mn;
      mx = e > mx ? e : mx;
      emit(i * ld + j, j, e);
    }
  }
  *mn_out = mn;
  *mx_out = mx;
}

// float32_rne codes of those rows (same arithmetic as requant_row_f32).
__attribute__((target_clones("avx2", "default"))) void requant_rows_f32_safe(
    const int32_t* __restrict acc, int64_t rows, int64_t ld, const int32_t* __restrict bias,
    const float* __restrict m, int64_t n, float flo, float fhi, int32_t zp, int32_t* __restrict codes,
    int32_t* mn_out, int32_t* mx_out) {
  for_each_biased(acc, rows, ld, bias, n, mn_out, mx_out, [=](int64_t at, int64_t j, int32_t e) {
    float f = static_cast<float>(e) * m[j];
    f = f < flo ? flo : f;
    f = f > fhi ? fhi : f;
    codes[at] = static_cast<int32_t>((f + kRoundMagic) - kRoundMagic) + zp;
  });
}

// Accumulator output (QConvArgs::acc_out) of those rows: acc + bias itself.
__attribute__((target_clones("avx2", "default"))) void bias_rows_safe(
    const int32_t* __restrict acc, int64_t rows, int64_t ld, const int32_t* __restrict bias, int64_t n,
    int32_t* __restrict out, int32_t* mn_out, int32_t* mx_out) {
  for_each_biased(acc, rows, ld, bias, n, mn_out, mx_out, [=](int64_t at, int64_t, int32_t e) { out[at] = e; });
}

constexpr int64_t kMaxProduct = 255 * 255;  // |(x - zx) * (w - zw)| for 8-bit codes

template <class T>
void scatter(T* __restrict y, int64_t stride, const int32_t* __restrict codes, int64_t cstride, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k * stride] = static_cast<T>(codes[k * cstride]);
}

class Epilogue {
 public:
  // `reduction`: products summed per output (taps * input channels per group).
  Epilogue(const QConvArgs& a, int64_t reduction) : a_(a), bias_(a.g.O, 0), bias32_(a.g.O, 0), m32_(a.g.O) {
    int64_t max_bias = 0;
    for (int64_t o = 0; o < a.g.O; ++o) {
      if (a.bias) bias_[o] = bias32_[o] = a.bias[o];
      max_bias = std::max<int64_t>(max_bias, bias_[o] < 0 ? -bias_[o] : bias_[o]);
      if (!a.acc_out) m32_[o] = a.rq.ch[o].m32;
    }
    f32_ = a.rq.spec.mode == Rounding::Float32Rne;
    safe_ = (f32_ || a.acc_out) && reduction * kMaxProduct + max_bias <= a.acc.max();
    flo_ = static_cast<float>(a.rq.lo - a.rq.zero_point);
    fhi_ = static_cast<float>(a.rq.hi - a.rq.zero_point);
  }
  // codes[j] for channel o0 + j from the int32 partial sums acc[j], j < nj <= kMaxRow
  // (the modeled accumulators instead of codes with acc_out).
  // `rows` rows at acc + i * ld -> codes + i * ld.
  void tile(const int32_t* acc, int64_t rows, int64_t ld, int64_t o0, int64_t nj, int32_t* codes, AccStats& st) const {
    if (safe_) {
      int32_t mn = std::numeric_limits<int32_t>::max(), mx = std::numeric_limits<int32_t>::min();
      if (a_.acc_out)
        bias_rows_safe(acc, rows, ld, bias32_.data() + o0, nj, codes, &mn, &mx);
      else
        requant_rows_f32_safe(acc, rows, ld, bias32_.data() + o0, m32_.data() + o0, nj, flo_, fhi_,
                              a_.rq.zero_point, codes, &mn, &mx);
      st.add(mn);
      st.add(mx);
      return;
    }
    for (int64_t i = 0; i < rows; ++i) row(acc + i * ld, o0, nj, codes + i * ld, st);
  }
  void row(const int32_t* acc, int64_t o0, int64_t nj, int32_t* codes, AccStats& st) const {
    int64_t e[kMaxRow];
    int64_t mn = std::numeric_limits<int64_t>::max(), mx = std::numeric_limits<int64_t>::min();
    for (int64_t j = 0; j < nj; ++j) {
      e[j] = static_cast<int64_t>(acc[j]) + bias_[o0 + j];
      mn = e[j] < mn ? e[j] : mn;
      mx = e[j] > mx ? e[j] : mx;
    }
    if (mn >= a_.acc.min() && mx <= a_.acc.max()) {
      st.add(mn);
      st.add(mx);
      if (a_.acc_out) {
        for (int64_t j = 0; j < nj; ++j) codes[j] = static_cast<int32_t>(e[j]);
      } else if (f32_) {
        requant_row_f32(e, m32_.data() + o0, nj, flo_, fhi_, a_.rq.zero_point, codes);
      } else {
        for (int64_t j = 0; j < nj; ++j) codes[j] = a_.rq.apply(static_cast<int32_t>(e[j]), o0 + j);
      }
      return;
    }
    for (int64_t j = 0; j < nj; ++j) {
      const int32_t v = model_accumulator(e[j], a_.acc, st);
      codes[j] = a_.acc_out ? v : a_.rq.apply(v, static_cast<std::size_t>(o0 + j));
    }
  }
  // y[base + k * stride] = codes[k * cstride], k < n (a local __restrict pointer:
  // byte stores would otherwise force reloads of everything they may alias);
  // acc_out[...] instead with acc_out.
  void store(int64_t base, int64_t stride, const int32_t* codes, int64_t cstride, int64_t n) const {
    if (a_.acc_out)
      scatter(a_.acc_out + base, stride, codes, cstride, n);
    else if (a_.y16)
      scatter(static_cast<uint16_t*>(a_.y) + base, stride, codes, cstride, n);
    else
      scatter(static_cast<uint8_t*>(a_.y) + base, stride, codes, cstride, n);
  }

 private:
  const QConvArgs& a_;
  std::vector<int64_t> bias_;
  std::vector<int32_t> bias32_;
  std::vector<float> m32_;
  bool f32_, safe_;
  float flo_, fhi_;
};

// ---- packing ----------------------------------------------------------------
struct Padded {
  int64_t Hp, Wp, Ctot;
  int64_t image_size() const { return Hp * Wp * Ctot; }
};

// buf[(h + pt) * Wp + (w + pl)][chan(c) - chan0] = x[n, c, h, w] - zx for c in
// [c0, c1); everything else 0. chan(c) = (c / Cg) * Cgp + c % Cg.
void pack_image(const QConvArgs& a, const Padded& pd, int64_t Cgp, int64_t n, int64_t c0, int64_t c1, int64_t chan0,
                int16_t* buf) {
  const ConvGeom& g = a.g;
  std::fill(buf, buf + pd.image_size(), int16_t{0});
  const int64_t Cg = g.Cg();
  const uint8_t* xn = a.x + n * g.in_sn;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t chan = (c / Cg) * Cgp + c % Cg - chan0;
    for (int64_t h = 0; h < g.H; ++h) {
      const uint8_t* __restrict src = xn + c * g.in_sc + h * g.in_sh;
      int16_t* __restrict dst = buf + ((h + g.pt) * pd.Wp + g.pl) * pd.Ctot + chan;
      for (int64_t w = 0; w < g.W; ++w)
        dst[w * pd.Ctot] = static_cast<int16_t>(static_cast<int32_t>(src[w * g.in_sw]) - a.x_zero_point);
    }
  }
}

std::vector<int64_t> tap_offsets(const ConvGeom& g, const Padded& pd) {
  std::vector<int64_t> off;
  for (int64_t ki = 0; ki < g.KH; ++ki)
    for (int64_t kj = 0; kj < g.KW; ++kj) off.push_back((ki * g.dh * pd.Wp + kj * g.dw) * pd.Ctot);
  return off;
}

const int16_t* position_ptr(const ConvGeom& g, const Padded& pd, const int16_t* img, int64_t p) {
  const int64_t oh = p / g.OW, ow = p % g.OW;
  return img + (oh * g.sh * pd.Wp + ow * g.sw) * pd.Ctot;
}

AccStats run_sequential_parallel(const QConvArgs& a) {
  StatsSink sink;
  const int64_t P = a.g.OH * a.g.OW;
  const std::size_t row_cost = static_cast<std::size_t>(P * a.g.Cg() * a.g.KH * a.g.KW);  // multiply-adds
  parallel_for(static_cast<std::size_t>(a.g.N * a.g.O), grain_for_cost(row_cost), [&](std::size_t b, std::size_t e) {
    AccStats st;
    for (std::size_t r = b; r < e; ++r)
      for (int64_t p = 0; p < P; ++p)
        conv_output_sequential(a, static_cast<int64_t>(r) / a.g.O, static_cast<int64_t>(r) % a.g.O, p, st);
    sink.merge(st);
  });
  return sink.total();
}

AccStats run_general(const QConvArgs& a, bool avx2) {
  const ConvGeom& g = a.g;
  const int64_t G = g.groups, Cg = g.Cg(), Og = g.Og();
  const int64_t Cgp = round_up(Cg, 2), CP = Cgp / 2;
  const int64_t T = g.KH * g.KW;
  const int64_t OB = (Og + kNR - 1) / kNR;
  const Padded pd{g.H + g.pt + g.pb, g.W + g.pl + g.pr, G * Cgp};
  const int64_t P = g.OH * g.OW;
  const int64_t PB = (P + kMR - 1) / kMR;

  // weights: [G][OB][T][CP][kNR][2]
  const int64_t panel = T * CP * kNR * 2;
  std::vector<int16_t> wpk(static_cast<std::size_t>(G * OB * panel), 0);
  for (int64_t o = 0; o < g.O; ++o) {
    const int64_t grp = o / Og, ol = o % Og, ob = ol / kNR, j = ol % kNR;
    int16_t* dst = wpk.data() + (grp * OB + ob) * panel;
    for (int64_t ci = 0; ci < Cg; ++ci)
      for (int64_t t = 0; t < T; ++t) {
        const int32_t v = static_cast<int32_t>(a.w[(o * Cg + ci) * T + t]) - a.w_zero_point[o];
        dst[((t * CP + ci / 2) * kNR + j) * 2 + ci % 2] = static_cast<int16_t>(v);
      }
  }
  const std::vector<int64_t> tapoff = tap_offsets(g, pd);
  const MicroKernel kernel = avx2 ? micro_avx2 : micro_generic;
  const Epilogue epi(a, T * Cg);

  // Positions [pb_begin, pb_end) (in micro-tiles) of group grp of image n.
  auto compute = [&](const int16_t* image, int64_t n, int64_t grp, int64_t pb_begin, int64_t pb_end, AccStats& st) {
    alignas(32) int32_t acc[kMR * kNR];
    int32_t codes[kMR * kNR];
    const int16_t* xp[kMR];
    const int16_t* img = image + grp * Cgp;
    for (int64_t pb = pb_begin; pb < pb_end; ++pb) {
      const int64_t p0 = pb * kMR;
      const int64_t np = std::min(kMR, P - p0);
      for (int64_t i = 0; i < kMR; ++i) xp[i] = position_ptr(g, pd, img, p0 + std::min(i, np - 1));
      for (int64_t ob = 0; ob < OB; ++ob) {
        kernel(xp, tapoff.data(), T, CP, wpk.data() + (grp * OB + ob) * panel, acc);
        const int64_t nj = std::min(kNR, Og - ob * kNR);
        const int64_t o0 = grp * Og + ob * kNR;
        epi.tile(acc, np, kNR, o0, nj, codes, st);
        for (int64_t j = 0; j < nj; ++j)
          epi.store(n * g.out_sn + (o0 + j) * g.out_so + p0 * g.out_sp, g.out_sp, codes + j, kNR, np);
      }
    }
  };
  StatsSink sink;
  const std::size_t image_cost = static_cast<std::size_t>(P * g.O * T * Cg);  // multiply-adds per image
  if (g.N >= kImagesPerThread * static_cast<int64_t>(num_threads())) {
    // many images: one task per image, packed into a cache-resident per-thread buffer
    parallel_for(static_cast<std::size_t>(g.N), grain_for_cost(image_cost), [&](std::size_t b, std::size_t e) {
      AccStats st;
      std::vector<int16_t> buf(static_cast<std::size_t>(pd.image_size()));
      for (std::size_t n = b; n < e; ++n) {
        pack_image(a, pd, Cgp, static_cast<int64_t>(n), 0, g.C, 0, buf.data());
        for (int64_t grp = 0; grp < G; ++grp) compute(buf.data(), static_cast<int64_t>(n), grp, 0, PB, st);
      }
      sink.merge(st);
    });
    return sink.total();
  }
  // few images (matmul, batch 1): pack all, then split positions across threads
  std::vector<int16_t> xbuf(static_cast<std::size_t>(g.N * pd.image_size()));
  parallel_for(static_cast<std::size_t>(g.N), grain_for_cost(static_cast<std::size_t>(pd.image_size())), [&](std::size_t b, std::size_t e) {
    for (std::size_t n = b; n < e; ++n)
      pack_image(a, pd, Cgp, static_cast<int64_t>(n), 0, g.C, 0, xbuf.data() + n * pd.image_size());
  });
  const int64_t chunks = (PB + kBlocksPerTask - 1) / kBlocksPerTask;
  const std::size_t task_cost = static_cast<std::size_t>(kBlocksPerTask * kMR * Og * T * Cg);
  parallel_for(static_cast<std::size_t>(g.N * G * chunks), grain_for_cost(task_cost), [&](std::size_t b, std::size_t e) {
    AccStats st;
    for (std::size_t task = b; task < e; ++task) {
      const int64_t n = static_cast<int64_t>(task) / (G * chunks);
      const int64_t grp = (static_cast<int64_t>(task) / chunks) % G;
      const int64_t chunk = static_cast<int64_t>(task) % chunks;
      compute(xbuf.data() + n * pd.image_size(), n, grp, chunk * kBlocksPerTask,
              std::min(PB, (chunk + 1) * kBlocksPerTask), st);
    }
    sink.merge(st);
  });
  return sink.total();
}

AccStats run_depthwise(const QConvArgs& a, bool avx2) {
  const ConvGeom& g = a.g;
  const int64_t C = g.C, T = g.KH * g.KW;
  const int64_t CB = (C + kDwC - 1) / kDwC;
  // one channel block of one image at a time: [Hp][Wp][kDwC] stays in L1
  const Padded pd{g.H + g.pt + g.pb, g.W + g.pl + g.pr, kDwC};
  const int64_t P = g.OH * g.OW;
  std::vector<int32_t> wpk(static_cast<std::size_t>(CB * T * kDwC), 0);  // [CB][T][kDwC]
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < T; ++t)
      wpk[((c / kDwC) * T + t) * kDwC + c % kDwC] = static_cast<int32_t>(a.w[c * T + t]) - a.w_zero_point[c];
  const std::vector<int64_t> tapoff = tap_offsets(g, pd);
  const DwKernel kernel = avx2 ? dw_avx2 : dw_generic;
  const Epilogue epi(a, T);
  StatsSink sink;
  parallel_for(static_cast<std::size_t>(g.N * CB), grain_for_cost(static_cast<std::size_t>(P * kDwC * T)), [&](std::size_t b, std::size_t e) {
    AccStats st;
    alignas(32) int32_t acc[kDwC];
    int32_t codes[kDwC];
    std::vector<int16_t> buf(static_cast<std::size_t>(pd.image_size()));
    for (std::size_t task = b; task < e; ++task) {
      const int64_t n = static_cast<int64_t>(task) / CB, cb = static_cast<int64_t>(task) % CB;
      const int64_t c0 = cb * kDwC, nc = std::min(kDwC, C - c0);
      pack_image(a, pd, 1, n, c0, c0 + nc, c0, buf.data());
      const int32_t* wp = wpk.data() + cb * T * kDwC;
      for (int64_t p = 0; p < P; ++p) {
        kernel(position_ptr(g, pd, buf.data(), p), tapoff.data(), T, wp, acc);
        epi.tile(acc, 1, kDwC, c0, nc, codes, st);
        epi.store(n * g.out_sn + c0 * g.out_so + p * g.out_sp, g.out_so, codes, 1, nc);
      }
    }
    sink.merge(st);
  });
  return sink.total();
}

const vnni::IsaKernels* vnni_kernels(SimdPath p) {
  if (p == SimdPath::Avx512Vnni) return vnni::avx512_vnni_kernels();
  if (p == SimdPath::AvxVnni) return vnni::avx_vnni_kernels();
  return nullptr;
}

// PYZEROQ_DISABLE_SIMD (read once): comma-separated paths treated as absent, e.g.
// "avx512vnni,avxvnni" (tests of the fallbacks on a CPU that has everything).
bool disabled_by_env(SimdPath p) {
  static const std::string names = [] {
    const char* e = std::getenv("PYZEROQ_DISABLE_SIMD");
    return "," + std::string(e ? e : "") + ",";
  }();
  const char* name = p == SimdPath::Avx512Vnni ? ",avx512vnni," : p == SimdPath::AvxVnni ? ",avxvnni," : ",avx2,";
  return p != SimdPath::Generic && names.find(name) != std::string::npos;
}

// cpuid + OS register state (libgcc's __builtin_cpu_supports checks XCR0 for the AVX / AVX-512 state).
bool cpu_has(SimdPath p) {
  if (disabled_by_env(p)) return false;
  switch (p) {
    case SimdPath::Avx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
    case SimdPath::AvxVnni:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
    case SimdPath::Avx2:
      return __builtin_cpu_supports("avx2");
    default:
      return true;
  }
}

}  // namespace

bool simd_supported(SimdPath p) {
  const bool built = (p != SimdPath::Avx512Vnni && p != SimdPath::AvxVnni) || vnni_kernels(p) != nullptr;
  return built && cpu_has(p);
}

SimdPath best_simd_path() {
  static const SimdPath best = [] {
    for (SimdPath p : kSimdPreference)
      if (simd_supported(p)) return p;
    return SimdPath::Generic;
  }();
  return best;
}

AccStats qconv_fast(const QConvArgs& a, SimdPath path) {
  const ConvGeom& g = a.g;
  const int64_t T = g.KH * g.KW;
  // an empty batch has nothing to plan (the VNNI layout divides by its images per unit)
  if (a.acc.mode == Overflow::Saturate || g.N == 0) return run_sequential_parallel(a);
  if (const vnni::IsaKernels* k = vnni_kernels(path)) return vnni::fits(a) ? vnni::run(a, *k) : run_sequential_parallel(a);
  const bool avx2 = path == SimdPath::Avx2;
  if (g.Cg() == 1 && g.Og() == 1 && T <= 2 * kMaxPairs) return run_depthwise(a, avx2);
  if (T * ((g.Cg() + 1) / 2) <= kMaxPairs) return run_general(a, avx2);
  return run_sequential_parallel(a);
}

}  // namespace integer
}  // namespace pyzeroq
