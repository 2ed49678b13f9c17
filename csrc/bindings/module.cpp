#include "bindings/register.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyzeroq numeric core: quantization kernels, Pareto DP, integer ALU simulator";
  pyzeroq::register_quantize(m);
  pyzeroq::register_pareto(m);
  pyzeroq::register_integer(m);
  pyzeroq::register_parallel(m);
}
