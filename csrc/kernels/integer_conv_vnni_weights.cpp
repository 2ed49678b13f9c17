// Planar VNNI path: packed GEMM weights, and a cache of them across calls.
//
// Packing a layer's weights costs about as much as the GEMM itself when there are few
// output positions per weight (deep layers at batch 1), which fbgemm and onnxruntime
// avoid by packing once when the layer is built. Here the call is stateless, so packed
// weights are kept in a small LRU cache keyed by the weight buffer and layout, and an
// entry is only used while the raw weight bytes still equal its private copy (memcmp):
// a weight array edited in place, or a new array at a recycled address, is repacked.
// Weights are cached from their second sighting on (same address and layout), so that
// arrays made afresh for every call (each at a new address) do not fill the cache.
#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>

#include "kernels/integer_conv_vnni_layout.hpp"

namespace pyzeroq {
namespace integer {
namespace vnni {
namespace {

constexpr int kByteBits = 8;
constexpr uint32_t kSignFlip = 0x80808080u;                // w ^ 0x80 = w - 128 as int8, in each byte
constexpr int64_t kCacheBytes = int64_t{128} << 20;        // raw + packed bytes kept at most
constexpr std::size_t kCacheEntries = 256;                 // entries kept at most
constexpr std::size_t kSeenKeys = 1024;                    // keys remembered for the second-sighting rule
constexpr int64_t kMinCachedBytes = int64_t{1} << 12;      // smaller layers are simply repacked

struct Key {
  const uint8_t* w;
  int64_t O, Cg, T, groups, rows;
  bool operator==(const Key& k) const {
    return w == k.w && O == k.O && Cg == k.Cg && T == k.T && groups == k.groups && rows == k.rows;
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

class WeightCache {
 public:
  std::shared_ptr<const PackedWeights> get(const QConvArgs& a, int64_t rows) {
    const ConvGeom& g = a.g;
    const Key key{a.w, g.O, g.Cg(), g.KH * g.KW, g.groups, rows};
    const int64_t bytes = key.O * key.Cg * key.T;
    if (bytes < kMinCachedBytes) return std::make_shared<const PackedWeights>(pack(a, rows));
    std::shared_ptr<const PackedWeights> hit = find(key);
    if (hit && std::memcmp(hit->raw.data(), a.w, static_cast<std::size_t>(bytes)) == 0) return hit;
    PackedWeights p = pack(a, rows);
    if (!hit && !seen_before(key)) return std::make_shared<const PackedWeights>(std::move(p));
    p.raw.assign(a.w, a.w + bytes);
    auto entry = std::make_shared<const PackedWeights>(std::move(p));
    insert(key, entry);
    return entry;
  }

 private:
  using Item = std::pair<Key, std::shared_ptr<const PackedWeights>>;
  static int64_t size_of(const PackedWeights& p) {
    return static_cast<int64_t>(p.raw.size() + p.quads.size() * sizeof(uint32_t) + p.sum_w.size() * sizeof(int64_t));
  }
  std::shared_ptr<const PackedWeights> find(const Key& key) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = items_.begin(); it != items_.end(); ++it)
      if (it->first == key) {
        items_.splice(items_.begin(), items_, it);  // most recently used first
        return it->second;
      }
    return nullptr;
  }
  // Whether `key` was looked up before (and remembers it).
  bool seen_before(const Key& key) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Key& k : seen_)
      if (k == key) return true;
    seen_.push_front(key);
    if (seen_.size() > kSeenKeys) seen_.pop_back();
    return false;
  }
  void insert(const Key& key, std::shared_ptr<const PackedWeights> entry) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = items_.begin(); it != items_.end(); ++it)
      if (it->first == key) {
        bytes_ -= size_of(*it->second);
        items_.erase(it);
        break;
      }
    bytes_ += size_of(*entry);
    items_.emplace_front(key, std::move(entry));
    while (items_.size() > 1 && (bytes_ > kCacheBytes || items_.size() > kCacheEntries)) {
      bytes_ -= size_of(*items_.back().second);
      items_.pop_back();
    }
  }
  std::mutex mu_;
  std::list<Item> items_;
  std::list<Key> seen_;
  int64_t bytes_ = 0;
};

}  // namespace

std::shared_ptr<const PackedWeights> gemm_weights(const QConvArgs& a, int64_t rows) {
  static WeightCache cache;
  return cache.get(a, rows);
}

}  // namespace vnni
}  // namespace integer
}  // namespace pyzeroq
