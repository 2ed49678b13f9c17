// Planar VNNI path of the fast QLinearConv / QLinearMatMul: the GEMM and depthwise plans
// (channel constants, tiles, loop order) and the entry point. Layout, packing and stores:
// integer_conv_vnni_layout.cpp; packed weights: integer_conv_vnni_weights.cpp; depthwise
// with channels in the lanes: integer_conv_vnni_dwc.cpp; ISA kernels:
// integer_conv_vnni512.cpp / integer_conv_vnni256.cpp. The layout and the exact
// decomposition are described in integer_conv_vnni.hpp.
#include "kernels/integer_conv_vnni.hpp"

#include <algorithm>
#include <vector>

#include "kernels/integer_conv_vnni_layout.hpp"

namespace pyzeroq {
namespace integer {
namespace vnni {
namespace {

constexpr int kByteBits = 8;
constexpr int kHalfBits = 16;
constexpr int64_t kDwChannels = 4;  // channels (tile rows) per depthwise unit
constexpr int64_t kCachedWeightBytes = int64_t{1} << 18;  // packed weights of a group kept in cache across tiles

// ---- general (grouped) conv / matmul -------------------------------------------
class GemmPlan {
 public:
  GemmPlan(const QConvArgs& a, const IsaKernels& k)
      : a_(a), k_(k), G_(a.g.groups), Cg_(a.g.Cg()), Og_(a.g.Og()), CQ_(ceil_div(Cg_, kQuad)),
        T_(a.g.KH * a.g.KW), OB_(ceil_div(Og_, k.rows)), L_(plan_layout(a.g, k, CQ_, false)),
        f_(make_finish(a, T_ * Cg_, G_ * OB_ * k.rows)), src_(a, L_), emit_(a, L_, f_) {
    pack_weights();
  }
  AccStats run() const {
    const int64_t blocks = a_.g.N / L_.images;
    const std::size_t tile_cost = static_cast<std::size_t>(L_.tile * Og_ * T_ * Cg_);
    return drive(blocks * G_, L_.Vpad / L_.tile, L_.buffer + L_.Vpad, tile_cost,
                 [&](int64_t u, uint32_t* buf, Workspace& ws) { prepare(u / G_ * L_.images, u % G_, buf, ws); },
                 [&](int64_t u, uint32_t* buf, int64_t tb, int64_t te, AccStats& st, Workspace& ws) {
                   compute(u / G_ * L_.images, u % G_, buf, tb, te, st, ws);
                 });
  }

 private:
  // Channel constants from the packed weights' sums; whether a group needs sum x.
  void pack_weights() {
    w_ = gemm_weights(a_, k_.rows);
    sumx_needed_.assign(static_cast<std::size_t>(G_), 0);
    for (int64_t o = 0; o < a_.g.O; ++o) {
      const int64_t grp = o / Og_;
      set_channel(a_, f_, o, grp * OB_ * k_.rows + o % Og_, w_->sum_w[o] - T_ * Cg_ * a_.w_zero_point[o]);
      if (a_.w_zero_point[o] != kWeightOffset) sumx_needed_[grp] = 1;
    }
  }
  // Packs unit (images n0.., group grp) into buf[0, buffer); then, if the group needs
  // it, sum x per virtual position into buf[buffer, buffer + Vpad) (as int32).
  void prepare(int64_t n0, int64_t grp, uint32_t* buf, Workspace& ws) const {
    if (a_.g.in_sc == 1)
      pack_quads_channels(a_, L_, n0, grp, buf);
    else
      src_.quads(n0, grp, ws, buf);
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
  // Tiles [tb, te) of unit (n0.., grp), every channel block: channel blocks outer when the
  // group's weights would not stay in cache across tiles (deep layers, few positions).
  void compute(int64_t n0, int64_t grp, const uint32_t* buf, int64_t tb, int64_t te, AccStats& st,
               Workspace& ws) const {
    const int64_t R = k_.rows, ld = L_.tile;
    int32_t* staging = Workspace::get(ws.staging, R * ld);
    const int32_t* sumx = sumx_needed_[grp] ? reinterpret_cast<const int32_t*>(buf + L_.buffer) : nullptr;
    const auto gemm = k_.gemm[L_.vectors - 1];
    const bool blocks_outer = OB_ * T_ * CQ_ * R * static_cast<int64_t>(sizeof(uint32_t)) > kCachedWeightBytes;
    const int64_t outer = blocks_outer ? OB_ : te - tb, inner = blocks_outer ? te - tb : OB_;
    Range range;
    for (int64_t i = 0; i < outer; ++i)
      for (int64_t j = 0; j < inner; ++j) {
        const int64_t ob = blocks_outer ? i : j, v0 = (tb + (blocks_outer ? j : i)) * ld;
        const int64_t slot = (grp * OB_ + ob) * R;
        const int64_t rows = std::min(R, Og_ - ob * R);
        gemm({buf + v0, L_.plane, L_.tapbase.data(), T_, CQ_, w_->quads.data() + slot * T_ * CQ_},
             {rows, L_.vectors, ld, sumx ? sumx + v0 : nullptr, f_.add.data() + slot, f_.coef.data() + slot,
              f_.m.data() + slot, L_.valid.data() + v0 / L_.lanes, f_.flo, f_.fhi, f_.zp, f_.mode, staging, &range.mn,
              &range.mx});
        emit_.rows(staging, n0, grp * Og_ + ob * R, rows, v0, st);
      }
    range.flush(st);
  }
  const QConvArgs& a_;
  const IsaKernels& k_;
  const int64_t G_, Cg_, Og_, CQ_, T_, OB_;
  const Layout L_;
  Finish f_;
  const RowPacker src_;
  const Emitter emit_;
  std::shared_ptr<const PackedWeights> w_;
  std::vector<char> sumx_needed_;
};

// ---- depthwise (one input and one output channel per group) ----------------------
class DwPlan {
 public:
  DwPlan(const QConvArgs& a, const IsaKernels& k)
      : a_(a), k_(k), T_(a.g.KH * a.g.KW), P_(ceil_div(a.g.KH, 2) * a.g.KW), CB_(ceil_div(a.g.C, kDwChannels)),
        L_(plan_layout(a.g, k, kDwChannels, true)), f_(make_finish(a, T_, a.g.C)), src_(a, L_),
        emit_(a, L_, f_) {
    pack_weights();
  }
  AccStats run() const {
    const int64_t blocks = a_.g.N / L_.images;
    return drive(blocks * CB_, L_.Vpad / L_.tile, L_.buffer, static_cast<std::size_t>(kDwChannels * L_.tile * T_),
                 [&](int64_t u, uint32_t* buf, Workspace& ws) {
                   const int64_t c0 = u % CB_ * kDwChannels;
                   for (int64_t c = c0; c < std::min(a_.g.C, c0 + kDwChannels); ++c)
                     src_.pairs(u / CB_ * L_.images, c, ws, buf + (c - c0) * L_.plane);
                 },
                 [&](int64_t u, uint32_t* buf, int64_t tb, int64_t te, AccStats& st, Workspace& ws) {
                   compute(u / CB_ * L_.images, u % CB_ * kDwChannels, buf, tb, te, st, ws);
                 });
  }

