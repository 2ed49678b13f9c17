"""Signed integer simulator paths vs real runtimes, 0 mismatching codes, tie cases constructed:

* onnxruntime QLinearConv / QLinearMatMul (S8S8, U8S8: the combinations it implements; S8U8 is
  checked against numpy in test_integer_signed.py), MatMulInteger / ConvInteger (all four), and
  com.microsoft QLinearAveragePool on int8 (exact scales: its float average then equals
  ``rounding="half_even"``).
* torch fbgemm / x86: quint8 activations with symmetric per-channel qint8 weights (U8S8).
* TFLite's reference int8 conv (reference_integer_ops::ConvPerChannel), written here in numpy:
  ``rounding="gemmlowp"``, int8 in / out, symmetric narrow-range int8 weights with zero point 0.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from test_integer_conv import IMPLS, f32_multiplier, np_rdbpot, np_srdhm, py_quantize_multiplier, ref_conv_acc, wrap32

import pyzeroq.integer as zi
from pyzeroq import ops

on = pytest.importorskip("ort_nodes")

CONV_CASES = [
    # name, (n, c, h, w), o, k, strides, pads (t, l, b, r), dilations, group
    ("plain3x3", (2, 16, 10, 10), 16, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ("strided_asym_pad", (1, 8, 11, 9), 12, 3, (2, 1), (2, 0, 1, 3), (1, 1), 1),
    ("dilated", (1, 6, 12, 12), 8, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1),
    ("depthwise", (2, 24, 9, 9), 24, 3, (1, 1), (1, 1, 1, 1), (1, 1), 24),
    ("grouped", (1, 12, 8, 8), 12, 3, (1, 1), (0, 0, 0, 0), (1, 1), 3),
    ("pointwise", (2, 40, 7, 7), 24, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),
]
ORT_COMBOS = [(np.int8, np.int8), (np.uint8, np.int8)]  # QLinear*: onnxruntime has no S8U8 kernel


def codes(rng, dtype, shape, lo=None, hi=None):
    info = np.iinfo(dtype)
    return rng.integers(info.min if lo is None else lo, (info.max if hi is None else hi) + 1, shape).astype(dtype)


def zp_of(rng, dtype, size=None):
    info = np.iinfo(dtype)
    return rng.integers(int(info.min) // 2, int(info.max) // 2, size).astype(dtype)


def mismatches(got, want) -> int:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    return int((got != want).sum())


# ---------------------------------------------------------------- onnxruntime QLinearConv / QLinearMatMul
@pytest.mark.parametrize("xt,wt", ORT_COMBOS, ids=["s8s8", "u8s8"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("with_bias", [False, True])
def test_qlinear_conv_vs_onnxruntime(xt, wt, case, with_bias):
    _, xs, o, k, strides, pads, dil, group = case
    rng = np.random.default_rng(zlib.crc32(repr((case[0], str(xt), with_bias)).encode()))
    x, w = codes(rng, xt, xs), codes(rng, wt, (o, xs[1] // group, k, k))
    zx, zw, zy = zp_of(rng, xt), zp_of(rng, wt, o), zp_of(rng, xt)
    sw = rng.uniform(0.001, 0.01, o).astype(np.float32)
    sx, sy = np.float32(0.02), np.float32(rng.uniform(0.05, 0.5))
    bias = rng.integers(-30000, 30000, o).astype(np.int32) if with_bias else None
    want = on.qlinear_conv(x, sx, zx, w, sw, zw, sy, zy, bias, strides, pads, dil, group)
    assert want.dtype == xt and len(np.unique(want)) > 40  # spread over the code range
    for impl in IMPLS:
        got, _ = zi.qlinear_conv2d(x, sx, zx, w, sw, zw, sy, zy, bias, strides, pads, dil, group, impl=impl)
        assert mismatches(got, want) == 0, impl


@pytest.mark.parametrize("xt", [np.int8, np.uint8], ids=["s8s8", "u8s8"])
@pytest.mark.parametrize("depthwise", [False, True])
def test_qlinear_conv_ties_vs_onnxruntime(xt, depthwise):
    """Power-of-two scales: M = f32(sx*sw)/sy in {2^-7, 2^-8, 2^-9} (2^-1.. for depthwise) and
    accumulators multiples of 64 (of 1): many acc*M are exactly k + 1/2, negative ones too."""
    rng = np.random.default_rng(42 + depthwise)
    c = o = 16
    g = c if depthwise else 1
    zx = xt(0 if xt == np.int8 else 128)
    if depthwise:
        x = codes(rng, xt, (2, c, 9, 9))
        w = codes(rng, np.int8, (o, 1, 3, 3), -28, 27)
    else:
        x = (int(zx) + 8 * rng.integers(-15, 16, (2, c, 9, 9))).astype(xt)
        w = (8 * rng.integers(-3, 4, (o, c, 3, 3))).astype(np.int8)
    sw = np.array([2.0, 1.0, 0.5] * 5 + [2.0], np.float32)
    sx, sy, zy = np.float32(0.25), np.float32(1.0 if depthwise else 64.0), xt(int(zx) - 3)
    zw = np.zeros(o, np.int8)
    want = on.qlinear_conv(x, sx, zx, w, sw, zw, sy, zy, None, (1, 1), (1, 1, 1, 1), (1, 1), g)
    acc = ref_conv_acc(x, zx, w, zw, None, pad=(1, 1, 1, 1), groups=g)
    prod = acc.astype(np.float64) * f32_multiplier(sx, sw, sy).astype(np.float64)[None, :, None, None]
    ties = (prod - np.floor(prod)) == 0.5
    assert ties.sum() > 200 and (ties & (prod < 0)).sum() > 50
    for impl in IMPLS:
        got, _ = zi.qlinear_conv2d(x, sx, zx, w, sw, zw, sy, zy, padding=1, groups=g, impl=impl)
        assert mismatches(got, want) == 0, impl
    away, _ = zi.qlinear_conv2d(x, sx, zx, w, sw, zw, sy, zy, padding=1, groups=g, rounding="gemmlowp")
    assert mismatches(away, want) > 0  # another tie rule differs: the comparison sees the ties


@pytest.mark.parametrize("at,bt", ORT_COMBOS, ids=["s8s8", "u8s8"])
@pytest.mark.parametrize("per_col", [False, True])
def test_qlinear_matmul_vs_onnxruntime(at, bt, per_col):
    rng = np.random.default_rng(5 + per_col + 2 * (at == np.int8))
    a, b = codes(rng, at, (3, 7, 50)), codes(rng, bt, (50, 13))
    sb = rng.uniform(0.001, 0.01, 13).astype(np.float32) if per_col else np.float32(0.004)
    zb = zp_of(rng, bt, 13) if per_col else zp_of(rng, bt)
    za, zy = zp_of(rng, at), zp_of(rng, at)
    want = on.qlinear_matmul(a, 0.03, za, b, sb, zb, 0.7, zy)
    for impl in IMPLS:
        got, _ = zi.qlinear_matmul(a, 0.03, za, b, sb, zb, 0.7, zy, impl=impl)
        assert mismatches(got, want) == 0, impl


@pytest.mark.parametrize("at", [np.int8, np.uint8], ids=["s8s8", "u8s8"])
def test_qlinear_matmul_ties_vs_onnxruntime(at):
    rng = np.random.default_rng(8)
    za = at(0 if at == np.int8 else 128)
    # a - za and b multiples of 16: acc = 256 m, M = 2^-9, so acc * M = m / 2 is a tie for every odd m
    a = (int(za) + 16 * rng.integers(-7, 8, (16, 20))).astype(at)
    b = (16 * rng.integers(-7, 8, (20, 8))).astype(np.int8)
    want = on.qlinear_matmul(a, 0.5, za, b, np.float32(1.0), np.int8(0), 256.0, za)
    acc = (a.astype(np.int64) - int(za)) @ b.astype(np.int64)
    assert ((acc % 512) == 256).sum() > 30 and ((acc % 512 == 256) & (acc < 0)).sum() > 10
    for impl in IMPLS:
        got, _ = zi.qlinear_matmul(a, 0.5, za, b, 1.0, np.int8(0), 256.0, za, impl=impl)
        assert mismatches(got, want) == 0, impl


ALL_COMBOS = [(np.int8, np.int8), (np.uint8, np.int8), (np.int8, np.uint8), (np.uint8, np.uint8)]


@pytest.mark.parametrize("at,bt", ALL_COMBOS, ids=["s8s8", "u8s8", "s8u8", "u8u8"])
def test_matmul_integer_and_conv_integer_vs_onnxruntime(at, bt):
    rng = np.random.default_rng(17 + 2 * (at == np.int8) + (bt == np.int8))
    a, b = codes(rng, at, (2, 6, 40)), codes(rng, bt, (40, 9))
    za, zb = zp_of(rng, at), zp_of(rng, bt, 9)
    want = on.matmul_integer(a, za, b, zb)
    x, w = codes(rng, at, (2, 6, 8, 8)), codes(rng, bt, (5, 6, 3, 3))
    zx, zw = zp_of(rng, at), zp_of(rng, bt)  # ConvInteger: per-tensor weight zero point
    want_conv = on.conv_integer(x, zx, w, zw, pads=(1, 2, 0, 1), strides=(2, 1))
    for impl in IMPLS:
        got, _ = zi.matmul_integer(a, za, b, zb, impl=impl)
        assert mismatches(got, want) == 0, impl
        got_conv, _ = zi.conv_integer(x, zx, w, zw, stride=(2, 1), padding=(1, 2, 0, 1), impl=impl)
        assert mismatches(got_conv, want_conv) == 0, impl


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0625])
@pytest.mark.parametrize("zp", [-8, -7, 0, 3])
def test_avg_pool_int8_vs_onnxruntime_qlinear_average_pool(scale, zp):
    """com.microsoft QLinearAveragePool computes nearbyintf(average of scale * (x - zp) / scale + zp)
    in float32; with power-of-two scales every step is exact, which is half_even on the codes."""
    rng = np.random.default_rng(zp + 100)
    x = codes(rng, np.int8, (2, 3, 8, 8))
    s = np.float32(scale)
    want = on.run_node("QLinearAveragePool", [x, s, np.int8(zp), s, np.int8(zp)], on.tensor_type(np.int8),
                       domain=on.MS_DOMAIN, kernel_shape=[2, 2], strides=[2, 2])
    sums = x.astype(np.int64).reshape(2, 3, 4, 2, 4, 2).sum((3, 5))
    assert ((sums % 4 == 2) & (sums < 0)).sum() > 3  # negative ties present
    assert mismatches(zi.avg_pool2d(x, zp, 2, rounding="half_even"), want) == 0
    assert mismatches(zi.avg_pool2d(x, zp, 2, rounding="half_up"), want) > 0


# ---------------------------------------------------------------- torch fbgemm / x86
torch = pytest.importorskip("torch")


def torch_qconv_u8s8(x, sx, zx, w, sw, zw, sy, zy, stride, padding, groups, engine):
    """torch.ao quantized conv2d: quint8 x, qint8 w (per channel when sw is an array), quint8 out."""
    import torch.ao.nn.quantized.functional as qF

    torch.backends.quantized.engine = engine
    qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), float(sx), int(zx))
    if np.ndim(sw) == 0:
        qw = torch._make_per_tensor_quantized_tensor(torch.from_numpy(w), float(sw), int(zw))
    else:
        qw = torch._make_per_channel_quantized_tensor(torch.from_numpy(w), torch.from_numpy(sw.astype(np.float64)),
                                                      torch.from_numpy(np.asarray(zw, np.int64)), 0)
    y = qF.conv2d(qx, qw, None, stride=stride, padding=padding, groups=groups, scale=float(sy), zero_point=int(zy))
    return y.int_repr().numpy()


@pytest.mark.parametrize("engine", [e for e in ("fbgemm", "x86") if e in torch.backends.quantized.supported_engines])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("groups,stride", [(1, 1), (1, 2), (16, 1)])
def test_u8s8_conv_vs_torch(engine, per_channel, groups, stride, one_thread):
    """Symmetric narrow-range int8 weights from ops.symmetric_params / ops.quantize (per channel,
    zero point 0) or a per-tensor qint8 zero point. Activations below 128: fbgemm's AVX2 u8*s8
    kernel saturates int16 pair sums otherwise (why torch's x86 observers use reduce_range)."""
    rng = np.random.default_rng(groups * 10 + stride + per_channel)
    x = rng.integers(0, 128, (2, 16, 10, 10)).astype(np.uint8)
    wf = rng.standard_normal((16, 16 // groups, 3, 3)).astype(np.float32)
    if per_channel:
        sw, zw = ops.symmetric_params(wf, 8, axis=0)
        w = ops.quantize(wf, sw, zw, 8, axis=0, signed=True, narrow_range=True)
    else:
        sw, zw = np.float32(0.02), -5
        w = ops.quantize(wf, sw, zw, 8, signed=True)
    assert w.dtype == np.int8 and (w.min() == -127 if per_channel else w.min() == -128)
    sx, sy = np.float32(0.02), np.float32(0.1 if groups == 1 else 0.02)
    want = torch_qconv_u8s8(x, sx, 11, w, sw, zw, sy, 100, stride, 1, groups, engine)
    assert len(np.unique(want)) > 50
    for impl in IMPLS:
        got, _ = zi.qlinear_conv2d(x, sx, 11, w, np.broadcast_to(sw, (16,)), np.broadcast_to(zw, (16,)), sy, 100,
                                   stride=stride, padding=1, groups=groups, impl=impl)
        assert mismatches(got, want) == 0, impl


# ---------------------------------------------------------------- TFLite reference int8 conv
def tflite_multiply_by_quantized_multiplier(acc, q31, shift):
    """MultiplyByQuantizedMultiplier (double-rounding reference form):
    RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc * 2^left, q31), right)."""
    left, right = max(shift, 0), max(-shift, 0)
    return np_rdbpot(np_srdhm(wrap32(acc * (1 << left)), q31), right)


def tflite_conv_per_channel(x_nhwc, input_offset, filt_ohwi, bias, in_scale, filt_scales, out_scale,
                            output_offset, stride, pad, groups=1, act_min=-128, act_max=127):
    """reference_integer_ops::ConvPerChannel (and DepthwiseConvPerChannel for groups == C) in
    numpy: per output channel QuantizeMultiplier(double(in_scale) * double(filter_scale) /
    double(out_scale)); acc = bias + sum filter * (input + input_offset) over the taps inside the
    image (padding contributes nothing); MBQM; + output_offset; clamp. Returns NHWC int8."""
    n, h, w, c = x_nhwc.shape
    o, kh, kw, cg = filt_ohwi.shape
    (sh, sw), (pt, pl) = stride, pad
    oh, ow = (h + 2 * pt - kh) // sh + 1, (w + 2 * pl - kw) // sw + 1
    xin = x_nhwc.astype(np.int64) + input_offset
    out = np.zeros((n, oh, ow, o), np.int64)
    for oc in range(o):
        g = oc // (o // groups)
        acc = np.full((n, oh, ow), 0 if bias is None else int(bias[oc]), np.int64)
        for fy in range(kh):
            for fx in range(kw):
                for i in range(oh):
                    iy = i * sh - pt + fy
                    if not 0 <= iy < h:
                        continue
                    for j in range(ow):
                        ix = j * sw - pl + fx
                        if 0 <= ix < w:
                            acc[:, i, j] += xin[:, iy, ix, g * cg:(g + 1) * cg] @ filt_ohwi[oc, fy, fx].astype(np.int64)
        q31, shift = py_quantize_multiplier(float(np.float64(in_scale) * np.float64(filt_scales[oc]) /
                                                  np.float64(out_scale)))
        out[..., oc] = tflite_multiply_by_quantized_multiplier(acc, q31, shift)
    return np.clip(out + output_offset, act_min, act_max).astype(np.int8)


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("scales", ["random", "power_of_two"])
def test_gemmlowp_int8_conv_vs_tflite_reference(groups, scales):
    """int8 activations (zero point -11), symmetric narrow-range int8 weights (zero point 0),
    int32 bias, int8 output (zero point 5): TFLite's arithmetic equals rounding="gemmlowp".
    Power-of-two scales make acc * M exact halves (both signs): SRDHM's ties-up and
    RoundingDivideByPOT's ties-away are then exercised."""
    rng = np.random.default_rng(groups + (scales == "random"))
    c, o = 8, 8 if groups == 8 else 6
    x = rng.integers(-128, 128, (2, c, 7, 7)).astype(np.int8)
    wf = rng.standard_normal((o, c // groups, 3, 3)).astype(np.float32)
    sw, zw = ops.symmetric_params(wf, 8, axis=0)
    if scales == "power_of_two":
        sw = np.float32(2.0) ** -rng.integers(6, 9, o).astype(np.float32)
        sx, sy = np.float32(0.5), np.float32(0.25)
    else:
        sx, sy = np.float32(0.037), np.float32(0.11)
    w = ops.quantize(wf, sw, zw, 8, axis=0, signed=True, narrow_range=True)
    bias = rng.integers(-2000, 2000, o).astype(np.int32)
    want = tflite_conv_per_channel(x.transpose(0, 2, 3, 1), 11, w.transpose(0, 2, 3, 1), bias, sx, sw, sy, 5,
                                   (1, 1), (1, 1), groups).transpose(0, 3, 1, 2)
    assert (want == -128).any() and (want == 127).any()  # both clamp edges
    for impl in IMPLS:
        got, _ = zi.qlinear_conv2d(x, sx, -11, w, sw, zw, sy, np.int8(5), bias, padding=1, groups=groups,
                                   rounding="gemmlowp", impl=impl)
        assert mismatches(got, want) == 0, impl
    if scales == "power_of_two":
        rne, _ = zi.qlinear_conv2d(x, sx, -11, w, sw, zw, sy, np.int8(5), bias, padding=1, groups=groups)
        assert mismatches(rne, want) > 0  # float32_rne rounds those ties differently
