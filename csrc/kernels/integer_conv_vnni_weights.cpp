// Planar VNNI path: packed GEMM weights, kept across calls by the caller's WeightCache.
//
// Packing a layer's weights costs about as much as the GEMM itself when there are few
// output positions per weight (deep layers at batch 1), which fbgemm and onnxruntime
// avoid by packing once when the layer is built. Here the kernel call is stateless; the
// caller that runs a layer repeatedly (IntegerModel, one WeightCache per step) passes
// its cache, and an entry is used only while the raw weight bytes and layout still equal
// those it was packed from (memcmp): weights edited in place are repacked. Without a
// cache the weights are packed on every call.
#include <algorithm>
#include <cstring>
#include <mutex>

#include "kernels/integer_conv_vnni_layout.hpp"

namespace pyzeroq {
namespace integer {
namespace vnni {
namespace {

constexpr int kByteBits = 8;
constexpr uint32_t kSignFlip = 0x80808080u;                // w ^ 0x80 = w - 128 as int8, in each byte

// The layout packed weights were made for (the raw bytes are compared separately).
struct Key {
  int64_t O = 0, Cg = 0, T = 0, groups = 0, rows = 0;
  bool operator==(const Key& k) const {
    return O == k.O && Cg == k.Cg && T == k.T && groups == k.groups && rows == k.rows;
  }
};

// quads [G][OB][T][CQ][rows]: quad (t, cq) of output channel o holds w[o][4cq + k][t] - 128 in
// byte k (0 past Cg; rows past Og are 0); sum_w[o] = sum of w[o] (zero point free).
PackedWeights pack(const QConvArgs& a, int64_t rows) {
  const ConvGeom& g = a.g;
  const int64_t G = g.groups, Cg = g.Cg(), Og = g.Og(), T = g.KH * g.KW;
  const int64_t CQ = ceil_div(Cg, kQuad), OB = ceil_div(Og, rows);
  PackedWeights p;
  p.quads.assign(static_cast<std::size_t>(G * OB * T * CQ * rows), 0);
  p.sum_w.assign(static_cast<std::size_t>(g.O), 0);
  for (int64_t o = 0; o < g.O; ++o) {
    const int64_t grp = o / Og, ol = o % Og, r = ol % rows;
    uint32_t* dst = p.quads.data() + (grp * OB + ol / rows) * T * CQ * rows + r;
    const uint8_t* src = a.w + o * Cg * T;
    int64_t sum = 0;
    for (int64_t i = 0; i < Cg * T; ++i) sum += src[i];
    p.sum_w[o] = sum;
    for (int64_t cq = 0; cq < CQ; ++cq) {
      const uint8_t* s[kQuad];
      uint32_t pad = 0;  // channels past Cg: w' = 0
      for (int64_t k = 0; k < kQuad; ++k) {
        const int64_t ci = std::min(cq * kQuad + k, Cg - 1);
        s[k] = src + ci * T;
        if (cq * kQuad + k >= Cg) pad |= uint32_t{UINT8_MAX} << (kByteBits * k);
      }
      for (int64_t t = 0; t < T; ++t) {
        const uint32_t q = static_cast<uint32_t>(s[0][t]) | static_cast<uint32_t>(s[1][t]) << kByteBits |
                           static_cast<uint32_t>(s[2][t]) << (2 * kByteBits) |
                           static_cast<uint32_t>(s[3][t]) << (3 * kByteBits);
        dst[(t * CQ + cq) * rows] = (q ^ kSignFlip) & ~pad;
      }
    }
  }
  return p;
}

}  // namespace

}  // namespace vnni

struct WeightCache::State {
  std::shared_ptr<const vnni::PackedWeights> get(const QConvArgs& a, int64_t rows) {
    const ConvGeom& g = a.g;
    const vnni::Key key{g.O, g.Cg(), g.KH * g.KW, g.groups, rows};
    const std::size_t bytes = static_cast<std::size_t>(key.O * key.Cg * key.T);
    std::lock_guard<std::mutex> lock(mu);
    if (entry && key == this->key && std::memcmp(entry->raw.data(), a.w, bytes) == 0) return entry;
    vnni::PackedWeights p = vnni::pack(a, rows);
    p.raw.assign(a.w, a.w + bytes);
    entry = std::make_shared<const vnni::PackedWeights>(std::move(p));
    this->key = key;
    return entry;
  }
  mutable std::mutex mu;
  vnni::Key key{};
  std::shared_ptr<const vnni::PackedWeights> entry;
};

WeightCache::WeightCache() : state_(std::make_unique<State>()) {}
WeightCache::~WeightCache() = default;

int64_t WeightCache::nbytes() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  const auto& e = state_->entry;
  if (!e) return 0;
  return static_cast<int64_t>(e->raw.size() + e->quads.size() * sizeof(uint32_t) + e->sum_w.size() * sizeof(int64_t));
}

namespace vnni {

std::shared_ptr<const PackedWeights> gemm_weights(const QConvArgs& a, int64_t rows) {
  if (a.weight_cache == nullptr) return std::make_shared<const PackedWeights>(pack(a, rows));
  return a.weight_cache->state().get(a, rows);
}

}  // namespace vnni
}  // namespace integer
}  // namespace pyzeroq
