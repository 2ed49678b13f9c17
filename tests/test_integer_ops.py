"""Integer simulator building blocks vs independent numpy / Python-int references:
requantize, residual add, pooling, multiplier helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_integer_conv import (
    np_rdbpot,
    np_round_shift,
    np_srdhm,
    py_dyadic,
    py_quantize_multiplier,
    ref_requant_dyadic,
    ref_requant_f32,
    ref_requant_gemmlowp,
)

import pyzeroq.integer as zi


# ---------------------------------------------------------------- multipliers
@settings(max_examples=200, deadline=None)
@given(m=st.floats(1e-12, 1e4, allow_nan=False, allow_infinity=False))
def test_quantize_multiplier_matches_python(m):
    assert tuple(zi.quantize_multiplier(m)) == py_quantize_multiplier(m)
    q, s = zi.quantize_multiplier(m)
    if m > 2.0 ** -31 and s < 30:
        assert abs(q * 2.0 ** (s - 31) - m) <= m * 2.0 ** -30


def test_quantize_multiplier_edges():
    assert tuple(zi.quantize_multiplier(0.0)) == (0, 0)
    assert tuple(zi.quantize_multiplier(0.5)) == (1 << 30, 0)
    assert tuple(zi.quantize_multiplier(1.0)) == (1 << 30, 1)
    # significand rounds up to 2^31 -> renormalized
    assert tuple(zi.quantize_multiplier(1.0 - 2.0 ** -40)) == (1 << 30, 1)
    assert tuple(zi.quantize_multiplier(2.0 ** -40)) == (0, 0)


@pytest.mark.parametrize("bits,shift", [(31, None), (16, None), (8, None), (None, 20), (None, 0)])
def test_dyadic_multiplier(bits, shift):
    for m in (0.3, 0.0017, 1.7, 0.5, 2.0 ** -20 * 3):
        b, n = zi.dyadic_multiplier(m, bits or 31, shift)
        assert (b, n) == py_dyadic(m, bits or 31, shift)
        if shift is None:
            assert b < 2 ** (bits or 31) + 1


# ---------------------------------------------------------------- requantize
@pytest.mark.parametrize("rounding", ["float32_rne", "gemmlowp", "dyadic"])
@pytest.mark.parametrize("out_bits,relu", [(8, False), (4, True), (16, False)])
def test_requantize_per_channel(rounding, out_bits, relu):
    rng = np.random.default_rng(out_bits)
    acc = rng.integers(-(1 << 20), 1 << 20, (3, 5, 7)).astype(np.int32)
    acc[0, 0, :3] = [np.iinfo(np.int32).min, np.iinfo(np.int32).max, 0]
    m = rng.uniform(1e-5, 1e-3, 5)
    hi = (1 << out_bits) - 1
    zy = hi // 3
    lo = zy if relu else 0
    got = zi.requantize(acc, m, zy, axis=1, rounding=rounding, out_bits=out_bits, relu=relu)
    if rounding == "float32_rne":
        want = ref_requant_f32(acc, m.astype(np.float32), zy, lo, hi, axis=1)
    elif rounding == "gemmlowp":
        want = ref_requant_gemmlowp(acc, m, zy, lo, hi, axis=1)
    else:
        want = ref_requant_dyadic(acc, m, zy, lo, hi, axis=1)
    assert got.dtype == (np.uint8 if out_bits <= 8 else np.uint16)
    np.testing.assert_array_equal(got, want)


def test_requantize_float32_ties_half_even():
    acc = np.arange(-40, 41, dtype=np.int32)
    got = zi.requantize(acc, 0.5, 128)  # exact ties at odd acc
    np.testing.assert_array_equal(got, np.rint(acc / 2) + 128)
    got = zi.requantize(acc, 0.25, 128, rounding="dyadic", dyadic_rounding="half_up")
    np.testing.assert_array_equal(got, np.floor(acc / 4 + 0.5) + 128)


def test_requantize_large_multiplier_gemmlowp_left_shift():
    acc = np.arange(-300, 300, 7, dtype=np.int32)
    got = zi.requantize(acc, 3.7, 100, rounding="gemmlowp", out_bits=16)
    want = ref_requant_gemmlowp(acc[None], np.array([3.7]), 100, 0, 65535, axis=0)[0]
    np.testing.assert_array_equal(got, want)


def test_requantize_bad_args():
    with pytest.raises(TypeError, match="acc"):
        zi.requantize(np.zeros(3, np.int64), 0.1, 0)
    with pytest.raises(ValueError, match="multiplier"):
        zi.requantize(np.zeros((2, 3), np.int32), [0.1, 0.2], 0, axis=1)
    with pytest.raises(ValueError, match="multiplier"):
        zi.requantize(np.zeros(3, np.int32), -0.1, 0)
    with pytest.raises(ValueError, match="y_zero_point"):
        zi.requantize(np.zeros(3, np.int32), 0.1, 300)


# ---------------------------------------------------------------- residual add
def ref_qadd(a, sa, za, b, sb, zb, sy, zy, rounding, lo=0, hi=255, dyadic_bits=31, dyadic_rounding="half_even"):
    a = a.astype(np.int64) - za
    b = b.astype(np.int64) - zb
    sa, sb, sy = np.float32(sa), np.float32(sb), np.float32(sy)
    if rounding == "float32_rne":
        va = (sa * a.astype(np.float32)).astype(np.float32)
        vb = (sb * b.astype(np.float32)).astype(np.float32)
        f = ((va + vb).astype(np.float32) / sy).astype(np.float32)
        return np.clip(np.rint(np.clip(f, lo - zy, hi - zy)).astype(np.int64) + zy, lo, hi)
    if rounding == "gemmlowp":
        twice_max = 2.0 * max(float(sa), float(sb))
        qa, ea = py_quantize_multiplier(float(sa) / twice_max)
        qb, eb = py_quantize_multiplier(float(sb) / twice_max)
        qo, eo = py_quantize_multiplier(twice_max / ((1 << 20) * float(sy)))
        xa = np_rdbpot(np_srdhm(a << 20, qa), -ea)
        xb = np_rdbpot(np_srdhm(b << 20, qb), -eb)
        s = xa + xb
        if eo > 0:
            s = s << eo
        out = np_rdbpot(np_srdhm(s, qo), max(-eo, 0))
        return np.clip(out + zy, lo, hi)
    ma, mb = float(sa) / float(sy), float(sb) / float(sy)
    _, n = py_dyadic(max(ma, mb), dyadic_bits)
    ba, _ = py_dyadic(ma, dyadic_bits, n)
    bb, _ = py_dyadic(mb, dyadic_bits, n)
    return np.clip(np_round_shift(a * ba + b * bb, n, dyadic_rounding) + zy, lo, hi)


@pytest.mark.parametrize("rounding", ["float32_rne", "gemmlowp", "dyadic"])
@pytest.mark.parametrize("relu", [False, True])
def test_qadd_matches_numpy(rounding, relu):
    rng = np.random.default_rng(11)
    a = rng.integers(0, 256, (4, 8, 9, 9), dtype=np.uint8)
    b = rng.integers(0, 256, (4, 8, 9, 9), dtype=np.uint8)
    for sa, sb, sy in [(0.02, 0.05, 0.06), (0.1, 0.013, 0.09), (0.5, 0.5, 1.0), (0.03, 0.02, 0.011)]:
        got = zi.qadd(a, sa, 120, b, sb, 7, sy, 100, rounding=rounding, relu=relu)
        want = ref_qadd(a, sa, 120, b, sb, 7, sy, 100, rounding, lo=100 if relu else 0)
        np.testing.assert_array_equal(got, want, err_msg=str((sa, sb, sy)))


def test_qadd_constructed_ties():
    # sa = sb = 0.5, sy = 1: y = (a - za + b - zb) / 2 lands on k + 0.5 for odd sums
    a = np.arange(0, 200, dtype=np.uint8)
    b = np.full(200, 13, np.uint8)
    s = (a.astype(np.int64) - 50 + 13) / 2
    for rounding, want in [("float32_rne", np.rint(s)), ("dyadic", np.rint(s))]:
        np.testing.assert_array_equal(zi.qadd(a, 0.5, 50, b, 0.5, 0, 1.0, 60, rounding=rounding), want + 60)
    got = zi.qadd(a, 0.5, 50, b, 0.5, 0, 1.0, 60, rounding="dyadic", dyadic_rounding="half_up")
    np.testing.assert_array_equal(got, np.floor(s + 0.5) + 60)
    np.testing.assert_array_equal(zi.qadd(a, 0.5, 50, b, 0.5, 0, 1.0, 60, rounding="gemmlowp"),
                                  ref_qadd(a, 0.5, 50, b, 0.5, 0, 1.0, 60, "gemmlowp"))


def test_qadd_bad_args():
    a = np.zeros((2, 3), np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        zi.qadd(a, 0.1, 0, np.zeros((3, 2), np.uint8), 0.1, 0, 0.1, 0)
    with pytest.raises(TypeError, match="b"):
        zi.qadd(a, 0.1, 0, a.astype(np.int32), 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match="b_scale"):
        zi.qadd(a, 0.1, 0, a, float("nan"), 0, 0.1, 0)


# ---------------------------------------------------------------- pooling
def ref_pool(x, k, s, pad, fn, fill):
    t, l, b, r = pad
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (t, b), (l, r)), constant_values=fill)
    oh = (x.shape[2] + t + b - k) // s + 1
    ow = (x.shape[3] + l + r - k) // s + 1
    win = np.stack([xp[:, :, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s] for i in range(k) for j in range(k)])
    return fn(win)


@pytest.mark.parametrize("k,s,pad", [(2, 2, 0), (3, 2, 1), (3, 1, (1, 0, 1, 2))])
def test_max_pool(k, s, pad):
    x = np.random.default_rng(k).integers(0, 256, (2, 3, 9, 8), dtype=np.uint8)
    p4 = zi.simulate._padding(pad)
    want = ref_pool(x, k, s, p4, lambda w: np.nanmax(w, axis=0), np.nan)
    np.testing.assert_array_equal(zi.max_pool2d(x, k, s, pad), want)


@pytest.mark.parametrize("include_pad", [False, True])
@pytest.mark.parametrize("rounding", ["half_up", "half_even"])
def test_avg_pool(include_pad, rounding):
    x = np.random.default_rng(5).integers(0, 256, (2, 3, 9, 8), dtype=np.uint8)
    zx = 37
    for k, s, pad in [(2, 2, 0), (3, 2, 1), (3, 1, (1, 0, 1, 2))]:
        p4 = zi.simulate._padding(pad)
        fill = zx if include_pad else np.nan
        sums = ref_pool(x, k, s, p4, lambda w: np.nansum(w, axis=0), fill).astype(np.int64)
        cnt = ref_pool(np.ones_like(x), k, s, p4, lambda w: np.nansum(w, axis=0), 1 if include_pad else np.nan)
        cnt = cnt.astype(np.int64)
        if rounding == "half_up":
            want = (sums + cnt // 2) // cnt  # TFLite: (sum + count/2) / count
        else:
            q, r = sums // cnt, sums % cnt
            want = q + ((2 * r > cnt) | ((2 * r == cnt) & (q % 2 == 1)))
        got = zi.avg_pool2d(x, zx, k, s, pad, count_include_pad=include_pad, rounding=rounding)
        np.testing.assert_array_equal(got, want)


def test_avg_pool_ties():
    x = np.array([[[[1, 2], [4, 5]]]], np.uint8)  # sum 12 / 4 = 3 exactly; make ties with 2x1 windows
    x2 = np.array([[[[1, 2, 5, 6]]]], np.uint8)
    np.testing.assert_array_equal(zi.avg_pool2d(x2, 0, (1, 2), (1, 2), rounding="half_up").ravel(), [2, 6])
    np.testing.assert_array_equal(zi.avg_pool2d(x2, 0, (1, 2), (1, 2), rounding="half_even").ravel(), [2, 6])
    x3 = np.array([[[[2, 3, 4, 5]]]], np.uint8)  # 2.5 -> 3 / 2 ; 4.5 -> 5 / 4
    np.testing.assert_array_equal(zi.avg_pool2d(x3, 0, (1, 2), (1, 2), rounding="half_up").ravel(), [3, 5])
    np.testing.assert_array_equal(zi.avg_pool2d(x3, 0, (1, 2), (1, 2), rounding="half_even").ravel(), [2, 4])
    assert zi.avg_pool2d(x, 0, 2).item() == 3


@pytest.mark.parametrize("rounding", ["float32_rne", "gemmlowp", "dyadic"])
def test_global_avg_pool(rounding):
    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (3, 10, 7, 7), dtype=np.uint8)
    sx, zx, sy, zy = np.float32(0.04), 90, np.float32(0.03), 12
    acc = (x.astype(np.int64) - zx).sum(axis=(2, 3))
    hw = 49
    if rounding == "float32_rne":
        m = (np.float32(sx / sy) / np.float32(hw)).astype(np.float32)
        want = ref_requant_f32(acc, np.array([m]), zy)
    elif rounding == "gemmlowp":
        want = ref_requant_gemmlowp(acc, np.full(10, float(sx) / (float(sy) * hw)), zy)
    else:
        want = ref_requant_dyadic(acc, np.full(10, float(sx) / (float(sy) * hw)), zy)
    got = zi.global_avg_pool2d(x, sx, zx, sy, zy, rounding=rounding)
    assert got.shape == (3, 10, 1, 1)
    np.testing.assert_array_equal(got[:, :, 0, 0], want)


def test_pool_bad_args():
    with pytest.raises(TypeError, match="x"):
        zi.max_pool2d(np.zeros((1, 1, 4, 4), np.float32), 2)
    with pytest.raises(ValueError, match="padding"):
        zi.max_pool2d(np.zeros((1, 1, 4, 4), np.uint8), 2, 2, 2)
    with pytest.raises(ValueError, match="x must have 4"):
        zi.avg_pool2d(np.zeros((4, 4), np.uint8), 0, 2)
    with pytest.raises(ValueError, match="rounding"):
        zi.avg_pool2d(np.zeros((1, 1, 4, 4), np.uint8), 0, 2, rounding="up")


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    a = torch.randint(0, 256, (2, 3), dtype=torch.uint8)
    y = zi.qadd(a, 0.1, 3, a, 0.2, 4, 0.3, 5)
    assert isinstance(y, np.ndarray) and y.shape == (2, 3)
    assert math.isfinite(float(y.sum()))


# ---------------------------------------------------------------- dtype equality, not identity
def test_kernels_accept_unpickled_arrays():
    """Unpickled arrays carry an equal but not identical dtype object; the bindings compare
    dtypes by equality (an unpickled IntegerModel once failed with "dtype uint8, got uint8")."""
    import pickle

    from pyzeroq import ops

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, 2, 5, 5), dtype=np.uint8)
    w = rng.integers(0, 256, (3, 2, 3, 3), dtype=np.uint8)
    xp, wp = pickle.loads(pickle.dumps(x)), pickle.loads(pickle.dumps(w))
    assert xp.dtype is not np.dtype(np.uint8)  # the case under test
    ref, _ = zi.qlinear_conv2d(x, 0.02, 3, w, 0.01, 128, 0.5, 7, None, 1, 1)
    got, _ = zi.qlinear_conv2d(xp, 0.02, 3, wp, 0.01, 128, 0.5, 7, None, 1, 1)
    np.testing.assert_array_equal(ref, got)
    data = rng.normal(size=16).astype(np.float32)
    out = pickle.loads(pickle.dumps(np.empty(16, np.float32)))
    ops.fake_quantize(data, 0.1, 3, 8, out=out)
    np.testing.assert_array_equal(out, ops.fake_quantize(data, 0.1, 3, 8))
