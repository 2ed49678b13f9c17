"""Integer QLinearConv / QLinearMatMul simulator vs an independent numpy int64 reference.

The references here (conv accumulator, the three requantization modes, the
accumulator model) are written from the formulas, not from the C++; the other
integer test files import them.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pyzeroq.integer as zi

# every implementation this CPU runs: reference, fast (= the best path), then each fast path
IMPLS = tuple(zi.available_impls())


# ---------------------------------------------------------------- references
def ref_conv_acc(x, zx, w, zw, bias=None, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """Exact int64 accumulator [N, O, OH, OW] = bias + sum (x - zx)(w - zw), padding = zx."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    t, l, b, r = pad
    xp = np.pad(x.astype(np.int64) - int(zx), ((0, 0), (0, 0), (t, b), (l, r)))
    wz = w.astype(np.int64) - np.broadcast_to(np.asarray(zw, np.int64), (o,))[:, None, None, None]
    sh, sw = stride
    dh, dw = dilation
    oh = (h + t + b - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + l + r - dw * (kw - 1) - 1) // sw + 1
    og = o // groups
    acc = np.zeros((n, o, oh, ow), np.int64)
    for g in range(groups):
        for ki in range(kh):
            for kj in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, ki * dh: ki * dh + sh * (oh - 1) + 1: sh,
                           kj * dw: kj * dw + sw * (ow - 1) + 1: sw]
                acc[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, wz[g * og:(g + 1) * og, :, ki, kj])
    if bias is not None:
        acc += np.asarray(bias, np.int64)[None, :, None, None]
    return acc


def ref_saturating_conv_acc(x, zx, w, zw, bias, acc_bits, pad=(0, 0, 0, 0)):
    """Saturate after every addition in the documented order: bias, then ci, ki, kj.
    stride 1, dilation 1, groups 1. Returns (acc, saturated_any)."""
    lo, hi = -(1 << (acc_bits - 1)), (1 << (acc_bits - 1)) - 1
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    t, l, b, r = pad
    xp = np.pad(x.astype(np.int64) - int(zx), ((0, 0), (0, 0), (t, b), (l, r)))
    wz = w.astype(np.int64) - np.broadcast_to(np.asarray(zw, np.int64), (o,))[:, None, None, None]
    oh, ow = h + t + b - kh + 1, wd + l + r - kw + 1
    b0 = np.zeros(o, np.int64) if bias is None else np.asarray(bias, np.int64)
    acc = np.broadcast_to(b0[None, :, None, None], (n, o, oh, ow)).copy()
    sat = (acc < lo) | (acc > hi)
    acc = np.clip(acc, lo, hi)
    for ci in range(cg):
        for ki in range(kh):
            for kj in range(kw):
                prod = xp[:, ci, None, ki:ki + oh, kj:kj + ow] * wz[None, :, ci, ki, kj, None, None]
                s = acc + prod
                sat |= (s < lo) | (s > hi)
                acc = np.clip(s, lo, hi)
    return acc, sat


def f32_multiplier(sx, sw, sy):
    return (np.float32(sx) * np.asarray(sw, np.float32)).astype(np.float32) / np.float32(sy)


def f64_multiplier(sx, sw, sy):
    return np.float64(np.float32(sx)) * np.asarray(sw, np.float32).astype(np.float64) / np.float64(np.float32(sy))


def ref_requant_f32(acc, m32, zy, lo=0, hi=255, axis=1):
    m = np.asarray(m32, np.float32)
    shape = [1] * acc.ndim
    shape[axis] = -1
    v = acc.astype(np.float32) * m.reshape(shape) if m.size > 1 else acc.astype(np.float32) * m.reshape(())
    v = np.clip(v.astype(np.float32), np.float32(lo - zy), np.float32(hi - zy))
    return (np.rint(v).astype(np.int64) + zy)


def py_quantize_multiplier(m: float):
    """TFLite QuantizeMultiplier in Python ints / floats."""
    if m == 0.0:
        return 0, 0
    f, e = math.frexp(m)
    q = f * (1 << 31)
    q = int(math.floor(abs(q) + 0.5)) * (1 if q >= 0 else -1)  # std::round: half away from zero
    if q == 1 << 31:
        q //= 2
        e += 1
    if e < -31:
        return 0, 0
    if e > 30:
        return (1 << 31) - 1, 30
    return q, e


