// Planar VNNI path of the fast QLinearConv / QLinearMatMul: layout, packing, weight
// preparation, tiling, parallel driver and the stores of finished tiles. The ISA
// kernels it calls live in integer_conv_vnni512.cpp / integer_conv_vnni256.cpp;
// the layout and the exact decomposition are described in integer_conv_vnni.hpp.
#include "kernels/integer_conv_vnni.hpp"

#include <emmintrin.h>  // SSE2 (x86-64 baseline): rows -> quads / pairs

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace pyzeroq {
namespace integer {
namespace vnni {
namespace {

constexpr int64_t kSseBytes = 16;       // columns per SSE2 interleave step
constexpr int kByteBits = 8;
constexpr int kHalfBits = 16;
constexpr int64_t kImagesPerThread = 2;  // (image, group) units per thread above which tasks are whole units
constexpr int64_t kTilesPerTask = 8;    // tiles per task when units are split

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
int64_t ceil_div(int64_t v, int64_t m) { return (v + m - 1) / m; }

// ---- layout ------------------------------------------------------------------
struct Layout {
  int64_t sh = 1, sw = 1, Hp = 0, Wp = 0, Hq = 0, Wq = 0, plane = 0;
  int64_t V = 0, OW = 0, tile = 0, Vpad = 0, lanes = 0;
  int64_t buffer = 0;             // uint32 per packed unit: every read of every tile lies below
  std::vector<int64_t> tapbase;   // [KH * KW], (ki, kj) order
  std::vector<uint16_t> valid;    // per lane vector of [0, Vpad): bit l = position is an output
  std::vector<int64_t> row_at;    // [Hp]: at(h, 0); column phase pw adds pw * Hq * Wq
  int64_t at(int64_t h, int64_t w) const { return ((h % sh * sw + w % sw) * Hq + h / sh) * Wq + w / sw; }
};

Layout make_layout(const ConvGeom& g, int64_t lanes, int64_t tile, int64_t planes) {
  Layout L;
  L.sh = g.sh, L.sw = g.sw;
  L.Hp = g.H + g.pt + g.pb, L.Wp = g.W + g.pl + g.pr;
  L.Hq = ceil_div(L.Hp, g.sh), L.Wq = ceil_div(L.Wp, g.sw);
  L.plane = g.sh * g.sw * L.Hq * L.Wq;
  L.V = g.OH * L.Wq, L.OW = g.OW, L.lanes = lanes, L.tile = tile, L.Vpad = round_up(L.V, tile);
  int64_t max_tap = 0;
  for (int64_t ki = 0; ki < g.KH; ++ki)
    for (int64_t kj = 0; kj < g.KW; ++kj) {
      L.tapbase.push_back(L.at(ki * g.dh, kj * g.dw));
      max_tap = std::max(max_tap, L.tapbase.back());
    }
  L.buffer = std::max((planes - 1) * L.plane + max_tap + L.Vpad, planes * L.plane);
  for (int64_t h = 0; h < L.Hp; ++h) L.row_at.push_back(L.at(h, 0));
  L.valid.assign(static_cast<std::size_t>(L.Vpad / lanes), 0);
  for (int64_t v = 0; v < L.V; ++v)
    if (v % L.Wq < L.OW) L.valid[v / lanes] |= static_cast<uint16_t>(1u << (v % lanes));
  return L;
}

// Per-task scratch memory, grown on first use and reused for every unit and tile.
struct Workspace {
  std::vector<uint8_t> rows;      // padded input rows
  std::vector<uint32_t*> phases;  // phase rows of one padded row
  std::vector<int32_t> acc, staging, pix;
  template <class T>
  static T* get(std::vector<T>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<std::size_t>(n));
    return v.data();
  }
};

// ---- packing -----------------------------------------------------------------
// Stores 16 consecutive columns (quads or pairs) q[0..3] starting at column w (a
// multiple of 16) into the phase rows dst[w % sw] (sw 1 or 2).
void store_columns(const __m128i q[4], int64_t w, int64_t sw, uint32_t* const* dst) {
  if (sw == 1) {
    for (int i = 0; i < 4; ++i) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst[0] + w + 4 * i), q[i]);
    return;
  }
  for (int half = 0; half < 2; ++half) {  // columns w + 8 half .. + 7
    const __m128i a = _mm_shuffle_epi32(q[2 * half], _MM_SHUFFLE(3, 1, 2, 0));
    const __m128i b = _mm_shuffle_epi32(q[2 * half + 1], _MM_SHUFFLE(3, 1, 2, 0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst[0] + w / 2 + 4 * half), _mm_unpacklo_epi64(a, b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst[1] + w / 2 + 4 * half), _mm_unpackhi_epi64(a, b));
  }
}

// dst[w % sw][w / sw] = r[0][w] | r[1][w] << 8 | r[2][w] << 16 | r[3][w] << 24, w < n.
void interleave_quads(const uint8_t* const r[4], int64_t n, int64_t sw, uint32_t* const* dst) {
  int64_t w = 0;
  if (sw <= 2) {
    for (; w + kSseBytes <= n; w += kSseBytes) {
      const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[0] + w));
      const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[1] + w));
      const __m128i a2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[2] + w));
      const __m128i a3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[3] + w));
      const __m128i t0 = _mm_unpacklo_epi8(a0, a1), t1 = _mm_unpackhi_epi8(a0, a1);
      const __m128i t2 = _mm_unpacklo_epi8(a2, a3), t3 = _mm_unpackhi_epi8(a2, a3);
      const __m128i q[4] = {_mm_unpacklo_epi16(t0, t2), _mm_unpackhi_epi16(t0, t2), _mm_unpacklo_epi16(t1, t3),
                            _mm_unpackhi_epi16(t1, t3)};
      store_columns(q, w, sw, dst);
    }
  }
  for (int64_t pw = 0; pw < sw; ++pw)  // w % sw == 0
    for (int64_t c = w + pw, i = (w + pw) / sw; c < n; c += sw, ++i)
      dst[pw][i] = static_cast<uint32_t>(r[0][c]) | static_cast<uint32_t>(r[1][c]) << kByteBits |
                        static_cast<uint32_t>(r[2][c]) << (2 * kByteBits) | static_cast<uint32_t>(r[3][c]) << (3 * kByteBits);
}

