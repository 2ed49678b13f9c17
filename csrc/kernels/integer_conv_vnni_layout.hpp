// Planar VNNI path, internal: the layout of one packed unit (integer_conv_vnni.hpp
// describes it), packing of inputs into it, the per-channel epilogue constants and
// the stores of finished tiles. Used by integer_conv_vnni.cpp only.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "kernels/integer_conv_vnni.hpp"

namespace pyzeroq {
namespace integer {
namespace vnni {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t ceil_div(int64_t v, int64_t m) { return (v + m - 1) / m; }

// Unit = `images` consecutive images (one below the other) of one group (GEMM) or
// one channel (depthwise), packed into `planes` planes.
struct Layout {
  int64_t sh = 1, sw = 1, Hp = 0, Wp = 0;  // Wp: padded width rounded up to a multiple of sw
  int64_t Hs = 0;           // rows per stacked image: Hp rounded up to a multiple of sh
  int64_t images = 1;       // images per unit
  int64_t rows = 0;         // padded rows per unit: images * Hs
  int64_t Hq = 0, Wq = 0, plane = 0;
  int64_t out_rows = 0;     // virtual output rows per image: Hs / sh (the first OH are outputs)
  int64_t OH = 0, OW = 0;
  int64_t V = 0;            // virtual positions of a unit
  int64_t lanes = 0, vectors = 0, tile = 0, Vpad = 0;
  int64_t buffer = 0;       // uint32 per packed unit: every read of every tile lies below
  std::vector<int64_t> tapbase;  // [KH * KW], (ki, kj) order
  std::vector<int64_t> row_at;   // [rows]: at(h, 0); column phase pw adds pw * Hq * Wq
  std::vector<uint16_t> valid;   // per lane vector of [0, Vpad): bit l = the position is an output
  int64_t at(int64_t h, int64_t w) const { return ((h % sh * sw + w % sw) * Hq + h / sh) * Wq + w / sw; }
};

// Layout of units of `planes` planes on ISA `k`: images per unit and tile width are
// chosen to waste the fewest lanes (depthwise: dw tiles, else GEMM tiles).
Layout plan_layout(const ConvGeom& g, const IsaKernels& k, int64_t planes, bool depthwise);

// Per-task scratch memory, grown on first use and reused for every unit and tile.
struct Workspace {
  std::vector<uint8_t> rows;      // padded input planes
  std::vector<uint32_t*> phases;  // phase rows of one padded row
  std::vector<int32_t> staging, pix;
  template <class T>
  static T* get(std::vector<T>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<std::size_t>(n));
    return v.data();
  }
};

// Packs the unit's images straight from x: channel quads (GEMM) or depthwise pairs,
// padding from constant rows (zx; 0 for channels past Cg, rows past the padded image and
// the alignment rows up to Hs).
class RowPacker {
 public:
  RowPacker(const QConvArgs& a, const Layout& L);
  // Channel quads of group grp of images n0, n0 + 1, ... into buf (rows of x contiguous).
  void quads(int64_t n0, int64_t grp, Workspace& ws, uint32_t* buf) const;
  // Depthwise: the (x[h][w], x[h + dh][w]) int16 pairs of channel c of images n0, ... into buf.
  void pairs(int64_t n0, int64_t c, Workspace& ws, uint32_t* buf) const;

  using Interleave = void (*)(const uint8_t* const*, int64_t, int64_t, uint32_t* const*);

