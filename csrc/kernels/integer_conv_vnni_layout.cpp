// Planar VNNI path: unit layout, packing, epilogue constants, stores of finished tiles
// (declarations and roles in integer_conv_vnni_layout.hpp).
#include "kernels/integer_conv_vnni_layout.hpp"

#include <emmintrin.h>  // SSE2 (x86-64 baseline): rows -> quads / pairs

#include <algorithm>
#include <cstring>
#include <tuple>

namespace pyzeroq {
namespace integer {
namespace vnni {
namespace {

constexpr int64_t kSseColumns = 16;  // columns per SSE2 interleave step
constexpr int kByteBits = 8;
constexpr int kHalfBits = 16;
constexpr int64_t kMaxStackBytes = int64_t{1} << 18;  // packed bytes of a stacked unit (fits L2)
constexpr int64_t kUnitsPerThread = 2;                // stacking keeps this many units per thread
constexpr int64_t kShortRow = 32;
constexpr int64_t kTileOverheadLanes = 16;            // a tile costs about as much as this many more lanes                     // padded rows shorter than this are packed via planes

// ---- layout ------------------------------------------------------------------
Layout make_layout(const ConvGeom& g, int64_t planes, int64_t lanes, int64_t vectors, int64_t images) {
  Layout L;
  L.sh = g.sh, L.sw = g.sw, L.Hp = g.H + g.pt + g.pb, L.Wp = round_up(g.W + g.pl + g.pr, g.sw);
  L.Hs = round_up(L.Hp, g.sh), L.images = images, L.rows = images * L.Hs;
  L.Hq = L.rows / g.sh, L.Wq = ceil_div(L.Wp, g.sw), L.plane = g.sh * g.sw * L.Hq * L.Wq;
  L.out_rows = L.Hs / g.sh, L.OH = g.OH, L.OW = g.OW;
  L.V = ((images - 1) * L.out_rows + g.OH) * L.Wq;
  L.lanes = lanes, L.vectors = vectors, L.tile = vectors * lanes, L.Vpad = round_up(L.V, L.tile);
  int64_t max_tap = 0;
  for (int64_t ki = 0; ki < g.KH; ++ki)
    for (int64_t kj = 0; kj < g.KW; ++kj) {
      L.tapbase.push_back(L.at(ki * g.dh, kj * g.dw));
      max_tap = std::max(max_tap, L.tapbase.back());
    }
  L.buffer = std::max((planes - 1) * L.plane + max_tap + L.Vpad, planes * L.plane);
  for (int64_t h = 0; h < L.rows; ++h) L.row_at.push_back(L.at(h, 0));
  L.valid.assign(static_cast<std::size_t>(L.Vpad / lanes), 0);
  for (int64_t v = 0; v < L.V; ++v)
    if (v % L.Wq < L.OW && (v / L.Wq) % L.out_rows < L.OH) L.valid[v / lanes] |= static_cast<uint16_t>(1u << (v % lanes));
  return L;
}

// Cost per image, in lanes, with `images` per unit and tiles of `vectors` lane vectors: the
// lanes computed plus a per-tile overhead (calls, epilogue set-up, stores).
double cost_per_image(const ConvGeom& g, int64_t lanes, int64_t vectors, int64_t images) {
  const int64_t Hs = round_up(g.H + g.pt + g.pb, g.sh), Wq = ceil_div(g.W + g.pl + g.pr, g.sw);
  const int64_t V = ((images - 1) * (Hs / g.sh) + g.OH) * Wq, tile = vectors * lanes;
  return static_cast<double>(round_up(V, tile) + kTileOverheadLanes * ceil_div(V, tile)) / static_cast<double>(images);
}

// ---- packing -----------------------------------------------------------------
// Stores 16 consecutive columns (quads or pairs) q[0..3] starting at column w (a
// multiple of 16) into the phase rows d0 (even columns) and d1 (odd; sw 2), or d0 (sw 1).
// (Pointers by value: vector stores may alias anything, an array of them would be reloaded.)
inline __attribute__((always_inline)) void store_columns(const __m128i q[4], int64_t w, int64_t sw, uint32_t* d0,
                                                         uint32_t* d1) {
  if (sw == 1) {
    for (int i = 0; i < 4; ++i) _mm_storeu_si128(reinterpret_cast<__m128i*>(d0 + w + 4 * i), q[i]);
    return;
  }
  for (int half = 0; half < 2; ++half) {  // columns w + 8 half .. + 7
    const __m128i a = _mm_shuffle_epi32(q[2 * half], _MM_SHUFFLE(3, 1, 2, 0));
    const __m128i b = _mm_shuffle_epi32(q[2 * half + 1], _MM_SHUFFLE(3, 1, 2, 0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d0 + w / 2 + 4 * half), _mm_unpacklo_epi64(a, b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d1 + w / 2 + 4 * half), _mm_unpackhi_epi64(a, b));
  }
}

// dst[w % sw][w / sw] = r[0][w] | r[1][w] << 8 | r[2][w] << 16 | r[3][w] << 24, w < n.
void interleave_quads(const uint8_t* const* r, int64_t n, int64_t sw, uint32_t* const* dst) {
  int64_t w = 0;
  if (sw <= 2) {
    const uint8_t *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
    uint32_t *d0 = dst[0], *d1 = sw == 2 ? dst[1] : nullptr;
    for (; w + kSseColumns <= n; w += kSseColumns) {
      const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + w));
      const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + w));
      const __m128i a2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r2 + w));
      const __m128i a3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r3 + w));
      const __m128i t0 = _mm_unpacklo_epi8(a0, a1), t1 = _mm_unpackhi_epi8(a0, a1);
      const __m128i t2 = _mm_unpacklo_epi8(a2, a3), t3 = _mm_unpackhi_epi8(a2, a3);
      const __m128i q[4] = {_mm_unpacklo_epi16(t0, t2), _mm_unpackhi_epi16(t0, t2), _mm_unpacklo_epi16(t1, t3),
                            _mm_unpackhi_epi16(t1, t3)};
      store_columns(q, w, sw, d0, d1);
    }
  }
  for (int64_t pw = 0; pw < sw; ++pw)  // w % sw == 0 here
    for (int64_t c = w + pw, i = (w + pw) / sw; c < n; c += sw, ++i)
      dst[pw][i] = static_cast<uint32_t>(r[0][c]) | static_cast<uint32_t>(r[1][c]) << kByteBits |
                   static_cast<uint32_t>(r[2][c]) << (2 * kByteBits) | static_cast<uint32_t>(r[3][c]) << (3 * kByteBits);
}

