// Mixed-precision Pareto solver kernels (ZeroQ Eq. 4 and Appendix A). Pure C++.
//
// Problem: L layers, B options per layer. Option b of layer l has sensitivity
// s[l*B + b] (finite) and an integer cost q[l*B + b] >= 0 that the caller has
// already reduced (shifted / divided by the gcd) or coarsened onto a bin grid.
// Options with q > capacity are never chosen. All DPs run over layers in
// SUFFIX order (l = L-1 .. 0) so that backtracking from layer 0 yields the
// lexicographically smallest choice vector among equal totals.
#pragma once
#include <cstdint>
#include <vector>

namespace pyzeroq {
namespace pareto {

// The argmin of the frontier DP is stored as uint8, one per layer per cost.
constexpr int64_t kMaxOptions = 256;

struct DPParams {
  int64_t layers = 0;
  int64_t options = 0;
  int64_t capacity = 0;  // largest total integer cost represented (table width - 1)
};

struct Frontier {
  std::vector<int64_t> cost;    // [P] total integer cost, strictly ascending
  std::vector<double> total;    // [P] total sensitivity, strictly decreasing
  std::vector<int64_t> choice;  // [P * L] option index per layer
};

// f_L[0] = 0, f_L[C > 0] = +inf
// f_l[C] = min_b  s[l][b] + f_{l+1}[C - q[l][b]]          (l = L-1 .. 0)
// arg_l[C] = smallest b attaining the min.
// Frontier points: the C with f_0[C] < min_{C' < C} f_0[C'] (ties -> lower cost);
// each point's choice follows arg from layer 0 (ties -> lexicographically smallest).
// last_only: return only the last point (= the optimum for budget `capacity`).
Frontier frontier_dp(const double* s, const int64_t* q, const DPParams& p, bool last_only);
Frontier frontier_dp_reference(const double* s, const int64_t* q, const DPParams& p, bool last_only);

struct KBest {
  int64_t k = 0;                // width of the per-cost lists (padding)
  std::vector<int64_t> cost;    // [M] reachable total integer costs, ascending
  std::vector<int64_t> count;   // [M] configurations listed for that cost (<= k)
  std::vector<double> total;    // [M * k] ascending per row, +inf padded
  std::vector<int64_t> choice;  // [M * k * L], -1 padded
};

// g_L[0] = (0), g_L[C > 0] = ()
// g_l[C] = the k smallest of { s[l][b] + g_{l+1}[C - q[l][b]][j] : b, j }, ordered
//          by (value, b, j)  == (total, lexicographic choice vector).
KBest k_best_dp(const double* s, const int64_t* q, const DPParams& p, int64_t k);
KBest k_best_dp_reference(const double* s, const int64_t* q, const DPParams& p, int64_t k);

struct PairParams {
  int64_t num_prefix = 0;
  int64_t num_cand = 0;
  double lo = 0.0;        // left edge of the size axis
  double width = 0.0;     // bin width (0: everything in bin 0)
  int64_t nbins = 1;
  double max_cost = 0.0;  // budget: pairs with size > max_cost are infeasible
  int64_t k = 1;          // kept per bin
};

struct Pairs {
  std::vector<int64_t> bin, prefix, cand;
  std::vector<double> estimate, size;
};

// For every pair (p, x): estimate = pv[p] + cv[x], size = pc[p] + cc[x];
// feasible iff size <= max_cost; bin = clamp(floor((size - lo) / width), 0, nbins - 1).
// Per bin keep the k smallest by (estimate, size, p, x); output ordered by (bin, that key).
Pairs top_pairs(const double* pv, const double* pc, const double* cv, const double* cc, const PairParams& p);
Pairs top_pairs_reference(const double* pv, const double* pc, const double* cv, const double* cc,
                          const PairParams& p);

}  // namespace pareto
}  // namespace pyzeroq