def np_srdhm(a, b):
    a = np.asarray(a, np.int64)
    ab = a * np.int64(b)
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    s = ab + nudge
    q = np.where(s >= 0, s // (1 << 31), -((-s) // (1 << 31)))  # C++ truncating division
    return np.where((a == -(1 << 31)) & (b == -(1 << 31)), (1 << 31) - 1, q)


def np_rdbpot(x, e):
    if e == 0:
        return x
    mask = (1 << e) - 1
    rem = x & mask
    thr = (mask >> 1) + (x < 0)
    return (x >> e) + (rem > thr)


def wrap32(v):
    return ((np.asarray(v, np.int64) + (1 << 31)) % (1 << 32)) - (1 << 31)


def ref_requant_gemmlowp(acc, m64, zy, lo=0, hi=255, axis=1):
    m64 = np.atleast_1d(np.asarray(m64, np.float64))
    out = np.empty(acc.shape, np.int64)
    acc = np.moveaxis(np.asarray(acc, np.int64), axis, 0)
    res = np.moveaxis(out, axis, 0)
    for c in range(acc.shape[0]):
        q, s = py_quantize_multiplier(float(m64[c if m64.size > 1 else 0]))
        left, right = max(s, 0), max(-s, 0)
        x = wrap32(acc[c] * (1 << left))
        res[c] = np_rdbpot(np_srdhm(x, q), right)
    return np.clip(out + zy, lo, hi)


def py_dyadic(m: float, bits=31, shift=None):
    if shift is None:
        _, e = math.frexp(m)
        shift = min(max(bits - e, 0), 62)
    return int(np.rint(math.ldexp(m, shift))), shift


def np_round_shift(p, n, mode):
    p = np.asarray(p, np.int64)
    if n == 0:
        return p
    q = p >> n
    rem = p - (q << n)
    half = 1 << (n - 1)
    if mode == "half_up":
        return q + (rem >= half)
    if mode == "half_away":
        return q + ((rem > half) | ((rem == half) & (p >= 0)))
    return q + ((rem > half) | ((rem == half) & (q % 2 == 1)))


def ref_requant_dyadic(acc, m64, zy, lo=0, hi=255, axis=1, bits=31, shift=None, mode="half_even"):
    m64 = np.atleast_1d(np.asarray(m64, np.float64))
    out = np.empty(acc.shape, np.int64)
    acc = np.moveaxis(np.asarray(acc, np.int64), axis, 0)
    res = np.moveaxis(out, axis, 0)
    for c in range(acc.shape[0]):
        b, n = py_dyadic(float(m64[c if m64.size > 1 else 0]), bits, shift)
        res[c] = np_round_shift(acc[c] * b, n, mode)
    return np.clip(out + zy, lo, hi)


def ref_requant(acc, sx, sw, sy, zy, rounding, lo=0, hi=255, axis=1, **dy):
    if rounding == "float32_rne":
        return ref_requant_f32(acc, f32_multiplier(sx, sw, sy), zy, lo, hi, axis)
    if rounding == "gemmlowp":
        return ref_requant_gemmlowp(acc, f64_multiplier(sx, sw, sy), zy, lo, hi, axis)
    return ref_requant_dyadic(acc, f64_multiplier(sx, sw, sy), zy, lo, hi, axis, **dy)


def bits_needed(acc):
    lo, hi = int(acc.min(initial=0)), int(acc.max(initial=0))
    b = 1
    while not (-(1 << (b - 1)) <= lo and hi <= (1 << (b - 1)) - 1):
        b += 1
    return b


def random_problem(rng, n, c, h, w, o, k, groups, wzp_zero=False):
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    wt = rng.integers(0, 256, (o, c // groups, k, k), dtype=np.uint8)
    zx = int(rng.integers(0, 256))
    zw = np.zeros(o, np.int64) if wzp_zero else rng.integers(0, 256, o)
    sw = rng.uniform(0.002, 0.02, o).astype(np.float32)
    bias = rng.integers(-20000, 20000, o).astype(np.int32)
    return x, zx, wt, zw, sw, bias


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("rounding", ["float32_rne", "gemmlowp", "dyadic"])
@pytest.mark.parametrize("cfg", [
    dict(n=2, c=8, h=9, w=9, o=6, k=3, groups=1, stride=1, pad=1, dil=1),
    dict(n=1, c=16, h=12, w=10, o=16, k=3, groups=16, stride=2, pad=(1, 0, 2, 1), dil=1),
    dict(n=2, c=6, h=11, w=11, o=20, k=3, groups=2, stride=(2, 1), pad=2, dil=2),
    dict(n=1, c=33, h=7, w=5, o=17, k=1, groups=1, stride=1, pad=0, dil=1),
    dict(n=3, c=3, h=15, w=15, o=5, k=5, groups=1, stride=3, pad=(2, 1), dil=1),
    dict(n=1, c=8, h=8, w=8, o=16, k=3, groups=8, stride=1, pad=1, dil=1),  # depthwise multiplier 2
])
def test_conv_matches_numpy(rounding, cfg):
    rng = np.random.default_rng(zlib.crc32(repr((rounding, str(cfg))).encode()))
    x, zx, w, zw, sw, bias = random_problem(rng, cfg["n"], cfg["c"], cfg["h"], cfg["w"], cfg["o"], cfg["k"], cfg["groups"])
    pad = zi.simulate._padding(cfg["pad"])
    stride, dil = zi.simulate._pair(cfg["stride"], "s"), zi.simulate._pair(cfg["dil"], "d")
    sx, sy, zy = np.float32(0.05), np.float32(0.07), 117
    acc = ref_conv_acc(x, zx, w, zw, bias, stride, pad, dil, cfg["groups"])
    want = ref_requant(acc, sx, sw, sy, zy, rounding)
    for impl in IMPLS:
        got, stats = zi.qlinear_conv2d(x, sx, zx, w, sw, zw, sy, zy, bias, stride=cfg["stride"], padding=cfg["pad"],
                                       dilation=cfg["dil"], groups=cfg["groups"], rounding=rounding, impl=impl)
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=impl)
        assert stats.max_abs_acc == np.abs(acc).max()
        assert stats.bits_needed == bits_needed(acc)
        assert stats.overflow_count == 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), groups=st.sampled_from([1, 2, 4]), k=st.integers(1, 4),
       stride=st.integers(1, 3), dil=st.integers(1, 2), pad=st.integers(0, 2), relu=st.booleans(),
       out_bits=st.sampled_from([4, 8, 12]), rounding=st.sampled_from(["float32_rne", "gemmlowp", "dyadic"]),
       dyadic_rounding=st.sampled_from(["half_even", "half_up", "half_away"]))
