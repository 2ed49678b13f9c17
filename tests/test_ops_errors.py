"""Invalid arguments raise ValueError/TypeError naming the argument, from the C++ binding.

Every case is checked twice: through pyzeroq.ops and directly on pyzeroq._core (the ops
wrapper does no validation of its own, so the error comes from the binding layer).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyzeroq import _core, ops

X = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)


def _both(fn_name, *args):
    """Yields callables for ops.<fn> and _core.<fn> with the same arguments."""
    return [lambda: getattr(ops, fn_name)(*args), lambda: getattr(_core, fn_name)(*args)]


def _raises(exc, match, fn_name, *args):
    for call in _both(fn_name, *args):
        with pytest.raises(exc, match=match):
            call()


# (function, args) of the three data kernels with a valid baseline
def _kernels(x=X, scale=0.1, zp=3, bits=8, axis=None):
    return [("quantize", (x, scale, zp, bits, axis)), ("fake_quantize", (x, scale, zp, bits, axis))]


def _with_nonfinite(value, index):
    x = np.zeros(300_000, np.float32)  # multi-threaded path
    x[index] = value
    return x


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("index", [0, 150_001, -1])
def test_nonfinite_data(value, index):
    x = _with_nonfinite(value, index)
    for name, args in _kernels(x):
        _raises(ValueError, "x contains NaN or Inf", name, *args)
    for name, args in _kernels(x.reshape(1000, 300), scale=np.full(300, 0.1, np.float32), axis=1):
        _raises(ValueError, "x contains NaN or Inf", name, *args)
    for axis in (None, 0, 1):
        _raises(ValueError, "x contains NaN or Inf", "asymmetric_params", x.reshape(1000, 300), 8, axis)
        _raises(ValueError, "x contains NaN or Inf", "asymmetric_params", x.reshape(1000, 300), 8, axis, 99.0)
    for ref in (_core._quantize_reference, _core._fake_quantize_reference):
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            ref(x, 0.1, 3, 8)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e39 -> float32 inf
@pytest.mark.parametrize("scale", [np.nan, np.inf, -np.inf, 1e39])
def test_nonfinite_scale(scale):
    for name, args in _kernels(scale=scale):
        _raises(ValueError, "scale must be finite", name, *args)
    _raises(ValueError, "scale must be finite", "dequantize", X.astype(np.uint8), scale, 0)


@pytest.mark.parametrize("scale", [0.0, -0.0, -1.0, 1e-50, [0.1, 0.0, 0.1]])
def test_nonpositive_scale(scale):
    axis = 1 if isinstance(scale, list) else None
    for name, args in _kernels(scale=scale, axis=axis):
        _raises(ValueError, "scale must be > 0", name, *args)
    _raises(ValueError, "scale must be > 0", "dequantize", X.astype(np.uint8), scale, 0, axis)


def test_scale_messages_print_the_value():
    """Tiny and odd values are printed as numbers, not std::to_string's fixed six decimals ("0.000000")."""
    _raises(ValueError, r"scale must be > 0, got -2.5e-07 \(as float32\)", "quantize", X, -2.5e-7, 0, 8)
    _raises(ValueError, r"got 0 \(as float32\)", "quantize", X, 1e-300, 0, 8)
    _raises(ValueError, r"zero_point must be integer-valued, got 0.5\b", "quantize", X, 0.1, 0.5, 8)


def test_scale_beyond_float32_range():
    """A grid whose end values overflow float32 (255 x 1.4e36 > 3.4e38) is refused, not turned into +-inf
    (dequantize does not know its codes' bits: it computes what it is given)."""
    for name, args in _kernels(scale=1.4e36, zp=0):
        _raises(ValueError, "beyond float32", name, *args)
    _raises(ValueError, "beyond float32", "quantize", X, [0.1, 1.4e36, 0.1], 0, 8, 1)
    ops.fake_quantize(X, 1.3e36, 0, 8)  # 255 x 1.3e36 still fits


@pytest.mark.parametrize("bits", [0, 1, 17, 32, -8, 10**30])
def test_bits_out_of_range(bits):
    for name, args in _kernels(bits=bits):
        _raises(ValueError, "bits", name, *args)
    _raises(ValueError, "bits", "asymmetric_params", X, bits)


