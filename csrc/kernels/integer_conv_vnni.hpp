// VNNI paths of the fast QLinearConv / QLinearMatMul (AVX-512 VNNI and AVX-VNNI):
// same results as qconv_reference, bit for bit. Internal to the kernels.
//
// Planar layout. Each (image, group) is packed once into channel-quad planes of
// uint8 codes: quad cq holds channels 4cq..4cq+3 of the group (byte k = channel
// 4cq+k, little endian), one uint32 per padded pixel. Padding pixels hold the
// input zero point zx; channels past Cg hold 0. Strides are phase split: padded
// pixel (h, w) sits at
//   at(h, w) = ((h % sh * sw + w % sw) * Hq + h / sh) * Wq + w / sw
// (Hq = ceil(Hp / sh), Wq = ceil(Wp / sw)), so output (oh, ow) under tap (ki, kj)
// reads at(ki*dh, kj*dw) + v with the "virtual position" v = oh * Wq + ow: a run of
// consecutive v is one contiguous vector load, whatever the stride and dilation.
// Virtual positions with ow >= OW are computed and dropped (the vector lanes are
// output positions, the rows of a tile are output channels). Small images are
// stacked: B images one below the other (each padded to a multiple of sh rows)
// form one unit, when that wastes fewer lanes (e.g. 1x1 convs on 7x7 maps).
//
// Exact decomposition (s8 weights): with w' = w - 128 in [-128, 127],
//   sum (x - zx)(w - zw) = sum x * w' + (128 - zw) * sum x - zx * sum (w - zw)
// over every tap and channel, padding included (x = zx there, and the left side
// gets 0 from it as in the reference). sum x * w' is _mm*_dpbusd_epi32 on the
// packed quads (padded channels have w' = 0 and x = 0); sum x comes from the
// per-pixel channel sums (only when some zw != 128); the last term is a constant
// per output channel. |sum x * w'| <= K * 255 * 128 and the exact result
// |sum (x - zx)(w - zw)| <= K * 255 * 255 fit int32 for K = taps * Cg <=
// kMaxVnniReduction, so int32 lane arithmetic (wrapping, exact modulo 2^32) gives
// the exact value. Larger reductions take the sequential path.
//
// Strided 1x1 convs without padding are run as unstrided ones on the subsampled input.
// Packed weights are cached between calls (integer_conv_vnni_weights.cpp).
//
// Depthwise, uint8 codes: channels in the lanes (integer_conv_vnni_dwc.cpp). Other
// output modes: one channel plane of int16 pairs (x[h][w], x[h + dh][w]) (raw codes,
// rows past the padding 0), so that _mm*_dpwssd_epi32 with the weight pair
// (w[ki][kj] - zw, w[ki+1][kj] - zw) adds two vertical taps per lane; the result
// is sum x * (w - zw) - zx * sum (w - zw).
#pragma once
#include <cstdint>

#include "kernels/integer_conv.hpp"

namespace pyzeroq {
namespace integer {
namespace vnni {

constexpr int64_t kMaxProduct = 255 * 255;                                  // |(x - zx)(w - zw)|, 8-bit codes
constexpr int64_t kMaxVnniReduction = INT32_MAX / kMaxProduct;             // taps * Cg per output
constexpr int32_t kWeightOffset = 128;                                     // w' = w - 128 is int8
constexpr int64_t kQuad = 4;                                               // channels per dpbusd lane

// GEMM tile: acc[r][l] = sum_t sum_cq dot4(x[cq * plane + tapbase[t] + l], w[(t * cquads + cq) * rows + r])
// for r < rows (the ISA's), l < (tile vectors) * lanes; x, w: uint8 / int8 quads. The
// accumulators then go through the epilogue (FinishTile) in registers.
struct GemmTile {
  const uint32_t* x;
  int64_t plane;
  const int64_t* tapbase;
  int64_t taps, cquads;
  const uint32_t* w;
};

// Depthwise tile: acc[r][l] = sum_p dot2(x[r * plane + tapbase[p] + l], w[r * pairs + p]) for
// r < rows (FinishTile::rows), l < dw_vectors * lanes; int16 pairs, one channel per row.
struct DwTile {
  const uint32_t* x;
  int64_t plane;
  const int64_t* tapbase;
  int64_t pairs;
  const uint32_t* w;
};

// What the epilogue writes per lane: requantized codes (uint8 / uint16), the biased
// accumulator (int32, acc_out), or the exact sum of products (int32; the driver then
// runs the scalar accumulator model / requantizer).
enum class FinishMode { CodesU8, CodesU16, Acc, Exact };

// Epilogue of a tile, for r < rows, l < vectors * lanes:
//   e = acc[r][l] + add[r] (+ sumx[l] * coef[r] when sumx)   (int32, wrapping)
// then by mode: Exact / Acc store e; Codes store the float32_rne code of e with
// multiplier m[r] (Requantizer::apply's arithmetic), at out[r * ld + l]. Except in Exact
// mode, *mn / *mx take the min / max of e over the lanes whose bit is set in valid[l / lanes].
struct FinishTile {
  int64_t rows, vectors, ld;
  const int32_t* sumx;
  const int32_t* add;
  const int32_t* coef;
  const float* m;
  const uint16_t* valid;
  float flo, fhi;
  int32_t zp;
  FinishMode mode;
  void* out;  // [rows][ld] elements of the mode's type
  int32_t* mn;
  int32_t* mx;
};

constexpr int64_t kMaxTileVectors = 3;  // lane vectors of the widest GEMM tile

// Depthwise tile with channels in the lanes (NHWC input, uint8 codes): for pixel p < npix,
// lane l (channel c0 + l):
//   e = add[l] + sum_t (x[pix[p] + tapoff[t] + l] as uint8) * w[t * lanes + l]
// then its float32_rne code (multiplier m[l], Requantizer::apply's arithmetic) at
// out[p * lanes + l]; *mn / *mx take the min / max of e over the lanes set in `valid`.
struct DwcTile {
  const uint8_t* x;
  const int64_t* pix;
  int64_t npix;
  const int64_t* tapoff;
  int64_t taps;
  const int32_t* w;
  const int32_t* add;
  const float* m;
  uint16_t valid;
  float flo, fhi;
  int32_t zp;
  uint8_t* out;
  int32_t* mn;
  int32_t* mx;
};

// One ISA's kernels and tile shape: a GEMM tile is rows x (v * lanes) lanes for
// v = 1 .. max_vectors (gemm[v - 1]), a depthwise tile up to FinishTile::rows channels x
// dw_vectors * lanes.
struct IsaKernels {
  int64_t lanes, rows, max_vectors, dw_vectors;
  void (*gemm[kMaxTileVectors])(const GemmTile&, const FinishTile&);
  void (*dw)(const DwTile&, const FinishTile&);
  void (*dwc)(const DwcTile&);
  // out[i] = sum_{cq < cquads} (sum of the 4 bytes of x[cq * plane + i]), i < n
  void (*pixel_sums)(const uint32_t* x, int64_t plane, int64_t cquads, int64_t n, int32_t* out);
};

// Null when the compiler could not build them (CMake probe); the CPU check is separate.
const IsaKernels* avx512_vnni_kernels();
const IsaKernels* avx_vnni_kernels();

// Whether the reduction of `a` fits the exact int32 bound above.
bool fits(const QConvArgs& a);
// qconv_fast on these kernels (not saturate mode; fits(a)).
AccStats run(const QConvArgs& a, const IsaKernels& k);

}  // namespace vnni
}  // namespace integer
}  // namespace pyzeroq
