// AVX-VNNI (VEX, 256-bit) kernels of the planar VNNI path (layout and tiles:
// integer_conv_vnni.hpp), for CPUs with AVX-VNNI and no AVX-512 (or where it is
// preferred). Compiled for avx2/avxvnni by the pragma below (per function); only
// called when the CPU has them. No AVX-512 instruction and no FMA is generated here.
#include "kernels/integer_conv_vnni.hpp"

#if defined(PYZEROQ_HAVE_AVXVNNI)
#include <immintrin.h>

namespace pyzeroq {
namespace integer {
namespace vnni {
namespace {

constexpr int64_t kLanes = 8;
constexpr int64_t kRows = 4;       // output channels per GEMM tile
constexpr int64_t kMaxVectors = kMaxTileVectors;  // lane vectors per GEMM tile: up to 12 accumulators of 16 ymm
constexpr int64_t kDwVectors = 4;  // lane vectors per depthwise tile

#pragma GCC push_options
#pragma GCC target("avx2,avxvnni")

// Low byte (u8) or low half (u16) of each int32 lane, in lane order, in the low 8 / 16 bytes.
inline __m128i narrow(__m256i v, bool u16) {
  const __m256i pick = u16 ? _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                              0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1)
                           : _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                              0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  // the picked bytes are dwords {0} / {0, 1} of each 128-bit half: gather them to the bottom
  const __m256i order = u16 ? _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7) : _mm256_setr_epi32(0, 4, 1, 5, 2, 3, 6, 7);
  return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, pick), order));
}

// All-ones int32 lanes where bit l of `bits` is set.
inline __m256i lane_mask(uint16_t bits) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), bit), bit);
}

// The tile epilogue (FinishTile) on accumulators in registers.
class Epilogue {
 public:
  explicit Epilogue(const FinishTile& f)
      : f_(f), codes_(f.mode == FinishMode::CodesU8 || f.mode == FinishMode::CodesU16),
        stats_(f.mode != FinishMode::Exact), mn_(_mm256_set1_epi32(*f.mn)), mx_(_mm256_set1_epi32(*f.mx)) {}
  // Lanes j * kLanes .. of row r.
  void put(__m256i acc, int64_t r, int64_t j) {
    __m256i e = _mm256_add_epi32(acc, _mm256_set1_epi32(f_.add[r]));
    if (f_.sumx)
      e = _mm256_add_epi32(e, _mm256_mullo_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(f_.sumx + j * kLanes)),
                                                 _mm256_set1_epi32(f_.coef[r])));
    if (stats_) {
      const __m256i valid = lane_mask(f_.valid[j]);
      mn_ = _mm256_min_epi32(mn_, _mm256_blendv_epi8(_mm256_set1_epi32(INT32_MAX), e, valid));
      mx_ = _mm256_max_epi32(mx_, _mm256_blendv_epi8(_mm256_set1_epi32(INT32_MIN), e, valid));
    }
    const int64_t at = r * f_.ld + j * kLanes;
    if (!codes_) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<int32_t*>(f_.out) + at), e);
      return;
    }
    // Requantizer::apply: one float32 multiply, clamp, magic rounding (half to even), + zp
    const __m256 magic = _mm256_set1_ps(kRoundMagic);
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(e), _mm256_set1_ps(f_.m[r]));
    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(f_.flo)), _mm256_set1_ps(f_.fhi));
    v = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
    const __m256i code = _mm256_add_epi32(_mm256_cvttps_epi32(v), _mm256_set1_epi32(f_.zp));
    if (f_.mode == FinishMode::CodesU8)
      _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(f_.out) + at), narrow(code, false));
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(f_.out) + at), narrow(code, true));
  }
  void done() {
    alignas(32) int32_t lo[kLanes], hi[kLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lo), mn_);
    _mm256_store_si256(reinterpret_cast<__m256i*>(hi), mx_);
    for (int64_t l = 0; l < kLanes; ++l) {
      *f_.mn = lo[l] < *f_.mn ? lo[l] : *f_.mn;
      *f_.mx = hi[l] > *f_.mx ? hi[l] : *f_.mx;
    }
  }

 private:
  const FinishTile& f_;
  const bool codes_, stats_;
  __m256i mn_, mx_;
};

template <int64_t kVectors>
void gemm(const GemmTile& g, const FinishTile& f) {
  __m256i acc[kRows][kVectors];
#pragma GCC unroll 4
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int64_t j = 0; j < kVectors; ++j) acc[r][j] = _mm256_setzero_si256();
  const uint32_t* w = g.w;
  for (int64_t t = 0; t < g.taps; ++t) {
    const uint32_t* xq = g.x + g.tapbase[t];
    for (int64_t cq = 0; cq < g.cquads; ++cq, xq += g.plane, w += kRows) {
      __m256i xv[kVectors];
#pragma GCC unroll 4
      for (int64_t j = 0; j < kVectors; ++j) xv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + j * kLanes));