@pytest.mark.parametrize("bits", [8.0, "8", None, True])
def test_bits_wrong_type(bits):
    for name, args in _kernels(bits=bits):
        _raises(TypeError, "bits must be an int", name, *args)
    _raises(TypeError, "bits must be an int", "asymmetric_params", X, bits)


def test_bits_numpy_int_accepted():
    np.testing.assert_array_equal(ops.quantize(X, 0.1, 3, np.int64(8)), ops.quantize(X, 0.1, 3, 8))


@pytest.mark.parametrize("zp, bits", [(-1, 8), (256, 8), (16, 4), (65536, 16), (4, 2), ([0, 300, 0], 8)])
def test_zero_point_out_of_range(zp, bits):
    axis = 1 if isinstance(zp, list) else None
    for name, args in _kernels(zp=zp, bits=bits, axis=axis):
        _raises(ValueError, "zero_point must be in the code range", name, *args)
    _raises(ValueError, "zero_point must be in the code range", "dequantize", X.astype(np.uint8), 0.1, 256)


@pytest.mark.parametrize("zp", [1.5, np.nan, np.inf])
def test_zero_point_not_integer(zp):
    for name, args in _kernels(zp=zp):
        _raises(ValueError, "zero_point must be integer-valued", name, *args)


@pytest.mark.parametrize("axis", [3, -4, 100])
def test_axis_out_of_range(axis):
    for name, args in _kernels(axis=axis):
        _raises(ValueError, "axis .* out of range", name, *args)
    _raises(ValueError, "axis .* out of range", "dequantize", X.astype(np.uint8), 0.1, 0, axis)
    _raises(ValueError, "axis .* out of range", "asymmetric_params", X, 8, axis)
    _raises(ValueError, "axis .* out of range", "quantize", np.float32(1.0), 0.1, 0, 8, 0)  # 0-d


@pytest.mark.parametrize("axis", [1.0, "1"])
def test_axis_wrong_type(axis):
    for name, args in _kernels(axis=axis):
        _raises(TypeError, "axis must be an int", name, *args)


def test_param_count_mismatch():
    s3, z3 = np.full(3, 0.1, np.float32), np.zeros(3, np.int64)
    for name, args in _kernels(scale=np.full(4, 0.1, np.float32), zp=z3, axis=1):
        _raises(ValueError, "scale has 4 values; expected 1 or 3", name, *args)
    for name, args in _kernels(scale=s3, zp=np.zeros(2, np.int64), axis=1):
        _raises(ValueError, "zero_point has 2 values", name, *args)
    for name, args in _kernels(scale=s3, zp=0, axis=None):  # per tensor needs one value
        _raises(ValueError, "scale has 3 values; expected 1", name, *args)
    for name, args in _kernels(scale=0.1, zp=z3, axis=None):
        _raises(ValueError, "zero_point has 3 values", name, *args)
    for name, args in _kernels(scale=np.zeros(0, np.float32), zp=0, axis=None):
        _raises(ValueError, "scale has 0 values", name, *args)
    _raises(ValueError, "scale has 2 values", "dequantize", X.astype(np.uint8), [0.1, 0.2], 0, 1)


@pytest.mark.parametrize("x", [X.astype(np.int32), X.astype(np.uint8), X > 0, X.astype(np.complex64),
                               np.array(["a", "b"])])
def test_non_float_data(x):
    for name, args in _kernels(x=x):
        _raises(TypeError, "x must be a floating-point array", name, *args)
    _raises(TypeError, "x must be a floating-point array", "asymmetric_params", x, 8)


def test_non_array_like():
    _raises(TypeError, "x must be", "quantize", object(), 0.1, 0, 8)
    _raises(TypeError, "scale must be", "quantize", X, "0.1", 0, 8)
    _raises(TypeError, "scale must be", "quantize", X, 1j, 0, 8)
    _raises(TypeError, "zero_point must be integers", "quantize", X, 0.1, "3", 8)


@pytest.mark.parametrize("q", [X, X.astype(np.int32), X.astype(np.int64), X > 0, X.astype(np.uint32)])
def test_dequantize_requires_code_dtypes(q):
    # int8 / int16 (signed codes) are accepted: tests/test_ops_signed.py
    _raises(TypeError, r"q must hold integer codes \(uint8, uint16, int8 or int16\)", "dequantize", q, 0.1, 0)


