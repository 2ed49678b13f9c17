"""QDQ export (``export_onnx(..., format="qdq")``, :mod:`pyzeroq.export_qdq`): record-typed and packed
codes, the graph's structure, and what onnxruntime 1.32 computes from it compared with the integer
simulator (``to_integer``, float32_rne), op by op and end to end, with its QDQ fusion on
(ORT_ENABLE_ALL) and off (ORT_DISABLE_ALL: plain float DequantizeLinear / QuantizeLinear semantics).

Where it is bit-exact and why (each op run alone on the simulator's input codes, :func:`isolated`):

* both levels: the input quantization, lookup tables (Gather of the simulator's table), data movement
  (Reshape / Transpose / Slice / Resize / Pad between DequantizeLinear and QuantizeLinear of the same
  record: ``Q(DQ(q)) == q``), standalone ReLU / ReLU6 (monotone), max pooling and concatenation of
  inputs whose record is the output's;
* fusion off: the residual add and the product (DequantizeLinear, Add / Mul, QuantizeLinear: the
  simulator's float32 formula, QuantizeLinear dividing by the scale);
* fusion on: Conv / Gemm with 8-bit weights (QLinearConv / QGemm: integer accumulator, multiplier
  ``f32(f32(sx*sw)/sy)``, half-to-even, as float32_rne), logits (QGemm with float output:
  ``f32(acc) * f32(sx*sw)``), global average pooling over a power-of-two window (QLinearGlobalAveragePool:
  integer sum, ``sx / (sy * HW)`` == ``f32(sx/sy) / HW`` then).

Where it is not (bounded below): float Conv / Gemm (fusion off, or 4-bit weights, which onnxruntime does
not fuse: its QLinearConv takes 8-bit weights) accumulate dequantized products in float32, so a result
within float error of a rounding tie can land one code away; the fused QLinearAdd / QLinearMul are fixed
point (22-bit multipliers): one code at near-ties; float average pooling sums dequantized values;
QLinearAveragePool rounds ``y/sy + zp`` (the zero point added before rounding half to even), so every
exact tie of the simulator's ``rne(y/sy) + zp`` (a quarter of a 2x2 window's outputs when the pool keeps
its input's record) moves one code when the zero point is odd; requantizations with another record
(``rne(f32(sx*(x-zx))/sy)`` vs the simulator's ``rne(f32(sx/sy)*(x-zx))``) differ at near-ties.
End to end those one-code differences propagate (tens of codes per million, at most a few steps).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo import ZOO, build

import pyzeroq as zq
from pyzeroq.export import output_names
from pyzeroq.integer.steps import (
    LAYER_STEPS,
    AdaptiveAvgPoolStep,
    AddStep,
    AvgPoolStep,
    ConcatStep,
    ConvStep,
    GlobalAvgPoolStep,
    InputStep,
    LogitsStep,
    MaxPoolStep,
    RequantStep,
)
from pyzeroq.qspec import TensorQuant

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pyzeroq.export_qdq import QDQ_HANDLERS, _QdqBuilder, build_qdq, qdq_opset  # noqa: E402
from pyzeroq.onnx_graph import code_type, container_bits, container_range, pack_codes  # noqa: E402

FUSED, FLOAT = ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL
BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
# onnxruntime fuses DQ -> Conv -> Q with int8 activations (S8S8) into QLinearConv only when told to: x86
# builds keep it off by default (session option "session.qdqisint8allowed", on by default for ARM); Gemm
# (QGemm) fuses either way
FUSED_INT8 = "fused, session.qdqisint8allowed=1"
LEVELS = {"fused": FUSED, "fused_int8": FUSED_INT8, "float": FLOAT}
FAST = dict(calibration="gaussian", num_samples=8, progress=False)
CONFIGS = {"W8A8": dict(weight_bits=8, act_bits=8), "W4A8": dict(weight_bits=4, act_bits=8),
           # int8 activations, symmetric int8 weights (TFLite / onnxruntime S8S8); TensorRT's zero points 0
           "W8A8-tflite": dict(weight_bits=8, act_bits=8, target="tflite"),
           "W4A8-tensorrt": dict(weight_bits=4, act_bits=8, target="tensorrt"),
           # codes of fewer bits than their int8 container: a Clip before the QuantizeLinear where values
           # can leave the range, none after data movement (onnxruntime 1.32's QDQ propagation at
           # ORT_ENABLE_ALL failed to load a Reshape / MaxPool -> Clip -> QuantizeLinear with int8 codes)
           "W4A6-tflite": dict(weight_bits=4, act_bits=6, target="tflite")}
# every step type of the plan but the standalone clamp / requantization (test_clamp_and_requant_steps)
MODELS = ("resnet18", "mobilenetv3_small", "shufflenetv2", "inception", "unet", "audio_cnn", "mlp_bn1d", "densenet",
          "two_heads")
IMAGES = 16
BYTE, NIBBLE, CRUMB = 8, 4, 2
# (max code difference, max fraction of differing codes) of an op run alone; + SLACK codes per step type
NEAR_TIE = (1, 1e-3)  # fixed-point QLinearAdd / QLinearMul, requantization to another record
FLOAT_ACC = (1, 1e-4)  # float32 accumulation of dequantized products (Conv / Gemm not fused)
POOL = (1, 0.3)  # average pools: exact ties (a quarter of a 2x2 window's sums) rounded another way
SLACK = 2
LOGITS_RTOL = 1e-5  # float Gemm logits vs f32(acc) * f32(sx*sw)
E2E_MAX_STEPS, E2E_MAX_FRACTION, E2E_FLOAT_RTOL = 4, 1e-2, 0.05  # differences propagated through the model
MIN_TOP1 = 0.75


def session(model, level, optimized_path=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = FUSED if level == FUSED_INT8 else level
    if level == FUSED_INT8:
        so.add_session_config_entry("session.qdqisint8allowed", "1")
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


_CACHE: dict = {}


def quantized(name: str, config: str):
    """(qmodel, integer model, images, simulator values) of a zoo model, cached across tests."""
    if (name, config) not in _CACHE:
        q = zq.quantize(build(name), zq.QuantConfig(**CONFIGS[config], **FAST), input_shape=ZOO[name][1])
        im = zq.to_integer(q)
        x = torch.rand((IMAGES, *ZOO[name][1]), generator=torch.Generator().manual_seed(1)).numpy()
        _CACHE[(name, config)] = (q, im, x, im.run(x))
    return _CACHE[(name, config)]


def isolated(im, step, shapes: dict):
    """The QDQ graph of one step alone: its input slots (codes) are graph inputs, its output the output."""
    b = _QdqBuilder(im, shapes, "float")
    QDQ_HANDLERS[type(step)](b, step)
    read = {i for n in b.nodes for i in n.input}
    if isinstance(step, InputStep):
        ins = [helper.make_tensor_value_info("input", TensorProto.FLOAT, shapes[step.inputs[0]])]
    else:
        ins = list({s: helper.make_tensor_value_info(s, code_type(q), shapes[s])
                    for s, q in zip(step.inputs, step.in_q) if s in read}.values())
    out_type = TensorProto.FLOAT if step.out_q is None else code_type(step.out_q)
    graph = helper.make_graph(b.nodes, step.name, ins, [helper.make_tensor_value_info(step.output, out_type, None)],
                              b.inits)
    opset = helper.make_opsetid("", qdq_opset(im))
    model = helper.make_model(graph, opset_imports=[opset])
    model.ir_version = helper.find_min_ir_version_for([opset])
    return model


def expectation(step, level, shapes: dict):
    """None where onnxruntime must equal the simulator bit for bit (module docstring), else the bound."""
    fused = level in (FUSED, FUSED_INT8)
    if isinstance(step, LAYER_STEPS):
        s8s8_conv = isinstance(step, ConvStep) and step.layer.input.signed and level != FUSED_INT8
        return None if fused and container_bits(step.layer.weight, NIBBLE) == BYTE and not s8s8_conv else FLOAT_ACC
    if isinstance(step, AddStep):  # and MulStep
        return NEAR_TIE if fused else None
    if isinstance(step, GlobalAvgPoolStep):  # fused only without a Clip before its QuantizeLinear
        window = int(np.prod(shapes[step.inputs[0]][2:]))
        lo, hi = step.clamp_codes()
        unclipped = (lo, hi) == (step.quant.qmin, step.quant.qmax) == container_range(step.quant)
        return None if fused and unclipped and window & (window - 1) == 0 else POOL
    if isinstance(step, (AvgPoolStep, AdaptiveAvgPoolStep)):
        return POOL
    if isinstance(step, RequantStep) or isinstance(step, (MaxPoolStep, ConcatStep)) and \
            any(q != step.quant for q in step.in_q):
        return NEAR_TIE
    return None


def check_isolated(im, x, env, level, tmp_path) -> dict:
    """Runs every step alone on the simulator's input codes; asserts :func:`expectation`; returns
    {step type: [differing codes, codes]} and checks that fused layers did fuse."""
    shapes = {k: tuple(v.shape) for k, v in env.items()}
    shapes[im.steps[0].inputs[0]] = x.shape
    counts: dict = {}
    for step in im.steps:
        path = tmp_path / "optimized.onnx"
        sess = session(isolated(im, step, shapes), level, path)
        feeds = {i.name: x if i.name == "input" else env[i.name] for i in sess.get_inputs()}
        got, want, bound = sess.run(None, feeds)[0], env[step.output], expectation(step, level, shapes)
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        if isinstance(step, LAYER_STEPS) and level in (FUSED, FUSED_INT8):  # QDQ fusion happened exactly where claimed
            assert bool(ops & {"QLinearConv", "QGemm"}) == (bound is None), (step.name, ops)
        if isinstance(step, LogitsStep):
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err == 0 if bound is None else err <= LOGITS_RTOL, (step.name, err)
        if step.out_q is None:  # float: logits (above), a returned tensor's DequantizeLinear (exact)
            assert isinstance(step, LogitsStep) or np.array_equal(got, want), step.name
            continue
        diff = np.abs(got.astype(np.int64) - want)
        if bound is None:
            np.testing.assert_array_equal(got, want, err_msg=f"{step.name} ({type(step).__name__})")
        else:
            assert diff.max() <= bound[0], (step.name, diff.max())
        kind = counts.setdefault(type(step).__name__, [0, 0, bound])
        kind[0], kind[1] = kind[0] + int((diff > 0).sum()), kind[1] + diff.size
    for name, (differing, total, bound) in counts.items():
        assert bound is None or differing <= bound[1] * total + SLACK, (name, differing, total)
    return counts


def compare_end_to_end(model, im, x, env, level) -> tuple:
    """(differing codes, codes, max code difference, max relative float error) over every output of a
    graph built with ``intermediate=True``."""
    slots = dict(output_names(im.output))
    sess = session(model, level)
    differing = total = worst = 0
    float_err = 0.0
    for name, value in zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})):
        slot = slots.get(name, name)
        want = env[slot if slot in env else slot.removesuffix("_value")]
        if value.dtype.kind == "f":
            float_err = max(float_err, float(np.abs(value - want).max() / (np.abs(want).max() or 1.0)))
            if value.ndim == 2:
                assert (value.argmax(1) == want.argmax(1)).mean() >= MIN_TOP1
            continue
        diff = np.abs(value.astype(np.int64) - want)
        differing, total, worst = differing + int((diff > 0).sum()), total + diff.size, max(worst, int(diff.max()))
    return differing, total, worst, float_err


# ---------------------------------------------------------------------------- record-typed codes, packing
@pytest.mark.parametrize("signed", [False, True])
def test_code_types_follow_the_record(signed):
    """The ONNX type comes from ``bits`` / ``signed`` (not a hard-coded uint8): 8 / 16-bit containers for
    activations, and INT4 / INT2 (UINT4 / UINT2) for weights with ``min_width`` 4 / 2."""
    u = "" if signed else "U"
    want = {2: (u + "INT8", u + "INT4", u + "INT2"), 3: (u + "INT8", u + "INT4", u + "INT4"),
            4: (u + "INT8", u + "INT4", u + "INT4"), 5: (u + "INT8",) * 3, 8: (u + "INT8",) * 3,
            9: (u + "INT16",) * 3, 16: (u + "INT16",) * 3}
    for bits, names in want.items():
        q = TensorQuant(bits, np.float32(0.1), np.int32(0), signed=signed)
        assert [TensorProto.DataType.Name(code_type(q, w)) for w in (BYTE, NIBBLE, CRUMB)] == list(names), bits
    with pytest.raises(ValueError, match="min_width"):
        code_type(TensorQuant(4, np.float32(0.1), np.int32(0)), 3)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [CRUMB, NIBBLE])
def test_packed_weights_dequantize_on_onnxruntime(bits, signed):
    """Codes packed two / four per byte (odd counts, per-channel zero points, signed two's complement)
    unpack to themselves (onnx) and onnxruntime's per-channel DequantizeLinear gives scale * (q - zp)."""
    rng = np.random.default_rng(bits + signed)
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if signed else (0, (1 << bits) - 1)
    codes = rng.integers(lo, hi + 1, (5, 3, 3))  # 45 codes: the last byte is padded
    q = TensorQuant(bits, rng.uniform(0.01, 0.1, 5).astype(np.float32), rng.integers(lo, hi + 1, 5), axis=0,
                    signed=signed)
    b = _QdqBuilder(None, {}, "float")
    w = b.code_const("w", codes, q, bits)
    z = b.code_const("z", q.zero_point, q, bits)
    packed = next(t for t in b.inits if t.name == w)
    assert len(packed.raw_data) == -(-codes.size * bits // BYTE) == len(pack_codes(codes, bits))
    np.testing.assert_array_equal(numpy_helper.to_array(packed), codes)
    b.node("DequantizeLinear", [w, b.const("s", q.scale), z], ["y"], "dq", axis=0)
    opset = helper.make_opsetid("", 25 if bits == CRUMB else 21)
    model = helper.make_model(helper.make_graph(b.nodes, "dq", [], [helper.make_tensor_value_info("y", 1, None)],
                                                b.inits), opset_imports=[opset])
    model.ir_version = helper.find_min_ir_version_for([opset])
    got = session(model, FLOAT).run(None, {})[0]
    want = q.scale[:, None, None] * (codes - q.zero_point[:, None, None]).astype(np.float32)
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("bits", [BYTE, NIBBLE])
def test_signed_activation_requantize(bits):
    """A signed record (int8 container) with a fused ReLU above the container's lowest code, and fewer
    bits than the container: Relu / Clip before QuantizeLinear(int8) give clamp(rne(x/s) + zp, lo, hi)."""
    q = TensorQuant(bits, np.float32(0.05), np.int32(-3), signed=True)
    b = _QdqBuilder(None, {}, "float")
    b.requantize("x", q, "y", lo=q.zero_point_value)
    assert [n.op_type for n in b.nodes] == (["Relu"] if bits == BYTE else ["Clip"]) + ["QuantizeLinear"]
    assert next(t for t in b.inits if t.name.endswith("zero_point")).data_type == TensorProto.INT8
    graph = helper.make_graph(b.nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1000])],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, None)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = np.random.default_rng(0).uniform(-10, 10, 1000).astype(np.float32)
    got = session(model, FLOAT).run(None, {"x": x})[0]
    want = np.clip(np.rint(x / np.float32(0.05)) + q.zero_point_value, q.zero_point_value, q.qmax)
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------- graph structure, arguments
def test_qdq_structure(tmp_path):
    """Float ops between Q / DQ; weights as their record's codes (UINT4 at W4), per-channel axis 0;
    int32 bias with scale f32(x_scale * w_scale[c]) and zero point 0; the QOperator default unchanged."""
    q, im, x, env = quantized("resnet18", "W4A8")
    model = zq.export_onnx(q, tmp_path / "r18.onnx", x[:1], format="qdq")
    assert onnx.load(str(tmp_path / "r18.onnx")) == model and model.opset_import[0].version == 21
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "Gemm", "Add", "MaxPool", "GlobalAveragePool", "QuantizeLinear", "DequantizeLinear"} <= ops
    assert not any(op.startswith("QLinear") for op in ops)
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for step in (s for s in im.steps if isinstance(s, LAYER_STEPS)):
        node = next(n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.name.startswith(step.output))
        w_dq, b_dq = producer[node.input[1]], producer[node.input[2]]
        assert [a.i for a in w_dq.attribute if a.name == "axis"] == [0] == [a.i for a in b_dq.attribute]
        w = inits[w_dq.input[0]]
        assert w.data_type == TensorProto.UINT4 and inits[w_dq.input[2]].data_type == TensorProto.UINT4
        np.testing.assert_array_equal(numpy_helper.to_array(w), step.layer.weight_codes)
        np.testing.assert_array_equal(numpy_helper.to_array(inits[w_dq.input[1]]), step.layer.weight.scale)
        np.testing.assert_array_equal(numpy_helper.to_array(inits[b_dq.input[0]]), step.layer.bias)
        np.testing.assert_array_equal(numpy_helper.to_array(inits[b_dq.input[1]]), step.layer.bias_scale)
        assert not numpy_helper.to_array(inits[b_dq.input[2]]).any()
    default = zq.export_onnx(q, tmp_path / "qop.onnx", x[:1])
    assert default == zq.export_onnx(q, tmp_path / "qop2.onnx", x[:1], format="qoperator")
    assert "QLinearConv" in {n.op_type for n in default.graph.node}
    # uint8 pixels: the simulator's pixel table, then the same QDQ graph
    pixels = (x * 255).round().astype(np.uint8)
    sess = session(build_qdq(im, pixels[:1], pixels="uint8", intermediate=True), FUSED)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": pixels})))
    np.testing.assert_array_equal(got[im.steps[0].output], im.run(pixels)[im.steps[0].output])