// dst[w % sw][w / sw] = lo[w] | hi[w] << 16 (two int16 codes), w < n.
void interleave_pairs(const uint8_t* lo, const uint8_t* hi, int64_t n, int64_t sw, uint32_t* const* dst) {
  int64_t w = 0;
  if (sw <= 2) {
    const __m128i z = _mm_setzero_si128();
    for (; w + kSseBytes <= n; w += kSseBytes) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + w));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi + w));
      const __m128i a0 = _mm_unpacklo_epi8(a, z), a1 = _mm_unpackhi_epi8(a, z);
      const __m128i b0 = _mm_unpacklo_epi8(b, z), b1 = _mm_unpackhi_epi8(b, z);
      const __m128i q[4] = {_mm_unpacklo_epi16(a0, b0), _mm_unpackhi_epi16(a0, b0), _mm_unpacklo_epi16(a1, b1),
                            _mm_unpackhi_epi16(a1, b1)};
      store_columns(q, w, sw, dst);
    }
  }
  for (int64_t pw = 0; pw < sw; ++pw)  // w % sw == 0
    for (int64_t c = w + pw, i = (w + pw) / sw; c < n; c += sw, ++i) dst[pw][i] = static_cast<uint32_t>(lo[c]) | static_cast<uint32_t>(hi[c]) << kHalfBits;
}