// dst[w % sw][w / sw] = r[0][w] | r[1][w] << 16 (two int16 codes), w < n.
void interleave_pairs(const uint8_t* const* r, int64_t n, int64_t sw, uint32_t* const* dst) {
  int64_t w = 0;
  if (sw <= 2) {
    const __m128i z = _mm_setzero_si128();
    const uint8_t *r0 = r[0], *r1 = r[1];
    uint32_t *d0 = dst[0], *d1 = sw == 2 ? dst[1] : nullptr;
    for (; w + kSseColumns <= n; w += kSseColumns) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + w));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + w));
      const __m128i a0 = _mm_unpacklo_epi8(a, z), a1 = _mm_unpackhi_epi8(a, z);
      const __m128i b0 = _mm_unpacklo_epi8(b, z), b1 = _mm_unpackhi_epi8(b, z);
      const __m128i q[4] = {_mm_unpacklo_epi16(a0, b0), _mm_unpackhi_epi16(a0, b0), _mm_unpacklo_epi16(a1, b1),
                            _mm_unpackhi_epi16(a1, b1)};
      store_columns(q, w, sw, d0, d1);
    }
  }
  for (int64_t pw = 0; pw < sw; ++pw)  // w % sw == 0 here
    for (int64_t c = w + pw, i = (w + pw) / sw; c < n; c += sw, ++i)
      dst[pw][i] = static_cast<uint32_t>(r[0][c]) | static_cast<uint32_t>(r[1][c]) << kHalfBits;
}

using Interleave = void (*)(const uint8_t* const*, int64_t, int64_t, uint32_t* const*);

