#include "bindings/register.hpp"

namespace pyzeroq {
void register_pareto(pybind11::module_& /*m*/) {}  // placeholder: filled in by its issue
}  // namespace pyzeroq