// Padded channel planes: Hp x Wp bytes, zx in the padding, then `below` rows of 0.
class PlaneSource {
 public:
  PlaneSource(const QConvArgs& a, const Layout& L, int64_t below)
      : a_(a), L_(L), size_((L.Hp + below) * L.Wp), zero_(static_cast<std::size_t>(size_), 0) {}
  int64_t size() const { return size_; }
  const uint8_t* zeros() const { return zero_.data(); }
  // Plane of channel c of image n, built in dst (size() bytes).
  const uint8_t* plane(int64_t n, int64_t c, uint8_t* dst) const {
    const ConvGeom& g = a_.g;
    const int64_t Wp = L_.Wp;
    std::memset(dst, a_.x_zero_point, static_cast<std::size_t>(L_.Hp * Wp));
    std::memset(dst + L_.Hp * Wp, 0, static_cast<std::size_t>(size_ - L_.Hp * Wp));
    const uint8_t* src = a_.x + n * g.in_sn + c * g.in_sc;
    uint8_t* d = dst + g.pt * Wp + g.pl;
    for (int64_t h = 0; h < g.H; ++h, d += Wp, src += g.in_sh) {
      if (g.in_sw == 1)
        std::memcpy(d, src, static_cast<std::size_t>(g.W));
      else
        for (int64_t w = 0; w < g.W; ++w) d[w] = src[w * g.in_sw];
    }
    return dst;
  }

 private:
  const QConvArgs& a_;
  const Layout& L_;
  const int64_t size_;
  std::vector<uint8_t> zero_;
};

// Interleaves padded planes (Hp x Wp bytes each) into the layout at plane0 by rows:
// put(rows, n, sw, dst) with rows[i] = row hp of plane i; one call over the whole
// planes when there is no stride (the layout is then row-major like the planes).
template <int kPlanes, class Put>
void interleave_planes(const Layout& L, const uint8_t* const (&planes)[kPlanes], uint32_t* plane0, Workspace& ws,
                       Put put) {
  if (L.sh == 1 && L.sw == 1) {
    uint32_t* const dst[1] = {plane0};
    put(planes, L.Hp * L.Wp, int64_t{1}, dst);
    return;
  }
  uint32_t** dst = Workspace::get(ws.phases, L.sw);
  const uint8_t* rows[kPlanes];
  for (int64_t hp = 0; hp < L.Hp; ++hp) {
    for (int64_t pw = 0; pw < L.sw; ++pw) dst[pw] = plane0 + L.row_at[hp] + pw * L.Hq * L.Wq;
    for (int i = 0; i < kPlanes; ++i) rows[i] = planes[i] + hp * L.Wp;
    put(rows, L.Wp, L.sw, dst);
  }
}

// Channel quads of group grp of image n (NCHW-like input: rows contiguous).
void pack_quads_rows(const QConvArgs& a, const Layout& L, const PlaneSource& src, int64_t n, int64_t grp,
                     Workspace& ws, uint32_t* buf) {
  const int64_t Cg = a.g.Cg(), CQ = ceil_div(Cg, kQuad);
  uint8_t* scratch = Workspace::get(ws.rows, kQuad * src.size());
  for (int64_t cq = 0; cq < CQ; ++cq) {
    const uint8_t* planes[kQuad];
    for (int64_t k = 0; k < kQuad; ++k) {
      const int64_t ci = cq * kQuad + k;
      planes[k] = ci < Cg ? src.plane(n, grp * Cg + ci, scratch + k * src.size()) : src.zeros();
    }
    interleave_planes<kQuad>(L, planes, buf + cq * L.plane, ws,
                             [](const uint8_t* const* r, int64_t m, int64_t sw, uint32_t* const* dst) {
                               interleave_quads(r, m, sw, dst);
                             });
  }
}

// Channel quads when channels are contiguous in the input (in_sc == 1: matmul rows).
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

// Depthwise: plane of (x[hp][w], x[hp + dh][w]) pairs of channel c of image n.
void pack_pairs(const QConvArgs& a, const Layout& L, const PlaneSource& src, int64_t n, int64_t c, Workspace& ws,
                uint32_t* buf) {
  const uint8_t* p = src.plane(n, c, Workspace::get(ws.rows, src.size()));
  const uint8_t* const planes[2] = {p, p + a.g.dh * L.Wp};
  interleave_planes<2>(L, planes, buf, ws, [](const uint8_t* const* r, int64_t m, int64_t sw, uint32_t* const* dst) {
    interleave_pairs(r[0], r[1], m, sw, dst);
  });
}

