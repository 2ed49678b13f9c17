"""int8 codes in the integer simulator (pyzeroq.integer) vs independent numpy references.

Inputs in every combination (S8S8, U8S8, S8U8, U8U8), signed outputs by ``y_signed`` or by an
int8 ``y_zero_point``, every implementation path (``impl``), every requantization mode. The
runtime comparisons (onnxruntime, torch fbgemm, TFLite's reference int8 conv) are in
tests/test_integer_signed_runtimes.py.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_integer_conv import IMPLS, f32_multiplier, ref_conv_acc, ref_requant, ref_requant_f32

import pyzeroq.integer as zi

ROUNDINGS = ("float32_rne", "gemmlowp", "dyadic")
COMBOS = [(np.int8, np.int8), (np.uint8, np.int8), (np.int8, np.uint8), (np.uint8, np.uint8)]
COMBO_IDS = ["s8s8", "u8s8", "s8u8", "u8u8"]
S8_MIN, S8_MAX = -128, 127


def codes(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(int(info.min), int(info.max) + 1, shape).astype(dtype)


def zero_point(rng, dtype, size=None):
    info = np.iinfo(dtype)
    return rng.integers(int(info.min), int(info.max) + 1, size)


def out_range(out_bits, signed):
    return (-(1 << (out_bits - 1)), (1 << (out_bits - 1)) - 1) if signed else (0, (1 << out_bits) - 1)


def assert_codes(got, want, dtype):
    assert got.dtype == dtype, (got.dtype, dtype)
    np.testing.assert_array_equal(got.astype(np.int64), want)


# ---------------------------------------------------------------- conv / matmul
@pytest.mark.parametrize("xt,wt", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("cfg", [
    dict(c=8, o=6, k=3, groups=1, stride=(1, 1), pad=(1, 1, 1, 1)),
    dict(c=12, o=12, k=3, groups=12, stride=(2, 2), pad=(1, 0, 2, 1)),  # depthwise
    dict(c=33, o=17, k=1, groups=1, stride=(1, 1), pad=(0, 0, 0, 0)),
])
def test_qlinear_conv2d_signed_vs_numpy(xt, wt, rounding, cfg):
    rng = np.random.default_rng(zlib.crc32(repr((str(xt), str(wt), rounding, str(cfg))).encode()))
    x = codes(rng, xt, (2, cfg["c"], 9, 8))
    w = codes(rng, wt, (cfg["o"], cfg["c"] // cfg["groups"], cfg["k"], cfg["k"]))
    zx, zw, zy = zero_point(rng, xt), zero_point(rng, wt, cfg["o"]), int(rng.integers(-20, 20))
    sw = rng.uniform(0.002, 0.02, cfg["o"]).astype(np.float32)
    bias = rng.integers(-20000, 20000, cfg["o"]).astype(np.int32)
    acc = ref_conv_acc(x, zx, w, zw, bias, cfg["stride"], cfg["pad"], groups=cfg["groups"])
    want = ref_requant(acc, 0.05, sw, 0.4, zy, rounding, S8_MIN, S8_MAX)
    for impl in IMPLS:
        got, stats = zi.qlinear_conv2d(x, 0.05, zx, w, sw, zw, 0.4, np.int8(zy), bias, cfg["stride"], cfg["pad"],
                                       groups=cfg["groups"], rounding=rounding, impl=impl)
        assert_codes(got, want, np.int8)
        assert stats.max_abs_acc == np.abs(acc).max()
        conv_acc, _ = zi.conv_integer(x, zx, w, zw, bias, cfg["stride"], cfg["pad"], groups=cfg["groups"], impl=impl)
        assert_codes(conv_acc, acc, np.int32)


@pytest.mark.parametrize("at,bt", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_qlinear_matmul_signed_vs_numpy(at, bt, rounding):
    rng = np.random.default_rng(zlib.crc32(repr((str(at), str(bt), rounding)).encode()))
    a, b = codes(rng, at, (2, 5, 37)), codes(rng, bt, (37, 11))
    za, zb = zero_point(rng, at), zero_point(rng, bt, 11)
    sb = rng.uniform(0.001, 0.01, 11).astype(np.float32)
    bias = rng.integers(-5000, 5000, 11).astype(np.int32)
    acc = (a.astype(np.int64) - za) @ (b.astype(np.int64) - zb[None, :]) + bias
    want = ref_requant(acc, 0.03, sb, 0.2, -9, rounding, S8_MIN, S8_MAX, axis=-1)
    for impl in IMPLS:
        got, _ = zi.qlinear_matmul(a, 0.03, za, b, sb, zb, 0.2, np.int8(-9), bias, rounding=rounding, impl=impl)
        assert_codes(got, want, np.int8)
        got_acc, _ = zi.matmul_integer(a, za, b, zb, bias, impl=impl)
        assert_codes(got_acc, acc, np.int32)


def test_signed_conv_pads_with_the_zero_point():
    """Padding holds x's zero point: a constant image at the zero point gives bias-only accumulators."""
    x = np.full((1, 2, 4, 4), -7, np.int8)
    w = np.full((3, 2, 3, 3), 100, np.int8)
    for impl in IMPLS:
        acc, _ = zi.conv_integer(x, -7, w, -3, np.int32([5, 6, 7]), padding=2, impl=impl)
        assert acc.shape == (1, 3, 6, 6) and (acc == np.int32([5, 6, 7])[None, :, None, None]).all()