def test_qdq_argument_errors(tmp_path, monkeypatch):
    """Bad ``format`` (and add_op with QDQ) fail naming the argument before to_integer runs."""
    import pyzeroq.export as ex

    q, im, x, _ = quantized("mlp_bn1d", "W8A8")
    monkeypatch.setattr(ex, "to_integer", lambda *a, **k: pytest.fail("to_integer ran before the check"))
    with pytest.raises(ValueError, match="format must be one of"):
        zq.export_onnx(q, tmp_path / "a.onnx", x[:1], format="QDQ")
    with pytest.raises(ValueError, match="add_op='qlinearadd' applies to format='qoperator'"):
        zq.export_onnx(q, tmp_path / "a.onnx", x[:1], add_op="qlinearadd", format="qdq")
    with pytest.raises(ValueError, match="pixels"):
        build_qdq(im, x[:1], pixels="int8")
    with pytest.raises(TypeError, match="int2_weights"):
        build_qdq(im, x[:1], int2_weights=1)
    with pytest.raises(ValueError, match="float32_rne"):
        build_qdq(zq.to_integer(q, rounding="gemmlowp"), x[:1])
    with pytest.raises(TypeError, match="IntegerModel"):
        build_qdq(q, x[:1])


# ---------------------------------------------------------------------------- onnxruntime vs the simulator
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", MODELS)
def test_isolated_ops_vs_simulator(name, config, tmp_path):
    """Each op alone on the simulator's input codes: bit-exact where the module docstring says so (and
    fused into QLinearConv / QGemm exactly where claimed), else within its bound."""
    _, im, x, env = quantized(name, config)
    for level in LEVELS.values():
        check_isolated(im, x, env, level, tmp_path)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", MODELS)