// ---- finished tiles -> outputs -------------------------------------------------
// What the epilogue needs per output channel, and the mode it runs in.
struct Finish {
  FinishMode mode = FinishMode::Exact;
  std::vector<int32_t> add, coef;  // per padded channel slot
  std::vector<float> m;
  std::vector<int64_t> bias;       // per output channel (Exact mode adds it in int64)
  float flo = 0.0f, fhi = 0.0f;
  int32_t zp = 0;
};

// Vector modes need every biased accumulator to fit the acc_bits register (as Epilogue::safe_).
Finish make_finish(const QConvArgs& a, int64_t reduction) {
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
  return f;
}

// Sets the constants of output channel o in padded slot `slot`: add = -zx * sum (w - zw)
// (+ bias in the vector modes), wrapped to int32 (the exact result fits int32).
void set_channel(const QConvArgs& a, Finish& f, int64_t o, int64_t slot, int64_t sum_wz) {
  int64_t add = -static_cast<int64_t>(a.x_zero_point) * sum_wz;
  if (f.mode != FinishMode::Exact) add += f.bias[o];
  f.add[slot] = static_cast<int32_t>(static_cast<uint32_t>(add));
  f.coef[slot] = kWeightOffset - a.w_zero_point[o];
  f.m[slot] = a.acc_out ? 0.0f : a.rq.ch[o].m32;
}

template <class T>
void copy_run(T* __restrict y, int64_t stride, const T* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i * stride] = src[i];
}

// Stores lanes [v0, v0 + tile) of `rows` finished rows (row r = output channel o0 + r, at
// staging + r * tile) of image n: every virtual position that is an output.
class Emitter {
 public:
  Emitter(const QConvArgs& a, const Layout& L, const Finish& f) : a_(a), L_(L), f_(f) {}
  void rows(const void* staging, int64_t n, int64_t o0, int64_t rows, int64_t v0, AccStats& st) const {
    const int64_t vend = std::min(v0 + L_.tile, L_.V);
    for (int64_t oh = v0 / L_.Wq; oh * L_.Wq < vend; ++oh) {
      const int64_t s = std::max(v0, oh * L_.Wq), e = std::min(vend, oh * L_.Wq + L_.OW);
      if (s >= e) continue;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t idx = n * a_.g.out_sn + (o0 + r) * a_.g.out_so + (oh * L_.OW + s - oh * L_.Wq) * a_.g.out_sp;
        run(staging, r * L_.tile + s - v0, o0 + r, idx, e - s, st);
      }
    }
  }

 private:
  void run(const void* staging, int64_t from, int64_t o, int64_t idx, int64_t n, AccStats& st) const {
    const int64_t sp = a_.g.out_sp;
    switch (f_.mode) {
      case FinishMode::CodesU8:
        return copy_run(static_cast<uint8_t*>(a_.y) + idx, sp, static_cast<const uint8_t*>(staging) + from, n);
      case FinishMode::CodesU16:
        return copy_run(static_cast<uint16_t*>(a_.y) + idx, sp, static_cast<const uint16_t*>(staging) + from, n);
      case FinishMode::Acc:
        return copy_run(a_.acc_out + idx, sp, static_cast<const int32_t*>(staging) + from, n);
      case FinishMode::Exact:
        for (int64_t i = 0; i < n; ++i)
          finish_output(a_, static_cast<const int32_t*>(staging)[from + i] + f_.bias[o], o, idx + i * sp, st);
    }
  }
  const QConvArgs& a_;
  const Layout& L_;
  const Finish& f_;
};

// Running min / max of the vector modes, added to the stats at the end of a task.
struct Range {
  int32_t mn = std::numeric_limits<int32_t>::max(), mx = std::numeric_limits<int32_t>::min();
  void flush(AccStats& st) const {
    if (mn > mx) return;  // no output seen
    st.add(mn);
    st.add(mx);
  }
};

