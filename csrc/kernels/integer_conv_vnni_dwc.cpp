// Depthwise conv of the VNNI paths with the channels in the vector lanes, for the
// uint8-code mode. Each image is packed once into a padded NHWC buffer (zx in the
// padding, channels rounded up to whole lane vectors); a tile is up to kPixels output
// pixels x one lane vector of channels, every tap one widening load and one int32
// multiply-add per pixel (exact: |x * (w - zw)| <= 255 * 255 and sum over T taps, T <=
// kMaxVnniReduction); the codes are transposed back to NCHW 16 x 16 at a time.
//   sum (x - zx)(w - zw) = sum x * (w - zw) - zx * sum (w - zw)   (padding x = zx adds 0)
#include <emmintrin.h>  // SSE2 (x86-64 baseline): 16 x 16 byte transpose

#include <cstring>

#include "kernels/integer_conv_vnni_layout.hpp"

namespace pyzeroq {
namespace integer {
namespace vnni {
namespace {

constexpr int64_t kPixels = 16;  // output pixels per tile (one 16 x 16 byte transpose)
constexpr int64_t kBlock = 16;   // bytes per transposed row

// out[j * out_stride + i] = in[i * in_stride + j] for i, j < 16: four rounds of unpacks.
void transpose16(const uint8_t* in, int64_t in_stride, uint8_t* out, int64_t out_stride) {
  __m128i r[kBlock];
  for (int i = 0; i < kBlock; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i * in_stride));
  for (int round = 0; round < 4; ++round) {
    __m128i t[kBlock];
    for (int i = 0; i < kBlock / 2; ++i) {
      const __m128i a = r[2 * i], b = r[2 * i + 1];
      switch (round) {
        case 0: t[i] = _mm_unpacklo_epi8(a, b), t[i + 8] = _mm_unpackhi_epi8(a, b); break;
        case 1: t[i] = _mm_unpacklo_epi16(a, b), t[i + 8] = _mm_unpackhi_epi16(a, b); break;
        case 2: t[i] = _mm_unpacklo_epi32(a, b), t[i + 8] = _mm_unpackhi_epi32(a, b); break;
        default: t[i] = _mm_unpacklo_epi64(a, b), t[i + 8] = _mm_unpackhi_epi64(a, b); break;
      }
    }
    std::memcpy(r, t, sizeof(r));
  }
  for (int k = 0; k < kBlock; ++k) {  // register k now holds column bit_reverse4(k)
    const int col = ((k & 1) << 3) | ((k & 2) << 1) | ((k & 4) >> 1) | ((k & 8) >> 3);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + col * out_stride), r[k]);
  }
}

class DwcPlan {
 public:
  DwcPlan(const QConvArgs& a, const IsaKernels& k)
      : a_(a), k_(k), L_(k.lanes), C_(a.g.C), Cp_(round_up(a.g.C, L_)), T_(a.g.KH * a.g.KW),
        Hp_(a.g.H + a.g.pt + a.g.pb), Wp_(a.g.W + a.g.pl + a.g.pr), P_(a.g.OH * a.g.OW),
        f_(make_finish(a, T_, Cp_)) {
    const ConvGeom& g = a.g;
    w_.assign(static_cast<std::size_t>(T_ * Cp_), 0);
    for (int64_t c = 0; c < C_; ++c) {
      int64_t sum_wz = 0;
      for (int64_t t = 0; t < T_; ++t) {
        const int32_t v = static_cast<int32_t>(a.w[c * T_ + t]) - a.w_zero_point[c];
        sum_wz += v;
        w_[(c / L_ * T_ + t) * L_ + c % L_] = v;  // [channel block][tap][lane]
      }
      set_channel(a, f_, c, c, sum_wz);
    }
    for (int64_t ki = 0; ki < g.KH; ++ki)
      for (int64_t kj = 0; kj < g.KW; ++kj) tapoff_.push_back((ki * g.dh * Wp_ + kj * g.dw) * Cp_);
    for (int64_t h = 0; h < g.H; ++h)
      for (int64_t w = 0; w < g.W; ++w) pixoff_.push_back(((h + g.pt) * Wp_ + w + g.pl) * Cp_);
  }
  AccStats run() const {
    const int64_t bytes = Hp_ * Wp_ * Cp_, words = ceil_div(bytes, static_cast<int64_t>(sizeof(uint32_t)));
    return drive(a_.g.N, ceil_div(P_, kPixels), words, static_cast<std::size_t>(kPixels * Cp_ * T_),
                 [&](int64_t n, uint32_t* buf, Workspace& ws) {
                   pack(n, reinterpret_cast<uint8_t*>(buf),
                        reinterpret_cast<uint8_t*>(Workspace::get(ws.pix, kBlock * kBlock / 4)));
                 },
                 [&](int64_t n, uint32_t* buf, int64_t tb, int64_t te, AccStats& st, Workspace& ws) {
                   compute(n, reinterpret_cast<const uint8_t*>(buf), tb, te, st, ws);
                 });
  }