def test_conv_property(seed, groups, k, stride, dil, pad, relu, out_bits, rounding, dyadic_rounding):
    rng = np.random.default_rng(seed)
    c, o = groups * int(rng.integers(1, 5)), groups * int(rng.integers(1, 7))
    h, w = int(rng.integers(k * dil, 12)), int(rng.integers(k * dil, 12))
    x, zx, wt, zw, sw, bias = random_problem(rng, int(rng.integers(1, 3)), c, h, w, o, k, groups)
    hi = (1 << out_bits) - 1
    zy = int(rng.integers(0, hi + 1))
    sx, sy = np.float32(rng.uniform(0.01, 0.1)), np.float32(rng.uniform(0.01, 0.5))
    acc = ref_conv_acc(x, zx, wt, zw, bias, (stride, stride), (pad,) * 4, (dil, dil), groups)
    want = ref_requant(acc, sx, sw, sy, zy, rounding, lo=zy if relu else 0, hi=hi, **(
        dict(mode=dyadic_rounding, bits=24) if rounding == "dyadic" else {}))
    kw = dict(dyadic_rounding=dyadic_rounding, dyadic_bits=24) if rounding == "dyadic" else {}
    for impl in IMPLS:
        got, _ = zi.qlinear_conv2d(x, sx, zx, wt, sw, zw, sy, zy, bias, stride, pad, dil, groups, rounding=rounding,
                                   out_bits=out_bits, relu=relu, impl=impl, **kw)
        assert got.dtype == (np.uint8 if out_bits <= 8 else np.uint16)
        np.testing.assert_array_equal(got, want, err_msg=impl)


