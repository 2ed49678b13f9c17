"""pyzeroq.ops quantization kernels against an independent numpy reference (exact equality)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyzeroq import _core, ops

BITS = [2, 3, 4, 7, 8, 9, 12, 16]


# ------------------------------------------------------------------ numpy reference


def _bcast(p, x, axis, dtype):
    p = np.asarray(p, dtype=dtype).reshape(-1)
    if axis is None or p.size == 1:
        return p.reshape(())
    shape = [1] * x.ndim
    shape[axis] = -1
    return p.reshape(shape)


def ref_quantize(x, scale, zp, bits, axis=None):
    """clamp(rint(f32(x / s)) + zp, 0, 2^bits - 1); np.rint rounds half to even."""
    x = np.asarray(x, dtype=np.float32)
    s = _bcast(scale, x, axis, np.float32)
    z = _bcast(zp, x, axis, np.int64)
    qmax = 2**bits - 1
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        v = np.divide(x, s, dtype=np.float32)  # one float32 division
    r = np.rint(v).astype(np.float64) + z
    return np.clip(r, 0, qmax).astype(np.uint8 if bits <= 8 else np.uint16)


def ref_dequantize(q, scale, zp, axis=None):
    s = _bcast(scale, q, axis, np.float32)
    z = _bcast(zp, q, axis, np.int64)
    return np.multiply(s, (q.astype(np.int64) - z).astype(np.float32), dtype=np.float32)


def ref_fake_quantize(x, scale, zp, bits, axis=None):
    return ref_dequantize(ref_quantize(x, scale, zp, bits, axis), scale, zp, axis)


def ref_params(x, bits, axis=None, percentile=None):
    """Documented asymmetric_params semantics, written with numpy only."""
    x = np.asarray(x, dtype=np.float32)
    if axis is None:
        chans = [x.reshape(-1)]
    else:
        chans = [np.take(x, c, axis=axis).reshape(-1) for c in range(x.shape[axis])]
    qmax = 2**bits - 1
    scales, zps = [], []
    for v in chans:
        v = v.astype(np.float64)
        if v.size == 0:
            lo = hi = 0.0
        elif percentile is None:
            lo, hi = float(v.min()), float(v.max())
        else:
            lo = float(np.percentile(v, 100 - percentile))
            hi = float(np.percentile(v, percentile))
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = np.float32((hi - lo) / qmax)
        if not s > 0:
            scales.append(np.float32(1.0))
            zps.append(0)
            continue
        z = np.rint(-lo / np.float64(s))
        scales.append(s)
        zps.append(int(np.clip(z, 0, qmax)))
    s_arr, z_arr = np.array(scales, np.float32), np.array(zps, np.int32)
    return (s_arr.reshape(()), z_arr.reshape(())) if axis is None else (s_arr, z_arr)


def assert_same(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def check_all(x, scale, zp, bits, axis=None):
    """ops, the optimized C++ kernels and the C++ reference kernels all equal numpy."""
    q_ref = ref_quantize(x, scale, zp, bits, axis)
    assert_same(ops.quantize(x, scale, zp, bits, axis), q_ref)
    assert_same(_core._quantize_reference(x, scale, zp, bits, axis), q_ref)
    fq_ref = ref_fake_quantize(x, scale, zp, bits, axis)
    assert_same(ops.fake_quantize(x, scale, zp, bits, axis), fq_ref)
    assert_same(_core._fake_quantize_reference(x, scale, zp, bits, axis), fq_ref)
    dq_ref = ref_dequantize(q_ref, scale, zp, axis)
    assert_same(ops.dequantize(q_ref, scale, zp, axis), dq_ref)
    assert_same(_core._dequantize_reference(q_ref, scale, zp, axis), dq_ref)
    return q_ref


# ------------------------------------------------------------------ helpers


def test_code_dtype_and_qrange():
    assert ops.code_dtype(2) is np.uint8 and ops.code_dtype(8) is np.uint8
    assert ops.code_dtype(9) is np.uint16 and ops.code_dtype(16) is np.uint16
    assert ops.qrange(4) == (0, 15) and ops.qrange(16) == (0, 65535)


@pytest.mark.parametrize("bits", [0, 1, 17, 64, -3, 4.0, True, "8", None])
def test_qrange_and_code_dtype_reject_widths_the_kernels_do_not_take(bits):
    for fn in (ops.qrange, ops.code_dtype):
        with pytest.raises(ValueError, match="bits must be in 2..16"):
            fn(bits)
    with pytest.raises(TypeError, match="narrow_range must be a bool"):
        ops.qrange(8, narrow_range=1)


# ------------------------------------------------------------------ per tensor


@pytest.mark.parametrize("bits", BITS)
def test_per_tensor_random(bits):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((7, 33, 5)) * 3).astype(np.float32)
    qmax = 2**bits - 1
    scale = np.float32(6.0 / qmax)
    zp = qmax // 3
    q = check_all(x, scale, zp, bits)
    assert q.min() == 0 and q.max() == qmax  # the clamp is exercised


@pytest.mark.parametrize("bits", [4, 8, 12])
def test_multithreaded_sizes(bits):
    # > 2 * grain elements: several threads, chunk edges inside rows / channel runs.
    rng = np.random.default_rng(1)
    qmax = 2**bits - 1
    for shape, axis in [((300_001,), None), ((3, 70_001), 0), ((1000, 131), 1), ((5, 7, 4001), 1),
                        ((2, 65_537, 3), -1)]:
        x = rng.standard_normal(shape).astype(np.float32)
        c = 1 if axis is None else shape[axis]
        scale = rng.uniform(0.005, 0.05, c).astype(np.float32)
        zp = rng.integers(0, qmax + 1, c)
        check_all(x, scale if axis is not None else scale[0], zp if axis is not None else zp[0], bits, axis)


def _ties(scale, ks):
    """float32 x with f32(x / scale) == k + 0.5 exactly (and its float neighbours)."""
    xs = []
    for k in ks:
        target = np.float32(k + 0.5)
        x0 = np.float32(target * scale)
        for x in (np.nextafter(x0, np.float32(-np.inf)), x0, np.nextafter(x0, np.float32(np.inf))):
            if np.float32(x / scale) == target:
                xs.append(x)
    return np.array(xs, dtype=np.float32)


@pytest.mark.parametrize("scale", [0.25, 0.1, 0.0123, 3.0, 1.7e-5])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_ties_round_half_to_even(scale, bits):
    scale = np.float32(scale)
    qmax = 2**bits - 1
    zp = qmax // 2
    ks = np.arange(-zp - 2, qmax - zp + 2)
    if ks.size > 400:
        ks = np.concatenate([ks[:100], ks[ks.size // 2 - 100: ks.size // 2 + 100], ks[-100:]])
    x = _ties(scale, ks)
    ratio = (x / scale).astype(np.float32)
    assert np.any(np.mod(ratio - 0.5, 2) == 0) and np.any(np.mod(ratio - 0.5, 2) == 1)  # even and odd k
    q = check_all(x, scale, zp, bits)
    # half to even explicitly: code - zp is the even neighbour of k + 0.5 (inside the range)
    inside = (ratio > -zp) & (ratio < qmax - zp)
    assert np.all((q[inside].astype(np.int64) - zp) % 2 == 0)


@pytest.mark.parametrize("bits", [2, 8, 16])
def test_clamp_edges(bits):
    qmax = 2**bits - 1
    scale = np.float32(0.37)
    for zp in (0, 1, qmax // 2, qmax - 1, qmax):
        lo = np.float32(scale * np.float32(0 - zp))
        hi = np.float32(scale * np.float32(qmax - zp))
        edges = [lo, hi, np.nextafter(lo, -np.inf), np.nextafter(hi, np.inf), lo - scale / 2, hi + scale / 2,
                 lo - scale, hi + scale, -3e38, 3e38, 0.0, -0.0, 1e-45, -1e-45, lo * 10, hi * 10]
        x = np.array(edges, dtype=np.float32)
        q = check_all(x, scale, zp, bits)
        assert q[0] == 0 and q[1] == qmax


def test_extreme_scales():
    # tiny scale: x / scale overflows to +-inf (clamped); subnormal and huge scales, up to the
    # largest whose grid scale * (code - zp) still fits float32 (a larger one is a ValueError)
    x = np.array([-1e30, -1.0, -1e-40, 0.0, 1e-40, 1.0, 1e30, 3.4e38], dtype=np.float32)
    for bits in (2, 8, 16):
        largest = np.float32(np.finfo(np.float32).max / 2**bits)
        for scale in (1e-45, 1e-40, 1.2e-38, 1e-10, 1e10, largest):
            check_all(x, np.float32(scale), 1, bits)
        with pytest.raises(ValueError, match="beyond float32"):
            ops.fake_quantize(x, 3e38, 1, bits)


# ------------------------------------------------------------------ per channel


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -2, -4])
@pytest.mark.parametrize("bits", [3, 8, 10])
def test_per_channel_any_axis(axis, bits):
    rng = np.random.default_rng(abs(axis) * 10 + bits)
    x = rng.standard_normal((4, 5, 6, 7)).astype(np.float32) * 2
    c = x.shape[axis]
    qmax = 2**bits - 1
    scale = rng.uniform(0.01, 0.3, c).astype(np.float32)
    zp = rng.integers(0, qmax + 1, c)
    check_all(x, scale, zp, bits, axis)
    # parameters shaped [C, 1, ...] / as lists / size-1 broadcast are accepted
    check_all(x, scale.reshape(c, 1, 1), zp.tolist(), bits, axis)
    check_all(x, scale[:1], zp[0], bits, axis)


def test_per_channel_equals_per_tensor_channel_by_channel():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 3, 5)).astype(np.float32)
    scale = np.array([0.01, 0.1, 0.05], np.float32)
    zp = np.array([0, 128, 255])
    q = ops.quantize(x, scale, zp, 8, axis=1)
    for c in range(3):
        assert_same(q[:, c], ops.quantize(np.ascontiguousarray(x[:, c]), scale[c], zp[c], 8))


# ------------------------------------------------------------------ layouts and dtypes


def test_non_contiguous_big_endian_float64_float16():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((8, 10)).astype(np.float32)
    scale, zp = np.float32(0.02), 100
    for x in (base[:, ::2], base.T, base.astype(">f4"), base.astype(np.float64), base.astype(np.float16)):
        expect = ref_quantize(np.asarray(x, dtype=np.float32), scale, zp, 8)
        assert_same(ops.quantize(x, scale, zp, 8), expect)
        assert_same(ops.fake_quantize(x, scale, zp, 8), ref_fake_quantize(np.asarray(x, np.float32), scale, zp, 8))
    q = ops.quantize(base, scale, zp, 12)
    for qq in (q[:, ::2], q.astype(">u2"), q.T):
        expect = ref_dequantize(np.ascontiguousarray(qq).astype(np.uint16), scale, zp)
        assert_same(ops.dequantize(qq, scale, zp), expect)
    assert_same(ops.quantize(base.tolist(), scale, zp, 8), ref_quantize(base, scale, zp, 8))


def test_float64_params_rounded_to_float32():
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    assert_same(ops.quantize(x, 0.1, 5.0, 8), ref_quantize(x, np.float32(0.1), 5, 8))
    assert_same(ops.quantize(x, np.float64(0.1), np.int64(5), 8), ref_quantize(x, np.float32(0.1), 5, 8))


def test_empty_and_scalar():
    for shape, axis in [((0,), None), ((3, 0, 2), 1), ((3, 0, 2), 0), ((0, 4), 1)]:
        x = np.zeros(shape, np.float32)
        c = 1 if axis is None else shape[axis]
        s, z = np.full(c, 0.1, np.float32), np.zeros(c, np.int64)
        q = ops.quantize(x, s, z, 8, axis)
        assert q.shape == shape and q.dtype == np.uint8
        assert ops.fake_quantize(x, s, z, 8, axis).shape == shape
        assert ops.dequantize(q, s, z, axis).dtype == np.float32
    x0 = np.array(1.26, np.float32)
    assert ops.quantize(x0, 0.5, 0, 4).shape == ()
    check_all(x0, np.float32(0.5), 0, 4)


def test_torch_in_torch_out():
    rng = np.random.default_rng(5)
    xn = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    x = torch.from_numpy(xn)
    s = torch.tensor([0.1, 0.2, 0.05])
    z = torch.tensor([3, 128, 250], dtype=torch.int32)
    q = ops.quantize(x, s, z, 8, axis=1)
    assert isinstance(q, torch.Tensor) and q.dtype == torch.uint8
    np.testing.assert_array_equal(q.numpy(), ref_quantize(xn, s.numpy(), z.numpy(), 8, 1))
    q16 = ops.quantize(x, s, z, 12, axis=1)
    assert q16.dtype == torch.uint16
    y = ops.dequantize(q, s, z, axis=1)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    fq = ops.fake_quantize(x.requires_grad_(), s, z, 8, axis=1)
    assert isinstance(fq, torch.Tensor) and not fq.requires_grad
    np.testing.assert_array_equal(fq.numpy(), ref_fake_quantize(xn, s.numpy(), z.numpy(), 8, 1))
    sc, zp = ops.asymmetric_params(torch.from_numpy(xn), 8, axis=1)
    assert isinstance(sc, torch.Tensor) and sc.dtype == torch.float32 and zp.dtype == torch.int32
    assert sc.shape == (3,)


# ------------------------------------------------------------------ asymmetric_params


def assert_params(x, bits, axis=None, percentile=None):
    s, z = ops.asymmetric_params(x, bits, axis, percentile)
    rs, rz = ref_params(x, bits, axis, percentile)
    assert_same(s, rs)
    assert_same(z, rz)
    return s, z


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_params_minmax(bits):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((5, 6, 7)) * 2 + 0.3).astype(np.float32)
    for axis in (None, 0, 1, 2, -1):
        s, z = assert_params(x, bits, axis)
        # min and max are representable within scale/2; 0 exactly
        assert np.all(z >= 0) and np.all(z <= 2**bits - 1)
    big = rng.standard_normal((3, 70_000)).astype(np.float32)  # threaded path
    for axis in (None, 0, 1):
        assert_params(big, bits, axis)


def test_params_ranges_one_sided_and_constant():
    for x in (np.full((4, 4), 5.0, np.float32), np.full(10, -3.0, np.float32), np.zeros((2, 3), np.float32),
              np.linspace(0.5, 2, 50, dtype=np.float32), np.linspace(-2, -0.5, 50, dtype=np.float32)):
        for bits in (2, 8):
            s, z = assert_params(x, bits)
            assert np.isfinite(s) and s > 0
    s, z = ops.asymmetric_params(np.zeros(8, np.float32), 8)
    assert s == 1.0 and z == 0
    s, z = ops.asymmetric_params(np.full(8, 5.0, np.float32), 8)
    assert z == 0 and s == np.float32(5.0 / 255)
    s, z = ops.asymmetric_params(np.full(8, -5.0, np.float32), 8)
    assert z == 255
    # one channel all zeros, one constant, one normal
    x = np.stack([np.zeros(5), np.full(5, 2.0), np.linspace(-1, 3, 5)]).astype(np.float32)
    assert_params(x, 4, axis=0)


def test_params_extreme_values_no_overflow():
    x = np.array([-3.4e38, 3.4e38], np.float32)
    s, z = assert_params(x, 2)
    assert np.isfinite(s)
    assert_params(np.array([1e-45, 0], np.float32), 16)  # range underflows: scale 1, zp 0


def test_params_empty():
    s, z = ops.asymmetric_params(np.zeros((0,), np.float32), 8)
    assert s.shape == () and s == 1.0 and z == 0
    s, z = ops.asymmetric_params(np.zeros((3, 0), np.float32), 8, axis=0)
    np.testing.assert_array_equal(s, [1, 1, 1])
    s, z = ops.asymmetric_params(np.zeros((0, 3), np.float32), 8, axis=0)
    assert s.shape == (0,) and z.shape == (0,)


@pytest.mark.parametrize("p", [50.0, 90.0, 99.0, 99.9, 99.99, 100.0, 97.3])
def test_params_percentile_matches_numpy(p):
    rng = np.random.default_rng(int(p * 100))
    x = (rng.standard_normal((4, 1001)) * np.array([[1], [3], [0.1], [10]]) + 0.2).astype(np.float32)
    x[0, :5] = 40.0  # outliers the percentile clips
    for axis in (None, 0, 1, -2):
        assert_params(x, 8, axis, p)
    assert_params(x[:, :2], 4, 0, p)  # two values per channel
    assert_params(x[:, :1], 4, 0, p)  # single value
    assert_params(np.zeros(7, np.float32), 8, None, p)


def test_params_percentile_clips_outliers():
    x = np.concatenate([np.linspace(-1, 1, 10_000), [1000.0, -1000.0]]).astype(np.float32)
    s_full, _ = ops.asymmetric_params(x, 8)
    s_clip, _ = ops.asymmetric_params(x, 8, percentile=99.9)
    assert s_clip < s_full / 100
    s_100, z_100 = ops.asymmetric_params(x, 8, percentile=100)
    assert s_100 == s_full


# ------------------------------------------------------------------ hypothesis properties

finite_f32 = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9), elements=finite_f32),
       bits=st.integers(2, 16), data=st.data())
def test_roundtrip_within_half_scale(x, bits, data):
    s, z = ops.asymmetric_params(x, bits)
    q = ops.quantize(x, s, z, bits)
    qmax = 2**bits - 1
    assert q.dtype == ops.code_dtype(bits) and int(q.max(initial=0)) <= qmax
    y = ops.dequantize(q, s, z)
    # the whole [min, max] range lies inside the code range (up to one rounding of scale)
    lo, hi = np.float32(s * np.float32(0 - int(z))), np.float32(s * np.float32(qmax - int(z)))
    inside = (x >= lo) & (x <= hi)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    tol = float(s) / 2 * (1 + 1e-5) + np.abs(x.astype(np.float64)) * 2e-7
    assert np.all(err[inside] <= tol[inside])
    assert_same(ops.fake_quantize(x, s, z, bits), y)


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=4, max_side=6), elements=finite_f32),
       bits=st.integers(2, 16), data=st.data())
def test_per_channel_equals_per_tensor_property(x, bits, data):
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    c = x.shape[axis]
    qmax = 2**bits - 1
    scale = np.array(data.draw(st.lists(st.floats(0.0009765625, 1024.0, width=32), min_size=c, max_size=c)), np.float32)
    zp = np.array(data.draw(st.lists(st.integers(0, qmax), min_size=c, max_size=c)), np.int64)
    q = ops.quantize(x, scale, zp, bits, axis)
    fq = ops.fake_quantize(x, scale, zp, bits, axis)
    assert int(q.max(initial=0)) <= qmax
    for ch in range(c):
        xc = np.take(x, ch, axis=axis)
        assert_same(np.take(q, ch, axis=axis), ops.quantize(xc, scale[ch], zp[ch], bits))
        assert_same(np.take(fq, ch, axis=axis), ops.fake_quantize(xc, scale[ch], zp[ch], bits))
    assert_same(q, ref_quantize(x, scale, zp, bits, axis))


@settings(max_examples=40, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=8), elements=finite_f32),
       bits=st.integers(2, 16), p=st.one_of(st.none(), st.floats(50, 100)), data=st.data())
def test_params_property(x, bits, p, data):
    axis = data.draw(st.one_of(st.none(), st.integers(-x.ndim, x.ndim - 1)))
    s, z = assert_params(x, bits, axis, p)
    assert np.all(s > 0) and np.all(np.isfinite(s))
    assert np.all((z >= 0) & (z <= 2**bits - 1))
    # real 0 is exactly representable
    assert_same(ops.fake_quantize(np.zeros(1 if axis is None else (x.shape[axis],), np.float32),
                                  s, z, bits, None if axis is None else 0),
                np.zeros(1 if axis is None else (x.shape[axis],), np.float32))


def test_fake_quantize_out():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((300, 1000)).astype(np.float32)
    out = np.full_like(x, np.nan)
    y = ops.fake_quantize(x, 0.02, 100, 8, out=out)
    assert y is out
    assert_same(out, ref_fake_quantize(x, np.float32(0.02), 100, 8))
    xt, outt = torch.from_numpy(x), torch.empty(300, 1000)
    assert ops.fake_quantize(xt, 0.02, 100, 8, out=outt) is outt
    np.testing.assert_array_equal(outt.numpy(), out)


def test_bfloat16_tensors_quantize_as_their_float32_values():
    """numpy has no bfloat16: its values (exact in float32) go to the kernels as float32."""
    torch = pytest.importorskip("torch")
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x32 = x.float()
    assert torch.equal(ops.quantize(x, 0.05, 3, 8), ops.quantize(x32, 0.05, 3, 8))
    assert torch.equal(ops.fake_quantize(x, 0.05, 3, 8), ops.fake_quantize(x32, 0.05, 3, 8))
    y = ops.fake_quantize_ste(x, 0.05, 3, 8)
    assert y.dtype == torch.bfloat16 and torch.equal(y.float(), ops.fake_quantize(x32, 0.05, 3, 8).bfloat16().float())
    s, z = ops.asymmetric_params(x, 4, axis=1)
    s32, z32 = ops.asymmetric_params(x32, 4, axis=1)
    assert torch.equal(s, s32) and torch.equal(z, z32)
