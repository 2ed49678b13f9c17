"""The typed integer plan: steps carry the quantization records as they are, one dispatch
table per consumer (runtime, ONNX builder), error types."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_integer_convert import ToyNet, images, quantize
from torch import nn

import pyzeroq as zq
import pyzeroq.integer as zi
from pyzeroq import export
from pyzeroq.integer import convert
from pyzeroq.integer import steps as S
from pyzeroq.integer.plan import PlanError, UnsupportedOperationError, compile_plan
from pyzeroq.models import Normalize
from pyzeroq.modules import QuantAct


class Branchy(nn.Module):
    """A conv output read by a standalone ReLU / ReLU6 and by an add (ClampStep)."""

    def __init__(self, relu=torch.relu):
        super().__init__()
        self.relu = relu
        self.normalize = Normalize()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv1(self.normalize(x))
        s = self.conv2(self.relu(y)) + y
        return self.fc(torch.flatten(self.gap(s), 1))


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return quantize(ToyNet())


def test_every_step_type_has_a_runtime_and_an_onnx_handler():
    assert set(convert.RUNTIME_HANDLERS) == set(S.STEP_TYPES) == set(export.ONNX_HANDLERS)
    assert len(set(S.STEP_TYPES)) == len(S.STEP_TYPES) == 17
    partial = dict(convert.RUNTIME_HANDLERS)
    del partial[S.ClampStep]
    with pytest.raises(TypeError, match="ClampStep"):
        S.check_handlers(partial, "test")
    with pytest.raises(TypeError, match="unknown step types"):
        S.check_handlers({**convert.RUNTIME_HANDLERS, int: None}, "test")


def test_layer_steps_carry_the_records(toy):
    plan = compile_plan(toy.graph_module)
    modules = dict(toy.graph_module.named_modules())
    layer_steps = [s for s in plan.steps if isinstance(s, S.LAYER_STEPS)]
    assert [s.name for s in layer_steps] == toy.report.layers
    for step in layer_steps:
        assert step.layer == modules[step.name].layer_record(step.name)
        assert step.in_q == (step.layer.input,) and step.out_q is step.layer.output
    assert isinstance(plan.steps[-1], S.LogitsStep) and plan.steps[-1].out_q is None
    assert plan.output == plan.steps[-1].output
    acts = {n.name: toy.graph_module.get_submodule(n.target).record() for n in toy.graph_module.graph.nodes
            if n.op == "call_module" and isinstance(toy.graph_module.get_submodule(n.target), QuantAct)}
    assert plan.steps[0].quant == acts[plan.steps[0].output]
    np.testing.assert_array_equal(plan.steps[-1].dequant, plan.steps[-1].layer.bias_scale)


def test_compiler_uses_the_record_as_is(toy, monkeypatch):
    """The compiler takes layer_record()'s weight codes, bias and activation without recomputing them."""
    layer = toy.graph_module.get_submodule("conv1.0")
    true = layer.layer_record("conv1.0")
    codes = np.array(true.weight_codes)
    codes[0, 0, 0, 0] ^= 1
    fake = dataclasses.replace(true, weight_codes=codes, bias=true.bias + 7)
    monkeypatch.setattr(layer, "layer_record", lambda name: fake)
    step = next(s for s in compile_plan(toy.graph_module).steps if s.name == "conv1.0")
    assert step.layer is fake


def test_fused_clamp_comes_from_the_record(toy, monkeypatch):
    dw = toy.graph_module.get_submodule("dw.0")
    assert dw.activation == "relu6"
    step = next(s for s in compile_plan(toy.graph_module).steps if s.name == "dw.0")
    assert step.clamp_codes() == step.layer.clamp_codes() == S.activation_clamp(step.out_q, "relu6")
    monkeypatch.setattr(dw, "activation", None)  # record and graph disagree: refused, not re-derived
    with pytest.raises(PlanError, match="'dw.0'.*does not follow it"):
        compile_plan(toy.graph_module)


def test_activation_clamp_rule():
    q = zq.qspec.TensorQuant(8, np.float32(0.05), 20)
    assert S.activation_clamp(q, None) == (0, 255)
    assert S.activation_clamp(q, "relu") == (20, 255)
    assert S.activation_clamp(q, "relu6") == (20, q.code_of(6.0)) == (20, 140)
    with pytest.raises(ValueError, match="activation"):
        S.activation_clamp(q, "gelu")


def test_standalone_relu_is_a_clamp_step():
    torch.manual_seed(4)
    q = quantize(Branchy())
    im = zq.to_integer(q)
    clamp = next(s for s in im.steps if isinstance(s, S.ClampStep))
    assert clamp.lo == clamp.x_q.zero_point_value and clamp.hi == 255 and clamp.out_q is clamp.x_q
    x = images(16)
    env = im.run(x)
    np.testing.assert_array_equal(env[clamp.output], np.maximum(env[clamp.inputs[0]], clamp.lo))
    with torch.no_grad():
        assert (im(x).argmax(1) == q(x).argmax(1)).float().mean() >= 0.9


def test_standalone_relu6_needs_six_as_a_code():
    torch.manual_seed(4)
    q = quantize(Branchy(F.relu6))
    act = q.graph_module.get_submodule(next(n.target for n in q.graph_module.graph.nodes if n.op == "call_module"
                                            and n.args[0].op == "call_module" and n.args[0].target == "conv1"))
    act.set_params(0.07, 10)  # 6.0 is within the range but not a code (6 / 0.07 = 85.7)
    with pytest.raises(UnsupportedOperationError, match="6.0 is a code") as info:
        zq.to_integer(q)
    assert info.value.op == "relu6"
    act.set_params(0.0625, 10)  # 6.0 is code 10 + 96
    clamp = next(s for s in zq.to_integer(q).steps if isinstance(s, S.ClampStep))
    assert (clamp.lo, clamp.hi) == (10, 106)


