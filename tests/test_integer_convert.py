"""Converter: quantized model -> integer-only model on the C++ simulator."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

import pyzeroq as zq
import pyzeroq.integer as zi
from pyzeroq import ops
from pyzeroq.integer import steps as S
from pyzeroq.integer.convert import AccumulatorOverflowError, logits_accumulator
from pyzeroq.integer.plan import PlanError, UnsupportedOperationError
from pyzeroq.models import Normalize, build_model, load_pretrained, registry
from pyzeroq.modules import QuantAct, set_weight_bits
from pyzeroq.qspec import LayerQuant, TensorQuant

FAST = dict(calibration="gaussian", num_samples=8, progress=False)
INTEGER_DTYPES = {"uint8", "uint16", "int32"}


class ToyNet(nn.Module):
    """Every op kind the converter handles: conv+BN+ReLU, residual add (+ReLU), depthwise
    conv+BN+ReLU6, avg pool, max pool, global pool, flatten, hidden linear+ReLU, logits."""

    def __init__(self, maxpool: bool = False):
        super().__init__()
        self.normalize = Normalize()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.relu2 = nn.ReLU()
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8))
        self.relu6 = nn.ReLU6()
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.pool = nn.MaxPool2d(2) if maxpool else nn.AvgPool2d(3, stride=2, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 12)
        self.fc1_relu = nn.ReLU()
        self.fc2 = nn.Linear(12, 10)
        with torch.no_grad():  # non-trivial BN statistics
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)

    def forward(self, x):
        x = self.relu1(self.conv1(self.normalize(x)))
        x = self.relu2(x + self.conv2(x))
        x = self.pw(self.relu6(self.dw(x)))
        x = self.gap(self.pool(x))
        return self.fc2(self.fc1_relu(self.fc1(torch.flatten(x, 1))))


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 28, 28, generator=g) ** 2)  # many dark pixels, like Fashion-MNIST


def quantize(model, **cfg):
    cfg = {"weight_bits": 8, "act_bits": 8, **FAST, **cfg}
    return zq.quantize(model.eval(), zq.QuantConfig(**cfg), input_shape=(1, 28, 28))


def fq_codes(qmodel, x) -> dict:
    """Codes of every QuantAct output of the fake-quant model, keyed by the quantized node."""
    out, hooks = {}, []
    for name, mod in qmodel.graph_module.named_modules():
        if isinstance(mod, QuantAct):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: out.__setitem__(name, np.rint(o.numpy() / np.float32(m.scale)).astype(np.int64)
                                                           + int(m.zero_point))))
    with torch.no_grad():
        logits = qmodel(x)
    for h in hooks:
        h.remove()
    return out, logits


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return quantize(ToyNet())


@functools.lru_cache(maxsize=None)
def reference_qmodel(name: str):
    """W8A8 reference model (pretrained when committed, else untrained), shared by the test files."""
    torch.manual_seed(0)
    model = load_pretrained(name) if name in registry() else build_model(name).eval()
    return quantize(model)


@pytest.fixture(scope="module")
def reference_models():
    return {name: reference_qmodel(name) for name in ("resnet20", "mobilenetv2")}


def test_toy_plan_covers_every_op(toy):
    im = zq.to_integer(toy)
    assert [type(s) for s in im.steps] == [S.InputStep, S.ConvStep, S.ConvStep, S.AddStep, S.ConvStep, S.ConvStep,
                                           S.AvgPoolStep, S.GlobalAvgPoolStep, S.ReshapeStep, S.LinearStep,
                                           S.LogitsStep]
    assert [s.kind for s in im.steps] == ["input", "conv", "conv", "add", "conv", "conv", "avg_pool",
                                          "global_avg_pool", "reshape", "linear", "linear_out"]
    assert im.folded_bn == {"conv1.1": "conv1.0", "conv2.1": "conv2.0", "dw.1": "dw.0", "pw.1": "pw.0"}
    # fused ReLU after the add (found by the compiler) / ReLU6 of dw (the layer record's activation)
    assert im.steps[3].activation == "relu" and im.steps[4].layer.activation == "relu6"


def test_weights_and_bias_match_fake_quant(toy):
    im = zq.to_integer(toy)
    layers = dict(toy.graph_module.named_modules())
    for step in im.steps:
        if not isinstance(step, S.LAYER_STEPS):
            continue
        layer = layers[step.name]
        assert step.layer == layer.layer_record(step.name)  # the record as is
        w = step.layer.weight_codes
        w_scale, w_zp = step.layer.weight.channels(w.shape[0])
        real = ops.dequantize(w.reshape(w.shape[0], -1), w_scale, w_zp, axis=0)
        np.testing.assert_array_equal(real.reshape(layer.weight.shape), layer.quantized_weight().detach().numpy())
        bias_scale = np.float32(step.in_q[0].scale_value) * w_scale
        np.testing.assert_array_equal(step.layer.bias.astype(np.float32) * bias_scale,
                                      layer.quantized_bias().detach().numpy())
        assert step.layer.bias.dtype == np.int32 and w.dtype == np.uint8


def test_toy_agrees_with_fake_quant(toy):
    x = images(64)
    codes, logits = fq_codes(toy, x)
    im = zq.to_integer(toy)
    env = im.run(x)
    # the boundary is exact, the first conv differs only at float near-ties of the requantization
    assert np.array_equal(env["act_quant_0"], codes["act_quant_0"])
    acts = [n for n in toy.graph_module.graph.nodes if n.op == "call_module" and n.target.startswith("act_quant")]
    for node in acts[1:]:
        slot = node.args[0].name if node.args[0].name in env else node.args[0].args[0].name
        diff = np.abs(env[slot].astype(np.int64).reshape(codes[node.target].shape) - codes[node.target])
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, node.target
    li = im(x)
    assert isinstance(li, torch.Tensor) and li.dtype == torch.float32
    assert (li.argmax(1) == logits.argmax(1)).float().mean() >= 0.95
    assert torch.allclose(li, logits, atol=0.1 * float(logits.abs().max()))


def test_no_float_op_between_boundary_and_logits(toy):
    im = zq.to_integer(toy)
    im.trace = True
    pixels = (images(4) * 255).round().to(torch.uint8)
    im(pixels)
    log = im.trace_log
    assert log[0]["op"] == "input" and log[0]["inputs"] == ["uint8"]
    assert log[-1]["op"] == "linear_out" and log[-1]["output"] == "float32"
    for entry in log[:-1]:  # every op before the final dequantization is integer in, integer out
        assert set(entry["inputs"]) <= INTEGER_DTYPES and entry["output"] in INTEGER_DTYPES, entry
    assert log[-2]["op"] == "accumulate" and log[-2]["output"] == "int32"
    assert len(log) == len(im.steps) + 1


def test_uint8_pixels_equal_float_path(toy):
    im = zq.to_integer(toy)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 1, 28, 28), dtype=np.uint8)
    from_float = im(torch.from_numpy(pixels).float() / 255)
    from_pixels = im(pixels)
    assert isinstance(from_pixels, np.ndarray)
    np.testing.assert_array_equal(from_float.numpy(), from_pixels)
    # the table reproduces the float boundary for every pixel value
    all_pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    np.testing.assert_array_equal(im.input_codes(all_pixels), im.input_codes(all_pixels.astype(np.float32) / np.float32(255)))


def test_maxpool_and_rounding_modes():
    torch.manual_seed(1)
    q = quantize(ToyNet(maxpool=True))
    x = images(32, seed=1)
    with torch.no_grad():
        ref = q(x).argmax(1)
    for rounding in ("float32_rne", "gemmlowp", "dyadic"):
        im = zq.to_integer(q, rounding=rounding)
        assert "max_pool" in [s.kind for s in im.steps]
        assert (torch.from_numpy(np.asarray(im(x.numpy()))).argmax(1) == ref).float().mean() >= 0.9


def test_relu6_clamps_at_code_of_six():
    torch.manual_seed(2)
    net = ToyNet()
    with torch.no_grad():
        net.dw[1].weight.mul_(20.0)  # drive the depthwise outputs far beyond 6
    q = quantize(net)
    act = next(n for n in q.graph_module.graph.nodes if n.op == "call_module" and n.args[0].op == "call_module"
               and n.args[0].target == "relu6")
    qa = q.graph_module.get_submodule(act.target)
    qa.scale.fill_(0.05)  # range [0, 12.75]: 6.0 is code 120, so ReLU6 clips inside the range
    qa.zero_point.fill_(0)
    im = zq.to_integer(q)
    dw = next(s for s in im.steps if s.name == "dw.0")
    assert dw.layer.activation == "relu6" and dw.clamp_codes() == (0, 120)
    x = images(16)
    codes, _ = fq_codes(q, x)
    got = im.run(x)[dw.output]
    assert got.max() == 120 and codes[act.target].max() == 120
    assert (got != codes[act.target]).mean() < 0.01


def test_mixed_weight_bits():
    torch.manual_seed(3)
    q = quantize(ToyNet())
    bits = dict(zip(q.report.layers, (2, 3, 4, 5, 6, 8)))
    set_weight_bits(q.graph_module, bits)
    im = zq.to_integer(q)
    for step in im.steps:
        if isinstance(step, S.LAYER_STEPS):
            assert step.layer.weight.bits == bits[step.name] and step.layer.weight_codes.max() < 2 ** bits[step.name]
    x = images(32)
    with torch.no_grad():
        ref = q(x).argmax(1)
    assert (torch.as_tensor(im(x)).argmax(1) == ref).float().mean() >= 0.9


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_reference_models(reference_models, name):
    q = reference_models[name]
    pixels, _ = zq.data.load_fashion_mnist("embedded")
    pixels = pixels[:64, None]
    x = torch.from_numpy(pixels).float() / 255
    with torch.no_grad():
        ref = q(x)
    im = zq.to_integer(q)
    im.trace = True
    li = im(pixels)
    assert all(set(e["inputs"]) <= INTEGER_DTYPES and e["output"] in INTEGER_DTYPES for e in im.trace_log[1:-1])
    np.testing.assert_array_equal(li, im(x).numpy())
    agree = (li.argmax(1) == ref.argmax(1).numpy()).mean()
    assert agree >= 62 / 64, agree
    kinds = {s.kind for s in im.steps}
    assert {"conv", "add", "global_avg_pool", "linear_out"} <= kinds
    if name == "mobilenetv2":  # depthwise convs with ReLU6
        assert any(isinstance(s, S.ConvStep) and s.groups > 1 and s.layer.activation == "relu6" for s in im.steps)
    rep = im.report()
    assert rep.images == 128 and len(rep.layers) == len(q.report.layers)
    assert rep.overflowing(16) and not rep.overflowing(32)  # 8-bit models need > 16 accumulator bits
    for row in rep.layers:
        assert row["bits_needed"] <= row["bound_bits"] and row["overflows"] == 0
        assert row["overflow_int16"] == (row["bits_needed"] > 16)
    assert "| layer |" in rep.to_markdown()


def test_narrow_accumulators(toy):
    x = images(8)
    wide = zq.to_integer(toy)
    rep = wide.report(x)
    first = rep.layers[0]
    assert first["layer"] == "conv1.0"
    narrow_bits = first["bits_needed"] - 1
    wrap = zq.to_integer(toy, acc_bits=narrow_bits, overflow="wrap")
    wrap(x)
    assert wrap.report().layers[0]["overflows"] > 0
    sat = zq.to_integer(toy, acc_bits=narrow_bits, overflow="saturate")
    sat(x)
    assert sat.report().layers[0]["overflows"] > 0
    err = zq.to_integer(toy, acc_bits=narrow_bits, overflow="error")
    with pytest.raises(AccumulatorOverflowError, match=rf"layer 'conv1.0'.*bits needed: {first['bits_needed']}") as info:
        err(x)
    assert info.value.layer == "conv1.0"
    # the logits layer (numpy int64 accumulator) follows the same register model
    fc = rep.layers[-1]
    assert fc["op"] == "linear_out"


@pytest.mark.parametrize("overflow", ["wrap", "saturate", "error"])
@pytest.mark.parametrize("acc_bits", [12, 16, 32])
def test_final_accumulator_matches_simulator_model(overflow, acc_bits):
    """The logits layer's int32 accumulator follows qlinear_matmul's acc_bits / overflow model."""
    rng = np.random.default_rng(acc_bits)
    a = rng.integers(0, 256, (6, 40), dtype=np.uint8)
    w = rng.integers(0, 256, (5, 40), dtype=np.uint8)
    zp = rng.integers(0, 256, 5)
    bias = rng.integers(-3000, 3000, 5).astype(np.int32)
    record = LayerQuant("fc", TensorQuant(8, np.ones(5, np.float32), zp, axis=0), w, TensorQuant(8, 0.1, 77),
                        bias=bias)
    step = S.LogitsStep(name="fc", inputs=("x",), output="fc", layer=record)
    kw = dict(acc_bits=acc_bits, overflow=overflow)
    sim_err = None
    try:  # requantize with M = 1 to 16 bits: codes = acc + 32768 where it fits
        codes, st = zi.qlinear_matmul(a, 1.0, 77, np.ascontiguousarray(w.T), 1.0, zp, 1.0, 32768, bias,
                                      out_bits=16, **kw)
    except ValueError as exc:
        sim_err = exc
    if sim_err is not None:
        assert isinstance(sim_err, AccumulatorOverflowError) and sim_err.layer is None
        with pytest.raises(AccumulatorOverflowError, match="layer 'fc'.*bits needed"):
            logits_accumulator(a, step, acc_bits, overflow)
        return
    acc, ours = logits_accumulator(a, step, acc_bits, overflow)
    mn, mx, count = ours.min_acc, ours.max_acc, ours.overflow_count
    assert count == st.overflow_count and max(-mn, mx) == st.max_abs_acc
    fits = (acc > -32768) & (acc < 32767)
    np.testing.assert_array_equal(codes[fits].astype(np.int64) - 32768, acc[fits])


def test_bad_inputs(toy):
    im = zq.to_integer(toy)
    with pytest.raises(ValueError, match=r"shape \[N, C, H, W\]"):
        im(torch.rand(1, 28, 28))
    with pytest.raises(TypeError, match="dtype int64"):
        im(np.zeros((1, 1, 28, 28), np.int64))
    with pytest.raises(ValueError, match="NaN"):
        im(torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        im([[[[0.0]]]])
    with pytest.raises(ValueError, match="no inputs"):
        zq.to_integer(toy).report()
    with pytest.raises(TypeError, match="QuantizedModel"):
        zq.to_integer(ToyNet())
    with pytest.raises(ValueError, match="rounding"):
        zq.to_integer(toy, rounding="nearest")
    with pytest.raises(ValueError, match="overflow"):
        zq.to_integer(toy, overflow="clip")
    with pytest.raises(ValueError, match="acc_bits"):
        zq.to_integer(toy, acc_bits=40)


def test_unsupported_models():
    class Sig(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.exp(self.conv(x)).mean((2, 3)))

    with pytest.raises(UnsupportedOperationError, match="exp") as info:
        zq.to_integer(quantize(Sig(), float_ops="allow"))
    assert isinstance(info.value, ValueError) and info.value.op == "exp" and info.value.node == "exp"
    with pytest.raises(PlanError, match="act_bits|not quantizing"):
        zq.to_integer(quantize(ToyNet(), act_bits=None))
    with pytest.raises(UnsupportedOperationError, match="16 bits.*2..8"):
        zq.to_integer(quantize(ToyNet(), act_bits=16))
    with pytest.raises(UnsupportedOperationError, match="12-bit weights") as info:
        zq.to_integer(quantize(ToyNet(), weight_bits=12))
    assert info.value.node == "conv1_0" and info.value.op == "QuantConv2d"

    class ConstOut(nn.Module):  # returns a Python constant beside the tensor
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return torch.flatten(self.conv(x), 1), 3

    with pytest.raises(ValueError, match="tuple / list / dict of tensors, got int"):
        quantize(ConstOut())


def test_meta_tensor_input_is_named():
    torch.manual_seed(0)
    im = zq.to_integer(quantize(ToyNet()))
    with pytest.raises(ValueError, match="x is a meta tensor"):
        im(torch.zeros(2, 1, 28, 28, device="meta"))
