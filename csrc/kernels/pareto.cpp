// Mixed-precision Pareto solver kernels; formulas in pareto.hpp and above each kernel.
#include "kernels/pareto.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace pyzeroq {
namespace pareto {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// cur[i] = min(cur[i], s + prev[i]); arg[i] = b where it improved (strictly).
// Both arrays are the same element width so the loop vectorizes to compare + blend.
__attribute__((target_clones("avx2", "default"))) void relax_row(const double* __restrict prev,
                                                                double* __restrict cur,
                                                                int64_t* __restrict arg, double s,
                                                                int64_t b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = s + prev[i];
    const bool better = v < cur[i];
    cur[i] = better ? v : cur[i];
    arg[i] = better ? b : arg[i];
  }
}

// Follow n paths from layer 0 to layer L-1 through the backpointer table [L][width][k]:
// option b = bb[l][c][j], next rank j = bj[l][c][j] (bj == nullptr: k == 1, j stays 0).
// Layer-outer order keeps every access inside one layer's table (cache friendly);
// path i is written to out[row[i] * L .. + L) (row empty: row i = i).
void backtrack_paths(std::vector<int64_t> c, std::vector<int64_t> j, const uint8_t* bb, const int32_t* bj,
                     const int64_t* q, const DPParams& p, int64_t k, const std::vector<int64_t>& row,
                     int64_t* out) {
  const int64_t width = p.capacity + 1;
  const size_t n = c.size();
  std::vector<uint8_t> by_layer(n * static_cast<size_t>(p.layers));
  for (int64_t l = 0; l < p.layers; ++l) {
    uint8_t* layer_row = by_layer.data() + l * n;
    const size_t table = static_cast<size_t>(l * width);
    for (size_t i = 0; i < n; ++i) {
      const size_t idx = (table + c[i]) * k + j[i];
      const uint8_t b = bb[idx];
      layer_row[i] = b;
      if (bj != nullptr) j[i] = bj[idx];
      c[i] -= q[l * p.options + b];
    }
  }
  for (size_t i = 0; i < n; ++i) {
    int64_t* dst = out + (row.empty() ? static_cast<int64_t>(i) : row[i]) * p.layers;
    for (int64_t l = 0; l < p.layers; ++l) dst[l] = by_layer[l * n + i];
  }
}

// Frontier points from f_0 and backtracking along arg (table [L][W], uint8).
Frontier collect_frontier(const std::vector<double>& f0, const std::vector<uint8_t>& arg,
                          const int64_t* q, const DPParams& p, bool last_only) {
  const int64_t width = p.capacity + 1;
  std::vector<int64_t> points;
  double best = kInf;
  for (int64_t c = 0; c < width; ++c) {
    if (f0[c] < best) {
      best = f0[c];
      points.push_back(c);
    }
  }
  if (last_only && points.size() > 1) points.erase(points.begin(), points.end() - 1);
  Frontier out;
  out.cost = points;
  for (int64_t c0 : points) out.total.push_back(f0[c0]);
  out.choice.resize(points.size() * p.layers);
  backtrack_paths(points, std::vector<int64_t>(points.size(), 0), arg.data(), nullptr, q, p, 1, {},
                  out.choice.data());
  return out;
}

// Largest reachable integer cost of the suffix l..L-1 grows by max_b q[l][b] (capped).
int64_t grow_reach(int64_t reach, const int64_t* q_row, const DPParams& p) {
  int64_t mx = 0;
  for (int64_t b = 0; b < p.options; ++b) {
    if (q_row[b] <= p.capacity) mx = std::max(mx, q_row[b]);
  }
  return std::min(p.capacity, reach + mx);
}

// One k_best table entry source: option b, rank j in the suffix list g_{l+1}[C - q_b].
struct PairKey {
  double estimate;
  double size;
  int64_t p;
  int64_t x;
  bool operator<(const PairKey& o) const {
    return std::tie(estimate, size, p, x) < std::tie(o.estimate, o.size, o.p, o.x);
  }
};