 private:
  // Per channel c and pair p = (row pair pr, column kj): (w[c][2pr][kj] - zw, w[c][2pr+1][kj] - zw)
  // as int16 (0 past KH), read at tap (2pr, kj).
  void pack_weights() {
    const ConvGeom& g = a_.g;
    w_.assign(static_cast<std::size_t>(g.C * P_), 0);
    for (int64_t pr = 0; 2 * pr < g.KH; ++pr)
      for (int64_t kj = 0; kj < g.KW; ++kj) tap_.push_back(L_.tapbase[2 * pr * g.KW + kj]);
    for (int64_t c = 0; c < g.C; ++c) {
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
  // Tiles [tb, te) of channels c0 .. c0 + kDwChannels (fewer at the end) of the unit's images.
  void compute(int64_t n0, int64_t c0, const uint32_t* buf, int64_t tb, int64_t te, AccStats& st,
               Workspace& ws) const {
    const int64_t ld = L_.tile, rows = std::min(kDwChannels, a_.g.C - c0);
    int32_t* staging = Workspace::get(ws.staging, kDwChannels * ld);
    Range range;
    for (int64_t tile = tb; tile < te; ++tile) {
      const int64_t v0 = tile * ld;
      k_.dw({buf + v0, L_.plane, tap_.data(), P_, w_.data() + c0 * P_},
            {rows, L_.vectors, ld, nullptr, f_.add.data() + c0, f_.coef.data() + c0, f_.m.data() + c0,
             L_.valid.data() + v0 / L_.lanes, f_.flo, f_.fhi, f_.zp, f_.mode, staging, &range.mn, &range.mx});
      emit_.rows(staging, n0, c0, rows, v0, st);
    }
    range.flush(st);
  }
  const QConvArgs& a_;
  const IsaKernels& k_;
  const int64_t T_, P_, CB_;
  const Layout L_;
  Finish f_;
  const RowPacker src_;
  const Emitter emit_;
  std::vector<int64_t> tap_;
  std::vector<uint32_t> w_;
};

}  // namespace

bool fits(const QConvArgs& a) { return a.g.KH * a.g.KW * a.g.Cg() <= kMaxVnniReduction; }

AccStats run(const QConvArgs& a, const IsaKernels& k) {
  if (a.g.Cg() == 1 && a.g.Og() == 1) {
    if (depthwise_in_lanes(a)) return run_depthwise_in_lanes(a, k);
    return DwPlan(a, k).run();
  }
  const ConvGeom& g = a.g;
  if (g.KH == 1 && g.KW == 1 && g.pt + g.pl + g.pb + g.pr == 0 && g.sh * g.sw > 1) {
    // strided 1x1 conv = unstrided 1x1 conv of the subsampled input (packs only what is read)
    QConvArgs s = a;
    s.g.H = g.OH, s.g.W = g.OW, s.g.in_sh = g.in_sh * g.sh, s.g.in_sw = g.in_sw * g.sw, s.g.sh = s.g.sw = 1;
    return GemmPlan(s, k).run();
  }
  return GemmPlan(a, k).run();
}

}  // namespace vnni
}  // namespace integer
}  // namespace pyzeroq
