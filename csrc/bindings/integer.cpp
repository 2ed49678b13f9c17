// pybind11 bindings of the integer ALU simulator (csrc/kernels/integer_*).
// All argument validation lives here: TypeError for wrong dtypes, ValueError
// for shapes / ranges / scales, each naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <vector>

#include "bindings/format.hpp"
#include "bindings/register.hpp"
#include "kernels/integer_conv.hpp"
#include "kernels/integer_elementwise.hpp"

namespace py = pybind11;

namespace pyzeroq {
namespace {
using namespace integer;

constexpr int kMinBits = 2;
constexpr int kMaxOutBits = 16;
constexpr int kMaxAccBits = 32;
constexpr int kCodeMax8 = 255;
constexpr int64_t kMaxGlobalPoolSize = int64_t{1} << 23;  // 255 * 2^23 < 2^31

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

// overflow="error": raised as _core.AccumulatorOverflowError (a ValueError subclass), so that
// Python recognizes it by type, not by message text.
struct AccumulatorOverflow : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

U8 code_array(const py::object& o, const char* name, int ndim_min, int ndim_max) {
  if (!py::isinstance<py::array>(o)) throw py::type_error(std::string(name) + " must be a numpy array of uint8 codes");
  py::array a = py::reinterpret_borrow<py::array>(o);
  if (!a.dtype().equal(py::dtype::of<uint8_t>()))
    throw py::type_error(std::string(name) + " must have dtype uint8, got " + std::string(py::str(a.dtype())));
  if (a.ndim() < ndim_min || a.ndim() > ndim_max)
    value_error(std::string(name) + " must have " + std::to_string(ndim_min) +
                (ndim_min == ndim_max ? "" : ".." + std::to_string(ndim_max)) + " dimensions, got " +
                std::to_string(a.ndim()));
  return U8::ensure(a);
}

float scalar_scale(double s, const char* name) {
  const float f = static_cast<float>(s);
  if (!(std::isfinite(f) && f > 0.0f)) value_error(std::string(name) + " must be a positive finite float32, got " + number_repr(s));
  return f;
}

py::array to_numpy(const py::object& o) { return py::module_::import("numpy").attr("asarray")(o); }

// float32 scales: a scalar or `count` values, each positive and finite.
std::vector<float> scale_vector(const py::object& o, const char* name, int64_t count) {
  py::array a = to_numpy(o);
  const char kind = a.dtype().kind();
  if (kind != 'f' && kind != 'i' && kind != 'u') throw py::type_error(std::string(name) + " must be a float array or scalar");
  auto f = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
  if (f.size() != 1 && f.size() != count)
    value_error(std::string(name) + " must be a scalar or have " + std::to_string(count) + " values, got " + std::to_string(f.size()));
  std::vector<float> v(static_cast<std::size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    v[i] = f.data()[f.size() == 1 ? 0 : i];
    if (!(std::isfinite(v[i]) && v[i] > 0.0f)) value_error(std::string(name) + " must hold positive finite values");
  }
  return v;
}

std::vector<int64_t> int_vector(const py::object& o, const char* name, int64_t count, int64_t lo, int64_t hi) {
  py::array a = to_numpy(o);
  const char kind = a.dtype().kind();
  if (kind != 'i' && kind != 'u') throw py::type_error(std::string(name) + " must be an integer array or scalar, got dtype " + std::string(py::str(a.dtype())));
  auto f = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  if (f.size() != 1 && f.size() != count)
    value_error(std::string(name) + " must be a scalar or have " + std::to_string(count) + " values, got " + std::to_string(f.size()));
  std::vector<int64_t> v(static_cast<std::size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    v[i] = f.data()[f.size() == 1 ? 0 : i];
    if (v[i] < lo || v[i] > hi)
      value_error(std::string(name) + " must lie in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(v[i]));
  }
  return v;
}

int64_t zero_point(const py::object& o, const char* name, int64_t hi) { return int_vector(o, name, 1, 0, hi)[0]; }

RequantSpec parse_spec(const std::string& rounding, const std::string& dyadic_rounding, int dyadic_bits, int dyadic_shift) {
  RequantSpec s;
  if (rounding == "float32_rne") s.mode = Rounding::Float32Rne;
  else if (rounding == "gemmlowp") s.mode = Rounding::Gemmlowp;
  else if (rounding == "dyadic") s.mode = Rounding::Dyadic;
  else value_error("rounding must be 'float32_rne', 'gemmlowp' or 'dyadic', got '" + rounding + "'");
  if (dyadic_rounding == "half_even") s.dyadic_round = DyadicRound::HalfEven;
  else if (dyadic_rounding == "half_up") s.dyadic_round = DyadicRound::HalfUp;
  else if (dyadic_rounding == "half_away") s.dyadic_round = DyadicRound::HalfAway;
  else value_error("dyadic_rounding must be 'half_even', 'half_up' or 'half_away', got '" + dyadic_rounding + "'");
  if (dyadic_bits < 1 || dyadic_bits > kMaxDyadicBits) value_error("dyadic_bits must lie in [1, 32]");
  if (dyadic_shift < -1 || dyadic_shift > kMaxDyadicShift) value_error("dyadic_shift must be None or lie in [0, 62]");
  s.dyadic_bits = dyadic_bits;
  s.dyadic_shift = dyadic_shift;
  return s;
}

int check_out_bits(int out_bits) {
  if (out_bits < kMinBits || out_bits > kMaxOutBits) value_error("out_bits must lie in [2, 16], got " + std::to_string(out_bits));
  return out_bits;
}

Requantizer make_requantizer(const RequantSpec& spec, int out_bits, const py::object& y_zero_point, bool relu,
                             const std::vector<float>& m32, const std::vector<double>& m64) {
  Requantizer rq;
  rq.spec = spec;
  rq.hi = (1 << check_out_bits(out_bits)) - 1;
  rq.zero_point = static_cast<int32_t>(zero_point(y_zero_point, "y_zero_point", rq.hi));
  rq.lo = relu ? rq.zero_point : 0;
  for (std::size_t c = 0; c < m32.size(); ++c) {
    if (!(std::isfinite(m32[c]) && m32[c] > 0.0f && std::isfinite(m64[c]) && m64[c] > 0.0))
      value_error("the requantization multiplier must be positive and finite in float32 (check the scales)");
    try {
      rq.ch.push_back(make_multiplier(spec, m32[c], m64[c]));
    } catch (const std::invalid_argument& e) {
      value_error(e.what());
    }
  }
  return rq;
}

AccModel parse_acc(int acc_bits, const std::string& overflow) {
  AccModel m;
  if (acc_bits < kMinBits || acc_bits > kMaxAccBits) value_error("acc_bits must lie in [2, 32], got " + std::to_string(acc_bits));
  m.bits = acc_bits;
  if (overflow == "wrap") m.mode = Overflow::Wrap;
  else if (overflow == "saturate") m.mode = Overflow::Saturate;
  else if (overflow == "error") m.mode = Overflow::Error;
  else value_error("overflow must be 'wrap', 'saturate' or 'error', got '" + overflow + "'");
  return m;
}

// impl names of the fast paths, as passed from Python.
struct NamedPath {
  const char* name;
  SimdPath path;
};
constexpr NamedPath kFastPaths[] = {{"fast_avx512vnni", SimdPath::Avx512Vnni},
                                    {"fast_avxvnni", SimdPath::AvxVnni},
                                    {"fast_avx2", SimdPath::Avx2},
                                    {"fast_generic", SimdPath::Generic}};

// "reference", "fast" (best path of this CPU), then the fast paths this CPU runs.
std::vector<std::string> available_impls() {
  std::vector<std::string> v{"reference", "fast"};
  for (const NamedPath& p : kFastPaths)
    if (simd_supported(p.path)) v.push_back(p.name);
  return v;
}

std::string impl_list(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& e : v) s += (s.empty() ? "'" : ", '") + e + "'";
  return s;
}

Impl parse_impl(const std::string& impl) {
  Impl im;
  if (impl == "reference") im.reference = true;
  if (impl == "reference" || impl == "fast") return im;
  for (const NamedPath& p : kFastPaths) {
    if (impl != p.name) continue;
    if (!simd_supported(p.path))
      value_error("impl '" + impl + "' is not supported on this CPU (or by this build); available: " +
                  impl_list(available_impls()));
    im.best = false;
    im.path = p.path;
    return im;
  }
  std::vector<std::string> all{"reference", "fast"};
  for (const NamedPath& p : kFastPaths) all.emplace_back(p.name);
  value_error("impl must be one of " + impl_list(all) + ", got '" + impl + "'");
}

py::array alloc_codes(const std::vector<py::ssize_t>& shape, int out_bits) {
  if (out_bits <= 8) return py::array_t<uint8_t>(shape);
  return py::array_t<uint16_t>(shape);
}

py::dict stats_dict(const AccStats& st) {
  py::dict d;
  d["max_abs_acc"] = st.max_abs_acc();
  d["bits_needed"] = st.bits_needed();
  d["overflow_count"] = st.overflow_count;
  d["min_acc"] = st.min_acc;
  d["max_acc"] = st.max_acc;
  return d;
}

std::vector<int32_t> bias_vector(const py::object& bias, int64_t O) {
  std::vector<int32_t> v;
  if (bias.is_none()) return v;
  const auto b = int_vector(bias, "bias", O, INT32_MIN, INT32_MAX);
  if (to_numpy(bias).size() != O) value_error("bias must have " + std::to_string(O) + " values (one per output channel)");
  v.assign(b.begin(), b.end());
  return v;
}

// Zero points, bias and accumulator model of a conv / matmul (x_name: "x" or "a",
// w_name: "w" or "b"); owns the arrays the kernel args point into.
struct Operands {
  std::vector<int32_t> zw, bias;
  void set(QConvArgs& a, const uint8_t* x, const py::object& x_zero_point, const char* x_name, const uint8_t* w,
           const py::object& w_zero_point, const char* w_name, const py::object& bias_o, int acc_bits,
           const std::string& overflow) {
    const std::vector<int64_t> z = int_vector(w_zero_point, (std::string(w_name) + "_zero_point").c_str(), a.g.O, 0, kCodeMax8);
    zw.assign(z.begin(), z.end());
    bias = bias_vector(bias_o, a.g.O);
    a.x = x;
    a.x_zero_point = static_cast<int32_t>(zero_point(x_zero_point, (std::string(x_name) + "_zero_point").c_str(), kCodeMax8));
    a.w = w;
    a.w_zero_point = zw.data();
    a.bias = bias.empty() ? nullptr : bias.data();
    a.acc = parse_acc(acc_bits, overflow);
  }
};

// Runs the kernel without the GIL; ValueError on overflow with overflow="error".
AccStats run_kernel(const QConvArgs& a, Impl im) {
  AccStats st;
  {
    py::gil_scoped_release release;
    st = qconv(a, im);
  }
  if (a.acc.mode == Overflow::Error && st.overflow_count > 0) throw AccumulatorOverflow(overflow_message(st, a.acc));
  return st;
}

// QLinear driver: validates scales / zero points / bias, builds the requantizer, runs.
py::tuple run_qconv(QConvArgs& a, const uint8_t* x, double x_scale, const py::object& x_zero_point,
                    const uint8_t* w, const py::object& w_scale, const py::object& w_zero_point, double y_scale,
                    const py::object& y_zero_point, const py::object& bias, const RequantSpec& spec, int out_bits,
                    int acc_bits, const std::string& overflow, bool relu, const std::string& impl,
                    const std::vector<py::ssize_t>& out_shape, const char* x_name, const char* w_name,
                    WeightCache* weight_cache) {
  const int64_t O = a.g.O;
  a.weight_cache = weight_cache;
  const float sx = scalar_scale(x_scale, (std::string(x_name) + "_scale").c_str()), sy = scalar_scale(y_scale, "y_scale");
  const std::vector<float> sw = scale_vector(w_scale, (std::string(w_name) + "_scale").c_str(), O);
  std::vector<float> m32(O);
  std::vector<double> m64(O);
  for (int64_t o = 0; o < O; ++o) {
    const float prod = sx * sw[o];  // float32, as onnxruntime
    m32[o] = prod / sy;
    m64[o] = static_cast<double>(sx) * static_cast<double>(sw[o]) / static_cast<double>(sy);  // TFLite
  }
  Operands own;
  own.set(a, x, x_zero_point, x_name, w, w_zero_point, w_name, bias, acc_bits, overflow);
  a.rq = make_requantizer(spec, out_bits, y_zero_point, relu, m32, m64);
  const Impl im = parse_impl(impl);
  py::array y = alloc_codes(out_shape, out_bits);
  a.y = y.mutable_data();
  a.y16 = out_bits > 8;
  const AccStats st = run_kernel(a, im);
  return py::make_tuple(y, stats_dict(st));
}

// Integer driver (ConvInteger / MatMulInteger): the int32 accumulators themselves.
py::tuple run_integer(QConvArgs& a, const uint8_t* x, const py::object& x_zero_point, const uint8_t* w,
                      const py::object& w_zero_point, const py::object& bias, int acc_bits,
                      const std::string& overflow, const std::string& impl, const std::vector<py::ssize_t>& out_shape,
                      const char* x_name, const char* w_name, WeightCache* weight_cache) {
  a.weight_cache = weight_cache;
  Operands own;
  own.set(a, x, x_zero_point, x_name, w, w_zero_point, w_name, bias, acc_bits, overflow);
  const Impl im = parse_impl(impl);
  py::array_t<int32_t> y(out_shape);
  a.acc_out = y.mutable_data();
  const AccStats st = run_kernel(a, im);
  return py::make_tuple(y, stats_dict(st));
}

std::vector<int64_t> int_list(const std::vector<int64_t>& v, const char* name, std::size_t n, int64_t lo) {
  if (v.size() != n) value_error(std::string(name) + " must have " + std::to_string(n) + " values");
  for (int64_t e : v)
    if (e < lo) value_error(std::string(name) + " values must be >= " + std::to_string(lo));
  return v;
}

// Geometry of a conv of x [N, C, H, W] with w [O, C/groups, KH, KW] (NCHW output).
ConvGeom conv_geom(const U8& x, const U8& w, std::vector<int64_t> stride, std::vector<int64_t> padding,
                   std::vector<int64_t> dilation, int64_t groups) {
  stride = int_list(stride, "stride", 2, 1);
  padding = int_list(padding, "padding", 4, 0);
  dilation = int_list(dilation, "dilation", 2, 1);
  ConvGeom g;
  g.N = x.shape(0), g.C = x.shape(1), g.H = x.shape(2), g.W = x.shape(3);
  g.O = w.shape(0), g.KH = w.shape(2), g.KW = w.shape(3);
  if (groups < 1) value_error("groups must be >= 1");
  g.groups = groups;
  if (g.C % groups != 0 || g.O % groups != 0)
    value_error("groups must divide the input channels of x and the output channels of w");
  if (w.shape(1) != g.C / groups)
    value_error("w must have shape [O, C/groups, KH, KW]: got " + std::to_string(w.shape(1)) + " input channels, expected " + std::to_string(g.C / groups));
  if (g.O == 0 || g.KH == 0 || g.KW == 0 || g.C == 0) value_error("w and x must not have empty dimensions");
  g.sh = stride[0], g.sw = stride[1], g.dh = dilation[0], g.dw = dilation[1];
  g.pt = padding[0], g.pl = padding[1], g.pb = padding[2], g.pr = padding[3];
  const int64_t eh = g.H + g.pt + g.pb - g.dh * (g.KH - 1) - 1, ew = g.W + g.pl + g.pr - g.dw * (g.KW - 1) - 1;
  if (eh < 0 || ew < 0) value_error("the (dilated) kernel of w is larger than the padded input x");
  g.OH = eh / g.sh + 1, g.OW = ew / g.sw + 1;
  g.in_sn = g.C * g.H * g.W, g.in_sc = g.H * g.W, g.in_sh = g.W, g.in_sw = 1;
  g.out_sn = g.O * g.OH * g.OW, g.out_so = g.OH * g.OW, g.out_sp = 1;
  return g;
}

py::tuple qlinear_conv2d(const py::object& x_o, double x_scale, const py::object& x_zero_point, const py::object& w_o,
                         const py::object& w_scale, const py::object& w_zero_point, double y_scale,
                         const py::object& y_zero_point, const py::object& bias, std::vector<int64_t> stride,
                         std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                         const std::string& rounding, int out_bits, int acc_bits, const std::string& overflow, bool relu,
                         const std::string& impl, const std::string& dyadic_rounding, int dyadic_bits, int dyadic_shift,
                         WeightCache* weight_cache) {
  const U8 x = code_array(x_o, "x", 4, 4), w = code_array(w_o, "w", 4, 4);
  const RequantSpec spec = parse_spec(rounding, dyadic_rounding, dyadic_bits, dyadic_shift);
  QConvArgs a;
  a.g = conv_geom(x, w, std::move(stride), std::move(padding), std::move(dilation), groups);
  const ConvGeom& g = a.g;
  return run_qconv(a, x.data(), x_scale, x_zero_point, w.data(), w_scale, w_zero_point, y_scale, y_zero_point, bias,
                   spec, out_bits, acc_bits, overflow, relu, impl, {g.N, g.O, g.OH, g.OW}, "x", "w", weight_cache);
}

py::tuple conv_integer(const py::object& x_o, const py::object& x_zero_point, const py::object& w_o,
                       const py::object& w_zero_point, const py::object& bias, std::vector<int64_t> stride,
                       std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, int acc_bits,
                       const std::string& overflow, const std::string& impl, WeightCache* weight_cache) {
  const U8 x = code_array(x_o, "x", 4, 4), w = code_array(w_o, "w", 4, 4);
  QConvArgs a;
  a.g = conv_geom(x, w, std::move(stride), std::move(padding), std::move(dilation), groups);
  const ConvGeom& g = a.g;
  return run_integer(a, x.data(), x_zero_point, w.data(), w_zero_point, bias, acc_bits, overflow, impl,
                     {g.N, g.O, g.OH, g.OW}, "x", "w", weight_cache);
}

// a [..., M, K] times b [K, N] as the 1x1 conv over the rows of a (see ConvGeom);
// holds the validated a and b transposed to [N, K].
struct MatmulOperands {
  U8 a;
  std::vector<uint8_t> bt;
  QConvArgs q;
  std::vector<py::ssize_t> out_shape;  // a.shape[:-1] + [N]
  MatmulOperands(const py::object& a_o, const py::object& b_o) : a(code_array(a_o, "a", 1, 32)) {
    const U8 b = code_array(b_o, "b", 2, 2);
    const int64_t K = a.shape(a.ndim() - 1), Ncol = b.shape(1);
    if (b.shape(0) != K) value_error("b must have shape [K, N] with K = a.shape[-1] = " + std::to_string(K));
    if (K == 0 || Ncol == 0) value_error("a and b must not have empty dimensions");
    const int64_t R = a.size() / K;
    bt.resize(static_cast<std::size_t>(K * Ncol));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < Ncol; ++n) bt[n * K + k] = b.data()[k * Ncol + n];
    ConvGeom& g = q.g;
    g.N = 1, g.C = K, g.H = R, g.W = 1, g.O = Ncol;
    g.OH = R, g.OW = 1;
    g.in_sn = R * K, g.in_sc = 1, g.in_sh = K, g.in_sw = 1;
    g.out_sn = R * Ncol, g.out_so = 1, g.out_sp = Ncol;
    out_shape.assign(a.shape(), a.shape() + a.ndim());
    out_shape.back() = Ncol;
  }
};

py::tuple qlinear_matmul(const py::object& a_o, double a_scale, const py::object& a_zero_point, const py::object& b_o,
                         const py::object& b_scale, const py::object& b_zero_point, double y_scale,
                         const py::object& y_zero_point, const py::object& bias, const std::string& rounding,
                         int out_bits, int acc_bits, const std::string& overflow, bool relu, const std::string& impl,
                         const std::string& dyadic_rounding, int dyadic_bits, int dyadic_shift,
                         WeightCache* weight_cache) {
  MatmulOperands m(a_o, b_o);
  const RequantSpec spec = parse_spec(rounding, dyadic_rounding, dyadic_bits, dyadic_shift);
  return run_qconv(m.q, m.a.data(), a_scale, a_zero_point, m.bt.data(), b_scale, b_zero_point, y_scale, y_zero_point,
                   bias, spec, out_bits, acc_bits, overflow, relu, impl, m.out_shape, "a", "b", weight_cache);
}

py::tuple matmul_integer(const py::object& a_o, const py::object& a_zero_point, const py::object& b_o,
                         const py::object& b_zero_point, const py::object& bias, int acc_bits,
                         const std::string& overflow, const std::string& impl, WeightCache* weight_cache) {
  MatmulOperands m(a_o, b_o);
  return run_integer(m.q, m.a.data(), a_zero_point, m.bt.data(), b_zero_point, bias, acc_bits, overflow, impl,
                     m.out_shape, "a", "b", weight_cache);
}

py::array requantize(const py::object& acc_o, const py::object& multiplier, const py::object& y_zero_point, int axis,
                     bool has_axis, const std::string& rounding, int out_bits, bool relu,
                     const std::string& dyadic_rounding, int dyadic_bits, int dyadic_shift) {
  if (!py::isinstance<py::array>(acc_o) || !py::reinterpret_borrow<py::array>(acc_o).dtype().equal(py::dtype::of<int32_t>()))
    throw py::type_error("acc must be a numpy array of dtype int32");
  auto acc = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(acc_o);
  const RequantSpec spec = parse_spec(rounding, dyadic_rounding, dyadic_bits, dyadic_shift);
  int64_t outer = acc.size(), channels = 1, inner = 1;
  if (has_axis) {
    if (axis < 0) axis += static_cast<int>(acc.ndim());
    if (axis < 0 || axis >= acc.ndim()) value_error("axis out of range for acc");
    channels = acc.shape(axis);
    outer = 1;
    for (int d = 0; d < axis; ++d) outer *= acc.shape(d);
    for (int d = axis + 1; d < acc.ndim(); ++d) inner *= acc.shape(d);
  }
  py::array m = to_numpy(multiplier);
  if (m.dtype().kind() != 'f') throw py::type_error("multiplier must be a float array or scalar");
  auto md = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(m);
  if (md.size() != 1 && md.size() != channels)
    value_error("multiplier must be a scalar or have acc.shape[axis] = " + std::to_string(channels) + " values");
  std::vector<float> m32(channels);
  std::vector<double> m64(channels);
  for (int64_t c = 0; c < channels; ++c) {
    m64[c] = md.data()[md.size() == 1 ? 0 : c];
    m32[c] = static_cast<float>(m64[c]);
  }
  const Requantizer rq = make_requantizer(spec, out_bits, y_zero_point, relu, m32, m64);
  py::array y = alloc_codes(std::vector<py::ssize_t>(acc.shape(), acc.shape() + acc.ndim()), out_bits);
  const CodeOut out{y.mutable_data(), out_bits > 8};
  {
    py::gil_scoped_release release;
    requantize_tensor(acc.data(), outer, channels, inner, rq, out);
  }
  return y;
}

using BinaryKernel = void (*)(const uint8_t*, const uint8_t*, int64_t, const QAddParams&, CodeOut);

// qadd / qmul: same arguments, same checks, another kernel.
template <BinaryKernel kernel>
py::array qbinary_binding(const py::object& a_o, double a_scale, const py::object& a_zp, const py::object& b_o,
                          double b_scale, const py::object& b_zp, double y_scale, const py::object& y_zp,
                          const std::string& rounding, int out_bits, bool relu, const std::string& dyadic_rounding,
                          int dyadic_bits, int dyadic_shift) {
  const U8 a = code_array(a_o, "a", 0, 32), b = code_array(b_o, "b", 0, 32);
  if (a.ndim() != b.ndim() || !std::equal(a.shape(), a.shape() + a.ndim(), b.shape()))
    value_error("a and b must have the same shape (no broadcasting)");
  QAddParams p;
  p.spec = parse_spec(rounding, dyadic_rounding, dyadic_bits, dyadic_shift);
  p.sa = scalar_scale(a_scale, "a_scale"), p.sb = scalar_scale(b_scale, "b_scale"), p.sy = scalar_scale(y_scale, "y_scale");
  p.za = static_cast<int32_t>(zero_point(a_zp, "a_zero_point", kCodeMax8));
  p.zb = static_cast<int32_t>(zero_point(b_zp, "b_zero_point", kCodeMax8));
  p.hi = (1 << check_out_bits(out_bits)) - 1;
  p.zy = static_cast<int32_t>(zero_point(y_zp, "y_zero_point", p.hi));
  p.lo = relu ? p.zy : 0;
  py::array y = alloc_codes(std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()), out_bits);
  const CodeOut out{y.mutable_data(), out_bits > 8};
  try {
    py::gil_scoped_release release;
    kernel(a.data(), b.data(), a.size(), p, out);
  } catch (const std::invalid_argument& e) {
    value_error(e.what());
  }
  return y;
}