 private:
  // buf[(hp * Wp + wp) * Cp + c] = x[n][c][hp - pt][wp - pl]; zx in the padding and past C.
  // Whole 16 x 16 blocks (channels x pixels of a contiguous plane) by transposes, the rest by bytes.
  void pack(int64_t n, uint8_t* buf, uint8_t* tmp) const {
    const ConvGeom& g = a_.g;
    const int64_t HW = g.H * g.W;
    std::memset(buf, a_.x_zero_point, static_cast<std::size_t>(Hp_ * Wp_ * Cp_));
    const uint8_t* xn = a_.x + n * g.in_sn;
    const bool planes = g.in_sw == 1 && g.in_sh == g.W;
    const int64_t c_blocks = planes ? C_ / kBlock * kBlock : 0, q_blocks = HW / kBlock * kBlock;
    for (int64_t c0 = 0; c0 < c_blocks; c0 += kBlock) {
      for (int64_t q0 = 0; q0 < q_blocks; q0 += kBlock) {
        transpose16(xn + c0 * g.in_sc + q0, g.in_sc, tmp, kBlock);
        for (int64_t k = 0; k < kBlock; ++k) std::memcpy(buf + pixoff_[q0 + k] + c0, tmp + k * kBlock, kBlock);
      }
      for (int64_t c = c0; c < c0 + kBlock; ++c)
        for (int64_t q = q_blocks; q < HW; ++q) buf[pixoff_[q] + c] = xn[c * g.in_sc + q];
    }
    for (int64_t c = c_blocks; c < C_; ++c)
      for (int64_t h = 0; h < g.H; ++h) {
        const uint8_t* src = xn + c * g.in_sc + h * g.in_sh;
        for (int64_t w = 0; w < g.W; ++w) buf[pixoff_[h * g.W + w] + c] = src[w * g.in_sw];
      }
  }
  void compute(int64_t n, const uint8_t* buf, int64_t tb, int64_t te, AccStats& st, Workspace& ws) const {
    const ConvGeom& g = a_.g;
    uint8_t* codes = reinterpret_cast<uint8_t*>(Workspace::get(ws.staging, 2 * kPixels * kBlock / 4));
    uint8_t* rows = codes + kPixels * kBlock;
    int64_t pix[kPixels];
    Range range;
    for (int64_t tile = tb; tile < te; ++tile) {
      const int64_t p0 = tile * kPixels, np = std::min(kPixels, P_ - p0);
      for (int64_t i = 0, oh = p0 / g.OW, ow = p0 % g.OW; i < np; ++i, ++ow) {
        if (ow == g.OW) ow = 0, ++oh;
        pix[i] = (oh * g.sh * Wp_ + ow * g.sw) * Cp_;
      }
      for (int64_t c0 = 0; c0 < C_; c0 += L_) {
        const int64_t nc = std::min(L_, C_ - c0);
        k_.dwc({buf + c0, pix, np, tapoff_.data(), T_, w_.data() + c0 * T_, f_.add.data() + c0, f_.m.data() + c0,
                static_cast<uint16_t>((1u << nc) - 1), f_.flo, f_.fhi, f_.zp, codes, &range.mn, &range.mx});
        store(n, c0, nc, p0, np, codes, rows);
      }
    }
    range.flush(st);
  }
  // codes [np][lanes] of channels c0.. at pixels p0.. -> y (NCHW).
  void store(int64_t n, int64_t c0, int64_t nc, int64_t p0, int64_t np, const uint8_t* codes, uint8_t* rows) const {
    const ConvGeom& g = a_.g;
    uint8_t* y = static_cast<uint8_t*>(a_.y) + n * g.out_sn + p0 * g.out_sp;
    if (L_ == kBlock && np == kPixels && g.out_sp == 1) {
      if (nc == kBlock) return transpose16(codes, L_, y + c0 * g.out_so, g.out_so);
      transpose16(codes, L_, rows, kBlock);
      for (int64_t c = 0; c < nc; ++c) std::memcpy(y + (c0 + c) * g.out_so, rows + c * kBlock, kBlock);
      return;
    }
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t p = 0; p < np; ++p) y[(c0 + c) * g.out_so + p * g.out_sp] = codes[p * L_ + c];
  }
  const QConvArgs& a_;
  const IsaKernels& k_;
  const int64_t L_, C_, Cp_, T_, Hp_, Wp_, P_;
  Finish f_;
  std::vector<int32_t> w_;
  std::vector<int64_t> tapoff_;
  std::vector<int64_t> pixoff_;  // [H * W]: offset of input pixel (h, w) in the packed image
};

}  // namespace

bool depthwise_in_lanes(const QConvArgs& a) {
  return make_finish(a, a.g.KH * a.g.KW, 0).mode == FinishMode::CodesU8;
}

AccStats run_depthwise_in_lanes(const QConvArgs& a, const IsaKernels& k) { return DwcPlan(a, k).run(); }

}  // namespace vnni
}  // namespace integer
}  // namespace pyzeroq
