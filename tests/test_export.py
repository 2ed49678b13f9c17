"""ONNX export: onnxruntime runs the exported graph and reproduces the integer simulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyzeroq as zq
from pyzeroq.export import build_onnx, output_names

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from test_integer_convert import ToyNet, images, quantize, reference_qmodel  # noqa: E402

LEVELS = [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL]


def session(model, level=LEVELS[0]):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_all(model, x, level=LEVELS[0]) -> dict:
    s = session(model, level)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"input": x})))


def assert_same_as_simulator(int_model, model, x, level=LEVELS[0]):
    got = run_all(model, x, level)
    env = int_model.run(x)
    returned = dict(output_names(int_model.output))
    for name, value in got.items():
        want = env[returned.get(name, name)]
        np.testing.assert_array_equal(value, want, err_msg=name)
    return got


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return quantize(ToyNet())


@pytest.mark.parametrize("level", LEVELS, ids=["optimized", "unoptimized"])
def test_toy_export_bit_exact(toy, tmp_path, level):
    x = images(32).numpy()
    path = tmp_path / "toy.onnx"
    model = zq.export_onnx(toy, path, x[:1])
    assert path.exists()
    onnx.checker.check_model(onnx.load(str(path)))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "QLinearConv", "MatMulInteger"} <= ops
    im = zq.to_integer(toy)
    got = run_all(model, x, level)
    np.testing.assert_array_equal(got["logits"], im(x))
    # every intermediate activation too
    assert_same_as_simulator(im, build_onnx(im, x[:1], intermediate=True), x, level)


def test_toy_maxpool_and_uint8_pixels(tmp_path):
    torch.manual_seed(1)
    q = quantize(ToyNet(maxpool=True))
    im = zq.to_integer(q)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 1, 28, 28), dtype=np.uint8)
    model = zq.export_onnx(q, tmp_path / "toy_u8.onnx", pixels[:1], pixels="uint8")
    assert "Gather" in {n.op_type for n in model.graph.node}
    assert [n.op_type for n in model.graph.node if "input" in n.input] == ["Cast"]  # no float boundary
    assert_same_as_simulator(im, build_onnx(im, pixels[:1], pixels="uint8", intermediate=True), pixels)
    # the uint8 graph and the float graph give the same logits
    float_model = build_onnx(im, pixels[:1].astype(np.float32) / 255)
    np.testing.assert_array_equal(run_all(model, pixels)["logits"],
                                  run_all(float_model, pixels.astype(np.float32) / np.float32(255))["logits"])


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_reference_models_export(name):
    q = reference_qmodel(name)
    im = zq.to_integer(q)
    pixels, _ = zq.data.load_fashion_mnist("embedded")
    x = pixels[:32, None].astype(np.float32) / np.float32(255)
    exported = build_onnx(im, x[:1], intermediate=True)
    got = assert_same_as_simulator(im, exported, x)
    with torch.no_grad():
        fq = q(torch.from_numpy(x)).numpy()
    assert (got["logits"].argmax(1) == fq.argmax(1)).mean() >= 30 / 32


def test_qlinearadd_bound(toy):
    """With add_op='qlinearadd' (onnxruntime's fixed-point kernel) an add whose inputs are
    identical codes differs from the simulator by at most one code, at near-ties only."""
    im = zq.to_integer(toy)
    x = images(256, seed=5).numpy()
    got = run_all(build_onnx(im, x[:1], add_op="qlinearadd", intermediate=True), x)
    env = im.run(x)
    add = next(s for s in im.steps if s.kind == "add")
    for s in im.steps[:im.steps.index(add)]:  # everything before the add is identical
        np.testing.assert_array_equal(got[s.output], env[s.output])
    diff = np.abs(got[add.output].astype(np.int64) - env[add.output])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_export_errors(toy, tmp_path):
    x = images(2).numpy()
    with pytest.raises(ValueError, match="float32_rne"):
        build_onnx(zq.to_integer(toy, rounding="gemmlowp"), x)
    with pytest.raises(ValueError, match="pixels"):
        zq.export_onnx(toy, tmp_path / "a.onnx", x, pixels="int8")
    with pytest.raises(ValueError, match="add_op"):
        zq.export_onnx(toy, tmp_path / "a.onnx", x, add_op="float")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        zq.export_onnx(toy, tmp_path / "a.onnx", x[0])
    with pytest.raises(TypeError, match="QuantizedModel"):
        zq.export_onnx(ToyNet(), tmp_path / "a.onnx", x)


def test_clamp_and_requant_steps_bit_exact():
    """Standalone ReLU6 (ClampStep) and QuantAct (RequantStep) export op for op."""
    import torch.nn.functional as F
    from test_integer_plan import Branchy, insert_requant

    from pyzeroq.integer import steps as S

    x = images(16).numpy()
    torch.manual_seed(4)
    q = quantize(Branchy(F.relu6))
    act = next(m for n, m in q.graph_module.named_modules() if n == "act_quant_1")
    act.set_params(0.0625, 10)  # ReLU6 clips inside the range at code 106
    im = zq.to_integer(q)
    assert any(isinstance(s, S.ClampStep) and s.hi == 106 for s in im.steps)
    got = assert_same_as_simulator(im, build_onnx(im, x[:1], intermediate=True), x)
    assert "Clip" in {n.op_type for n in build_onnx(im, x[:1]).graph.node}
    assert len(got) == 1 + sum(s.out_q is not None for s in im.steps)
    torch.manual_seed(0)
    im = zq.to_integer(insert_requant(quantize(ToyNet())))
    assert any(isinstance(s, S.RequantStep) for s in im.steps)
    assert_same_as_simulator(im, build_onnx(im, x[:1], intermediate=True), x)


def test_mixed_precision_export_bit_exact():
    """2- and 4-bit weights, 4-bit activations: still the simulator's codes on every activation."""
    from pyzeroq.modules import set_weight_bits

    torch.manual_seed(3)
    q = quantize(ToyNet(), act_bits=4)
    set_weight_bits(q.graph_module, dict(zip(q.report.layers, (2, 4, 2, 4, 3, 8))))
    im = zq.to_integer(q)
    x = images(32, seed=2).numpy()
    for level in LEVELS:
        assert_same_as_simulator(im, build_onnx(im, x[:1], intermediate=True), x, level)


@pytest.mark.parametrize("level", LEVELS, ids=["optimized", "unoptimized"])
def test_int8_activations_with_asymmetric_uint8_weights(tmp_path, level):
    """act_dtype='int8' with the default asymmetric weights: onnxruntime has no S8U8 QLinearConv, so the
    export writes the weights as int8 codes w - 128 (zero points zw - 128, the same differences): the
    QOperator file loads and equals the integer model bit for bit, every intermediate too."""
    torch.manual_seed(0)
    q = quantize(ToyNet(), act_dtype="int8")
    x = images(16).numpy()
    im = zq.to_integer(q)
    model = zq.export_onnx(q, tmp_path / "s8u8.onnx", x[:1])
    np.testing.assert_array_equal(run_all(model, x, level)["logits"], im(x))
    assert_same_as_simulator(im, build_onnx(im, x[:1], intermediate=True), x, level)