// memcpy of a short run without a library call: two possibly overlapping moves of one
// power-of-two size cover [0, n) exactly (no byte outside the run is written).
inline void copy_bytes(uint8_t* __restrict d, const uint8_t* __restrict s, int64_t n) {
  constexpr int64_t kShort = 16;
  if (n > kShort) {
    std::memcpy(d, s, static_cast<std::size_t>(n));
  } else if (n >= 8) {
    uint64_t a, b;
    std::memcpy(&a, s, 8), std::memcpy(&b, s + n - 8, 8);
    std::memcpy(d, &a, 8), std::memcpy(d + n - 8, &b, 8);
  } else if (n >= 4) {
    uint32_t a, b;
    std::memcpy(&a, s, 4), std::memcpy(&b, s + n - 4, 4);
    std::memcpy(d, &a, 4), std::memcpy(d + n - 4, &b, 4);
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i];
  }
}

template <class T>
void copy_run(T* __restrict y, int64_t stride, const T* __restrict src, int64_t n) {
  if (stride == 1) {
    copy_bytes(reinterpret_cast<uint8_t*>(y), reinterpret_cast<const uint8_t*>(src), n * static_cast<int64_t>(sizeof(T)));
    return;
  }
  for (int64_t i = 0; i < n; ++i) y[i * stride] = src[i];
}

}  // namespace

Layout plan_layout(const ConvGeom& g, const IsaKernels& k, int64_t planes, bool depthwise) {
  const int64_t Hs = round_up(g.H + g.pt + g.pb, g.sh), Wq = ceil_div(g.W + g.pl + g.pr, g.sw);
  const int64_t image_bytes = planes * Hs * Wq * g.sw * static_cast<int64_t>(sizeof(uint32_t));
  int64_t stack = std::min(g.N, std::max<int64_t>(1, g.N / (kUnitsPerThread * static_cast<int64_t>(num_threads()))));
  stack = std::min(stack, std::max<int64_t>(1, kMaxStackBytes / image_bytes));
  if (g.in_sc == 1) stack = 1;  // channels-last input (matmul): packed per image
  while (g.N % stack != 0) --stack;  // every unit full: no lanes of images past N
  int64_t best_images = 1, best_vectors = depthwise ? k.dw_vectors : k.max_vectors;
  double best = cost_per_image(g, k.lanes, best_vectors, 1);
  for (int64_t images : {int64_t{1}, stack})
    for (int64_t v = depthwise ? k.dw_vectors : k.max_vectors; v >= (depthwise ? k.dw_vectors : 1); --v) {
      const double cost = cost_per_image(g, k.lanes, v, images);
      if (cost < best) best = cost, best_images = images, best_vectors = v;
    }
  return make_layout(g, planes, k.lanes, best_vectors, best_images);
}

RowPacker::RowPacker(const QConvArgs& a, const Layout& L) : a_(a), L_(L) {
  const int64_t n = L.Hs * L.Wp;  // the longest constant run: a whole padded image (channels past Cg)
  zx_.assign(static_cast<std::size_t>(n), static_cast<uint8_t>(a.x_zero_point));
  zero_.assign(static_cast<std::size_t>(n), 0);
}

RowPacker::Src RowPacker::row(int64_t n, int64_t c, int64_t hp) const {
  const ConvGeom& g = a_.g;
  const bool zero = c < 0 || hp >= L_.Hp;
  if (zero || hp < g.pt || hp >= g.pt + g.H) return {zero ? zero_.data() : zx_.data(), zero};
  return {a_.x + n * g.in_sn + c * g.in_sc + (hp - g.pt) * g.in_sh, false};
}

void RowPacker::put(const Src* rows, int count, int64_t h, uint32_t* plane0, Workspace& ws, Interleave f) const {
  const ConvGeom& g = a_.g;
  uint32_t** base = Workspace::get(ws.phases, 2 * L_.sw);  // column phases of unit row h
  uint32_t** dst = base + L_.sw;
  for (int64_t pw = 0; pw < L_.sw; ++pw) base[pw] = plane0 + L_.row_at[h] + pw * L_.Hq * L_.Wq;
  const uint8_t* r[kQuad];
  auto segment = [&](int64_t c0, int64_t n, bool interior) {  // padded columns [c0, c0 + n)
    if (n <= 0) return;
    for (int64_t k = 0; k < L_.sw; ++k) dst[k] = base[(c0 + k) % L_.sw] + (c0 + k) / L_.sw;
    for (int i = 0; i < count; ++i) r[i] = interior || rows[i].zero ? rows[i].p : zx_.data();
    f(r, n, L_.sw, dst);
  };
  uint8_t* strided = nullptr;
  for (int i = 0; i < count && g.in_sw != 1; ++i)  // gather strided interiors (not used by NCHW inputs)
    if (!rows[i].zero && rows[i].p != zx_.data()) {
      if (!strided) strided = Workspace::get(ws.rows, kQuad * g.W);
      for (int64_t w = 0; w < g.W; ++w) strided[i * g.W + w] = rows[i].p[w * g.in_sw];
    }
  Src local[kQuad];
  for (int i = 0; i < count; ++i)
    local[i] = strided && !rows[i].zero && rows[i].p != zx_.data() ? Src{strided + i * g.W, false} : rows[i];
  rows = local;
  segment(0, g.pl, false);
  segment(g.pl, g.W, true);
  segment(g.pl + g.W, L_.Wp - g.pl - g.W, false);
}