// parallel_for over `units` packed units (image, group / channel), each of `tiles` tiles:
// whole units per task when there are many, else units packed first and tiles split.
// prepare(unit, buf, ws) packs a unit; compute(unit, buf, tile_begin, tile_end, st, ws) runs tiles.
template <class Prepare, class Compute>
AccStats drive(int64_t units, int64_t tiles, int64_t buffer, std::size_t tile_cost, Prepare prepare, Compute compute) {
  StatsSink sink;
  const std::size_t unit_cost = tile_cost * static_cast<std::size_t>(tiles);
  if (units >= kImagesPerThread * static_cast<int64_t>(num_threads())) {
    parallel_for(static_cast<std::size_t>(units), grain_for_cost(unit_cost), [&](std::size_t b, std::size_t e) {
      AccStats st;
      Workspace ws;
      std::vector<uint32_t> buf(static_cast<std::size_t>(buffer), 0);
      for (std::size_t u = b; u < e; ++u) {
        prepare(static_cast<int64_t>(u), buf.data(), ws);
        compute(static_cast<int64_t>(u), buf.data(), int64_t{0}, tiles, st, ws);
      }
      sink.merge(st);
    });
    return sink.total();
  }
  std::vector<uint32_t> all(static_cast<std::size_t>(units * buffer), 0);
  parallel_for(static_cast<std::size_t>(units), grain_for_cost(static_cast<std::size_t>(buffer)),
               [&](std::size_t b, std::size_t e) {
                 Workspace ws;
                 for (std::size_t u = b; u < e; ++u) prepare(static_cast<int64_t>(u), all.data() + u * buffer, ws);
               });
  const int64_t chunks = ceil_div(tiles, kTilesPerTask);
  parallel_for(static_cast<std::size_t>(units * chunks), grain_for_cost(tile_cost * kTilesPerTask),
               [&](std::size_t b, std::size_t e) {
                 AccStats st;
                 Workspace ws;
                 for (std::size_t task = b; task < e; ++task) {
                   const int64_t u = static_cast<int64_t>(task) / chunks, c = static_cast<int64_t>(task) % chunks;
                   compute(u, all.data() + u * buffer, c * kTilesPerTask, std::min(tiles, (c + 1) * kTilesPerTask), st,
                           ws);
                 }
                 sink.merge(st);
               });
  return sink.total();
}