def test_constructed_ties_distinguish_modes():
    # M = 0.25 * 2 / 1 = 0.5 exactly; odd accumulators land on k + 0.5
    x = np.arange(0, 64, dtype=np.uint8).reshape(1, 1, 8, 8)
    w = np.full((1, 1, 1, 1), 1, np.uint8)
    acc = np.arange(0, 64) - 20  # zx = 20, zw = 0
    kw = dict(x_scale=0.25, x_zero_point=20, w=w, w_scale=2.0, w_zero_point=0, y_scale=1.0, y_zero_point=100)
    rne, _ = zi.qlinear_conv2d(x, **kw, rounding="float32_rne")
    glp, _ = zi.qlinear_conv2d(x, **kw, rounding="gemmlowp")
    dup, _ = zi.qlinear_conv2d(x, **kw, rounding="dyadic", dyadic_rounding="half_up")
    daw, _ = zi.qlinear_conv2d(x, **kw, rounding="dyadic", dyadic_rounding="half_away")
    dev, _ = zi.qlinear_conv2d(x, **kw, rounding="dyadic", dyadic_rounding="half_even")
    half = acc / 2
    np.testing.assert_array_equal(rne.ravel(), np.rint(half) + 100)
    np.testing.assert_array_equal(dev.ravel(), np.rint(half) + 100)
    away = np.sign(half) * np.floor(np.abs(half) + 0.5)
    np.testing.assert_array_equal(daw.ravel(), away + 100)
    np.testing.assert_array_equal(dup.ravel(), np.floor(half + 0.5) + 100)
    # gemmlowp at M = 0.5 (q31 = 2^30, shift 0): the tie is decided by SRDHM's
    # nudge + truncating division, i.e. toward +inf (-9.5 -> -9, 9.5 -> 10)
    np.testing.assert_array_equal(glp.ravel(), np.floor(half + 0.5) + 100)
    assert (rne != glp).sum() > 10 and (daw != dup).sum() > 5
    # M = 0.25 (shift -1): SRDHM is exact for even acc, RoundingDivideByPOT rounds
    # the tie acc/4 = k + 0.5 away from zero
    glp4, _ = zi.qlinear_conv2d(x, **{**kw, "x_scale": 0.125}, rounding="gemmlowp")
    even = acc % 2 == 0
    quarter = acc / 4
    np.testing.assert_array_equal(glp4.ravel()[even], (np.sign(quarter) * np.floor(np.abs(quarter) + 0.5) + 100)[even])
    assert ((acc % 4 == 2) & (acc < 0)).sum() > 3