void RowPacker::quads(int64_t n0, int64_t grp, Workspace& ws, uint32_t* buf) const {
  const ConvGeom& g = a_.g;
  const int64_t Cg = g.Cg(), CQ = ceil_div(Cg, kQuad);
  const bool whole = L_.sh == 1 && L_.sw == 1 && g.pl == 0 && g.pr == 0 && g.in_sw == 1 && g.in_sh == g.W;
  Src rows[kQuad];
  for (int64_t cq = 0; cq < CQ; ++cq) {
    uint32_t* plane0 = buf + cq * L_.plane;
    if (!whole && L_.Wp < kShortRow) {  // short rows: padded planes first, then whole-plane interleaves
      const int64_t size = L_.rows * L_.Wp;
      uint8_t* p = Workspace::get(ws.rows, kQuad * size);
      const uint8_t* planes[kQuad];
      const int64_t offsets[kQuad] = {};
      for (int64_t k = 0; k < kQuad; ++k) {
        const int64_t ci = cq * kQuad + k;
        plane(n0, ci < Cg ? grp * Cg + ci : -1, 0, p + k * size);
        planes[k] = p + k * size;
      }
      interleave_planes(planes, offsets, kQuad, 0, plane0, ws, interleave_quads);
      continue;
    }
    for (int64_t i = 0; i < L_.images; ++i) {
      if (whole) {  // rows contiguous in x and in the layout: top padding, image, bottom padding in 3 calls
        for (int64_t k = 0; k < kQuad; ++k) {
          const int64_t ci = cq * kQuad + k;
          rows[k] = row(n0 + i, ci < Cg ? grp * Cg + ci : -1, 0);
        }
        const uint8_t* r[kQuad];
        uint32_t* dst[1];
        for (const auto& [h0, n, interior] : {std::tuple<int64_t, int64_t, bool>{0, g.pt, false},
                                              {g.pt, g.H, true}, {g.pt + g.H, L_.Hs - g.pt - g.H, false}}) {
          if (n == 0) continue;
          for (int64_t k = 0; k < kQuad; ++k) {
            const int64_t ci = cq * kQuad + k;
            r[k] = ci >= Cg || h0 >= L_.Hp ? zero_.data()
                   : interior       ? a_.x + (n0 + i) * g.in_sn + (grp * Cg + ci) * g.in_sc
                                    : zx_.data();
          }
          dst[0] = plane0 + L_.row_at[i * L_.Hs + h0];
          interleave_quads(r, n * L_.Wp, 1, dst);
        }
        continue;
      }
      for (int64_t hp = 0; hp < L_.Hs; ++hp) {
        for (int64_t k = 0; k < kQuad; ++k) {
          const int64_t ci = cq * kQuad + k;
          rows[k] = row(n0 + i, ci < Cg ? grp * Cg + ci : -1, hp);
        }
        put(rows, kQuad, i * L_.Hs + hp, plane0, ws, interleave_quads);
      }
    }
  }
}