// ---- general (grouped) conv / matmul -------------------------------------------
class GemmPlan {
 public:
  GemmPlan(const QConvArgs& a, const IsaKernels& k)
      : a_(a), k_(k), G_(a.g.groups), Cg_(a.g.Cg()), Og_(a.g.Og()), CQ_(ceil_div(Cg_, kQuad)),
        T_(a.g.KH * a.g.KW), OB_(ceil_div(Og_, k.rows)), L_(make_layout(a.g, k.lanes, k.vectors * k.lanes, CQ_)),
        f_(make_finish(a, T_ * Cg_)), src_(a, L_, 0), emit_(a, L_, f_) {
    pack_weights();
  }
  AccStats run() const {
    const std::size_t tile_cost = static_cast<std::size_t>(L_.tile * Og_ * T_ * Cg_);
    return drive(a_.g.N * G_, L_.Vpad / L_.tile, L_.buffer + L_.Vpad, tile_cost,
                 [&](int64_t u, uint32_t* buf, Workspace& ws) { prepare(u / G_, u % G_, buf, ws); },
                 [&](int64_t u, uint32_t* buf, int64_t tb, int64_t te, AccStats& st, Workspace& ws) {
                   compute(u / G_, u % G_, buf, tb, te, st, ws);
                 });
  }
 private:
  // weights [G][OB][T][CQ][rows] of int8 quads w - 128 (0 past Cg and Og); channel constants.
  void pack_weights() {
    const int64_t R = k_.rows, slots = G_ * OB_ * R;
    w_.assign(static_cast<std::size_t>(slots * T_ * CQ_), 0);
    f_.add.assign(static_cast<std::size_t>(slots), 0), f_.coef.assign(static_cast<std::size_t>(slots), 0);
    f_.m.assign(static_cast<std::size_t>(slots), 0.0f), sumx_needed_.assign(static_cast<std::size_t>(G_), 0);
    for (int64_t o = 0; o < a_.g.O; ++o) {
      const int64_t grp = o / Og_, ol = o % Og_, r = ol % R;
      uint32_t* dst = w_.data() + (grp * OB_ + ol / R) * T_ * CQ_ * R;
      int64_t sum_wz = 0;
      for (int64_t ci = 0; ci < Cg_; ++ci)
        for (int64_t t = 0; t < T_; ++t) {
          const int32_t v = a_.w[(o * Cg_ + ci) * T_ + t];
          sum_wz += v - a_.w_zero_point[o];
          const uint32_t s8 = static_cast<uint8_t>(static_cast<int8_t>(v - kWeightOffset));
          dst[(t * CQ_ + ci / kQuad) * R + r] |= s8 << (kByteBits * (ci % kQuad));
        }
      set_channel(a_, f_, o, grp * OB_ * R + ol, sum_wz);
      if (a_.w_zero_point[o] != kWeightOffset) sumx_needed_[grp] = 1;
    }
  }
  // Packs unit (n, grp) into buf[0, buffer); then, if the group needs it, sum x per
  // virtual position into buf[buffer, buffer + Vpad) (as int32).
  void prepare(int64_t n, int64_t grp, uint32_t* buf, Workspace& ws) const {
    if (a_.g.in_sc == 1)
      pack_quads_channels(a_, L_, n, grp, buf);
    else
      pack_quads_rows(a_, L_, src_, n, grp, ws, buf);
    if (!sumx_needed_[grp]) return;
    int32_t* sumx = reinterpret_cast<int32_t*>(buf + L_.buffer);
    const int64_t npix = L_.buffer - (CQ_ - 1) * L_.plane;  // >= max tapbase + Vpad
    int32_t* pix = Workspace::get(ws.pix, npix);
    k_.pixel_sums(buf, L_.plane, CQ_, npix, pix);
    std::fill(sumx, sumx + L_.Vpad, 0);
    for (int64_t t = 0; t < T_; ++t) {
      const int32_t* p = pix + L_.tapbase[t];
      for (int64_t v = 0; v < L_.Vpad; ++v) sumx[v] += p[v];
    }
  }
  void compute(int64_t n, int64_t grp, const uint32_t* buf, int64_t tb, int64_t te, AccStats& st,
               Workspace& ws) const {
    const int64_t R = k_.rows, ld = L_.tile;
    int32_t* acc = Workspace::get(ws.acc, R * ld);
    int32_t* staging = Workspace::get(ws.staging, R * ld);
    const int32_t* sumx = sumx_needed_[grp] ? reinterpret_cast<const int32_t*>(buf + L_.buffer) : nullptr;
    Range range;
    for (int64_t tile = tb; tile < te; ++tile) {
      const int64_t v0 = tile * ld;
      for (int64_t ob = 0; ob < OB_; ++ob) {
        const int64_t slot = (grp * OB_ + ob) * R;
        k_.gemm({buf + v0, L_.plane, L_.tapbase.data(), T_, CQ_, w_.data() + slot * T_ * CQ_, acc, ld});
        k_.finish({acc, R, k_.vectors, ld, sumx ? sumx + v0 : nullptr, f_.add.data() + slot,
                   f_.coef.data() + slot, f_.m.data() + slot, L_.valid.data() + v0 / L_.lanes, f_.flo, f_.fhi, f_.zp,
                   f_.mode, staging, &range.mn, &range.mx});
        emit_.rows(staging, n, grp * Og_ + ob * R, std::min(R, Og_ - ob * R), v0, st);
      }
    }
    range.flush(st);
  }
  const QConvArgs& a_;
  const IsaKernels& k_;
  const int64_t G_, Cg_, Og_, CQ_, T_, OB_;
  const Layout L_;
  Finish f_;
  const PlaneSource src_;
  const Emitter emit_;
  std::vector<uint32_t> w_;
  std::vector<char> sumx_needed_;
};


