// AVX-512 VNNI kernels of the planar VNNI path (layout and tiles: integer_conv_vnni.hpp).
// Everything ISA specific is compiled for avx512f/bw/vnni by the pragma below (per
// function, so the rest of the library still runs on any x86-64); the driver calls
// these only when the CPU has them. Integer arithmetic and IEEE float32 multiply /
// add only (no FMA target: Requantizer::apply's float32_rne result must not change).
#include "kernels/integer_conv_vnni.hpp"

#if defined(PYZEROQ_HAVE_AVX512VNNI)
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_*
// placeholders once inlined (GCC PR 105593); the warning is located in the header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

namespace pyzeroq {
namespace integer {
namespace vnni {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kRows = 8;       // output channels per GEMM tile
constexpr int64_t kMaxVectors = kMaxTileVectors;  // lane vectors per GEMM tile: up to 24 accumulators of 32 zmm
constexpr int64_t kDwVectors = 4;  // lane vectors per depthwise tile

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni")

template <int64_t kVectors>
void gemm(const GemmTile& g) {
  __m512i acc[kRows][kVectors];
#pragma GCC unroll 8
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int64_t j = 0; j < kVectors; ++j) acc[r][j] = _mm512_setzero_si512();
  const uint32_t* w = g.w;
  for (int64_t t = 0; t < g.taps; ++t) {
    const uint32_t* xq = g.x + g.tapbase[t];
    for (int64_t cq = 0; cq < g.cquads; ++cq, xq += g.plane, w += kRows) {
      __m512i xv[kVectors];
#pragma GCC unroll 4
      for (int64_t j = 0; j < kVectors; ++j) xv[j] = _mm512_loadu_si512(xq + j * kLanes);
#pragma GCC unroll 8
      for (int64_t r = 0; r < kRows; ++r) {
        const __m512i b = _mm512_set1_epi32(static_cast<int32_t>(w[r]));
#pragma GCC unroll 4
        for (int64_t j = 0; j < kVectors; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], xv[j], b);
      }
    }
  }
#pragma GCC unroll 8
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int64_t j = 0; j < kVectors; ++j) _mm512_storeu_si512(g.acc + r * g.ld + j * kLanes, acc[r][j]);
}

void dw(const DwTile& d) {
  for (int64_t r = 0; r < d.rows; ++r) {
    const uint32_t* x = d.x + r * d.plane;
    const uint32_t* w = d.w + r * d.pairs;
    int32_t* out = d.acc + r * d.ld;
    __m512i acc[kDwVectors];
#pragma GCC unroll 4
    for (int64_t j = 0; j < kDwVectors; ++j) acc[j] = _mm512_setzero_si512();
    for (int64_t p = 0; p < d.pairs; ++p) {
      const uint32_t* xp = x + d.tapbase[p];
      const __m512i b = _mm512_set1_epi32(static_cast<int32_t>(w[p]));
#pragma GCC unroll 4
      for (int64_t j = 0; j < kDwVectors; ++j)
        acc[j] = _mm512_dpwssd_epi32(acc[j], _mm512_loadu_si512(xp + j * kLanes), b);
    }
#pragma GCC unroll 4
    for (int64_t j = 0; j < kDwVectors; ++j) _mm512_storeu_si512(out + j * kLanes, acc[j]);
  }
}

// float32_rne codes of e (Requantizer::apply: one float32 multiply, clamp, magic rounding).
inline __m512i requant(__m512i e, __m512 m, __m512 flo, __m512 fhi, __m512i zp) {
  const __m512 magic = _mm512_set1_ps(kRoundMagic);
  __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(e), m);
  f = _mm512_min_ps(_mm512_max_ps(f, flo), fhi);
  f = _mm512_sub_ps(_mm512_add_ps(f, magic), magic);
  return _mm512_add_epi32(_mm512_cvttps_epi32(f), zp);
}

void store_lanes(const FinishTile& f, __m512i v, int64_t at) {
  switch (f.mode) {
    case FinishMode::CodesU8:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(f.out) + at), _mm512_cvtepi32_epi8(v));
      break;
    case FinishMode::CodesU16:
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(f.out) + at), _mm512_cvtepi32_epi16(v));
      break;
    default:
      _mm512_storeu_si512(static_cast<int32_t*>(f.out) + at, v);
  }
}

void finish(const FinishTile& f) {
  __m512i mn = _mm512_set1_epi32(*f.mn), mx = _mm512_set1_epi32(*f.mx);
  const __m512 flo = _mm512_set1_ps(f.flo), fhi = _mm512_set1_ps(f.fhi);
  const __m512i zp = _mm512_set1_epi32(f.zp);
  const bool codes = f.mode == FinishMode::CodesU8 || f.mode == FinishMode::CodesU16;
  for (int64_t r = 0; r < f.rows; ++r) {
    const __m512i add = _mm512_set1_epi32(f.add[r]);
    const __m512i coef = _mm512_set1_epi32(f.sumx ? f.coef[r] : 0);
    const __m512 m = _mm512_set1_ps(codes ? f.m[r] : 0.0f);
    for (int64_t j = 0; j < f.vectors; ++j) {
      const int64_t at = r * f.ld + j * kLanes;
      __m512i e = _mm512_add_epi32(_mm512_loadu_si512(f.acc + at), add);
      if (f.sumx) e = _mm512_add_epi32(e, _mm512_mullo_epi32(_mm512_loadu_si512(f.sumx + j * kLanes), coef));
      if (f.mode != FinishMode::Exact) {
        const __mmask16 valid = f.valid[j];
        mn = _mm512_mask_min_epi32(mn, valid, mn, e);
        mx = _mm512_mask_max_epi32(mx, valid, mx, e);
      }
      store_lanes(f, codes ? requant(e, m, flo, fhi, zp) : e, at);
    }
  }
  *f.mn = _mm512_reduce_min_epi32(mn);
  *f.mx = _mm512_reduce_max_epi32(mx);
}

void pixel_sums(const uint32_t* x, int64_t plane, int64_t cquads, int64_t n, int32_t* out) {
  const __m512i ones = _mm512_set1_epi8(1);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    __m512i s = _mm512_setzero_si512();
    for (int64_t cq = 0; cq < cquads; ++cq) s = _mm512_dpbusd_epi32(s, _mm512_loadu_si512(x + cq * plane + i), ones);
    _mm512_storeu_si512(out + i, s);
  }
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
  __m512i s = _mm512_setzero_si512();
  for (int64_t cq = 0; cq < cquads; ++cq)
    s = _mm512_dpbusd_epi32(s, _mm512_maskz_loadu_epi32(tail, x + cq * plane + i), ones);
  _mm512_mask_storeu_epi32(out + i, tail, s);
}

#pragma GCC pop_options

const IsaKernels kKernels{kLanes, kRows, kMaxVectors, kDwVectors, {gemm<1>, gemm<2>, gemm<3>}, dw, finish, pixel_sums};

}  // namespace

const IsaKernels* avx512_vnni_kernels() { return &kKernels; }

}  // namespace vnni
}  // namespace integer
}  // namespace pyzeroq
#pragma GCC diagnostic pop

#else  // the compiler cannot target AVX-512 VNNI: the path is never offered

namespace pyzeroq {
namespace integer {
namespace vnni {
const IsaKernels* avx512_vnni_kernels() { return nullptr; }
}  // namespace vnni
}  // namespace integer
}  // namespace pyzeroq

#endif
