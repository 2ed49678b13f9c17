// pybind11 bindings of the Pareto DP kernels (private; pyzeroq.pareto is the public API).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>

#include "bindings/register.hpp"
#include "kernels/pareto.hpp"

namespace py = pybind11;

namespace pyzeroq {
namespace {

using F64 = py::array_t<double, py::array::c_style | py::array::forcecast>;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Largest DP table (layers x (capacity + 1) [x k]) the bindings accept; the Python layer
// raises a friendlier error (suggesting bins=) well before this.
constexpr int64_t kMaxTableCells = int64_t{1} << 31;

void require(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error(msg);
}

void check_finite(const double* v, int64_t n, const char* name) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(v[i])) throw py::value_error(std::string(name) + " must be finite (found NaN or inf)");
  }
}

pareto::DPParams check_problem(const F64& sens, const I64& qcost, int64_t capacity, int64_t k) {
  require(sens.ndim() == 2, "sensitivity must be 2-D [layers, options]");
  require(qcost.ndim() == 2, "qcost must be 2-D [layers, options]");
  require(sens.shape(0) == qcost.shape(0) && sens.shape(1) == qcost.shape(1),
          "sensitivity and qcost must have the same shape");
  pareto::DPParams p{sens.shape(0), sens.shape(1), capacity};
  require(p.layers >= 1, "sensitivity needs at least one layer");
  require(p.options >= 1 && p.options <= pareto::kMaxOptions,
          "sensitivity needs between 1 and " + std::to_string(pareto::kMaxOptions) + " options per layer");
  require(capacity >= 0, "capacity must be >= 0");
  require(k >= 1, "k must be >= 1");
  require(capacity < kMaxTableCells / p.layers / k, "DP table too large (layers x (capacity+1) x k)");
  check_finite(sens.data(), p.layers * p.options, "sensitivity");
  const int64_t* q = qcost.data();
  for (int64_t i = 0; i < p.layers * p.options; ++i) require(q[i] >= 0, "qcost must be >= 0");
  return p;
}

// Hands the vector's buffer to numpy without a copy (the capsule owns the vector).
template <class T>
py::array_t<T> to_array(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* owner = new std::vector<T>(std::move(v));
  py::capsule free_owner(owner, [](void* ptr) { delete static_cast<std::vector<T>*>(ptr); });
  return py::array_t<T>(shape, owner->data(), free_owner);
}

py::tuple frontier_binding(const F64& sens, const I64& qcost, int64_t capacity, bool last_only,
                           bool reference) {
  const pareto::DPParams p = check_problem(sens, qcost, capacity, 1);
  pareto::Frontier f;
  {
    py::gil_scoped_release release;
    f = reference ? pareto::frontier_dp_reference(sens.data(), qcost.data(), p, last_only)
                  : pareto::frontier_dp(sens.data(), qcost.data(), p, last_only);
  }
  const auto n = static_cast<py::ssize_t>(f.cost.size());
  return py::make_tuple(to_array(std::move(f.cost), {n}), to_array(std::move(f.total), {n}), to_array(std::move(f.choice), {n, p.layers}));
}

py::tuple k_best_binding(const F64& sens, const I64& qcost, int64_t capacity, int64_t k, bool reference) {
  const pareto::DPParams p = check_problem(sens, qcost, capacity, k);
  pareto::KBest r;
  {
    py::gil_scoped_release release;
    r = reference ? pareto::k_best_dp_reference(sens.data(), qcost.data(), p, k)
                  : pareto::k_best_dp(sens.data(), qcost.data(), p, k);
  }
  const auto m = static_cast<py::ssize_t>(r.cost.size());
  return py::make_tuple(to_array(std::move(r.cost), {m}), to_array(std::move(r.total), {m, k}), to_array(std::move(r.choice), {m, k, p.layers}),
                        to_array(std::move(r.count), {m}));
}

py::tuple pairs_binding(const F64& pv, const F64& pc, const F64& cv, const F64& cc, double lo, double width,
                        int64_t nbins, double max_cost, int64_t k, bool reference) {
  require(pv.ndim() == 1 && pc.ndim() == 1 && pv.shape(0) == pc.shape(0),
          "prefix_value and prefix_cost must be 1-D of equal length");
  require(cv.ndim() == 1 && cc.ndim() == 1 && cv.shape(0) == cc.shape(0),
          "cand_value and cand_cost must be 1-D of equal length");
  require(nbins >= 1, "nbins must be >= 1");
  require(k >= 1, "k must be >= 1");
  require(std::isfinite(lo) && std::isfinite(width) && width >= 0.0, "lo and width must be finite, width >= 0");
  require(!std::isnan(max_cost), "max_cost must not be NaN");
  pareto::PairParams p{pv.shape(0), cv.shape(0), lo, width, nbins, max_cost, k};
  check_finite(pv.data(), p.num_prefix, "prefix_value");
  check_finite(pc.data(), p.num_prefix, "prefix_cost");
  check_finite(cv.data(), p.num_cand, "cand_value");
  check_finite(cc.data(), p.num_cand, "cand_cost");
  pareto::Pairs r;
  {
    py::gil_scoped_release release;
    r = reference ? pareto::top_pairs_reference(pv.data(), pc.data(), cv.data(), cc.data(), p)
                  : pareto::top_pairs(pv.data(), pc.data(), cv.data(), cc.data(), p);
  }
  const auto n = static_cast<py::ssize_t>(r.bin.size());
  return py::make_tuple(to_array(std::move(r.bin), {n}), to_array(std::move(r.prefix), {n}), to_array(std::move(r.cand), {n}),
                        to_array(std::move(r.estimate), {n}), to_array(std::move(r.size), {n}));
}

}  // namespace

void register_pareto(py::module_& m) {
  m.attr("pareto_max_options") = pareto::kMaxOptions;
  m.def("pareto_frontier_dp", &frontier_binding, py::arg("sensitivity"), py::arg("qcost"), py::arg("capacity"),
        py::arg("last_only") = false, py::arg("reference") = false,
        "Exact DP over integer costs 0..capacity -> (cost[P], total[P], choice[P, L]) of the frontier.");
  m.def("pareto_k_best", &k_best_binding, py::arg("sensitivity"), py::arg("qcost"), py::arg("capacity"),
        py::arg("k"), py::arg("reference") = false,
        "k best configurations per integer total cost -> (cost[M], total[M, k], choice[M, k, L], count[M]).");
  m.def("pareto_top_pairs", &pairs_binding, py::arg("prefix_value"), py::arg("prefix_cost"),
        py::arg("cand_value"), py::arg("cand_cost"), py::arg("lo"), py::arg("width"), py::arg("nbins"),
        py::arg("max_cost"), py::arg("k"), py::arg("reference") = false,
        "Per size bin the k best (prefix, candidate) pairs -> (bin, prefix, cand, estimate, size).");
}

}  // namespace pyzeroq
