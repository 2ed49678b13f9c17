// pybind11 bindings of the quantization kernels (csrc/kernels/quantize.hpp), unsigned and signed codes.
// All argument validation happens here; the kernels trust their inputs. User errors are
// ValueError / TypeError naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "bindings/format.hpp"
#include "bindings/register.hpp"
#include "kernels/quantize.hpp"

namespace py = pybind11;

namespace pyzeroq {
namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;
constexpr double kMaxPercentile = 100.0;
constexpr double kMinPercentile = 50.0;  // clipping to [100 - p, p] needs p >= 50

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }
std::string type_name(const py::handle& h) { return py::str(py::type::of(h).attr("__name__")).cast<std::string>(); }

py::array as_array(const py::handle& obj, const char* name) {
  py::array arr = py::array::ensure(obj);
  if (!arr) {
    PyErr_Clear();
    throw py::type_error(std::string(name) + " must be array-like, got " + type_name(obj));
  }
  return arr;
}

// Float data (x): any floating dtype, converted to C-contiguous native float32 only if needed.
FloatArray float_data(const py::handle& obj, const char* name) {
  py::array arr = as_array(obj, name);
  if (arr.dtype().kind() != 'f')
    throw py::type_error(std::string(name) + " must be a floating-point array, got dtype " + dtype_name(arr));
  return FloatArray::ensure(arr);
}

long long index_arg(const py::handle& obj, const char* name) {
  if (py::isinstance<py::bool_>(obj) || !PyIndex_Check(obj.ptr()))
    throw py::type_error(std::string(name) + " must be an int, got " + type_name(obj));
  int overflow = 0;
  py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!idx) throw py::error_already_set();
  const long long v = PyLong_AsLongLongAndOverflow(idx.ptr(), &overflow);
  if (overflow) throw py::value_error(std::string(name) + " is out of range");
  return v;
}

int bits_arg(const py::handle& obj) {
  const long long b = index_arg(obj, "bits");
  if (b < quant::kMinBits || b > quant::kMaxBits)
    throw py::value_error("bits must be in " + std::to_string(quant::kMinBits) + ".." +
                          std::to_string(quant::kMaxBits) + ", got " + std::to_string(b));
  return static_cast<int>(b);
}

// True / False (Python or numpy bool) for a keyword flag such as `signed`.
bool flag_arg(const py::handle& obj, const char* name) {
  if (PyBool_Check(obj.ptr())) return obj.ptr() == Py_True;
  if (py::isinstance(obj, py::module_::import("numpy").attr("bool_"))) return obj.cast<bool>();
  throw py::type_error(std::string(name) + " must be a bool, got " + type_name(obj));
}

// [qmin, qmax] of the codes from the `bits`, `signed` and `narrow_range` arguments.
quant::CodeRange range_arg(int bits, const py::handle& signed_obj, const py::handle& narrow_obj) {
  return quant::code_range(bits, flag_arg(signed_obj, "signed"), flag_arg(narrow_obj, "narrow_range"));
}

// [outer, channels, inner] view of `shape` for `axis` (None: per tensor).
quant::Layout layout_for(const py::array& x, const py::object& axis) {
  quant::Layout l;
  const auto ndim = static_cast<long long>(x.ndim());
  std::size_t n = 1;
  for (py::ssize_t d = 0; d < x.ndim(); ++d) n *= static_cast<std::size_t>(x.shape(d));
  if (axis.is_none()) {
    l.inner = n;
    return l;
  }
  long long a = index_arg(axis, "axis");
  if (a < -ndim || a >= ndim)
    throw py::value_error("axis " + std::to_string(a) + " is out of range for an array of " + std::to_string(ndim) +
                          " dimension(s)");
  if (a < 0) a += ndim;
  for (long long d = 0; d < a; ++d) l.outer *= static_cast<std::size_t>(x.shape(d));
  l.channels = static_cast<std::size_t>(x.shape(a));
  for (long long d = a + 1; d < ndim; ++d) l.inner *= static_cast<std::size_t>(x.shape(d));
  return l;
}

// Validated per-channel parameters, size-1 inputs broadcast to every channel.
struct Params {
  std::vector<float> scale;
  std::vector<std::int32_t> zero_point;
  quant::AffineParams view(const quant::CodeRange& r) const {
    return {scale.data(), zero_point.data(), r.qmin, r.qmax};
  }
};