@pytest.mark.parametrize("acc_bits", [12, 16, 20])
def test_accumulator_wrap_and_error(acc_bits):
    rng = np.random.default_rng(acc_bits)
    x, zx, w, zw, sw, bias = random_problem(rng, 2, 16, 6, 6, 8, 3, 1)
    acc = ref_conv_acc(x, zx, w, zw, bias, pad=(1, 1, 1, 1))
    m = 1 << acc_bits
    wrapped = ((acc + m // 2) % m) - m // 2
    want = ref_requant(wrapped, 0.05, sw, 0.3, 128, "float32_rne")
    n_over = int(((acc < -m // 2) | (acc >= m // 2)).sum())
    assert n_over > 0
    for impl in IMPLS:
        got, stats = zi.qlinear_conv2d(x, 0.05, zx, w, sw, zw, 0.3, 128, bias, padding=1, acc_bits=acc_bits, impl=impl)
        np.testing.assert_array_equal(got, want)
        assert stats.overflow_count == n_over and stats.bits_needed == bits_needed(acc)
        with pytest.raises(ValueError, match=f"bits needed: {bits_needed(acc)}"):
            zi.qlinear_conv2d(x, 0.05, zx, w, sw, zw, 0.3, 128, bias, padding=1, acc_bits=acc_bits,
                              overflow="error", impl=impl)


@pytest.mark.parametrize("acc_bits", [14, 17, 32])
def test_accumulator_saturate_order(acc_bits):
    rng = np.random.default_rng(acc_bits + 100)
    x, zx, w, zw, sw, bias = random_problem(rng, 2, 8, 7, 7, 5, 3, 1)
    bias = (bias * 3).astype(np.int32)
    acc, sat = ref_saturating_conv_acc(x, zx, w, zw, bias, acc_bits, pad=(1, 1, 1, 1))
    want = ref_requant(acc, 0.05, sw, 0.3, 128, "gemmlowp")
    for impl in IMPLS:
        got, stats = zi.qlinear_conv2d(x, 0.05, zx, w, sw, zw, 0.3, 128, bias, padding=1, acc_bits=acc_bits,
                                       overflow="saturate", rounding="gemmlowp", impl=impl)
        np.testing.assert_array_equal(got, want)
        assert stats.overflow_count == int(sat.sum())
    if acc_bits < 32:
        assert sat.sum() > 0


def test_fast_paths_on_larger_shapes():
    rng = np.random.default_rng(7)
    for (c, o, hw, k, s, g) in [(64, 64, 7, 3, 1, 1), (96, 96, 14, 3, 2, 96), (32, 96, 14, 1, 1, 1), (3, 16, 28, 3, 1, 1)]:
        x, zx, w, zw, sw, bias = random_problem(rng, 2, c, hw, hw, o, k, g)
        ref, sr = zi.qlinear_conv2d(x, 0.02, zx, w, sw, zw, 0.9, 128, bias, s, k // 2, 1, g, impl="reference")
        for impl in IMPLS[1:]:
            got, sf = zi.qlinear_conv2d(x, 0.02, zx, w, sw, zw, 0.9, 128, bias, s, k // 2, 1, g, impl=impl)
            np.testing.assert_array_equal(got, ref)
            assert sf == sr


def test_large_reduction_exact():
    # K = 4096 * 9 pairs exceeds one int32 lane budget -> per-output path; extremes everywhere
    x = np.full((1, 4096, 3, 3), 255, np.uint8)
    w = np.full((2, 4096, 3, 3), 0, np.uint8)
    got, stats = zi.qlinear_conv2d(x, 1.0, 0, w, 1.0, 255, 1e9, 0, acc_bits=32, overflow="wrap")
    exact = -4096 * 9 * 255 * 255
    assert stats.max_abs_acc == -exact and stats.overflow_count == 2
    assert stats.bits_needed == bits_needed(np.array([exact]))


@pytest.mark.parametrize("rounding", ["float32_rne", "gemmlowp", "dyadic"])
def test_matmul_matches_numpy(rounding):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (2, 5, 37), dtype=np.uint8)
    b = rng.integers(0, 256, (37, 11), dtype=np.uint8)
    za, zb = 77, rng.integers(0, 256, 11)
    sb = rng.uniform(0.001, 0.01, 11).astype(np.float32)
    bias = rng.integers(-5000, 5000, 11).astype(np.int32)
    acc = (a.astype(np.int64) - za) @ (b.astype(np.int64) - zb[None, :]) + bias
    want = ref_requant(acc, 0.03, sb, 0.2, 90, rounding, axis=-1)
    for impl in IMPLS:
        got, stats = zi.qlinear_matmul(a, 0.03, za, b, sb, zb, 0.2, 90, bias, rounding=rounding, impl=impl)
        np.testing.assert_array_equal(got, want)
        assert stats.max_abs_acc == np.abs(acc).max()


def test_bad_arguments_name_the_argument():
    x = np.zeros((1, 4, 5, 5), np.uint8)
    w = np.zeros((2, 4, 3, 3), np.uint8)
    ok = dict(x_scale=0.1, x_zero_point=0, w_scale=0.1, w_zero_point=0, y_scale=0.1, y_zero_point=0)
    with pytest.raises(TypeError, match="x"):
        zi.qlinear_conv2d(x.astype(np.float32), w=w, **ok)
    with pytest.raises(TypeError, match="w"):
        zi.qlinear_conv2d(x, w=w.astype(np.int16), **ok)  # int8 is accepted (signed codes)
    with pytest.raises(ValueError, match="w must have shape"):
        zi.qlinear_conv2d(x, w=np.zeros((2, 3, 3, 3), np.uint8), **ok)
    with pytest.raises(ValueError, match="x_zero_point"):
        zi.qlinear_conv2d(x, w=w, **{**ok, "x_zero_point": 256})
    with pytest.raises(ValueError, match="w_zero_point"):
        zi.qlinear_conv2d(x, w=w, **{**ok, "w_zero_point": [0, 1, 2]})
    with pytest.raises(ValueError, match="y_zero_point"):
        zi.qlinear_conv2d(x, w=w, **{**ok, "y_zero_point": 16}, out_bits=4)
    with pytest.raises(ValueError, match="w_scale"):
        zi.qlinear_conv2d(x, w=w, **{**ok, "w_scale": [0.1, -0.1]})
    with pytest.raises(ValueError, match="x_scale"):
        zi.qlinear_conv2d(x, w=w, **{**ok, "x_scale": 0.0})
    with pytest.raises(ValueError, match="bias"):
        zi.qlinear_conv2d(x, w=w, **ok, bias=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="rounding"):
        zi.qlinear_conv2d(x, w=w, **ok, rounding="nearest")
    with pytest.raises(ValueError, match="overflow"):
        zi.qlinear_conv2d(x, w=w, **ok, overflow="clip")
    with pytest.raises(ValueError, match="groups"):
        zi.qlinear_conv2d(x, w=w, **ok, groups=3)
    with pytest.raises(ValueError, match="padding"):
        zi.qlinear_conv2d(x, w=w, **ok, padding=(1, 2, 3))
    with pytest.raises(ValueError, match="larger than the padded input"):
        zi.qlinear_conv2d(x[:, :, :2, :2], w=w, **ok)
    with pytest.raises(ValueError, match="b must have shape"):
        zi.qlinear_matmul(np.zeros((3, 4), np.uint8), 0.1, 0, np.zeros((5, 2), np.uint8), 0.1, 0, 0.1, 0)


# ---------------------------------------------------------------- empty batches
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kernel,groups,signed", [(3, 1, False), (1, 1, False), (3, 1, True), (3, 2, False), (3, 4, False)])
def test_empty_batch(impl, kernel, groups, signed):
    """N = 0 gives an empty [0, O, OH, OW] on every path (the VNNI planner once divided by zero: SIGFPE)."""
    dt = np.int8 if signed else np.uint8
    x = np.zeros((0, 4, 6, 6), dt)
    w = np.zeros((4, 4 // groups, kernel, kernel), dt)
    cache = zi.WeightCache()
    for kwargs in ({}, {"weight_cache": cache}):
        y, _ = zi.qlinear_conv2d(x, 0.1, 0, w, 0.01, 0, 0.5, 0, groups=groups, impl=impl, **kwargs)
        assert y.shape == (0, 4, 7 - kernel, 7 - kernel)
        acc, _ = zi.conv_integer(x, 0, w, 0, groups=groups, impl=impl, **kwargs)
        assert acc.shape == (0, 4, 7 - kernel, 7 - kernel) and acc.dtype == np.int32


def test_geometry_and_scale_arguments_are_checked():
    """stride / padding of the wrong type and degenerate scales: errors naming them."""
    x, w = np.zeros((1, 4, 6, 6), np.uint8), np.zeros((2, 4, 3, 3), np.uint8)
    for kwargs, name in ((dict(stride=1.5), "stride"), (dict(stride=True), "stride"), (dict(padding="same"), "padding"),
                         (dict(padding=1.0), "padding"), (dict(dilation=[1, 1.0]), "dilation")):
        with pytest.raises(TypeError, match=name):
            zi.qlinear_conv2d(x, 0.1, 3, w, 0.01, 128, 0.5, 10, **kwargs)
    y, _ = zi.qlinear_conv2d(x, 0.1, 3, w, 0.01, 128, 0.5, 10, stride=np.array([1, 1]), padding=(1, 1))
    assert y.shape == (1, 2, 6, 6)
    for args, name in (((0.0, [0.2], 0.05), "x_scale"), ((0.1, [0.2, -0.3], 0.05), "w_scale"),
                       ((0.1, [0.2], float("nan")), "y_scale")):
        with pytest.raises(ValueError, match=name):
            zi.requant_multiplier(*args)
