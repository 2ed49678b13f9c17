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

// The tile epilogue (FinishTile) on accumulators in registers.
class Epilogue {
 public:
  explicit Epilogue(const FinishTile& f)
      : f_(f), codes_(f.mode == FinishMode::CodesU8 || f.mode == FinishMode::CodesU16),
        stats_(f.mode != FinishMode::Exact), mn_(_mm512_set1_epi32(*f.mn)), mx_(_mm512_set1_epi32(*f.mx)),
        flo_(_mm512_set1_ps(f.flo)), fhi_(_mm512_set1_ps(f.fhi)), magic_(_mm512_set1_ps(kRoundMagic)),
        zp_(_mm512_set1_epi32(f.zp)) {}
  // Lanes j * kLanes .. of row r.
  void put(__m512i acc, int64_t r, int64_t j) {
    __m512i e = _mm512_add_epi32(acc, _mm512_set1_epi32(f_.add[r]));
    if (f_.sumx)
      e = _mm512_add_epi32(e, _mm512_mullo_epi32(_mm512_loadu_si512(f_.sumx + j * kLanes),
                                                 _mm512_set1_epi32(f_.coef[r])));
    if (stats_) {
      const __mmask16 valid = f_.valid[j];
      mn_ = _mm512_mask_min_epi32(mn_, valid, mn_, e);
      mx_ = _mm512_mask_max_epi32(mx_, valid, mx_, e);
    }
    const int64_t at = r * f_.ld + j * kLanes;
    if (!codes_) {
      _mm512_storeu_si512(static_cast<int32_t*>(f_.out) + at, e);
      return;
    }
    // Requantizer::apply: one float32 multiply, clamp, magic rounding (half to even), + zp
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(e), _mm512_set1_ps(f_.m[r]));
    v = _mm512_min_ps(_mm512_max_ps(v, flo_), fhi_);
    v = _mm512_sub_ps(_mm512_add_ps(v, magic_), magic_);
    const __m512i code = _mm512_add_epi32(_mm512_cvttps_epi32(v), zp_);
    if (f_.mode == FinishMode::CodesU8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(f_.out) + at), _mm512_cvtepi32_epi8(code));
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(f_.out) + at),
                          _mm512_cvtepi32_epi16(code));
  }
  void done() {
    *f_.mn = _mm512_reduce_min_epi32(mn_);
    *f_.mx = _mm512_reduce_max_epi32(mx_);
  }

 private:
  const FinishTile& f_;
  const bool codes_, stats_;
  __m512i mn_, mx_;
  const __m512 flo_, fhi_, magic_;
  const __m512i zp_;
};

template <int64_t kVectors>
void gemm(const GemmTile& g, const FinishTile& f) {
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
  Epilogue epi(f);
#pragma GCC unroll 8
  for (int64_t r = 0; r < kRows; ++r) {
    if (r >= f.rows) break;
#pragma GCC unroll 4
    for (int64_t j = 0; j < kVectors; ++j) epi.put(acc[r][j], r, j);
  }
  epi.done();
}

void dw(const DwTile& d, const FinishTile& f) {
  Epilogue epi(f);
  for (int64_t r = 0; r < f.rows; ++r) {
    const uint32_t* x = d.x + r * d.plane;
    const uint32_t* w = d.w + r * d.pairs;
    __m512i acc[kDwVectors];
#pragma GCC unroll 4
    for (int64_t j = 0; j < kDwVectors; ++j) acc[j] = _mm512_setzero_si512();
    for (int64_t p = 0; p < d.pairs; ++p) {
      const uint32_t* xp = x + d.tapbase[p];
      const __m512i b = _mm512_set1_epi32(static_cast<int32_t>(w[p]));
#pragma GCC unroll 4
      for (int64_t j = 0; j < kDwVectors; ++j) acc[j] = _mm512_dpwssd_epi32(acc[j], _mm512_loadu_si512(xp + j * kLanes), b);
    }
#pragma GCC unroll 4
    for (int64_t j = 0; j < kDwVectors; ++j) epi.put(acc[j], r, j);
  }
  epi.done();
}

void dwc(const DwcTile& d) {
  const __m512i add = _mm512_loadu_si512(d.add), zp = _mm512_set1_epi32(d.zp);
  const __m512 m = _mm512_loadu_ps(d.m), flo = _mm512_set1_ps(d.flo), fhi = _mm512_set1_ps(d.fhi);
  const __m512 magic = _mm512_set1_ps(kRoundMagic);
  __m512i mn = _mm512_set1_epi32(*d.mn), mx = _mm512_set1_epi32(*d.mx);
  for (int64_t p = 0; p < d.npix; ++p) {
    const uint8_t* x = d.x + d.pix[p];
    __m512i acc = add;
    for (int64_t t = 0; t < d.taps; ++t) {
      const __m512i xv = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + d.tapoff[t])));
      acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(xv, _mm512_loadu_si512(d.w + t * kLanes)));
    }
    mn = _mm512_mask_min_epi32(mn, d.valid, mn, acc);
    mx = _mm512_mask_max_epi32(mx, d.valid, mx, acc);
    // Requantizer::apply: one float32 multiply, clamp, magic rounding (half to even), + zp
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), m);
    v = _mm512_min_ps(_mm512_max_ps(v, flo), fhi);
    v = _mm512_sub_ps(_mm512_add_ps(v, magic), magic);
    const __m512i code = _mm512_add_epi32(_mm512_cvttps_epi32(v), zp);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d.out + p * kLanes), _mm512_cvtepi32_epi8(code));
  }
  *d.mn = _mm512_reduce_min_epi32(mn);
  *d.mx = _mm512_reduce_max_epi32(mx);
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

const IsaKernels kKernels{kLanes, kRows, kMaxVectors, kDwVectors, {gemm<1>, gemm<2>, gemm<3>}, dw, dwc, pixel_sums};

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