void RowPacker::plane(int64_t n0, int64_t c, int64_t below, uint8_t* dst) const {
  const ConvGeom& g = a_.g;
  const int64_t Wp = L_.Wp, Hb = L_.Hq + ceil_div(below, L_.sh);  // rows per row-phase block
  if (c < 0 || L_.Hs != L_.Hp || below > 0) std::memset(dst, 0, static_cast<std::size_t>(L_.sh * Hb * Wp));
  if (c < 0) return;
  const int64_t sh = L_.sh, Hs = L_.Hs, Hp = L_.Hp, pt = g.pt, pl = g.pl, H = g.H, W = g.W;
  const int64_t in_sh = g.in_sh, in_sw = g.in_sw;
  const uint8_t* zx = zx_.data();
  for (int64_t i = 0; i < L_.images; ++i) {
    const uint8_t* src = a_.x + (n0 + i) * g.in_sn + c * g.in_sc;
    for (int64_t hp = 0, h = i * Hs; hp < Hp; ++hp, ++h) {  // h: unit row, stored in phase order
      uint8_t* d = dst + (sh == 1 ? h : h % sh * Hb + h / sh) * Wp;
      copy_bytes(d, zx, Wp);
      if (hp < pt || hp >= pt + H) continue;
      const uint8_t* s = src + (hp - pt) * in_sh;
      if (in_sw == 1)
        copy_bytes(d + pl, s, W);
      else
        for (int64_t w = 0; w < W; ++w) d[pl + w] = s[w * in_sw];
    }
  }
}

void RowPacker::interleave_planes(const uint8_t* const* planes, const int64_t* offsets, int count, int64_t below,
                                  uint32_t* plane0, Workspace& ws, Interleave f) const {
  const int64_t Hb = L_.Hq + ceil_div(below, L_.sh);
  uint32_t** dst = Workspace::get(ws.phases, L_.sw);
  const uint8_t* src[kQuad];
  for (int64_t ph = 0; ph < L_.sh; ++ph) {  // unit rows ph, ph + sh, ...: one row of the layout's phase blocks each
    for (int i = 0; i < count; ++i)  // plane i is read offsets[i] unit rows further down
      src[i] = planes[i] + ((ph + offsets[i]) % L_.sh * Hb + (ph + offsets[i]) / L_.sh) * L_.Wp;
    for (int64_t pw = 0; pw < L_.sw; ++pw) dst[pw] = plane0 + (ph * L_.sw + pw) * L_.Hq * L_.Wq;
    f(src, L_.Hq * L_.Wp, L_.sw, dst);  // Wp % sw == 0: column c of the run is column c % Wp of its row
  }
}

void RowPacker::pairs(int64_t n0, int64_t c, Workspace& ws, uint32_t* buf) const {
  const int64_t dh = a_.g.dh, Hb = L_.Hq + ceil_div(dh, L_.sh);
  uint8_t* p = Workspace::get(ws.rows, L_.sh * Hb * L_.Wp);
  plane(n0, c, dh, p);
  const uint8_t* const planes[2] = {p, p};
  const int64_t offsets[2] = {0, dh};
  interleave_planes(planes, offsets, 2, dh, buf, ws, interleave_pairs);
}

void pack_quads_channels(const QConvArgs& a, const Layout& L, int64_t n, int64_t grp, uint32_t* buf) {
  const ConvGeom& g = a.g;
  const int64_t Cg = g.Cg(), CQ = ceil_div(Cg, kQuad);
  for (int64_t hp = 0; hp < L.Hp; ++hp)
    for (int64_t wp = 0; wp < L.Wp; ++wp) {
      const bool inside = hp >= g.pt && hp < g.pt + g.H && wp >= g.pl && wp < g.pl + g.W;
      const uint8_t* px = inside ? a.x + n * g.in_sn + (hp - g.pt) * g.in_sh + (wp - g.pl) * g.in_sw + grp * Cg : nullptr;
      const int64_t at = L.at(hp, wp);
      for (int64_t cq = 0; cq < CQ; ++cq) {
        uint32_t q = 0;
        for (int64_t k = 0; k < kQuad && cq * kQuad + k < Cg; ++k)
          q |= static_cast<uint32_t>(inside ? px[cq * kQuad + k] : a.x_zero_point) << (kByteBits * k);
        buf[cq * L.plane + at] = q;
      }
    }
}

