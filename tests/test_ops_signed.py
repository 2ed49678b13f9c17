"""Signed and narrow-range codes in pyzeroq.ops, and symmetric_params: the optimized C++
kernels, their plain-loop reference twins and an independent numpy reference agree exactly
(random data, constructed .5 ties, clamp edges); onnxruntime QuantizeLinear / DequantizeLinear
(int8, int16, int4, uint4, int2, uint2) give the same codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_ops import _bcast

from pyzeroq import _core, ops

BITS = [2, 3, 4, 7, 8, 9, 12, 16]
RANGES = [(True, False), (True, True), (False, True)]  # (signed, narrow_range); unsigned full: test_ops.py


# ------------------------------------------------------------------ numpy reference
def np_qrange(bits, signed, narrow):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return lo + int(narrow), hi


def ref_quantize(x, scale, zp, bits, axis, signed, narrow):
    """clamp(rint(f32(x / s)) + zp, qmin, qmax) in int8/int16 (signed) or uint8/uint16."""
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        v = np.divide(x, _bcast(scale, x, axis, np.float32), dtype=np.float32)
    r = np.rint(v).astype(np.float64) + _bcast(zp, x, axis, np.int64)
    lo, hi = np_qrange(bits, signed, narrow)
    dtype = (np.int8 if bits <= 8 else np.int16) if signed else (np.uint8 if bits <= 8 else np.uint16)
    return np.clip(r, lo, hi).astype(dtype)


def ref_dequantize(q, scale, zp, axis):
    return np.multiply(_bcast(scale, q, axis, np.float32),
                       (q.astype(np.int64) - _bcast(zp, q, axis, np.int64)).astype(np.float32), dtype=np.float32)


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(a, b)


def check_all(x, scale, zp, bits, axis, signed, narrow):
    """ops, the optimized kernels and the reference kernels all equal numpy (quantize, fake
    quantize, dequantize, STE mask)."""
    kw = dict(signed=signed, narrow_range=narrow)
    q = ref_quantize(x, scale, zp, bits, axis, signed, narrow)
    assert_same(ops.quantize(x, scale, zp, bits, axis, **kw), q)
    assert_same(_core._quantize_reference(x, scale, zp, bits, axis, **kw), q)
    fq = ref_dequantize(q, scale, zp, axis)
    assert_same(ops.fake_quantize(x, scale, zp, bits, axis, **kw), fq)
    assert_same(_core._fake_quantize_reference(x, scale, zp, bits, axis, **kw), fq)
    assert_same(ops.dequantize(q, scale, zp, axis), fq)
    assert_same(_core._dequantize_reference(q, scale, zp, axis), fq)
    lo, hi = np_qrange(bits, signed, narrow)
    s, z = _bcast(scale, x, axis, np.float32), _bcast(zp, x, axis, np.int64)
    mask = (x >= s * (lo - z).astype(np.float32)) & (x <= s * (hi - z).astype(np.float32))
    grad = np.arange(1, x.size + 1, dtype=np.float32).reshape(x.shape)
    want = np.where(mask, grad, np.float32(0))
    assert_same(_core.ste_grad(grad, x, scale, zp, bits, axis, **kw), want)
    assert_same(_core._ste_grad_reference(grad, x, scale, zp, bits, axis, **kw), want)
    return q


# ------------------------------------------------------------------ ranges and dtypes
def test_qrange_and_code_dtype():
    assert ops.qrange(8, signed=True) == (-128, 127) and ops.qrange(8, True, True) == (-127, 127)
    assert ops.qrange(4, signed=True) == (-8, 7) and ops.qrange(16, signed=True) == (-32768, 32767)
    assert ops.qrange(8, narrow_range=True) == (1, 255) and ops.qrange(2, True) == (-2, 1)
    assert ops.code_dtype(8, signed=True) is np.int8 and ops.code_dtype(9, signed=True) is np.int16
    assert ops.code_dtype(8) is np.uint8 and ops.code_dtype(16, False) is np.uint16


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed,narrow", RANGES)
def test_random_per_tensor(bits, signed, narrow):
    rng = np.random.default_rng(bits * 7 + signed * 3 + narrow)
    x = (rng.standard_normal((5, 41, 3)) * 4).astype(np.float32)
    lo, hi = np_qrange(bits, signed, narrow)
    scale = np.float32(8.0 / (hi - lo))
    zp = (lo + hi) // 2 + 1
    q = check_all(x, scale, zp, bits, None, signed, narrow)
    assert q.min() == lo and q.max() == hi  # both clamp edges reached


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("signed,narrow", RANGES)
@pytest.mark.parametrize("shape,axis", [((6, 3, 5, 5), 0), ((4, 37), 1), ((3, 7, 2), -2), ((9, 300), 0)])
def test_random_per_channel(bits, signed, narrow, shape, axis):
    rng = np.random.default_rng(bits + 11 * len(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    c = shape[axis]
    lo, hi = np_qrange(bits, signed, narrow)
    scale = rng.uniform(0.5, 2.0, c).astype(np.float32) * np.float32(6.0 / (hi - lo))
    zp = rng.integers(lo, hi + 1, c)
    check_all(x, scale, zp, bits, axis, signed, narrow)


def exact_ties(scale, ks):
    """(x, k): float32 x with f32(x / scale) == k + 0.5 exactly, for the k of ``ks`` where such an
    x exists (searched among the float32 neighbours of (k + .5) * scale; where x / scale steps
    over k + .5 there is none). At least half of ``ks`` must be found."""
    s = np.float32(scale)
    xs, found = [], []
    for k in ks:
        target = np.float32(k + 0.5)
        x = np.float32(target * s)
        for _ in range(8):
            x = np.nextafter(x, np.float32(-np.inf))
        for _ in range(17):
            if np.float32(x / s) == target:
                xs.append(x)
                found.append(k)
                break
            x = np.nextafter(x, np.float32(np.inf))
    assert len(found) * 2 >= len(ks), (scale, len(found), len(ks))
    return np.array(xs, np.float32), np.array(found, np.int64)


@pytest.mark.parametrize("scale", [0.25, 0.1, 0.0137, 3.0])
@pytest.mark.parametrize("signed,narrow", RANGES)
def test_constructed_ties_round_half_even(scale, signed, narrow):
    bits = 8
    lo, hi = np_qrange(bits, signed, narrow)
    zp = 0 if signed else 128
    x, ks = exact_ties(scale, np.arange(lo - zp - 3, hi - zp + 3))  # ties in range and past both edges
    q = check_all(x, scale, zp, bits, None, signed, narrow)
    rne = np.where(ks % 2 == 0, ks, ks + 1) + zp  # k + 0.5 -> the even neighbour
    np.testing.assert_array_equal(q.astype(np.int64), np.clip(rne, lo, hi))
    assert (q.astype(np.int64) != np.clip(np.floor(ks + 0.5) + zp, lo, hi)).any()  # half-up would differ


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("signed,narrow", RANGES)
def test_clamp_edges(bits, signed, narrow):
    lo, hi = np_qrange(bits, signed, narrow)
    zp = 0 if signed else (lo + hi + 1) // 2
    codes = np.array([lo - 2, lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, hi + 2], np.float64)
    x = np.concatenate([(codes - zp).astype(np.float32), np.float32([lo - zp - 0.5, hi - zp + 0.5, -1e30, 1e30])])
    q = check_all(x, 1.0, zp, bits, None, signed, narrow)
    assert q.tolist() == [lo, lo, lo, lo + 1, hi - 1, hi, hi, hi, lo, hi, lo, hi]


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_threaded_sizes_equal_the_reference(axis):
    """Arrays well above MIN_PARALLEL_WORK per thread: the chunked, threaded kernels (scalar and
    per-element channel runs) equal the single-threaded references."""
    import pyzeroq

    rng = np.random.default_rng(21)
    x = (rng.standard_normal((64, 4099)) * 40).astype(np.float32)
    c = 1 if axis is None else x.shape[axis]
    scale = rng.uniform(0.2, 0.4, c).astype(np.float32)
    zp = rng.integers(-20, 20, c)
    if axis is None:
        scale, zp = scale[0], zp[0]
    before = pyzeroq.get_num_threads()
    pyzeroq.set_num_threads(4)
    try:
        check_all(x, scale, zp, 8, axis, True, True)
        for percentile in (None, 99.9):
            s, z = ops.symmetric_params(x, 8, axis, percentile)
            s_ref, z_ref = _core._symmetric_params_reference(x, 8, axis, percentile)
            assert_same(s, s_ref)
            assert_same(z, z_ref)
    finally:
        pyzeroq.set_num_threads(before)


def test_narrow_range_drops_the_lowest_code():
    x = np.array([-300.0, -128.0, -127.6, -127.0, 127.0, 300.0], np.float32)
    assert ops.quantize(x, 1.0, 0, 8, signed=True).tolist() == [-128, -128, -128, -127, 127, 127]
    assert ops.quantize(x, 1.0, 0, 8, signed=True, narrow_range=True).tolist() == [-127, -127, -127, -127, 127, 127]
    assert ops.fake_quantize(x, 1.0, 0, 8, signed=True, narrow_range=True).min() == -127.0


def test_signed_codes_are_the_unsigned_codes_shifted():
    """quantize(x, s, z, signed) + 2^(b-1) == quantize(x, s, z + 2^(b-1), unsigned)."""
    rng = np.random.default_rng(3)
    for bits in (3, 8, 11, 16):
        half = 2 ** (bits - 1)
        x = (rng.standard_normal(999) * half * 0.7).astype(np.float32)
        s = ops.quantize(x, 0.5, -3, bits, signed=True).astype(np.int64)
        u = ops.quantize(x, 0.5, half - 3, bits).astype(np.int64)
        np.testing.assert_array_equal(s + half, u)


def test_dequantize_signed_full_container_range():
    for dtype in (np.int8, np.int16):
        info = np.iinfo(dtype)
        q = np.array([info.min, -1, 0, 1, info.max], dtype)
        for zp in (info.min, 0, info.max):
            y = ops.dequantize(q, 0.5, zp)
            assert_same(y, ref_dequantize(q, 0.5, zp, None))
        with pytest.raises(ValueError, match="zero_point must be in the code range"):
            ops.dequantize(q, 0.5, int(info.max) + 1)


def test_torch_in_torch_out_and_non_cpu_formula():
    x = torch.linspace(-3, 3, 61)
    q = ops.quantize(x, 0.05, 0, 8, signed=True, narrow_range=True)
    assert q.dtype == torch.int8 and int(q.min()) == -60 and int(q.max()) == 60
    assert ops.dequantize(q, 0.05, 0).dtype == torch.float32
    for signed, narrow in RANGES:
        zp = 0 if signed else 7
        want = ops.fake_quantize(x, 0.02, zp, 4, signed=signed, narrow_range=narrow)
        got = ops._fake_quantize_torch(x, 0.02, zp, 4, signed=signed, narrow_range=narrow)
        assert torch.equal(got, want)
        g = torch.ones_like(x)
        mask = ops._ste_mask_torch(x, 0.02, zp, 4, None, signed=signed, narrow_range=narrow)
        want_grad = torch.from_numpy(_core.ste_grad(g.numpy(), x.numpy(), 0.02, zp, 4, signed=signed,
                                                    narrow_range=narrow))
        assert torch.equal(mask.float(), want_grad)


def test_fake_quantize_ste_signed_gradient():
    x = torch.linspace(-2, 2, 41, requires_grad=True)
    y = ops.fake_quantize_ste(x, 0.25, 0, 4, signed=True, narrow_range=True)  # codes [-7, 7] -> [-1.75, 1.75]
    y.sum().backward()
    inside = (x.detach() >= -1.75) & (x.detach() <= 1.75)
    assert torch.equal(x.grad, inside.float())
    assert float(y.detach().min()) == -1.75 and float(y.detach().max()) == 1.75
    x2 = x.detach().double().requires_grad_()  # the torch-mask path (non-float32)
    ops.fake_quantize_ste(x2, 0.25, 0, 4, signed=True, narrow_range=True).sum().backward()
    assert torch.equal(x2.grad, inside.double())


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(zero_point=-129, signed=True), ValueError, r"zero_point must be in the code range \[-128, 127\]"),
    (dict(zero_point=-128, signed=True, narrow_range=True), ValueError, r"\[-127, 127\]"),
    (dict(zero_point=0, narrow_range=True), ValueError, r"\[1, 255\]"),
    (dict(zero_point=0, signed=1), TypeError, "signed must be a bool"),
    (dict(zero_point=0, narrow_range="yes"), TypeError, "narrow_range must be a bool"),
])
def test_bad_signed_arguments(kwargs, exc, match):
    x = np.zeros(4, np.float32)
    zp = kwargs.pop("zero_point")
    for fn in (ops.quantize, ops.fake_quantize, _core._quantize_reference):
        with pytest.raises(exc, match=match):
            fn(x, 0.1, zp, 8, **kwargs)


# ------------------------------------------------------------------ symmetric_params
def ref_symmetric(x, bits, axis, percentile, signed):
    x = np.asarray(x, np.float32)
    chans = [x.reshape(-1)] if axis is None else [np.take(x, c, axis=axis).reshape(-1) for c in range(x.shape[axis])]
    scales, zps = [], []
    for v in chans:
        mag = np.abs(v.astype(np.float64))
        amax = 0.0 if mag.size == 0 else (mag.max() if percentile is None else np.percentile(mag, percentile))
        s = np.float32(amax / (2 ** (bits - 1) - 1))
        scales.append(s if s > 0 else np.float32(1.0))
        zps.append(0 if signed else 2 ** (bits - 1))
    s, z = np.array(scales, np.float32), np.array(zps, np.int32)
    return (s.reshape(()), z.reshape(())) if axis is None else (s, z)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("percentile", [None, 99.0, 100.0, 50.0])
@pytest.mark.parametrize("shape,axis", [((300,), None), ((8, 3, 3, 3), 0), ((5, 64), 1), ((0, 4), 1)])
def test_symmetric_params_vs_numpy(bits, signed, percentile, shape, axis):
    rng = np.random.default_rng(bits + len(shape))
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 5)).astype(np.float32)
    want = ref_symmetric(x, bits, axis, percentile, signed)
    for fn in (ops.symmetric_params, _core._symmetric_params_reference):
        s, z = fn(x, bits, axis, percentile, signed=signed)
        assert_same(s, want[0])
        assert_same(z, want[1])


def test_symmetric_params_rule_and_degenerate_channels():
    w = np.array([[0.0, 0.0, 0.0], [-2.54, 1.0, 0.3], [0.5, -0.1, 1.27]], np.float32)
    s, z = ops.symmetric_params(w, 8, axis=0)
    f32_div = [np.float32(np.float64(np.float32(a)) / 127) for a in (2.54, 1.27)]  # float64 quotient of f32 amax
    assert s.tolist() == [1.0, *f32_div] and z.tolist() == [0, 0, 0]
    q = ops.quantize(w, s, z, 8, axis=0, signed=True, narrow_range=True)
    assert q[1, 0] == -127 and q[2, 2] == 127 and not q[0].any()  # +-amax -> +-127, all-zero row -> 0
    s_u, z_u = ops.symmetric_params(w, 8, axis=0, signed=False)
    assert_same(s_u, s)
    assert z_u.tolist() == [128, 128, 128]
    assert ops.symmetric_params(np.float32([1e-44]), 8)[0] == 1.0  # scale underflows: 1.0
    st_, zt = ops.symmetric_params(torch.from_numpy(w), 8, axis=0, narrow_range=True)
    assert isinstance(st_, torch.Tensor) and torch.equal(st_, torch.from_numpy(s)) and zt.dtype == torch.int32


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(percentile=49.0), ValueError, "percentile must be in"),
    (dict(bits=1), ValueError, "bits must be in"),
    (dict(signed="no"), TypeError, "signed must be a bool"),
    (dict(narrow_range=None), TypeError, "narrow_range must be a bool"),
    (dict(axis=3), ValueError, "axis 3 is out of range"),
])
def test_symmetric_params_errors(kwargs, exc, match):
    x = np.ones((2, 3), np.float32)
    args = {"bits": 8, **kwargs}
    for fn in (ops.symmetric_params, _core._symmetric_params_reference):
        with pytest.raises(exc, match=match):
            fn(x, **args)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.symmetric_params(np.float32([1.0, np.nan]), 8)


# ------------------------------------------------------------------ hypothesis
@settings(max_examples=60, deadline=None)
@given(data=st.data(), bits=st.integers(2, 16), signed=st.booleans(), narrow=st.booleans(),
       per_channel=st.booleans())
def test_property_fast_reference_numpy(data, bits, signed, narrow, per_channel):
    x = data.draw(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
                             elements=st.floats(-1e4, 1e4, width=32)))
    lo, hi = np_qrange(bits, signed, narrow)
    axis = data.draw(st.integers(0, x.ndim - 1)) if per_channel else None
    n = x.shape[axis] if per_channel else 1
    scale = np.array(data.draw(st.lists(st.floats(0.0009765625, 1024.0, width=32), min_size=n, max_size=n)), np.float32)
    zp = np.array(data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)))
    if not per_channel:
        scale, zp = scale[0], zp[0]
    q = check_all(x, scale, zp, bits, axis, signed, narrow)
    assert q.size == 0 or (int(q.min()) >= lo and int(q.max()) <= hi)
    s, z = ops.symmetric_params(x, bits, axis, signed=signed)
    assert_same(s, _core._symmetric_params_reference(x, bits, axis, signed=signed)[0])


# ------------------------------------------------------------------ onnxruntime
def ort_quantize(x, scale, zp, axis=None, opset=21):
    ort_nodes = pytest.importorskip("ort_nodes")  # skips (this test only) without onnxruntime
    attrs = {} if axis is None else {"axis": axis}
    return ort_nodes.run_node("QuantizeLinear", [x, scale, zp], ort_nodes.tensor_type(zp.dtype), opset=opset, **attrs)


def ort_dequantize(q, scale, zp, axis=None, opset=21):
    ort_nodes = pytest.importorskip("ort_nodes")
    attrs = {} if axis is None else {"axis": axis}
    return ort_nodes.run_node("DequantizeLinear", [q, scale, zp], ort_nodes.onnx.TensorProto.FLOAT, opset=opset, **attrs)


@pytest.mark.parametrize("dtype,bits", [(np.int8, 8), (np.int16, 16), (np.uint16, 16)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_dequantize_vs_onnxruntime(dtype, bits, per_channel):
    rng = np.random.default_rng(bits + per_channel)
    info = np.iinfo(dtype)
    x = (rng.standard_normal((4, 6, 9)) * 3).astype(np.float32)
    signed = info.min < 0
    if per_channel:
        scale = rng.uniform(0.5, 2, 6).astype(np.float32) * np.float32(6 / (int(info.max) - int(info.min)))
        zp, axis = rng.integers(int(info.min) // 2, int(info.max) // 2, 6).astype(dtype), 1
    else:
        scale, zp, axis = np.float32(5.5 / (int(info.max) - int(info.min))), dtype(int(info.max) // 3), None
    for c in range(6):  # exact .5 ties in every channel
        ties = exact_ties(scale[c] if per_channel else scale, np.arange(-4, 4))[0][:6]
        x[0, c, :ties.size] = ties
    want = ort_quantize(x, scale, zp, axis)
    got = ops.quantize(x, scale, zp.astype(np.int64), bits, axis, signed=signed)
    assert_same(got, want)
    assert_same(ops.dequantize(got, scale, zp.astype(np.int64), axis), ort_dequantize(got, scale, zp, axis))


PACKED = [("int4", 4, True, 21), ("uint4", 4, False, 21), ("int2", 2, True, 25), ("uint2", 2, False, 25)]


@pytest.mark.parametrize("name,bits,signed,opset", PACKED, ids=[p[0] for p in PACKED])
def test_packed_codes_vs_onnxruntime(name, bits, signed, opset):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = getattr(ml_dtypes, name, None)
    if dtype is None:
        pytest.skip(f"ml_dtypes has no {name}")
    lo, hi = np_qrange(bits, signed, False)
    zp = np.array([lo, (lo + hi) // 2, hi], dtype)
    scale = np.float32([0.5, 0.25, 1.0])
    x = np.stack([exact_ties(s, np.arange(lo - 2, hi + 2))[0] for s in scale])  # power-of-two scales: all found
    want = ort_quantize(x, scale, zp, axis=0, opset=opset)
    got = ops.quantize(x, scale, zp.astype(np.int64), bits, 0, signed=signed)
    np.testing.assert_array_equal(got.astype(np.int64), want.astype(np.int64))
    deq = ort_dequantize(got.astype(dtype), scale, zp, axis=0, opset=opset)
    assert_same(ops.dequantize(got, scale, zp.astype(np.int64), 0), deq)