@pytest.mark.parametrize("p", [49.9, 100.01, -1.0, np.nan, 1000])
def test_percentile_out_of_range(p):
    _raises(ValueError, "percentile must be in", "asymmetric_params", X, 8, None, p)


@pytest.mark.parametrize("p", ["99", [99.0]])
def test_percentile_wrong_type(p):
    _raises(TypeError, "percentile must be a number", "asymmetric_params", X, 8, None, p)


def test_ste_grad_shape_mismatch():
    with pytest.raises(ValueError, match="grad must have the shape of x"):
        _core.ste_grad(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32), 0.1, 0, 8)
    with pytest.raises(TypeError, match="grad must be a floating-point array"):
        _core.ste_grad(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.float32), 0.1, 0, 8)


def test_torch_inputs_validated_too():
    x = torch.from_numpy(X.copy())
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        ops.fake_quantize(x, 0.1, 3, 8)
    with pytest.raises(ValueError, match="scale must be > 0"):
        ops.quantize(torch.from_numpy(X), torch.tensor(0.0), 3, 8)
    with pytest.raises(ValueError, match="zero_point must be in the code range"):
        ops.quantize(torch.from_numpy(X), 0.1, torch.tensor([0, 1, 300]), 8, axis=1)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        ops.quantize(torch.arange(4), 0.1, 3, 8)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        ops.fake_quantize_ste(x.requires_grad_(), 0.1, 3, 8)


def test_valid_edge_cases_do_not_raise():
    # empty arrays, non-contiguous and big-endian arrays are valid
    assert ops.quantize(np.zeros((0, 3), np.float32), [0.1] * 3, [0] * 3, 8, axis=1).shape == (0, 3)
    assert ops.fake_quantize(X[:, ::2].astype(">f4"), 0.1, 3, 8).shape == (2, 2, 4)
    assert ops.dequantize(np.zeros(0, np.uint16), 0.1, 65535).shape == (0,)


def test_fake_quantize_out_invalid():
    x = np.zeros((4, 5), np.float32)
    for out, exc, msg in [(np.zeros((5, 4), np.float32), ValueError, "out must have the shape of x"),
                          (np.zeros((4, 5), np.float64), TypeError, "out must be a float32 array, got dtype float64"),
                          (np.zeros((5, 4), np.float32).T, ValueError, "out must be C-contiguous"),
                          ([0.0] * 20, TypeError, "out must be a numpy array"),
                          (x, ValueError, "out must not overlap x")]:
        with pytest.raises(exc, match=msg):
            ops.fake_quantize(x, 0.1, 0, 8, out=out)
    ro = np.zeros((4, 5), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        _core.fake_quantize(x, 0.1, 0, 8, out=ro)


def test_fake_quantize_tensor_x_with_numpy_out():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="out must be a torch tensor like x, got ndarray"):
        ops.fake_quantize(torch.zeros(4, 5), 0.1, 0, 8, out=np.zeros((4, 5), np.float32))


def test_tensor_arguments_are_named():
    """bfloat16 / meta tensors as parameters or out, numpy for the autograd op: errors naming the argument."""
    x = torch.ones(2, 3)
    assert ops.quantize(X, torch.tensor(0.1, dtype=torch.bfloat16), 0, 8).dtype == np.uint8  # exact float32 value
    with pytest.raises(ValueError, match="scale is a meta tensor"):
        ops.quantize(X, torch.tensor(0.1, device="meta"), 0, 8)
    with pytest.raises(TypeError, match="out must be a float32 CPU tensor"):
        ops.fake_quantize(x, 0.1, 0, 8, out=torch.empty(2, 3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="out must be a float32 CPU tensor"):
        ops.fake_quantize(x, 0.1, 0, 8, out=torch.empty(2, 3, device="meta"))
    with pytest.raises(ValueError, match="q must be a CPU tensor"):
        ops.dequantize(torch.zeros(3, dtype=torch.uint8, device="meta"), 0.1, 0)
    with pytest.raises(TypeError, match="x must be a torch tensor"):
        ops.fake_quantize_ste(X, 0.1, 0, 8)


def test_out_requiring_grad_is_refused():
    """The kernel writes out behind autograd's back: a tensor that requires grad is refused (torch refuses
    in-place writes to such leaves too), and left unchanged."""
    out = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="out must not require grad"):
        ops.fake_quantize(torch.ones(2, 3), 0.1, 0, 8, out=out)
    assert not out.detach().any()