Finish make_finish(const QConvArgs& a, int64_t reduction, int64_t slots) {
  Finish f;
  int64_t max_bias = 0;
  f.bias.assign(static_cast<std::size_t>(a.g.O), 0);
  for (int64_t o = 0; o < a.g.O; ++o) {
    if (a.bias) f.bias[o] = a.bias[o];
    max_bias = std::max<int64_t>(max_bias, f.bias[o] < 0 ? -f.bias[o] : f.bias[o]);
  }
  const bool f32 = a.rq.spec.mode == Rounding::Float32Rne;
  const bool safe = (f32 || a.acc_out) && reduction * kMaxProduct + max_bias <= a.acc.max();
  f.mode = !safe ? FinishMode::Exact : a.acc_out ? FinishMode::Acc : a.y16 ? FinishMode::CodesU16 : FinishMode::CodesU8;
  if (!a.acc_out) {
    f.flo = static_cast<float>(a.rq.lo - a.rq.zero_point);
    f.fhi = static_cast<float>(a.rq.hi - a.rq.zero_point);
    f.zp = a.rq.zero_point;
  }
  f.add.assign(static_cast<std::size_t>(slots), 0);
  f.coef.assign(static_cast<std::size_t>(slots), 0);
  f.m.assign(static_cast<std::size_t>(slots), 0.0f);
  return f;
}

void set_channel(const QConvArgs& a, Finish& f, int64_t o, int64_t slot, int64_t sum_wz) {
  int64_t add = -static_cast<int64_t>(a.x_zero_point) * sum_wz;
  if (f.mode != FinishMode::Exact) add += f.bias[o];
  f.add[slot] = static_cast<int32_t>(static_cast<uint32_t>(add));
  f.coef[slot] = kWeightOffset - a.w_zero_point[o];
  f.m[slot] = a.acc_out ? 0.0f : a.rq.ch[o].m32;
}

template <class Fn>
void Emitter::for_each_run(int64_t v0, Fn fn) const {
  const int64_t vend = std::min(v0 + L_.tile, L_.V), image = L_.out_rows * L_.Wq;
  if (L_.Wq == L_.OW) {  // no dropped columns: an image's outputs are one run
    for (int64_t i = v0 / image; i * image < vend; ++i) {
      const int64_t s = std::max(v0, i * image), e = std::min(vend, i * image + L_.OH * L_.Wq);
      if (s < e) fn(i, s - i * image, s - v0, e - s);
    }
    return;
  }
  int64_t vr = v0 / L_.Wq, i = vr / L_.out_rows, oh = vr % L_.out_rows;
  for (; vr * L_.Wq < vend; ++vr, ++oh) {  // virtual output rows: image i of the unit, output row oh
    if (oh == L_.out_rows) oh = 0, ++i;
    const int64_t s = std::max(v0, vr * L_.Wq), e = std::min(vend, vr * L_.Wq + L_.OW);
    if (oh < L_.OH && s < e) fn(i, oh * L_.OW + s - vr * L_.Wq, s - v0, e - s);
  }
}

template <class T>
void Emitter::copy_rows(const T* staging, T* y, int64_t n0, int64_t o0, int64_t rows, int64_t v0) const {
  const ConvGeom& g = a_.g;
  for_each_run(v0, [&](int64_t i, int64_t p, int64_t from, int64_t len) {
    T* yo = y + (n0 + i) * g.out_sn + o0 * g.out_so + p * g.out_sp;
    for (int64_t r = 0; r < rows; ++r) copy_run(yo + r * g.out_so, g.out_sp, staging + r * L_.tile + from, len);
  });
}

void Emitter::rows(const void* staging, int64_t n0, int64_t o0, int64_t rows, int64_t v0, AccStats& st) const {
  const ConvGeom& g = a_.g;
  switch (f_.mode) {
    case FinishMode::CodesU8:
      return copy_rows(static_cast<const uint8_t*>(staging), static_cast<uint8_t*>(a_.y), n0, o0, rows, v0);
    case FinishMode::CodesU16:
      return copy_rows(static_cast<const uint16_t*>(staging), static_cast<uint16_t*>(a_.y), n0, o0, rows, v0);
    case FinishMode::Acc:
      return copy_rows(static_cast<const int32_t*>(staging), a_.acc_out, n0, o0, rows, v0);
    case FinishMode::Exact:
      for_each_run(v0, [&](int64_t i, int64_t p, int64_t from, int64_t len) {
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t* src = static_cast<const int32_t*>(staging) + r * L_.tile + from;
          const int64_t o = o0 + r, idx = (n0 + i) * g.out_sn + o * g.out_so + p * g.out_sp;
          for (int64_t k = 0; k < len; ++k) finish_output(a_, src[k] + f_.bias[o], o, idx + k * g.out_sp, st);
        }
      });
  }
}

}  // namespace vnni
}  // namespace integer
}  // namespace pyzeroq