int64_t size_bin(double size, const PairParams& p) {
  if (!(p.width > 0.0)) return 0;
  const double t = (size - p.lo) / p.width;
  if (!(t > 0.0)) return 0;
  if (t >= static_cast<double>(p.nbins)) return p.nbins - 1;
  return std::min<int64_t>(p.nbins - 1, static_cast<int64_t>(std::floor(t)));
}

KBest backtrack_k_best(const std::vector<double>& val, const std::vector<int32_t>& cnt,
                       const std::vector<uint8_t>& bb, const std::vector<int32_t>& bj, const int64_t* q,
                       const DPParams& p, int64_t k) {
  const int64_t width = p.capacity + 1;
  KBest out;
  out.k = k;
  std::vector<int64_t> start_c, start_j, row;
  for (int64_t c = 0; c < width; ++c) {
    if (cnt[c] == 0) continue;
    const auto m = static_cast<int64_t>(out.cost.size());
    out.cost.push_back(c);
    out.count.push_back(cnt[c]);
    for (int64_t r = 0; r < k; ++r) out.total.push_back(val[c * k + r]);  // +inf past cnt
    for (int64_t r = 0; r < cnt[c]; ++r) {
      start_c.push_back(c);
      start_j.push_back(r);
      row.push_back(m * k + r);
    }
  }
  out.choice.assign(out.cost.size() * k * p.layers, -1);
  backtrack_paths(std::move(start_c), std::move(start_j), bb.data(), bj.data(), q, p, k, row, out.choice.data());
  return out;
}

}  // namespace

// f_l[C] = min_b s[l][b] + f_{l+1}[C - q[l][b]]; option-outer / cost-inner so that the
// inner loop is a vectorizable relax_row; only the reachable prefix of each row is touched.
Frontier frontier_dp(const double* s, const int64_t* q, const DPParams& p, bool last_only) {
  const int64_t width = p.capacity + 1;
  std::vector<double> prev(width, kInf), cur(width, kInf);
  std::vector<int64_t> tmp(width, 0);
  std::vector<uint8_t> arg(static_cast<size_t>(p.layers * width), 0);
  prev[0] = 0.0;
  int64_t reach = 0;
  for (int64_t l = p.layers - 1; l >= 0; --l) {
    const int64_t* q_row = q + l * p.options;
    const int64_t new_reach = grow_reach(reach, q_row, p);
    std::fill(cur.begin(), cur.begin() + new_reach + 1, kInf);
    std::fill(tmp.begin(), tmp.begin() + new_reach + 1, 0);
    for (int64_t b = 0; b < p.options; ++b) {
      const int64_t qb = q_row[b];
      if (qb > p.capacity) continue;
      const int64_t n = std::min(width - qb, reach + 1);
      relax_row(prev.data(), cur.data() + qb, tmp.data() + qb, s[l * p.options + b], b, n);
    }
    uint8_t* arg_row = arg.data() + l * width;
    for (int64_t c = 0; c <= new_reach; ++c) arg_row[c] = static_cast<uint8_t>(tmp[c]);
    std::swap(prev, cur);
    reach = new_reach;
  }
  return collect_frontier(prev, arg, q, p, last_only);
}

// Plain version: cost-outer / option-inner, whole rows, same arithmetic (s + f) and tie rule.
Frontier frontier_dp_reference(const double* s, const int64_t* q, const DPParams& p, bool last_only) {
  const int64_t width = p.capacity + 1;
  std::vector<double> prev(width, kInf), cur(width, kInf);
  std::vector<uint8_t> arg(static_cast<size_t>(p.layers * width), 0);
  prev[0] = 0.0;
  for (int64_t l = p.layers - 1; l >= 0; --l) {
    for (int64_t c = 0; c < width; ++c) {
      double best = kInf;
      int64_t best_b = 0;
      for (int64_t b = 0; b < p.options; ++b) {
        const int64_t qb = q[l * p.options + b];
        if (qb > c) continue;
        const double v = s[l * p.options + b] + prev[c - qb];
        if (v < best) {
          best = v;
          best_b = b;
        }
      }
      cur[c] = best;
      arg[l * width + c] = static_cast<uint8_t>(best_b);
    }
    std::swap(prev, cur);
  }
  return collect_frontier(prev, arg, q, p, last_only);
}