@pytest.mark.parametrize("out_bits,signed", [(4, True), (12, True), (16, True), (2, True), (16, False)])
@pytest.mark.parametrize("relu", [False, True])
def test_output_bits_and_relu(out_bits, signed, relu):
    rng = np.random.default_rng(out_bits + relu)
    x, w = codes(rng, np.int8, (1, 4, 6, 6)), codes(rng, np.int8, (5, 4, 3, 3))
    lo, hi = out_range(out_bits, signed)
    zy = (lo + hi) // 2 - 1
    sy = np.float32(0.01 * 2.0 ** -(out_bits - 8))  # outputs spread over the whole range
    acc = ref_conv_acc(x, 3, w, 0, None, pad=(1, 1, 1, 1))
    want = ref_requant_f32(acc, f32_multiplier(0.02, np.float32(0.01), sy), zy, zy if relu else lo, hi)
    dtype = (np.int8 if out_bits <= 8 else np.int16) if signed else (np.uint8 if out_bits <= 8 else np.uint16)
    for impl in IMPLS:
        got, _ = zi.qlinear_conv2d(x, 0.02, 3, w, 0.01, 0, sy, zy, padding=1, out_bits=out_bits, relu=relu,
                                   impl=impl, y_signed=signed)
        assert_codes(got, want, dtype)
    assert want.min() == (zy if relu else lo) and want.max() == hi  # both clamp edges reached


def test_output_type_rule():
    """ONNX rule: y_zero_point's dtype decides (int8 / int16 numpy or torch -> signed) unless
    y_signed says otherwise."""
    torch = pytest.importorskip("torch")
    a, b = np.full((1, 2), 10, np.int8), np.ones((2, 1), np.int8)
    mm = lambda zy, **kw: zi.qlinear_matmul(a, 1.0, 0, b, 1.0, 0, 1.0, zy, **kw)[0]  # noqa: E731
    assert mm(np.int8(-5)).dtype == np.int8 and int(mm(np.int8(-5))[0, 0]) == 15
    assert mm(np.array([-5], np.int8)).dtype == np.int8
    assert mm(torch.tensor(-5, dtype=torch.int8)).dtype == np.int8
    assert mm(np.int16(-5), out_bits=12).dtype == np.int16
    assert mm(5).dtype == np.uint8 and mm(np.int32(5)).dtype == np.uint8 and mm(np.uint8(5)).dtype == np.uint8
    assert mm(5, y_signed=True).dtype == np.int8 and int(mm(-100, y_signed=True)[0, 0]) == -80
    assert mm(np.int8(5), y_signed=False).dtype == np.uint8


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("axis", [None, 1])
def test_requantize_signed(rounding, axis):
    rng = np.random.default_rng(7)
    acc = rng.integers(-50000, 50000, (3, 4, 5)).astype(np.int32)
    m = np.float32(0.0021) if axis is None else rng.uniform(0.001, 0.003, 4).astype(np.float32)
    want = ref_requant(acc, 1.0, m, 1.0, -3, rounding, S8_MIN, S8_MAX, axis=axis or 0)
    got = zi.requantize(acc, m if rounding == "float32_rne" else np.float64(1.0) * m, np.int8(-3), axis,
                        rounding=rounding)
    assert_codes(got, want, np.int8)


# ---------------------------------------------------------------- elementwise
def ref_elementwise(op, a, sa, za, b, sb, zb, sy, zy, lo, hi):
    """float32_rne qadd / qmul: clamp(rne(f32(f32(va op vb) / sy)) + zy), va = f32(sa * (a - za))."""
    va = np.float32(sa) * (a.astype(np.int64) - za).astype(np.float32)
    vb = np.float32(sb) * (b.astype(np.int64) - zb).astype(np.float32)
    v = (va + vb if op == "add" else va * vb).astype(np.float32) / np.float32(sy)
    return np.clip(np.rint(v.astype(np.float32)).astype(np.int64) + zy, lo, hi)


