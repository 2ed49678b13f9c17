// Integer ALU simulator: QLinearConv / QLinearMatMul, and ConvInteger /
// MatMulInteger (the int32 accumulator itself, `acc_out`) (pure C++).
//
// Accumulator of output (n, o, oh, ow), group g = o / Og, Cg input channels per group:
//   acc = bias[o] + sum_{ci < Cg} sum_{ki < KH} sum_{kj < KW}
//           (x[n, g*Cg+ci, oh*sh - pt + ki*dh, ow*sw - pl + kj*dw] - zx) * (w[o, ci, ki, kj] - zw[o])
// where positions outside the input contribute 0 (padding holds the input zero point).
// The exact value is kept in int64; the AccModel turns it into the acc_bits
// accumulator (wrap / saturate / error) and the Requantizer maps it to the code.
//
// Saturate order (order dependent): acc = sat(bias), then for ci (outermost),
// ki, kj (innermost): acc = sat(acc + product). Matmul: sat(bias), then k ascending.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>

#include "kernels/integer_requant.hpp"

namespace pyzeroq {
namespace integer {

struct ConvGeom {
  int64_t N = 1, C = 1, H = 1, W = 1;  // input NCHW
  int64_t O = 1, KH = 1, KW = 1;       // weight OIHW (I = C / groups)
  int64_t groups = 1;
  int64_t sh = 1, sw = 1;              // stride
  int64_t pt = 0, pl = 0, pb = 0, pr = 0;  // padding top/left/bottom/right
  int64_t dh = 1, dw = 1;              // dilation
  int64_t OH = 1, OW = 1;              // output size (derived)
  // Input element (n, c, h, w) lives at x[n*in_sn + c*in_sc + h*in_sh + w*in_sw]:
  // NCHW for conv; matmul a[R, K] is the 1x1 conv with C = K, H = R, W = 1
  // (in_sc = 1, in_sh = K).
  int64_t in_sn = 0, in_sc = 0, in_sh = 0, in_sw = 0;
  int64_t Cg() const { return C / groups; }
  int64_t Og() const { return O / groups; }
  // Output element (n, o, p) lives at y[n*out_sn + o*out_so + p*out_sp].
  // Conv: NCHW (so = OH*OW, sp = 1). Matmul (1x1 "conv" over rows): so = 1, sp = O.
  int64_t out_sn = 0, out_so = 0, out_sp = 0;
};

// Packed weights of one layer, kept across calls by whoever owns this object (pyzeroq.integer's
// IntegerModel holds one per conv / linear step; there is no process-wide cache). The fast paths
// that repack weights (VNNI) reuse the packed copy while the raw weight bytes and the layout still
// equal those it was packed from (checked byte for byte on every call), else repack and keep the
// new copy. Thread-safe. QConvArgs::weight_cache null: the weights are packed on every call.
class WeightCache {
 public:
  struct State;  // integer_conv_vnni_weights.cpp
  WeightCache();
  ~WeightCache();
  WeightCache(const WeightCache&) = delete;
  WeightCache& operator=(const WeightCache&) = delete;
  int64_t nbytes() const;  // bytes held (raw + packed copies)
  State& state() const { return *state_; }

 private:
  std::unique_ptr<State> state_;
};

struct QConvArgs {
  ConvGeom g;
  const uint8_t* x = nullptr;  // [N, C, H, W]
  int32_t x_zero_point = 0;
  const uint8_t* w = nullptr;  // [O, Cg, KH, KW]
  const int32_t* w_zero_point = nullptr;  // [O]
  const int32_t* bias = nullptr;          // [O] or null
  Requantizer rq;                         // ch.size() == O
  AccModel acc;
  void* y = nullptr;                      // uint8 (out_bits <= 8) or uint16
  bool y16 = false;
  // Set: every output stores its accumulator after the acc model (the value the
  // requantizer would get) here, laid out like y; `rq` and `y` are then unused.
  int32_t* acc_out = nullptr;
  WeightCache* weight_cache = nullptr;  // optional: the caller's cache of this layer's packed weights
};

// Kernel families of the fast path. Generic: portable C++; Avx2: packed int16
// implicit GEMM with _mm256_madd_epi16; AvxVnni / Avx512Vnni: u8 x s8 quads with
// _mm256_dpbusd_avx_epi32 / _mm512_dpbusd_epi32 on a planar layout
// (integer_conv_vnni.cpp). Best first in kSimdPreference.
enum class SimdPath { Generic, Avx2, AvxVnni, Avx512Vnni };
constexpr SimdPath kSimdPreference[] = {SimdPath::Avx512Vnni, SimdPath::AvxVnni, SimdPath::Avx2, SimdPath::Generic};

// Impl: Reference, or Fast with the best path this CPU runs, or Fast with one path.
struct Impl {
  bool reference = false;
  bool best = true;  // fast: pick the best supported path at run time
  SimdPath path = SimdPath::Generic;
};

// Whether this build and this CPU (cpuid, OS-enabled register state) run `p`.
bool simd_supported(SimdPath p);
SimdPath best_simd_path();

// Reference: plain loops in the documented order, single thread.
AccStats qconv_reference(const QConvArgs& a);
// Fast: packed implicit GEMM on `path` (integer_conv_fast.cpp / integer_conv_vnni.cpp),
// depthwise kernel, parallel_for. Saturate mode and reductions too large for exact
// int32 lanes run the reference per-output loop in parallel. `path` must be supported.
AccStats qconv_fast(const QConvArgs& a, SimdPath path);

inline AccStats qconv(const QConvArgs& a, const Impl& impl) {
  if (impl.reference) return qconv_reference(a);
  return qconv_fast(a, impl.best ? best_simd_path() : impl.path);
}

// Thread-safe sum of the per-task stats of a parallel kernel.
class StatsSink {
 public:
  void merge(const AccStats& s) {
    std::lock_guard<std::mutex> lock(mu_);
    total_.merge(s);
  }
  AccStats total() const { return total_; }

 private:
  std::mutex mu_;
  AccStats total_;
};

// Shared by both paths: one output (n, o, p = oh*OW + ow) by the plain loop
// in the saturate order above; updates `st` and stores the code (or accumulator).
void conv_output_sequential(const QConvArgs& a, int64_t n, int64_t o, int64_t p, AccStats& st);

// Store of output idx: the modeled accumulator `acc` into acc_out, or its code into y.
inline void store_output(const QConvArgs& a, int32_t acc, int64_t o, int64_t idx) {
  if (a.acc_out) {
    a.acc_out[idx] = acc;
    return;
  }
  const int32_t code = a.rq.apply(acc, static_cast<std::size_t>(o));
  if (a.y16)
    static_cast<uint16_t*>(a.y)[idx] = static_cast<uint16_t>(code);
  else
    static_cast<uint8_t*>(a.y)[idx] = static_cast<uint8_t>(code);
}

// Epilogue shared by both paths: exact accumulator -> acc model -> store.
inline void finish_output(const QConvArgs& a, int64_t exact, int64_t o, int64_t idx, AccStats& st) {
  store_output(a, model_accumulator(exact, a.acc, st), o, idx);
}

}  // namespace integer
}  // namespace pyzeroq