// g_l[C]: B-way merge of the sorted suffix lists g_{l+1}[C - q_b] shifted by s[l][b];
// each step takes the smallest head value, ties to the smaller b (list order keeps j).
KBest k_best_dp(const double* s, const int64_t* q, const DPParams& p, int64_t k) {
  const int64_t width = p.capacity + 1;
  const size_t cells = static_cast<size_t>(p.layers * width * k);
  std::vector<double> prev_val(width * k, kInf), cur_val(width * k, kInf);
  std::vector<int32_t> prev_cnt(width, 0), cur_cnt(width, 0);
  std::vector<uint8_t> bb(cells, 0);
  std::vector<int32_t> bj(cells, 0);
  std::vector<int64_t> head(p.options);
  prev_cnt[0] = 1;
  prev_val[0] = 0.0;
  int64_t reach = 0;
  for (int64_t l = p.layers - 1; l >= 0; --l) {
    const int64_t* q_row = q + l * p.options;
    const double* s_row = s + l * p.options;
    const int64_t new_reach = grow_reach(reach, q_row, p);
    for (int64_t c = 0; c <= new_reach; ++c) {
      for (int64_t b = 0; b < p.options; ++b) {
        const int64_t qb = q_row[b];
        head[b] = (qb <= c && c - qb <= reach && prev_cnt[c - qb] > 0) ? 0 : -1;
      }
      double* out_val = cur_val.data() + c * k;
      const size_t base = static_cast<size_t>((l * width + c) * k);
      int64_t r = 0;
      for (; r < k; ++r) {
        int64_t best_b = -1;
        double best_v = kInf;
        for (int64_t b = 0; b < p.options; ++b) {
          if (head[b] < 0) continue;
          const double v = s_row[b] + prev_val[(c - q_row[b]) * k + head[b]];
          if (best_b < 0 || v < best_v) {
            best_v = v;
            best_b = b;
          }
        }
        if (best_b < 0) break;
        out_val[r] = best_v;
        bb[base + r] = static_cast<uint8_t>(best_b);
        bj[base + r] = static_cast<int32_t>(head[best_b]);
        if (++head[best_b] >= prev_cnt[c - q_row[best_b]]) head[best_b] = -1;
      }
      for (int64_t t = r; t < k; ++t) out_val[t] = kInf;
      cur_cnt[c] = static_cast<int32_t>(r);
    }
    std::swap(prev_val, cur_val);
    std::swap(prev_cnt, cur_cnt);
    reach = new_reach;
  }
  return backtrack_k_best(prev_val, prev_cnt, bb, bj, q, p, k);
}