void check_count(std::size_t got, const quant::Layout& l, bool per_channel, const char* name) {
  if (per_channel ? (got == 1 || got == l.channels) : got == 1) return;
  throw py::value_error(std::string(name) + " has " + std::to_string(got) + " values; expected " +
                        (per_channel ? "1 or " + std::to_string(l.channels) + " (the length of x along axis)"
                                     : std::string("1 (per tensor: axis is None)")));
}

// check_grid: the reals of the whole code range, scale * (q - zp), must be finite float32 (the
// kernels that take bits; dequantize does not know the bits of its codes, only their type).
Params params_arg(const py::handle& scale_obj, const py::handle& zp_obj, const quant::Layout& l, bool per_channel,
                  const quant::CodeRange& range, bool check_grid = true) {
  py::array s_arr = as_array(scale_obj, "scale");
  const char sk = s_arr.dtype().kind();
  if (sk != 'f' && sk != 'i' && sk != 'u')
    throw py::type_error("scale must be real numbers, got dtype " + dtype_name(s_arr));
  py::array z_arr = as_array(zp_obj, "zero_point");
  const char zk = z_arr.dtype().kind();
  if (zk != 'f' && zk != 'i' && zk != 'u')
    throw py::type_error("zero_point must be integers, got dtype " + dtype_name(z_arr));
  const FloatArray s = FloatArray::ensure(s_arr);
  const DoubleArray z = DoubleArray::ensure(z_arr);
  const auto ns = static_cast<std::size_t>(s.size()), nz = static_cast<std::size_t>(z.size());
  check_count(ns, l, per_channel, "scale");
  check_count(nz, l, per_channel, "zero_point");
  Params p;
  p.scale.resize(l.channels);
  p.zero_point.resize(l.channels);
  const float* sp = s.data();
  const double* zp = z.data();
  for (std::size_t i = 0; i < ns; ++i) {
    if (!std::isfinite(sp[i])) throw py::value_error("scale must be finite (float32), got " + number_repr(sp[i]));
    if (!(sp[i] > 0.0f)) throw py::value_error("scale must be > 0, got " + number_repr(sp[i]) + " (as float32)");
  }
  for (std::size_t i = 0; i < nz; ++i) {
    if (!std::isfinite(zp[i]) || std::floor(zp[i]) != zp[i])
      throw py::value_error("zero_point must be integer-valued, got " + number_repr(zp[i]));
    if (zp[i] < range.qmin || zp[i] > range.qmax)
      throw py::value_error("zero_point must be in the code range [" + std::to_string(range.qmin) + ", " +
                            std::to_string(range.qmax) + "], got " + std::to_string(static_cast<long long>(zp[i])));
  }
  for (std::size_t c = 0; c < l.channels; ++c) {
    p.scale[c] = sp[ns == 1 ? 0 : c];
    p.zero_point[c] = static_cast<std::int32_t>(zp[nz == 1 ? 0 : c]);
    if (!check_grid) continue;
    const float lo = p.scale[c] * static_cast<float>(range.qmin - p.zero_point[c]);
    const float hi = p.scale[c] * static_cast<float>(range.qmax - p.zero_point[c]);
    if (!std::isfinite(lo) || !std::isfinite(hi))
      throw py::value_error("scale " + number_repr(p.scale[c]) + " with zero_point " +
                            std::to_string(p.zero_point[c]) + " puts the code range [" + std::to_string(range.qmin) +
                            ", " + std::to_string(range.qmax) + "] beyond float32: scale * (code - zero_point) overflows");
  }
  return p;
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

const char* const kNonFinite = "x contains NaN or Inf";

template <class Code, bool Reference>
py::array quantize_as(const FloatArray& x, const quant::Layout& l, const Params& p, const quant::CodeRange& r) {
  py::array_t<Code> q(shape_of(x));
  bool bad;
  {
    py::gil_scoped_release nogil;
    bad = Reference ? quant::quantize_reference(x.data(), q.mutable_data(), l, p.view(r))
                    : quant::quantize(x.data(), q.mutable_data(), l, p.view(r));
  }
  if (bad) throw py::value_error(kNonFinite);
  return std::move(q);
}

template <bool Reference>
py::array quantize_py(const py::handle& x_obj, const py::handle& scale, const py::handle& zero_point,
                      const py::handle& bits_obj, const py::object& axis, const py::handle& signed_obj,
                      const py::handle& narrow_obj) {
  const FloatArray x = float_data(x_obj, "x");
  const int bits = bits_arg(bits_obj);
  const quant::CodeRange r = range_arg(bits, signed_obj, narrow_obj);
  const quant::Layout l = layout_for(x, axis);
  const Params p = params_arg(scale, zero_point, l, !axis.is_none(), r);
  const bool small = bits <= quant::kMaxBitsUint8;
  if (r.qmin < 0)
    return small ? quantize_as<std::int8_t, Reference>(x, l, p, r) : quantize_as<std::int16_t, Reference>(x, l, p, r);
  return small ? quantize_as<std::uint8_t, Reference>(x, l, p, r) : quantize_as<std::uint16_t, Reference>(x, l, p, r);
}

template <class Code, bool Reference>
py::array dequantize_as(const py::array& q_arr, const py::handle& scale, const py::handle& zero_point,
                        const py::object& axis) {
  using CodeArray = py::array_t<Code, py::array::c_style | py::array::forcecast>;
  const CodeArray q = CodeArray::ensure(q_arr);
  // the zero point may be any value of the code type
  const quant::CodeRange r{std::numeric_limits<Code>::min(), std::numeric_limits<Code>::max()};
  const quant::Layout l = layout_for(q, axis);
  const Params p = params_arg(scale, zero_point, l, !axis.is_none(), r, /*check_grid=*/false);
  py::array_t<float> y(shape_of(q));
  {
    py::gil_scoped_release nogil;
    if (Reference)
      quant::dequantize_reference(q.data(), y.mutable_data(), l, p.view(r));
    else
      quant::dequantize(q.data(), y.mutable_data(), l, p.view(r));
  }
  return std::move(y);
}

template <bool Reference>
py::array dequantize_py(const py::handle& q_obj, const py::handle& scale, const py::handle& zero_point,
                        const py::object& axis) {
  py::array q = as_array(q_obj, "q");
  const py::dtype dt = q.dtype();
  if (dt.kind() == 'u' && dt.itemsize() == 1) return dequantize_as<std::uint8_t, Reference>(q, scale, zero_point, axis);
  if (dt.kind() == 'u' && dt.itemsize() == 2)
    return dequantize_as<std::uint16_t, Reference>(q, scale, zero_point, axis);
  if (dt.kind() == 'i' && dt.itemsize() == 1) return dequantize_as<std::int8_t, Reference>(q, scale, zero_point, axis);
  if (dt.kind() == 'i' && dt.itemsize() == 2) return dequantize_as<std::int16_t, Reference>(q, scale, zero_point, axis);
  throw py::type_error("q must hold integer codes (uint8, uint16, int8 or int16), got dtype " + dtype_name(q));
}

// `out`: None (allocate) or a writeable C-contiguous float32 array of x's shape not overlapping x.
py::array_t<float> output_like(const FloatArray& x, const py::object& out_obj) {
  if (out_obj.is_none()) return py::array_t<float>(shape_of(x));
  if (!py::isinstance<py::array>(out_obj)) throw py::type_error("out must be a numpy array or None");
  py::array out = py::reinterpret_borrow<py::array>(out_obj);
  if (!out.dtype().equal(py::dtype::of<float>()))
    throw py::type_error("out must be a float32 array, got dtype " + dtype_name(out));
  if (!(out.flags() & py::array::c_style)) throw py::value_error("out must be C-contiguous");
  if (!out.writeable()) throw py::value_error("out must be writeable");
  if (shape_of(out) != shape_of(x)) throw py::value_error("out must have the shape of x");
  const auto* o = static_cast<const char*>(out.data());
  const auto* xb = static_cast<const char*>(static_cast<const void*>(x.data()));
  const auto bytes = static_cast<std::size_t>(x.nbytes());
  if (bytes != 0 && o < xb + bytes && xb < o + bytes) throw py::value_error("out must not overlap x");
  return py::reinterpret_borrow<py::array_t<float>>(out);
}

template <bool Reference>
py::array fake_quantize_py(const py::handle& x_obj, const py::handle& scale, const py::handle& zero_point,
                           const py::handle& bits_obj, const py::object& axis, const py::handle& signed_obj,
                           const py::handle& narrow_obj, const py::object& out) {
  const FloatArray x = float_data(x_obj, "x");
  const int bits = bits_arg(bits_obj);
  const quant::CodeRange r = range_arg(bits, signed_obj, narrow_obj);
  const quant::Layout l = layout_for(x, axis);
  const Params p = params_arg(scale, zero_point, l, !axis.is_none(), r);
  py::array_t<float> y = output_like(x, out);
  bool bad;
  {
    py::gil_scoped_release nogil;
    bad = Reference ? quant::fake_quantize_reference(x.data(), y.mutable_data(), l, p.view(r))
                    : quant::fake_quantize(x.data(), y.mutable_data(), l, p.view(r));
  }
  if (bad) throw py::value_error(kNonFinite);
  return std::move(y);
}

template <bool Reference>
py::array ste_grad_py(const py::handle& grad_obj, const py::handle& x_obj, const py::handle& scale,
                      const py::handle& zero_point, const py::handle& bits_obj, const py::object& axis,
                      const py::handle& signed_obj, const py::handle& narrow_obj) {
  const FloatArray g = float_data(grad_obj, "grad");
  const FloatArray x = float_data(x_obj, "x");
  if (shape_of(g) != shape_of(x)) throw py::value_error("grad must have the shape of x");
  const int bits = bits_arg(bits_obj);
  const quant::CodeRange r = range_arg(bits, signed_obj, narrow_obj);
  const quant::Layout l = layout_for(x, axis);
  const Params p = params_arg(scale, zero_point, l, !axis.is_none(), r);
  py::array_t<float> dx(shape_of(x));
  {
    py::gil_scoped_release nogil;
    if (Reference)
      quant::ste_grad_reference(g.data(), x.data(), dx.mutable_data(), l, p.view(r));
    else
      quant::ste_grad(g.data(), x.data(), dx.mutable_data(), l, p.view(r));
  }
  return std::move(dx);
}

// percentile: None (-> kNoPercentile) or a number in [50, 100].
double percentile_arg(const py::object& percentile_obj) {
  if (percentile_obj.is_none()) return quant::kNoPercentile;
  if (py::isinstance<py::bool_>(percentile_obj) ||
      !(py::isinstance<py::float_>(percentile_obj) || PyIndex_Check(percentile_obj.ptr()) ||
        PyFloat_Check(percentile_obj.ptr()) || py::hasattr(percentile_obj, "__float__")))
    throw py::type_error("percentile must be a number or None, got " + type_name(percentile_obj));
  const double percentile = py::float_(percentile_obj).cast<double>();
  if (!(percentile >= kMinPercentile && percentile <= kMaxPercentile))
    throw py::value_error("percentile must be in [50, 100], got " + std::to_string(percentile));
  return percentile;
}

// (scale float32, zero_point int32) arrays, 0-d per tensor or [C], filled by
// compute(scale, zero_point) without the GIL; ValueError when it reports a non-finite value.
template <class Compute>
py::tuple params_result(const quant::Layout& l, const py::object& axis, Compute&& compute) {
  std::vector<py::ssize_t> out_shape;
  if (!axis.is_none()) out_shape.push_back(static_cast<py::ssize_t>(l.channels));
  py::array_t<float> scale(out_shape);
  py::array_t<std::int32_t> zero_point(out_shape);
  bool bad;
  {
    py::gil_scoped_release nogil;
    bad = compute(scale.mutable_data(), zero_point.mutable_data());
  }
  if (bad) throw py::value_error(kNonFinite);
  return py::make_tuple(scale, zero_point);
}

py::tuple asymmetric_params_py(const py::handle& x_obj, const py::handle& bits_obj, const py::object& axis,
                               const py::object& percentile_obj) {
  const FloatArray x = float_data(x_obj, "x");
  const int bits = bits_arg(bits_obj);
  const quant::Layout l = layout_for(x, axis);
  const double percentile = percentile_arg(percentile_obj);
  return params_result(l, axis, [&](float* scale, std::int32_t* zero_point) {
    return quant::asymmetric_params(x.data(), l, bits, percentile, scale, zero_point);
  });
}

template <bool Reference>
py::tuple symmetric_params_py(const py::handle& x_obj, const py::handle& bits_obj, const py::object& axis,
                              const py::object& percentile_obj, const py::handle& signed_obj,
                              const py::handle& narrow_obj) {
  const FloatArray x = float_data(x_obj, "x");
  const int bits = bits_arg(bits_obj);
  const bool is_signed = flag_arg(signed_obj, "signed");
  flag_arg(narrow_obj, "narrow_range");  // validated only: the scale rule is the same for both ranges
  const quant::Layout l = layout_for(x, axis);
  const double percentile = percentile_arg(percentile_obj);
  return params_result(l, axis, [&](float* scale, std::int32_t* zero_point) {
    return Reference ? quant::symmetric_params_reference(x.data(), l, bits, is_signed, percentile, scale, zero_point)
                     : quant::symmetric_params(x.data(), l, bits, is_signed, percentile, scale, zero_point);
  });
}

}  // namespace