 private:
  struct Src {
    const uint8_t* p;  // W interior bytes (stride in_sw in x), or a constant row
    bool zero;         // constant 0 (else the padding columns hold zx)
  };
  // Padded row hp (< Hs) of channel c (< 0: past Cg) of image n.
  Src row(int64_t n, int64_t c, int64_t hp) const;
  // Unit row h from `count` source rows, interleaved by f into the plane at plane0.
  void put(const Src* rows, int count, int64_t h, uint32_t* plane0, Workspace& ws, Interleave f) const;
  // Padded plane of channel c (< 0: zeros) of the unit's images into dst, its unit rows in
  // phase order: row h at (h % sh) * Hb + h / sh (rows of Wp bytes, zx padding, rows past Hp
  // 0), Hb = Hq + ceil(below / sh) rows per phase block (the last ones 0).
  void plane(int64_t n0, int64_t c, int64_t below, uint8_t* dst) const;
  // `count` such planes interleaved by f into the layout at plane0, one call per row phase;
  // plane i contributes its unit row h + offsets[i] to unit row h.
  void interleave_planes(const uint8_t* const* planes, const int64_t* offsets, int count, int64_t below,
                         uint32_t* plane0, Workspace& ws, Interleave f) const;
  const QConvArgs& a_;
  const Layout& L_;
  std::vector<uint8_t> zx_, zero_;
};

// The same as RowPacker::quads when channels are contiguous in the input (in_sc == 1: matmul
// rows); one image per unit.
void pack_quads_channels(const QConvArgs& a, const Layout& L, int64_t n, int64_t grp, uint32_t* buf);

// Packed GEMM weights: quads [G][OB][T][CQ][rows] of int8 w - 128 (byte k = input channel
// 4cq + k; 0 past Cg and in rows past Og), sum_w[o] = sum of the raw w[o] (zero point free),
// raw = the weights they were packed from (cache validation; empty when not cached).
struct PackedWeights {
  std::vector<uint8_t> raw;
  std::vector<uint32_t> quads;
  std::vector<int64_t> sum_w;
};
// The packed weights of a.w for tiles of `rows` channels (integer_conv_vnni_weights.cpp):
// from a cache when the same raw weights were packed before, else packed now.
std::shared_ptr<const PackedWeights> gemm_weights(const QConvArgs& a, int64_t rows);

// Epilogue constants per output channel slot, and the mode it runs in.
struct Finish {
  FinishMode mode = FinishMode::Exact;
  std::vector<int32_t> add, coef;  // per channel slot
  std::vector<float> m;
  std::vector<int64_t> bias;       // per output channel (Exact mode adds it in int64)
  float flo = 0.0f, fhi = 0.0f;
  int32_t zp = 0;
};

// Mode for `reduction` products per output; vector modes need every biased
// accumulator to fit the acc_bits register (as the AVX2 path's Epilogue::safe_).
Finish make_finish(const QConvArgs& a, int64_t reduction, int64_t slots);
// Constants of output channel o in slot `slot`: add = -zx * sum (w - zw) (+ bias in the
// vector modes), wrapped to int32 (the exact result fits int32); coef = 128 - zw; m.
void set_channel(const QConvArgs& a, Finish& f, int64_t o, int64_t slot, int64_t sum_wz);

// Stores lanes [v0, v0 + tile) of finished rows (row r = output channel o0 + r, at
// staging + r * tile) of the unit whose first image is n0: every virtual position
// that is an output, in runs contiguous in y (Exact mode: through the scalar
// accumulator model and requantizer).
class Emitter {
 public:
  Emitter(const QConvArgs& a, const Layout& L, const Finish& f) : a_(a), L_(L), f_(f) {}
  void rows(const void* staging, int64_t n0, int64_t o0, int64_t rows, int64_t v0, AccStats& st) const;

 private:
  // fn(image i of the unit, output position p, first lane - v0, length) per run of outputs.
  template <class Fn>
  void for_each_run(int64_t v0, Fn fn) const;
  template <class T>
  void copy_rows(const T* staging, T* y, int64_t n0, int64_t o0, int64_t rows, int64_t v0) const;
  const QConvArgs& a_;
  const Layout& L_;
  const Finish& f_;
};

constexpr int64_t kImagesPerThread = 2;  // units per thread above which tasks are whole units
constexpr int64_t kTilesPerTask = 8;    // tiles per task when units are split

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
inline AccStats drive(int64_t units, int64_t tiles, int64_t buffer, std::size_t tile_cost, Prepare prepare, Compute compute) {
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

// Depthwise conv with channels in the vector lanes (integer_conv_vnni_dwc.cpp): for the
// uint8-code mode (the others take the planar depthwise tiles).
bool depthwise_in_lanes(const QConvArgs& a);
AccStats run_depthwise_in_lanes(const QConvArgs& a, const IsaKernels& k);

}  // namespace vnni
}  // namespace integer
}  // namespace pyzeroq