#pragma GCC unroll 4
      for (int64_t r = 0; r < kRows; ++r) {
        const __m256i b = _mm256_set1_epi32(static_cast<int32_t>(w[r]));
#pragma GCC unroll 4
        for (int64_t j = 0; j < kVectors; ++j) acc[r][j] = _mm256_dpbusd_avx_epi32(acc[r][j], xv[j], b);
      }
    }
  }
  Epilogue epi(f);
#pragma GCC unroll 4
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
    __m256i acc[kDwVectors];
#pragma GCC unroll 4
    for (int64_t j = 0; j < kDwVectors; ++j) acc[j] = _mm256_setzero_si256();
    for (int64_t p = 0; p < d.pairs; ++p) {
      const uint32_t* xp = x + d.tapbase[p];
      const __m256i b = _mm256_set1_epi32(static_cast<int32_t>(w[p]));
#pragma GCC unroll 4
      for (int64_t j = 0; j < kDwVectors; ++j)
        acc[j] = _mm256_dpwssd_avx_epi32(acc[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + j * kLanes)), b);
    }
#pragma GCC unroll 4
    for (int64_t j = 0; j < kDwVectors; ++j) epi.put(acc[j], r, j);
  }
  epi.done();
}

void dwc(const DwcTile& d) {
  const __m256i add = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.add)), zp = _mm256_set1_epi32(d.zp);
  const __m256 m = _mm256_loadu_ps(d.m), flo = _mm256_set1_ps(d.flo), fhi = _mm256_set1_ps(d.fhi);
  const __m256 magic = _mm256_set1_ps(kRoundMagic);
  const __m256i valid = lane_mask(d.valid);
  const __m256i lowest = _mm256_set1_epi32(INT32_MIN), highest = _mm256_set1_epi32(INT32_MAX);
  __m256i mn = _mm256_set1_epi32(*d.mn), mx = _mm256_set1_epi32(*d.mx);
  for (int64_t p = 0; p < d.npix; ++p) {
    const uint8_t* x = d.x + d.pix[p];
    __m256i acc = add;
    for (int64_t t = 0; t < d.taps; ++t) {
      const __m256i xv = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + d.tapoff[t])));
      acc = _mm256_add_epi32(
          acc, _mm256_mullo_epi32(xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.w + t * kLanes))));
    }
    mn = _mm256_min_epi32(mn, _mm256_blendv_epi8(highest, acc, valid));
    mx = _mm256_max_epi32(mx, _mm256_blendv_epi8(lowest, acc, valid));
    // Requantizer::apply: one float32 multiply, clamp, magic rounding (half to even), + zp
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), m);
    v = _mm256_min_ps(_mm256_max_ps(v, flo), fhi);
    v = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
    const __m256i code = _mm256_add_epi32(_mm256_cvttps_epi32(v), zp);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(d.out + p * kLanes), narrow(code, false));
  }
  alignas(32) int32_t lo[kLanes], hi[kLanes];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lo), mn);
  _mm256_store_si256(reinterpret_cast<__m256i*>(hi), mx);
  for (int64_t l = 0; l < kLanes; ++l) {
    *d.mn = lo[l] < *d.mn ? lo[l] : *d.mn;
    *d.mx = hi[l] > *d.mx ? hi[l] : *d.mx;
  }
}

void pixel_sums(const uint32_t* x, int64_t plane, int64_t cquads, int64_t n, int32_t* out) {
  const __m256i ones = _mm256_set1_epi8(1);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    __m256i s = _mm256_setzero_si256();
    for (int64_t cq = 0; cq < cquads; ++cq)
      s = _mm256_dpbusd_avx_epi32(s, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + cq * plane + i)), ones);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), s);
  }
  for (; i < n; ++i) {
    int32_t s = 0;
    for (int64_t cq = 0; cq < cquads; ++cq) {
      const uint8_t* q = reinterpret_cast<const uint8_t*>(x + cq * plane + i);
      for (int64_t k = 0; k < kQuad; ++k) s += q[k];
    }
    out[i] = s;
  }
}

#pragma GCC pop_options

const IsaKernels kKernels{kLanes, kRows, kMaxVectors, kDwVectors, {gemm<1>, gemm<2>, gemm<3>}, dw, dwc, pixel_sums};

}  // namespace

const IsaKernels* avx_vnni_kernels() { return &kKernels; }

}  // namespace vnni
}  // namespace integer
}  // namespace pyzeroq

#else  // the compiler cannot target AVX-VNNI: the path is never offered

namespace pyzeroq {
namespace integer {
namespace vnni {
const IsaKernels* avx_vnni_kernels() { return nullptr; }
}  // namespace vnni
}  // namespace integer
}  // namespace pyzeroq

#endif