void register_quantize(pybind11::module_& m) {
  using py::arg;
  m.attr("MIN_BITS") = quant::kMinBits;  // the code widths every kernel takes
  m.attr("MAX_BITS") = quant::kMaxBits;
  const auto code_args = [](auto&& f, const char* name, const char* doc, pybind11::module_& mod) {
    mod.def(name, f, arg("x"), arg("scale"), arg("zero_point"), arg("bits"), arg("axis") = py::none(), py::kw_only(),
            arg("signed") = false, arg("narrow_range") = false, doc);
  };
  code_args(&quantize_py<false>, "quantize",
            "q = clamp(rne(x / scale) + zero_point, qmin, qmax): uint8 / uint16 codes (unsigned: [0 or 1, "
            "2^bits - 1]) or int8 / int16 (signed: [-2^(bits-1) (+1 narrow_range), 2^(bits-1) - 1]).",
            m);
  code_args(&quantize_py<true>, "_quantize_reference", "Plain-loop reference of quantize (tests only).", m);
  m.def("dequantize", &dequantize_py<false>, arg("q"), arg("scale"), arg("zero_point"), arg("axis") = py::none(),
        "real = scale * (q - zero_point) as float32; q uint8, uint16, int8 or int16.");
  m.def("_dequantize_reference", &dequantize_py<true>, arg("q"), arg("scale"), arg("zero_point"),
        arg("axis") = py::none(), "Plain-loop reference of dequantize (tests only).");
  m.def("fake_quantize", &fake_quantize_py<false>, arg("x"), arg("scale"), arg("zero_point"), arg("bits"),
        arg("axis") = py::none(), py::kw_only(), arg("signed") = false, arg("narrow_range") = false,
        arg("out") = py::none(),
        "dequantize(quantize(x)) in one pass, float32; `out`: optional preallocated result array.");
  m.def("_fake_quantize_reference", &fake_quantize_py<true>, arg("x"), arg("scale"), arg("zero_point"), arg("bits"),
        arg("axis") = py::none(), py::kw_only(), arg("signed") = false, arg("narrow_range") = false,
        arg("out") = py::none(), "Plain-loop reference of fake_quantize (tests only).");
  const char* ste_doc = "Straight-through gradient: grad where scale*(qmin-zp) <= x <= scale*(qmax-zp), else 0.";
  m.def("ste_grad", &ste_grad_py<false>, arg("grad"), arg("x"), arg("scale"), arg("zero_point"), arg("bits"),
        arg("axis") = py::none(), py::kw_only(), arg("signed") = false, arg("narrow_range") = false, ste_doc);
  m.def("_ste_grad_reference", &ste_grad_py<true>, arg("grad"), arg("x"), arg("scale"), arg("zero_point"),
        arg("bits"), arg("axis") = py::none(), py::kw_only(), arg("signed") = false, arg("narrow_range") = false,
        "Plain-loop reference of ste_grad (tests only).");
  m.def("asymmetric_params", &asymmetric_params_py, arg("x"), arg("bits"), arg("axis") = py::none(),
        arg("percentile") = py::none(),
        "(scale float32, zero_point int32) from the min/max (or [100-p, p] percentile) range of x, "
        "per tensor (0-d arrays) or per channel along axis (shape [C]).");
  const char* sym_doc =
      "(scale float32, zero_point int32): scale = f32(amax / (2^(bits-1) - 1)), amax = max |x| (or the "
      "percentile of |x|), zero point 0 (signed) or 2^(bits-1) (unsigned); per tensor or per channel.";
  m.def("symmetric_params", &symmetric_params_py<false>, arg("x"), arg("bits"), arg("axis") = py::none(),
        arg("percentile") = py::none(), py::kw_only(), arg("signed") = true, arg("narrow_range") = false, sym_doc);
  m.def("_symmetric_params_reference", &symmetric_params_py<true>, arg("x"), arg("bits"), arg("axis") = py::none(),
        arg("percentile") = py::none(), py::kw_only(), arg("signed") = true, arg("narrow_range") = false,
        "Single-threaded reference of symmetric_params (tests only).");
}

}  // namespace pyzeroq
