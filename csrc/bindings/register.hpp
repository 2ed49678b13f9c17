// One register_<concept>() per binding file; module.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

namespace pyzeroq {
void register_quantize(pybind11::module_& m);
void register_pareto(pybind11::module_& m);
void register_integer(pybind11::module_& m);
void register_parallel(pybind11::module_& m);
}  // namespace pyzeroq
