"""float32_rne mode vs real int8 runtimes: onnxruntime QLinearConv / QLinearMatMul
and torch's fbgemm quantized conv. 0 mismatching codes, tie cases included."""

from __future__ import annotations

import numpy as np
import pytest

import pyzeroq.integer as zi

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def _session(model):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_qlinear_conv(x, sx, zx, w, sw, zw, sy, zy, bias=None, stride=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), groups=1):
    o = w.shape[0]
    inits = [
        helper.make_tensor("x_scale", TensorProto.FLOAT, [], [float(sx)]),
        helper.make_tensor("x_zp", TensorProto.UINT8, [], [int(zx)]),
        helper.make_tensor("w", TensorProto.UINT8, list(w.shape), w.ravel().tolist()),
        helper.make_tensor("w_scale", TensorProto.FLOAT, [o], np.broadcast_to(sw, (o,)).astype(np.float32).tolist()),
        helper.make_tensor("w_zp", TensorProto.UINT8, [o], np.broadcast_to(zw, (o,)).astype(np.uint8).tolist()),
        helper.make_tensor("y_scale", TensorProto.FLOAT, [], [float(sy)]),
        helper.make_tensor("y_zp", TensorProto.UINT8, [], [int(zy)]),
    ]
    ins = ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp"]
    if bias is not None:
        inits.append(helper.make_tensor("B", TensorProto.INT32, [o], bias.tolist()))
        ins.append("B")
    node = helper.make_node("QLinearConv", ins, ["y"], strides=list(stride), pads=list(pads), dilations=list(dil),
                            group=groups, kernel_shape=list(w.shape[2:]))
    graph = helper.make_graph([node], "qconv", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return _session(model).run(None, {"x": x})[0]


def ort_qlinear_matmul(a, sa, za, b, sb, zb, sy, zy):
    n = b.shape[1]
    per_col = np.ndim(sb) > 0
    shp = [n] if per_col else []
    inits = [
        helper.make_tensor("a_scale", TensorProto.FLOAT, [], [float(sa)]),
        helper.make_tensor("a_zp", TensorProto.UINT8, [], [int(za)]),
        helper.make_tensor("b", TensorProto.UINT8, list(b.shape), b.ravel().tolist()),
        helper.make_tensor("b_scale", TensorProto.FLOAT, shp, np.atleast_1d(sb).astype(np.float32).tolist()),
        helper.make_tensor("b_zp", TensorProto.UINT8, shp, np.atleast_1d(zb).astype(np.uint8).tolist()),
        helper.make_tensor("y_scale", TensorProto.FLOAT, [], [float(sy)]),
        helper.make_tensor("y_zp", TensorProto.UINT8, [], [int(zy)]),
    ]
    node = helper.make_node("QLinearMatMul", ["a", "a_scale", "a_zp", "b", "b_scale", "b_zp", "y_scale", "y_zp"], ["y"])
    graph = helper.make_graph([node], "qmm", [helper.make_tensor_value_info("a", TensorProto.UINT8, list(a.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return _session(model).run(None, {"a": a})[0]


CONV_CASES = [
    # name, (n, c, h, w), o, k, stride, pads (t, l, b, r), dilation, groups
    ("plain3x3", (2, 16, 12, 12), 16, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ("strided", (2, 16, 13, 13), 32, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1),
    ("asym_pad_dil", (1, 8, 11, 9), 12, 3, (1, 2), (2, 0, 1, 3), (2, 1), 1),
    ("depthwise", (2, 24, 10, 10), 24, 3, (1, 1), (1, 1, 1, 1), (1, 1), 24),
    ("depthwise_s2", (2, 32, 14, 14), 32, 3, (2, 2), (1, 1, 1, 1), (1, 1), 32),
    ("grouped", (1, 12, 8, 8), 12, 3, (1, 1), (0, 0, 0, 0), (1, 1), 3),
    ("pointwise", (2, 40, 7, 7), 24, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),
    ("first_layer", (2, 1, 28, 28), 16, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_vs_onnxruntime(case, with_bias):
    _, xs, o, k, stride, pads, dil, groups = case
    rng = np.random.default_rng(abs(hash(case[0])) % 2**32 + with_bias)
    x = rng.integers(0, 256, xs, dtype=np.uint8)
    w = rng.integers(0, 256, (o, xs[1] // groups, k, k), dtype=np.uint8)
    zx, zy = int(rng.integers(0, 256)), int(rng.integers(0, 256))
    zw = rng.integers(0, 256, o).astype(np.uint8)  # per-channel, nonzero, all different
    sw = rng.uniform(0.001, 0.01, o).astype(np.float32)
    sx, sy = np.float32(0.02), np.float32(rng.uniform(0.05, 0.5))
    bias = rng.integers(-30000, 30000, o).astype(np.int32) if with_bias else None
    want = ort_qlinear_conv(x, sx, zx, w, sw, zw, sy, zy, bias, stride, pads, dil, groups)
    for impl in ("fast", "reference"):
        got, _ = zi.qlinear_conv2d(x, sx, zx, w, sw, zw, sy, zy, bias, stride, pads, dil, groups, impl=impl)
        assert int((got != want).sum()) == 0, f"{impl}: {(got != want).sum()} mismatching codes"


@pytest.mark.parametrize("depthwise", [False, True])
def test_conv_ties_vs_onnxruntime(depthwise):
    # power-of-two scales: M = f32(sx*sw)/sy in {0.5, 0.25, 0.125}, so many acc*M are exactly k + 0.5
    rng = np.random.default_rng(42 + depthwise)
    c = o = 16
    g = c if depthwise else 1
    zw = rng.integers(120, 136, o).astype(np.uint8)
    if depthwise:
        x = rng.integers(0, 256, (2, c, 9, 9), dtype=np.uint8)
        w = rng.integers(100, 156, (o, 1, 3, 3), dtype=np.uint8)
    else:  # x - zx and w - zw multiples of 8: acc is a multiple of 64, M = 2^-7..2^-9
        x = (128 + 8 * rng.integers(-15, 16, (2, c, 9, 9))).astype(np.uint8)
        w = (zw[:, None, None, None] + 8 * rng.integers(-3, 4, (o, c, 3, 3))).astype(np.uint8)
    sw = np.array([2.0, 1.0, 0.5] * 5 + [2.0], np.float32)
    sx, sy, zx, zy = np.float32(0.25), np.float32(1.0 if depthwise else 64.0), 128, 128
    want = ort_qlinear_conv(x, sx, zx, w, sw, zw, sy, zy, None, (1, 1), (1, 1, 1, 1), (1, 1), g)
    got, _ = zi.qlinear_conv2d(x, sx, zx, w, sw, zw, sy, zy, padding=1, groups=g)
    from test_integer_conv import f32_multiplier, ref_conv_acc
    a = ref_conv_acc(x, zx, w, zw, None, pad=(1, 1, 1, 1), groups=g)
    prod = a.astype(np.float64) * f32_multiplier(sx, sw, sy).astype(np.float64)[None, :, None, None]
    ties = int(((prod - np.floor(prod)) == 0.5).sum())
    assert ties > 200, ties
    assert int((got != want).sum()) == 0
    # half-away rounding would differ on those ties: the comparison really sees them
    away, _ = zi.qlinear_conv2d(x, sx, zx, w, sw, zw, sy, zy, padding=1, groups=g, rounding="dyadic",
                                dyadic_rounding="half_away")
    assert int((away != want).sum()) > 0


@pytest.mark.parametrize("per_col", [False, True])
def test_matmul_vs_onnxruntime(per_col):
    rng = np.random.default_rng(5 + per_col)
    a = rng.integers(0, 256, (3, 7, 50), dtype=np.uint8)
    b = rng.integers(0, 256, (50, 13), dtype=np.uint8)
    sb = rng.uniform(0.001, 0.01, 13).astype(np.float32) if per_col else np.float32(0.004)
    zb = rng.integers(0, 256, 13).astype(np.uint8) if per_col else np.uint8(131)
    want = ort_qlinear_matmul(a, np.float32(0.03), 61, b, sb, zb, np.float32(0.7), 100)
    for impl in ("fast", "reference"):
        got, _ = zi.qlinear_matmul(a, np.float32(0.03), 61, b, sb, zb, np.float32(0.7), 100, impl=impl)
        assert int((got != want).sum()) == 0


def test_matmul_ties_vs_onnxruntime():
    rng = np.random.default_rng(8)
    a = rng.integers(0, 256, (16, 20), dtype=np.uint8)
    b = rng.integers(0, 256, (20, 8), dtype=np.uint8)
    want = ort_qlinear_matmul(a, np.float32(0.5), 128, b, np.float32(1.0), np.uint8(128), np.float32(256.0), 128)
    got, _ = zi.qlinear_matmul(a, 0.5, 128, b, 1.0, 128, 256.0, 128)
    assert int((got != want).sum()) == 0


# ---------------------------------------------------------------- torch fbgemm
torch = pytest.importorskip("torch")


def torch_qconv(x, sx, zx, w, sw, zw, sy, zy, stride, padding, groups, engine):
    """torch.ao quantized conv2d. Weights: uint8 codes u with zero point z are the
    qint8 codes u - 128 with zero point z - 128 (same real values). Activations
    stay below 128: fbgemm's AVX2 u8*s8 kernel (vpmaddubsw) saturates int16 pair
    sums otherwise (the reason torch's observers use reduce_range on x86)."""
    import torch.ao.nn.quantized.functional as qF

    torch.backends.quantized.engine = engine
    qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), float(sx), int(zx))
    wi8 = torch.from_numpy((w.astype(np.int16) - 128).astype(np.int8))
    if np.ndim(sw) == 0:
        qw = torch._make_per_tensor_quantized_tensor(wi8, float(sw), int(zw) - 128)
    else:
        qw = torch._make_per_channel_quantized_tensor(
            wi8, torch.from_numpy(np.asarray(sw, np.float64)), torch.from_numpy(np.asarray(zw, np.int64) - 128), 0)
    y = qF.conv2d(qx, qw, None, stride=stride, padding=padding, groups=groups, scale=float(sy), zero_point=int(zy))
    return y.int_repr().numpy()


@pytest.mark.parametrize("engine", [e for e in ("fbgemm", "x86") if e in torch.backends.quantized.supported_engines])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("groups,stride", [(1, 1), (1, 2), (16, 1)])
def test_conv_vs_torch(engine, per_channel, groups, stride):
    rng = np.random.default_rng(groups * 10 + stride + per_channel)
    x = rng.integers(0, 128, (2, 16, 10, 10), dtype=np.uint8)
    w = rng.integers(0, 256, (16, 16 // groups, 3, 3), dtype=np.uint8)
    sx, sy = np.float32(0.02), np.float32(0.3 if groups == 1 else 0.05)
    if per_channel:
        # per-channel weight zero points must be 0 in fbgemm (qint8 zp 0 = uint8 zp 128)
        sw, zw = rng.uniform(0.001, 0.01, 16).astype(np.float32), np.full(16, 128)
    else:
        sw, zw = np.float32(0.004), 119
    want = torch_qconv(x, sx, 11, w, sw, zw, sy, 100, stride, 1, groups, engine)
    got, _ = zi.qlinear_conv2d(x, sx, 11, w, np.broadcast_to(sw, (16,)), np.broadcast_to(zw, (16,)), sy, 100,
                               stride=stride, padding=1, groups=groups)
    assert int((got != want).sum()) == 0