def test_end_to_end_vs_simulator(name, config):
    """The whole graph, every activation: identical where every op is exact at that level (the fused
    W8A8 graphs of two_heads and mlp_bn1d), else differences propagated from the bounded ops, a few
    steps at most on under 1 % of the codes."""
    _, im, x, env = quantized(name, config)
    model = build_qdq(im, x[:1], intermediate=True)
    shapes = {k: tuple(v.shape) for k, v in env.items()}
    for level in LEVELS.values():
        differing, total, worst, float_err = compare_end_to_end(model, im, x, env, level)
        if all(expectation(s, level, shapes) is None for s in im.steps):
            assert (differing, float_err) == (0, 0.0)
        else:
            assert worst <= E2E_MAX_STEPS and differing <= E2E_MAX_FRACTION * total and float_err <= E2E_FLOAT_RTOL


@pytest.mark.parametrize("zero_point", [3, 4])
def test_avg_pool_tie_rounding(zero_point):
    """Why QLinearAveragePool differs: with the pool's input record as its output record, a 2x2 window
    gives the simulator M = f32(sx/sy) / 4 = 0.25 exactly, so a quarter of the outputs are exact ties
    (window sum - 4 zp = 2 mod 4), rounded half to even before the zero point is added. onnxruntime's
    fused QLinearAveragePool rounds y/sy + zp: every tie moves one code when zp is odd, none when it is
    even; float AveragePool -> QuantizeLinear (fusion off) rounds the simulator's way at exact ties
    (sx a power of two: no float error)."""
    q = TensorQuant(8, np.float32(0.125), np.int32(zero_point))
    step = AvgPoolStep(name="pool", inputs=("x",), output="y", x_q=q, quant=q, kernel=(2, 2), stride=(2, 2),
                       padding=(0, 0))
    b = _QdqBuilder(None, {}, "float")
    b.avg_pool(step)
    shape = (2, 16, 16, 16)
    graph = helper.make_graph(b.nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    excess = x.astype(np.int64).reshape(2, 16, 8, 2, 8, 2).sum((3, 5)) - 4 * zero_point
    want = np.clip(np.rint(excess / 4) + zero_point, q.qmin, q.qmax)  # the simulator: rne(acc * 0.25) + zp
    ties = excess % 4 == 2
    fused = session(model, FUSED).run(None, {"x": x})[0].astype(np.int64)
    assert ties.mean() > 0.2 and np.abs(fused - want).max() <= 1
    np.testing.assert_array_equal(fused != want, ties if zero_point % 2 else np.zeros_like(ties))
    np.testing.assert_array_equal(session(model, FLOAT).run(None, {"x": x})[0], want)


def test_clamp_and_requant_steps(tmp_path):
    """A standalone ReLU6 clipping inside the range (ClampStep: Clip in float, exact at both levels) and
    a standalone requantization (RequantStep: DequantizeLinear -> QuantizeLinear, near-ties only)."""
    import torch.nn.functional as F
    from test_integer_convert import ToyNet, images
    from test_integer_convert import quantize as quantize_toy
    from test_integer_plan import Branchy, insert_requant

    from pyzeroq.integer import steps as S

    x = images(16).numpy()
    torch.manual_seed(4)
    q = quantize_toy(Branchy(F.relu6))
    next(m for n, m in q.graph_module.named_modules() if n == "act_quant_1").set_params(0.0625, 10)
    torch.manual_seed(0)
    for im, kind in ((zq.to_integer(q), S.ClampStep), (zq.to_integer(insert_requant(quantize_toy(ToyNet()))),
                                                        S.RequantStep)):
        env = im.run(x)
        env[im.steps[0].inputs[0]] = x
        assert any(isinstance(s, kind) for s in im.steps)
        for level in LEVELS.values():
            assert kind.__name__ in check_isolated(im, x, env, level, tmp_path)


# ---------------------------------------------------------------------------- packed mixed precision
def test_mixed_precision_packed_size(tmp_path):
    """MP4/A8 (2-, 4- and 8-bit weights): the QDQ file's weight and bias initializers hold exactly
    ``report.size_bytes`` (weights at their bits + every other parameter as 4 bytes: the int32 biases)
    with ``int2_weights=True`` (plus under one byte of padding per layer), and 2-bit weights cost 2 bits
    each more by default (stored as UINT4, which every onnxruntime optimization level runs).
    Scales, zero points and the graph come on top. onnxruntime agrees with the simulator as established
    above (int2 graphs at ORT_ENABLE_BASIC or below: the fused QLinearConv refuses 2-bit weights)."""
    q = zq.quantize(build("mobilenetv2"), zq.QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=4, act_bits=8,
                                                         mp_relaxation=False, **FAST), input_shape=ZOO["mobilenetv2"][1])
    bits, report = q.bit_widths, q.report
    assert set(bits.values()) == {2, 4, 8}
    im = zq.to_integer(q)
    x = torch.rand((IMAGES, *ZOO["mobilenetv2"][1]), generator=torch.Generator().manual_seed(1)).numpy()
    env = im.run(x)
    two_bit = sum(report.params[n] for n in report.layers if bits[n] == CRUMB)
    for int2, opset, extra, levels in ((False, 21, two_bit * (NIBBLE - CRUMB) // BYTE, (FUSED, FLOAT)),
                                       (True, 25, 0, (BASIC, FLOAT))):
        model = zq.export_onnx(q, tmp_path / "mp.onnx", x[:1], format="qdq") if not int2 else \
            build_qdq(im, x[:1], int2_weights=True)
        assert model.opset_import[0].version == opset
        stored = sum(len(t.raw_data) for t in model.graph.initializer if t.name.endswith(("_weight", "_bias")))
        assert 0 <= stored - report.size_bytes - extra <= len(report.layers), (stored, report.size_bytes, extra)
        if int2:
            with pytest.raises(Exception, match="uint2"):  # onnxruntime 1.32: QDQ fusion -> invalid QLinearConv
                session(model, FUSED)
        full = build_qdq(im, x[:1], intermediate=True, int2_weights=int2)
        for level in levels:
            differing, total, worst, float_err = compare_end_to_end(full, im, x, env, level)
            assert worst <= E2E_MAX_STEPS and differing <= E2E_MAX_FRACTION * total and float_err <= E2E_FLOAT_RTOL


@pytest.mark.parametrize("name", ["unet", "shufflenetv2", "inception"])  # upsample, transpose / chunk, pad
def test_no_unused_initializers(name):
    """Every initializer of the QOperator and QDQ graphs is read by a node (onnxruntime warns about
    each unused one at every session start)."""
    from pyzeroq.export import build_onnx

    _, im, x, _ = quantized(name, "W8A8")
    for model in (build_onnx(im, x[:1]), build_qdq(im, x[:1])):
        read = {i for n in model.graph.node for i in n.input}
        assert [t.name for t in model.graph.initializer if t.name not in read] == []


@pytest.mark.parametrize("format", ["qoperator", "qdq"])
def test_example_input_of_a_size_the_model_cannot_take(tmp_path, format):
    """UNet's skip concatenation needs sizes that survive its down- and upsampling: 7 x 7 does not."""
    q, _, x, _ = quantized("unet", "W8A8")
    odd = np.random.default_rng(0).random((1, x.shape[1], 7, 7)).astype(np.float32)
    with pytest.raises(ValueError, match=r"example_input of shape \(1, \d+, 7, 7\) does not fit the model"):
        zq.export_onnx(q, tmp_path / "a.onnx", odd, format=format)
    assert not (tmp_path / "a.onnx").exists()