@pytest.mark.parametrize("at,bt", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("op", ["add", "mul"])
def test_qadd_qmul_signed(at, bt, op):
    rng = np.random.default_rng(zlib.crc32(repr((str(at), str(bt), op)).encode()))
    a, b = codes(rng, at, (4, 50)), codes(rng, bt, (4, 50))
    za, zb = int(zero_point(rng, at)), int(zero_point(rng, bt))
    sy = 0.05 if op == "add" else 0.5
    fn = zi.qadd if op == "add" else zi.qmul
    want = ref_elementwise(op, a, 0.02, za, b, 0.03, zb, sy, 4, S8_MIN, S8_MAX)
    assert_codes(fn(a, 0.02, za, b, 0.03, zb, sy, np.int8(4)), want, np.int8)
    (ua, uza), (ub, uzb) = unsigned_operands(a, za), unsigned_operands(b, zb)
    for rounding in ("gemmlowp", "dyadic"):  # the signed result is the unsigned one, shifted exactly
        ref_u = fn(ua, 0.02, uza, ub, 0.03, uzb, sy, 4 + 128, rounding=rounding).astype(np.int64) - 128
        assert_codes(fn(a, 0.02, za, b, 0.03, zb, sy, np.int8(4), rounding=rounding), ref_u, np.int8)


def unsigned_operands(codes_, zp):
    """uint8 codes and zero point carrying the same differences (int8 + 128; uint8 unchanged)."""
    if codes_.dtype == np.uint8:
        return codes_, zp
    return (codes_.astype(np.int16) + 128).astype(np.uint8), zp + 128


# ---------------------------------------------------------------- pooling
def ref_pool(x, k, s, pad, reduce, zp=0, count_include_pad=False, rounding="half_up"):
    """max / integer average of codes over each window [N, C, OH, OW] (int64); pad = (t, l, b, r)."""
    n, c, h, w = x.shape
    t, l, b, r = pad
    oh, ow = (h + t + b - k) // s + 1, (w + l + r - k) // s + 1
    out = np.zeros((n, c, oh, ow), np.int64)
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * s - t, j * s - l
            win = x[:, :, max(h0, 0):min(h0 + k, h), max(w0, 0):min(w0 + k, w)].astype(np.int64)
            if reduce == "max":
                out[:, :, i, j] = win.max((2, 3))
                continue
            total, count = win.sum((2, 3)), win.shape[2] * win.shape[3]
            if count_include_pad:
                total, count = total + (k * k - count) * zp, k * k
            q, rem = np.divmod(total, count)  # floor division: total / count = q + rem / count
            if rounding == "half_even":
                out[:, :, i, j] = q + ((2 * rem > count) | ((2 * rem == count) & (q % 2 == 1)))
            else:
                out[:, :, i, j] = q + (2 * rem >= count)
    return out


@pytest.mark.parametrize("rounding", ["half_up", "half_even"])
@pytest.mark.parametrize("count_include_pad", [False, True])
def test_pools_signed(rounding, count_include_pad):
    rng = np.random.default_rng(11 + count_include_pad)
    x = codes(rng, np.int8, (2, 3, 9, 8))
    pad = (1, 1, 1, 1)
    got = zi.avg_pool2d(x, -5, 2, 2, pad, count_include_pad, rounding)
    assert_codes(got, ref_pool(x, 2, 2, pad, "avg", -5, count_include_pad, rounding), np.int8)
    assert_codes(zi.max_pool2d(x, 3, 2, pad), ref_pool(x, 3, 2, pad, "max"), np.int8)


def test_avg_pool_ties_both_rules_and_tflite_int8_difference():
    """Constructed window sums at every tie s / 4 = k + 1/2 (negative and positive). half_up is
    floor(s/4 + 1/2), half_even picks the even neighbour; TFLite's int8 AveragePool rounds
    half away from zero on the signed sum, i.e. differs from half_up on negative ties only."""
    sums = np.arange(-256, 255, 4) + 2  # s = 4k + 2 in [-254, 254]: all ties, each the sum of two int8
    x = np.zeros((1, 1, 2, 2 * sums.size), np.int8)  # 2x2 windows: row 0 holds (a, b), row 1 zeros
    x[0, 0, 0, 0::2] = sums // 2
    x[0, 0, 0, 1::2] = sums - sums // 2
    s = x.astype(np.int64).reshape(1, 1, 2, -1, 2).sum((2, 4)).reshape(-1)
    assert (s % 4 == 2).all() and (s < 0).sum() > 50 and (s > 0).sum() > 50
    up = zi.avg_pool2d(x, 0, 2).reshape(-1).astype(np.int64)
    even = zi.avg_pool2d(x, 0, 2, rounding="half_even").reshape(-1).astype(np.int64)
    np.testing.assert_array_equal(up, np.floor_divide(s + 2, 4))
    np.testing.assert_array_equal(even, np.round(s / 4).astype(np.int64))  # numpy rounds half to even
    tflite = np.where(s > 0, (s + 2) // 4, -((-s + 2) // 4))  # (acc -+ count/2) / count, C truncation
    np.testing.assert_array_equal(up != tflite, s < 0)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_global_avg_pool_signed(rounding):
    rng = np.random.default_rng(5)
    x = codes(rng, np.int8, (2, 6, 5, 7))
    acc = (x.astype(np.int64) - (-11)).sum((2, 3)).reshape(2, 6, 1, 1)
    if rounding == "float32_rne":
        m = (np.float32(np.float32(0.1) / np.float32(0.07)) / np.float32(35)).astype(np.float32)
        want = ref_requant_f32(acc, m, 3, S8_MIN, S8_MAX)
    else:  # the unsigned result on shifted codes, shifted back
        want = zi.global_avg_pool2d((x.astype(np.int16) + 128).astype(np.uint8), 0.1, 117, 0.07, 131,
                                    rounding).astype(np.int64) - 128
    assert_codes(zi.global_avg_pool2d(x, 0.1, -11, 0.07, np.int8(3), rounding), want, np.int8)


# ---------------------------------------------------------------- errors
def test_signed_argument_errors():
    x, w = np.zeros((1, 2, 3, 3), np.int8), np.zeros((2, 2, 1, 1), np.int8)
    ok = dict(x_scale=0.1, x_zero_point=0, w_scale=0.1, w_zero_point=0, y_scale=0.1, y_zero_point=np.int8(0))
    with pytest.raises(ValueError, match=r"x_zero_point must lie in \[-128, 127\] for int8 x"):
        zi.qlinear_conv2d(x, w=w, **{**ok, "x_zero_point": 128})
    with pytest.raises(ValueError, match=r"w_zero_point must lie in \[-128, 127\]"):
        zi.qlinear_conv2d(x, w=w, **{**ok, "w_zero_point": [0, -129]})
    with pytest.raises(ValueError, match=r"y_zero_point must lie in \[-8, 7\] for signed 4-bit output"):
        zi.qlinear_conv2d(x, w=w, **{**ok, "y_zero_point": np.int8(8)}, out_bits=4)
    with pytest.raises(TypeError, match="x must have dtype uint8 or int8, got int16"):
        zi.qlinear_conv2d(x.astype(np.int16), w=w, **ok)
    with pytest.raises(TypeError, match="x_zero_point must be an integer"):
        zi.qlinear_conv2d(x, w=w, **{**ok, "x_zero_point": 0.5})
    with pytest.raises(TypeError, match="y_signed must be a bool or None"):
        zi.qlinear_conv2d(x, w=w, **ok, y_signed="yes")
    with pytest.raises(TypeError, match="y_zero_point must be an integer array or scalar, got dtype float32"):
        zi.requantize(np.zeros(3, np.int32), 0.1, np.float32(3))
    with pytest.raises(ValueError, match="out_bits must lie in"):
        zi.requantize(np.zeros(3, np.int32), 0.1, 0, out_bits=17, y_signed=True)
    with pytest.raises(ValueError, match=r"x_zero_point must lie in \[-128, 127\]"):
        zi.avg_pool2d(x, 200, 2)


# ---------------------------------------------------------------- property
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), combo=st.sampled_from(COMBOS), m=st.integers(1, 9), k=st.integers(1, 70),
       n=st.integers(1, 12), rounding=st.sampled_from(ROUNDINGS), out_bits=st.sampled_from([4, 8, 10]),
       relu=st.booleans(), y_signed=st.booleans())
def test_property_matmul_any_signedness(seed, combo, m, k, n, rounding, out_bits, relu, y_signed):
    rng = np.random.default_rng(seed)
    at, bt = combo
    a, b = codes(rng, at, (m, k)), codes(rng, bt, (k, n))
    za, zb = int(zero_point(rng, at)), zero_point(rng, bt, n)
    lo, hi = out_range(out_bits, y_signed)
    zy = int(rng.integers(lo, hi + 1))
    sb = rng.uniform(0.001, 0.02, n).astype(np.float32)
    sy = np.float32(rng.uniform(0.05, 2.0) * 2.0 ** -(out_bits - 8))
    acc = (a.astype(np.int64) - za) @ (b.astype(np.int64) - zb[None, :])
    want = ref_requant(acc, 0.01, sb, sy, zy, rounding, zy if relu else lo, hi, axis=-1)
    for impl in IMPLS:
        got, _ = zi.qlinear_matmul(a, 0.01, za, b, sb, zb, sy, zy, rounding=rounding, out_bits=out_bits, relu=relu,
                                   impl=impl, y_signed=y_signed)
        np.testing.assert_array_equal(got.astype(np.int64), want)
        assert (got.dtype.kind == "i") == y_signed