// ---- depthwise (one input and one output channel per group) ----------------------
class DwPlan {
 public:
  DwPlan(const QConvArgs& a, const IsaKernels& k)
      : a_(a), k_(k), T_(a.g.KH * a.g.KW), P_(ceil_div(a.g.KH, 2) * a.g.KW),
        L_(make_layout(a.g, k.lanes, k.dw_vectors * k.lanes, 1)), f_(make_finish(a, T_)), src_(a, L_, a.g.dh),
        emit_(a, L_, f_) {
    pack_weights();
  }
  AccStats run() const {
    const int64_t C = a_.g.C;
    return drive(a_.g.N * C, L_.Vpad / L_.tile, L_.buffer, static_cast<std::size_t>(L_.tile * T_),
                 [&](int64_t u, uint32_t* buf, Workspace& ws) { pack_pairs(a_, L_, src_, u / C, u % C, ws, buf); },
                 [&](int64_t u, uint32_t* buf, int64_t tb, int64_t te, AccStats& st, Workspace& ws) {
                   compute(u / C, u % C, buf, tb, te, st, ws);
                 });
  }

 private:
  // Per channel c and pair p = (row pair pr, column kj): (w[c][2pr][kj] - zw, w[c][2pr+1][kj] - zw)
  // as int16 (0 past KH), read at tap (2pr, kj).
  void pack_weights() {
    const ConvGeom& g = a_.g;
    const int64_t C = g.C;
    w_.assign(static_cast<std::size_t>(C * P_), 0);
    f_.add.assign(static_cast<std::size_t>(C), 0), f_.coef.assign(static_cast<std::size_t>(C), 0);
    f_.m.assign(static_cast<std::size_t>(C), 0.0f);
    for (int64_t pr = 0; 2 * pr < g.KH; ++pr)
      for (int64_t kj = 0; kj < g.KW; ++kj) tap_.push_back(L_.tapbase[2 * pr * g.KW + kj]);
    for (int64_t c = 0; c < C; ++c) {
      const uint8_t* wc = a_.w + c * T_;
      const int32_t zw = a_.w_zero_point[c];
      int64_t sum_wz = 0;
      for (int64_t t = 0; t < T_; ++t) sum_wz += wc[t] - zw;
      for (int64_t ki = 0; ki < g.KH; ++ki)
        for (int64_t kj = 0; kj < g.KW; ++kj) {
          const uint32_t v = static_cast<uint16_t>(static_cast<int16_t>(wc[ki * g.KW + kj] - zw));
          w_[c * P_ + (ki / 2) * g.KW + kj] |= v << (kHalfBits * (ki % 2));
        }
      set_channel(a_, f_, c, c, sum_wz);
    }
  }
  void compute(int64_t n, int64_t c, const uint32_t* buf, int64_t tb, int64_t te, AccStats& st, Workspace& ws) const {
    const int64_t ld = L_.tile;
    int32_t* acc = Workspace::get(ws.acc, ld);
    int32_t* staging = Workspace::get(ws.staging, ld);
    Range range;
    for (int64_t tile = tb; tile < te; ++tile) {
      const int64_t v0 = tile * ld;
      k_.dw({buf + v0, tap_.data(), P_, w_.data() + c * P_, acc});
      k_.finish({acc, 1, k_.dw_vectors, ld, nullptr, f_.add.data() + c, f_.coef.data() + c, f_.m.data() + c,
                 L_.valid.data() + v0 / L_.lanes, f_.flo, f_.fhi, f_.zp, f_.mode, staging, &range.mn, &range.mx});
      emit_.rows(staging, n, c, 1, v0, st);
    }
    range.flush(st);
  }
  const QConvArgs& a_;
  const IsaKernels& k_;
  const int64_t T_, P_;
  const Layout L_;
  Finish f_;
  const PlaneSource src_;
  const Emitter emit_;
  std::vector<int64_t> tap_;
  std::vector<uint32_t> w_;
};

}  // namespace

bool fits(const QConvArgs& a) { return a.g.KH * a.g.KW * a.g.Cg() <= kMaxVnniReduction; }

AccStats run(const QConvArgs& a, const IsaKernels& k) {
  if (a.g.Cg() == 1 && a.g.Og() == 1) return DwPlan(a, k).run();
  return GemmPlan(a, k).run();
}

}  // namespace vnni
}  // namespace integer
}  // namespace pyzeroq