// Plain version: gather every (value, b, j), sort, keep the first k.
KBest k_best_dp_reference(const double* s, const int64_t* q, const DPParams& p, int64_t k) {
  const int64_t width = p.capacity + 1;
  const size_t cells = static_cast<size_t>(p.layers * width * k);
  std::vector<double> prev_val(width * k, kInf), cur_val(width * k, kInf);
  std::vector<int32_t> prev_cnt(width, 0), cur_cnt(width, 0);
  std::vector<uint8_t> bb(cells, 0);
  std::vector<int32_t> bj(cells, 0);
  prev_cnt[0] = 1;
  prev_val[0] = 0.0;
  std::vector<std::tuple<double, int64_t, int64_t>> cand;
  for (int64_t l = p.layers - 1; l >= 0; --l) {
    for (int64_t c = 0; c < width; ++c) {
      cand.clear();
      for (int64_t b = 0; b < p.options; ++b) {
        const int64_t qb = q[l * p.options + b];
        if (qb > c) continue;
        for (int64_t j = 0; j < prev_cnt[c - qb]; ++j) {
          cand.emplace_back(s[l * p.options + b] + prev_val[(c - qb) * k + j], b, j);
        }
      }
      std::sort(cand.begin(), cand.end());
      const int64_t n = std::min<int64_t>(k, static_cast<int64_t>(cand.size()));
      for (int64_t r = 0; r < k; ++r) {
        const size_t idx = static_cast<size_t>((l * width + c) * k + r);
        cur_val[c * k + r] = r < n ? std::get<0>(cand[r]) : kInf;
        if (r < n) {
          bb[idx] = static_cast<uint8_t>(std::get<1>(cand[r]));
          bj[idx] = static_cast<int32_t>(std::get<2>(cand[r]));
        }
      }
      cur_cnt[c] = static_cast<int32_t>(n);
    }
    std::swap(prev_val, cur_val);
    std::swap(prev_cnt, cur_cnt);
  }
  return backtrack_k_best(prev_val, prev_cnt, bb, bj, q, p, k);
}

// Per size bin a bounded max-heap of the k best keys seen so far.
Pairs top_pairs(const double* pv, const double* pc, const double* cv, const double* cc, const PairParams& p) {
  std::vector<std::vector<PairKey>> heaps(static_cast<size_t>(p.nbins));
  for (int64_t i = 0; i < p.num_prefix; ++i) {
    for (int64_t x = 0; x < p.num_cand; ++x) {
      const double size = pc[i] + cc[x];
      if (!(size <= p.max_cost)) continue;
      const PairKey key{pv[i] + cv[x], size, i, x};
      std::vector<PairKey>& h = heaps[size_bin(size, p)];
      if (static_cast<int64_t>(h.size()) < p.k) {
        h.push_back(key);
        std::push_heap(h.begin(), h.end());
      } else if (key < h.front()) {
        std::pop_heap(h.begin(), h.end());
        h.back() = key;
        std::push_heap(h.begin(), h.end());
      }
    }
  }
  Pairs out;
  for (int64_t b = 0; b < p.nbins; ++b) {
    std::vector<PairKey>& h = heaps[b];
    std::sort_heap(h.begin(), h.end());
    for (const PairKey& key : h) {
      out.bin.push_back(b);
      out.prefix.push_back(key.p);
      out.cand.push_back(key.x);
      out.estimate.push_back(key.estimate);
      out.size.push_back(key.size);
    }
  }
  return out;
}

// Plain version: every feasible pair, one sort by (bin, key), first k of each bin.
Pairs top_pairs_reference(const double* pv, const double* pc, const double* cv, const double* cc,
                          const PairParams& p) {
  std::vector<std::pair<int64_t, PairKey>> all;
  for (int64_t i = 0; i < p.num_prefix; ++i) {
    for (int64_t x = 0; x < p.num_cand; ++x) {
      const double size = pc[i] + cc[x];
      if (!(size <= p.max_cost)) continue;
      all.emplace_back(size_bin(size, p), PairKey{pv[i] + cv[x], size, i, x});
    }
  }
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first < b.first : a.second < b.second;
  });
  Pairs out;
  int64_t run_bin = -1, run = 0;
  for (const auto& [bin, key] : all) {
    run = bin == run_bin ? run + 1 : 0;
    run_bin = bin;
    if (run >= p.k) continue;
    out.bin.push_back(bin);
    out.prefix.push_back(key.p);
    out.cand.push_back(key.x);
    out.estimate.push_back(key.estimate);
    out.size.push_back(key.size);
  }
  return out;
}

}  // namespace pareto
}  // namespace pyzeroq