def insert_requant(qmodel):
    """A QuantAct right after conv2.0's output quantizer (a standalone requantization step)."""
    gm = qmodel.graph_module
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.args and isinstance(n.args[0], torch.fx.Node)
                and n.args[0].target == "conv2.0")
    src = gm.get_submodule(node.target)
    extra = QuantAct(8)
    extra.set_params(float(src.scale) * 1.37, int(src.zero_point) + 3)
    extra.mode = "quantize"
    gm.add_module("extra_requant", extra)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module("extra_requant", (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    gm.recompile()
    return qmodel


def test_standalone_quant_act_is_a_requant_step():
    torch.manual_seed(0)
    q = insert_requant(quantize(ToyNet()))
    im = zq.to_integer(q)
    step = next(s for s in im.steps if isinstance(s, S.RequantStep))
    assert step.name == "extra_requant" and step.x_q != step.quant
    env = im.run(images(8))
    mult = np.float32(np.float32(step.x_q.scale_value) / np.float32(step.quant.scale_value))
    want = zi.requantize(env[step.inputs[0]].astype(np.int32) - step.x_q.zero_point_value, mult,
                         step.quant.zero_point_value)
    np.testing.assert_array_equal(env[step.output], want)


def test_unsupported_operation_error_names_node_and_op():
    class Pool2(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.pool = nn.AdaptiveAvgPool2d((None, 2))  # keeps H: no integer form
            self.fc = nn.Linear(4 * 26 * 2, 3)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.conv(x)), 1))

    with pytest.raises(ValueError, match="AdaptiveAvgPool2d"):  # quantize stops first (integer.support)
        quantize(Pool2())
    with pytest.raises(UnsupportedOperationError, match="AdaptiveAvgPool2d") as info:
        zq.to_integer(quantize(Pool2(), float_ops="allow"))
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, PlanError)
    assert (err.node, err.op) == ("pool", "AdaptiveAvgPool2d")
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), again.node, again.op, str(again)) == (UnsupportedOperationError, "pool", "AdaptiveAvgPool2d",
                                                               str(err))

    torch.manual_seed(0)
    net = ToyNet()
    net.conv1[0].padding_mode = "reflect"
    with pytest.raises(UnsupportedOperationError, match="padding_mode") as info:
        zq.to_integer(quantize(net, float_ops="allow"))
    assert info.value.op == "QuantConv2d"


def test_overflow_error_type():
    """The simulator raises AccumulatorOverflowError (a ValueError) for overflow="error" only."""
    x = np.full((1, 1, 4, 4), 255, np.uint8)
    w = np.full((1, 1, 3, 3), 255, np.uint8)
    with pytest.raises(zi.AccumulatorOverflowError, match="accumulator overflow.*bits needed") as info:
        zi.qlinear_conv2d(x, 1.0, 0, w, 1.0, 0, 1.0, 0, acc_bits=12, overflow="error")
    assert isinstance(info.value, ValueError) and info.value.layer is None
    with pytest.raises(zi.AccumulatorOverflowError):
        zi.conv_integer(x, 0, w, 0, acc_bits=12, overflow="error")
    with pytest.raises(zi.AccumulatorOverflowError):
        zi.qlinear_matmul(x.reshape(4, 4), 1.0, 0, np.full((4, 2), 255, np.uint8), 1.0, 0, 1.0, 0, acc_bits=12,
                          overflow="error")
    with pytest.raises(ValueError) as info:  # other argument errors keep their type
        zi.qlinear_conv2d(x, -1.0, 0, w, 1.0, 0, 1.0, 0)
    assert not isinstance(info.value, zi.AccumulatorOverflowError)
    again = pickle.loads(pickle.dumps(zi.AccumulatorOverflowError("m", layer="fc")))
    assert again.layer == "fc" and str(again) == "m"


def test_step_serialization(toy):
    plan = compile_plan(toy.graph_module)
    for step in plan.steps:
        d = step.to_dict()
        assert S.step_from_dict(d) == step
        again = pickle.loads(pickle.dumps(step))
        assert again == step and type(again) is type(step)
        if isinstance(step, S.LAYER_STEPS):  # canonical dtypes: the kernels check dtype identity
            assert again.layer.weight_codes.dtype is np.dtype(np.uint8)
            assert again.layer.bias.dtype is np.dtype(np.int32)
    with pytest.raises(ValueError, match="not an integer step"):
        S.step_from_dict({"type": "EvalStep"})


def test_step_validation(toy):
    conv = next(s for s in compile_plan(toy.graph_module).steps if isinstance(s, S.ConvStep))
    with pytest.raises(ValueError, match="padding must have 4 values"):
        dataclasses.replace(conv, padding=(1, 1))
    q = conv.out_q
    with pytest.raises(ValueError, match="exactly one of flatten and shape"):
        S.ReshapeStep(name="r", inputs=("x",), output="r", x_q=q)
    with pytest.raises(ValueError, match="activation"):
        S.AddStep(name="a", inputs=("x", "y"), output="a", x_q=q, y_q=q, quant=q, activation="tanh")
    with pytest.raises(ValueError, match="float output"):
        S.LogitsStep(name="c", inputs=("x",), output="c", layer=conv.layer)
    with pytest.raises(dataclasses.FrozenInstanceError):
        conv.groups = 2
    r = S.ReshapeStep(name="r", inputs=("x",), output="r", x_q=q, shape=("batch", -1))
    assert r.apply(np.zeros((3, 2, 2, 2), np.uint8)).shape == (3, 8)
