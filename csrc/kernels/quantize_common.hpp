// Helpers shared by the quantization kernel sources (quantize.cpp, quantize_params.cpp); internal.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <limits>

#include "kernels/parallel.hpp"
#include "kernels/quantize.hpp"

// Runtime-dispatched SIMD clones of a plain loop: AVX2 or the SSE2 baseline.
#define PYZEROQ_SIMD_CLONES __attribute__((target_clones("avx2", "default")))

namespace pyzeroq::quant::detail {

constexpr std::size_t kGrain = grain_for_cost(1);  // elements per chunk: one operation each (parallel.hpp)
constexpr float kInf = std::numeric_limits<float>::infinity();

// 1 when x is NaN or +-Inf.
inline unsigned nonfinite(float x) { return !(std::fabs(x) <= FLT_MAX); }

// Channels == 1 means one parameter set for everything: fold outer into inner.
inline Layout normalized(const Layout& l) {
  if (l.channels == 1) return Layout{1, 1, l.outer * l.inner};
  return l;
}

}  // namespace pyzeroq::quant::detail