PoolGeom pool_geom(const U8& x, const std::vector<int64_t>& kernel, std::vector<int64_t> stride, const std::vector<int64_t>& padding) {
  PoolGeom g;
  int_list(kernel, "kernel_size", 2, 1);
  int_list(stride, "stride", 2, 1);
  int_list(padding, "padding", 4, 0);
  g.planes = x.shape(0) * x.shape(1), g.H = x.shape(2), g.W = x.shape(3);
  g.KH = kernel[0], g.KW = kernel[1], g.sh = stride[0], g.sw = stride[1];
  g.pt = padding[0], g.pl = padding[1], g.pb = padding[2], g.pr = padding[3];
  if (g.pt >= g.KH || g.pb >= g.KH || g.pl >= g.KW || g.pr >= g.KW) value_error("padding must be smaller than kernel_size");
  const int64_t eh = g.H + g.pt + g.pb - g.KH, ew = g.W + g.pl + g.pr - g.KW;
  if (eh < 0 || ew < 0) value_error("kernel_size is larger than the padded input x");
  g.OH = eh / g.sh + 1, g.OW = ew / g.sw + 1;
  return g;
}

}  // namespace

void register_integer(py::module_& m) {
  py::register_exception<AccumulatorOverflow>(m, "AccumulatorOverflowError", PyExc_ValueError);
  using namespace py::literals;
  // Copies and pickles are empty caches: packed weights are a speed-up, never state.
  py::class_<WeightCache>(m, "IntegerWeightCache",
                          "Packed weights of one conv / matmul layer kept across calls (pass the same "
                          "object with the same weights); reused while the raw weight bytes are unchanged.")
      .def(py::init<>())
      .def_property_readonly("nbytes", &WeightCache::nbytes, "bytes held (raw + packed weight copies)")
      .def("__deepcopy__", [](const WeightCache&, const py::object&) { return std::make_unique<WeightCache>(); })
      .def("__copy__", [](const WeightCache&) { return std::make_unique<WeightCache>(); })
      .def(py::pickle([](const WeightCache&) { return py::tuple(); },
                      [](const py::tuple&) { return std::make_unique<WeightCache>(); }));
  m.def("integer_qlinear_conv2d", &qlinear_conv2d, "x"_a, "x_scale"_a, "x_zero_point"_a, "w"_a, "w_scale"_a,
        "w_zero_point"_a, "y_scale"_a, "y_zero_point"_a, "bias"_a, "stride"_a, "padding"_a, "dilation"_a, "groups"_a,
        "rounding"_a, "out_bits"_a, "acc_bits"_a, "overflow"_a, "relu"_a, "impl"_a, "dyadic_rounding"_a,
        "dyadic_bits"_a, "dyadic_shift"_a, "weight_cache"_a = py::none(),
        "ONNX QLinearConv on uint8 codes (NCHW x, OIHW w); returns (codes, stats dict).");
  m.def("integer_qlinear_matmul", &qlinear_matmul, "a"_a, "a_scale"_a, "a_zero_point"_a, "b"_a, "b_scale"_a,
        "b_zero_point"_a, "y_scale"_a, "y_zero_point"_a, "bias"_a, "rounding"_a, "out_bits"_a, "acc_bits"_a,
        "overflow"_a, "relu"_a, "impl"_a, "dyadic_rounding"_a, "dyadic_bits"_a, "dyadic_shift"_a,
        "weight_cache"_a = py::none(),
        "ONNX QLinearMatMul (a [..., M, K], b [K, N], per-column b scales); returns (codes, stats dict).");
  m.def("integer_conv_integer", &conv_integer, "x"_a, "x_zero_point"_a, "w"_a, "w_zero_point"_a, "bias"_a,
        "stride"_a, "padding"_a, "dilation"_a, "groups"_a, "acc_bits"_a, "overflow"_a, "impl"_a,
        "weight_cache"_a = py::none(),
        "ONNX ConvInteger (+ optional int32 bias): the int32 accumulators under the acc model; returns "
        "(int32 [N, O, OH, OW], stats dict).");
  m.def("integer_matmul_integer", &matmul_integer, "a"_a, "a_zero_point"_a, "b"_a, "b_zero_point"_a, "bias"_a,
        "acc_bits"_a, "overflow"_a, "impl"_a, "weight_cache"_a = py::none(),
        "ONNX MatMulInteger (+ optional int32 bias [N]): the int32 accumulators under the acc model; returns "
        "(int32 [..., M, N], stats dict).");
  m.def("integer_available_impls", &available_impls,
        "impl names this CPU and build run: 'reference', 'fast' (the best of the others), then the "
        "fast paths ('fast_avx512vnni', 'fast_avxvnni', 'fast_avx2', 'fast_generic') it supports.");
  m.def("integer_requantize", &requantize, "acc"_a, "multiplier"_a, "y_zero_point"_a, "axis"_a, "has_axis"_a,
        "rounding"_a, "out_bits"_a, "relu"_a, "dyadic_rounding"_a, "dyadic_bits"_a, "dyadic_shift"_a,
        "Requantize an int32 accumulator tensor with real multiplier(s) M.");
  m.def("integer_qmul", &qbinary_binding<qmul>, "a"_a, "a_scale"_a, "a_zero_point"_a, "b"_a, "b_scale"_a,
        "b_zero_point"_a, "y_scale"_a, "y_zero_point"_a, "rounding"_a, "out_bits"_a, "relu"_a, "dyadic_rounding"_a,
        "dyadic_bits"_a, "dyadic_shift"_a, "Elementwise product of two code tensors, requantized.");
  m.def("integer_qadd", &qbinary_binding<qadd>, "a"_a, "a_scale"_a, "a_zero_point"_a, "b"_a, "b_scale"_a, "b_zero_point"_a,
        "y_scale"_a, "y_zero_point"_a, "rounding"_a, "out_bits"_a, "relu"_a, "dyadic_rounding"_a, "dyadic_bits"_a,
        "dyadic_shift"_a, "Residual add of two code tensors, requantized.");
  m.def("integer_max_pool2d", [](const py::object& x_o, std::vector<int64_t> k, std::vector<int64_t> s, std::vector<int64_t> p) {
    const U8 x = code_array(x_o, "x", 4, 4);
    const PoolGeom g = pool_geom(x, k, s, p);
    py::array_t<uint8_t> y({x.shape(0), x.shape(1), g.OH, g.OW});
    {
      py::gil_scoped_release release;
      max_pool(x.data(), g, y.mutable_data());
    }
    return y;
  }, "x"_a, "kernel_size"_a, "stride"_a, "padding"_a);
  m.def("integer_avg_pool2d", [](const py::object& x_o, const py::object& x_zp, std::vector<int64_t> k, std::vector<int64_t> s,
                                 std::vector<int64_t> p, bool count_include_pad, const std::string& rounding) {
    const U8 x = code_array(x_o, "x", 4, 4);
    const PoolGeom g = pool_geom(x, k, s, p);
    const int32_t zx = static_cast<int32_t>(zero_point(x_zp, "x_zero_point", kCodeMax8));
    if (rounding != "half_up" && rounding != "half_even") value_error("rounding must be 'half_up' or 'half_even', got '" + rounding + "'");
    py::array_t<uint8_t> y({x.shape(0), x.shape(1), g.OH, g.OW});
    {
      py::gil_scoped_release release;
      avg_pool(x.data(), g, zx, count_include_pad, rounding == "half_even", y.mutable_data());
    }
    return y;
  }, "x"_a, "x_zero_point"_a, "kernel_size"_a, "stride"_a, "padding"_a, "count_include_pad"_a, "rounding"_a);
  m.def("integer_global_avg_pool", [](const py::object& x_o, double x_scale, const py::object& x_zp, double y_scale,
                                      const py::object& y_zp, const std::string& rounding, int out_bits,
                                      const std::string& dyadic_rounding, int dyadic_bits, int dyadic_shift) {
    const U8 x = code_array(x_o, "x", 4, 4);
    const int64_t N = x.shape(0), C = x.shape(1), HW = x.shape(2) * x.shape(3);
    if (HW == 0 || HW > kMaxGlobalPoolSize) value_error("x must have 1..2^23 spatial positions");
    const RequantSpec spec = parse_spec(rounding, dyadic_rounding, dyadic_bits, dyadic_shift);
    const float sx = scalar_scale(x_scale, "x_scale"), sy = scalar_scale(y_scale, "y_scale");
    const int32_t zx = static_cast<int32_t>(zero_point(x_zp, "x_zero_point", kCodeMax8));
    const float ratio = sx / sy;
    const std::vector<float> m32(C, ratio / static_cast<float>(HW));
    const std::vector<double> m64(C, static_cast<double>(sx) / (static_cast<double>(sy) * static_cast<double>(HW)));
    const Requantizer rq = make_requantizer(spec, out_bits, y_zp, false, m32, m64);
    py::array y = alloc_codes({N, C, 1, 1}, out_bits);
    const CodeOut out{y.mutable_data(), out_bits > 8};
    {
      py::gil_scoped_release release;
      global_avg_pool(x.data(), N, C, HW, zx, rq, out);
    }
    return y;
  }, "x"_a, "x_scale"_a, "x_zero_point"_a, "y_scale"_a, "y_zero_point"_a, "rounding"_a, "out_bits"_a,
        "dyadic_rounding"_a, "dyadic_bits"_a, "dyadic_shift"_a);
  m.def("integer_quantize_multiplier", [](double m) {
    if (!(std::isfinite(m) && m >= 0)) value_error("multiplier must be finite and >= 0");
    int32_t q; int s;
    quantize_multiplier(m, &q, &s);
    return py::make_tuple(q, s);
  }, "multiplier"_a, "TFLite QuantizeMultiplier: M ~ q31 * 2^(shift - 31).");
  m.def("integer_dyadic_multiplier", [](double m, int bits, int shift) {
    if (!(std::isfinite(m) && m > 0)) value_error("multiplier must be positive and finite");
    const RequantSpec s = parse_spec("dyadic", "half_even", bits, shift);
    int64_t b; int n;
    try { dyadic_multiplier(m, s.dyadic_bits, s.dyadic_shift, &b, &n); } catch (const std::invalid_argument& e) { value_error(e.what()); }
    return py::make_tuple(b, n);
  }, "multiplier"_a, "dyadic_bits"_a, "dyadic_shift"_a, "Dyadic M ~ b / 2^n.");
}

}  // namespace pyzeroq
