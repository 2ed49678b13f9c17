"""Operator coverage beyond the reference CNNs: each op family quantized end to end.

Per model: (a) the surgery leaves no float op, (b) the integer model reproduces the fake-quant
model's activation codes (lookup tables exactly, by construction) and its predictions,
(c) onnxruntime reproduces every intermediate code of the integer model, (d) save / load
(QuantizedModel and IntegerModel) round trips bit-exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_integer_convert import fq_codes, images, quantize
from torch import nn

import pyzeroq as zq
from pyzeroq.integer import steps as S
from pyzeroq.integer.lookup import lookup_table
from pyzeroq.integer.plan import UnsupportedOperationError
from pyzeroq.models import Normalize
from pyzeroq.modules import QuantAct
from pyzeroq.qspec import TensorQuant

WIDTH = 8
CLASSES = 10
BATCH = 32
MIN_AGREEMENT = 0.9  # integer vs fake-quant top-1 agreement (near-tie requantizations only)
MAX_CODE_DIFF_FRACTION = 0.01  # conv requantization near-ties (see test_integer_convert)

LOOKUP_MODULES = [nn.Hardswish(), nn.Hardsigmoid(), nn.SiLU(), nn.GELU(), nn.Sigmoid(), nn.Tanh(),
                  nn.LeakyReLU(0.1), nn.Hardtanh(-0.5, 1.5)]
LOOKUP_FUNCTIONS = [F.hardswish, F.hardsigmoid, F.silu, lambda x: F.gelu(x, approximate="tanh"), torch.sigmoid,
                    torch.tanh, lambda x: F.leaky_relu(x, 0.2), lambda x: F.hardtanh(x, -1.0, 1.0)]


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=1), nn.BatchNorm2d(cout))
    with torch.no_grad():
        conv[1].running_mean.uniform_(-0.5, 0.5)
        conv[1].running_var.uniform_(0.5, 2.0)
    return conv


class LookupNet(nn.Module):
    """conv -> activation, once per activation (modules, or functional forms), -> pool -> linear."""

    def __init__(self, functional: bool):
        super().__init__()
        self.normalize = Normalize()
        self.convs = nn.ModuleList([_conv(1 if i == 0 else WIDTH, WIDTH, 2 if i in (0, 4) else 1)
                                    for i in range(len(LOOKUP_MODULES))])
        self.functional = functional
        if not functional:
            self.acts = nn.ModuleList(LOOKUP_MODULES)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        x = self.normalize(x)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.functional:
                x = LOOKUP_FUNCTIONS[i](x) if i != 4 else x.sigmoid()  # the method form too
            else:
                x = self.acts[i](x)
        return self.fc(torch.flatten(self.gap(x), 1))


# ---------------------------------------------------------------------------- shared checks
def check_no_float_ops(q) -> None:
    assert q.report.float_ops == []


def check_integer_matches_fake_quant(q, im, x: torch.Tensor) -> dict:
    """Every QuantAct's codes (a few conv near-ties allowed) and the predictions; returns the env."""
    codes, logits = fq_codes(q, x)
    env = im.run(x)
    acts = [n for n in q.graph_module.graph.nodes if n.op == "call_module" and
            isinstance(q.graph_module.get_submodule(n.target), QuantAct)]
    slots = {s.output for s in im.steps}
    for node in acts:
        p = node  # the step that wrote these codes: the QuantAct's own (input) or its source's (a fused ReLU skipped)
        while p.name not in slots:
            p = p.args[0]
        slot = p.name
        got = env[slot].astype(np.int64).reshape(codes[node.target].shape)
        diff = np.abs(got - codes[node.target])
        assert (diff > 0).mean() <= MAX_CODE_DIFF_FRACTION, node.target
    assert (np.asarray(im(x)).argmax(1) == logits.numpy().argmax(1)).mean() >= MIN_AGREEMENT
    return env


def check_onnx(im, x: np.ndarray) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from test_export import LEVELS, assert_same_as_simulator

    from pyzeroq.export import build_onnx, output_names
    model = build_onnx(im, x[:1], intermediate=True)
    for level in LEVELS:
        got = assert_same_as_simulator(im, model, x, level)
        assert len(got) == len(output_names(im.output)) + sum(s.out_q is not None for s in im.steps)
    assert ort is not None


def check_save_load(q, im, x: torch.Tensor, tmp_path) -> None:
    q.save(tmp_path / "q.pzq")
    q2 = zq.load(tmp_path / "q.pzq")
    with torch.no_grad():
        np.testing.assert_array_equal(q2(x).numpy(), q(x).numpy())
    im2 = zq.to_integer(q2)
    assert im2.steps == im.steps
    im.save(tmp_path / "im.pt")
    im3 = zq.load(tmp_path / "im.pt")
    assert im3.steps == im.steps
    for other in (im2, im3):
        np.testing.assert_array_equal(np.asarray(other(x.numpy())), np.asarray(im(x.numpy())))


def check_all(q, tmp_path, kinds: set, x: torch.Tensor | None = None) -> None:
    check_no_float_ops(q)
    im = zq.to_integer(q)
    assert kinds <= {s.kind for s in im.steps}
    x = images(BATCH) if x is None else x
    check_integer_matches_fake_quant(q, im, x)
    check_onnx(im, x.numpy())
    check_save_load(q, im, x, tmp_path)
    return im


# ---------------------------------------------------------------------------- lookup activations
@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functional"])
def test_lookup_activations(functional, tmp_path):
    torch.manual_seed(0)
    q = quantize(LookupNet(functional))
    im = check_all(q, tmp_path, {"lookup"})
    lookups = [s for s in im.steps if isinstance(s, S.LookupStep)]
    assert len(lookups) == len(LOOKUP_MODULES)
    # exact by construction: the table maps the fake-quant input codes to the fake-quant output codes
    x = images(BATCH, seed=3)
    codes, _ = fq_codes(q, x)
    gm = q.graph_module
    for step in lookups:
        node = next(n for n in gm.graph.nodes if n.name == step.output)
        src, dst = node.args[0].target, next(iter(node.users)).target
        np.testing.assert_array_equal(step.table[codes[src]], codes[dst], err_msg=step.name)


class MlpHead(nn.Module):
    """Activations on [N, K] features: conv -> SiLU -> mean -> Linear -> GELU -> cat -> Linear."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize()
        self.c = _conv(1, WIDTH, 2)
        self.fc1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.fc2 = nn.Linear(3 * WIDTH, CLASSES)

    def forward(self, x):
        x = F.silu(self.c(self.normalize(x))).mean((2, 3))
        return self.fc2(torch.cat([F.gelu(self.fc1(x)), x], dim=1))


def test_activations_on_features(tmp_path):
    """Lookup tables and a concat on 2-D [N, K] features."""
    torch.manual_seed(5)
    q = quantize(MlpHead())
    check_no_float_ops(q)
    im = zq.to_integer(q)
    assert [s.kind for s in im.steps].count("lookup") == 2
    x = images(BATCH)
    check_integer_matches_fake_quant(q, im, x)
    check_save_load(q, im, x, tmp_path)
    cat = next(s for s in im.steps if isinstance(s, S.ConcatStep))
    assert any(xq != cat.quant for xq in cat.x_qs)  # 2-D inputs requantized (Unsqueeze, QLinearConv, Flatten)
    check_onnx(im, x.numpy())


def test_low_bit_lookup_and_concat(tmp_path):
    """4-bit activations: 16-entry tables, requantized concat inputs, codes clipped to 15 in ONNX."""
    torch.manual_seed(0)
    im = check_all(quantize(LookupNet(functional=False), act_bits=4), tmp_path, {"lookup"})
    assert all(s.table.shape == (16,) and s.table.max() <= 15 for s in im.steps if isinstance(s, S.LookupStep))
    torch.manual_seed(1)
    check_all(quantize(InceptionNet(1), act_bits=4), tmp_path, {"concat"})


def test_lookup_table_formula():
    x_q, y_q = TensorQuant(8, 0.05, 128), TensorQuant(8, 1 / 255, 0)
    table = lookup_table(torch.sigmoid, x_q, y_q)
    real = np.float32(0.05) * (np.arange(256, dtype=np.float32) - np.float32(128))
    want = y_q.quantize(torch.sigmoid(torch.from_numpy(real)).numpy())
    np.testing.assert_array_equal(table, want)
    assert table.dtype == np.uint8 and table[0] == 0 and table[-1] == 255
    low = lookup_table(torch.tanh, TensorQuant(4, 0.5, 8), TensorQuant(4, 2 / 15, 7), activation="relu")
    assert low.shape == (16,) and low.min() == 7  # fused ReLU: clamped at the zero point
    with pytest.raises(ValueError, match="entries"):
        S.LookupStep(name="a", inputs=("x",), output="y", x_q=x_q, quant=y_q, table=table[:10])
    step = S.LookupStep(name="a", inputs=("x",), output="y", x_q=x_q, quant=y_q, table=table, op="sigmoid")
    assert S.step_from_dict(step.to_dict()) == step


# ---------------------------------------------------------------------------- concatenation
class InceptionNet(nn.Module):
    """stem conv -> two conv branches (1x1 and 3x3, ReLU) concatenated along ``dim`` -> conv ->
    a second cat (three inputs, one repeated) -> pool -> linear."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim
        self.normalize = Normalize()
        self.stem = _conv(1, WIDTH, 2)
        self.relu = nn.ReLU()
        self.branch1 = nn.Sequential(nn.Conv2d(WIDTH, WIDTH // 2, 1), nn.BatchNorm2d(WIDTH // 2), nn.ReLU())
        self.branch3 = nn.Sequential(_conv(WIDTH, WIDTH), nn.ReLU())
        cat_channels = WIDTH // 2 + WIDTH if dim == 1 else WIDTH
        self.mix = _conv(cat_channels if dim == 1 else WIDTH // 2, WIDTH) if dim == 1 else None
        self.head = _conv(cat_channels if dim == 1 else WIDTH, WIDTH)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * WIDTH + WIDTH if dim == 1 else WIDTH, CLASSES)

    def forward(self, x):
        x = self.relu(self.stem(self.normalize(x)))
        a, b = self.branch1(x), self.branch3(x)
        if self.dim == 1:
            y = self.head(torch.cat([a, b], 1))
            y = torch.cat((y, x, y), dim=1)
        else:  # spatial: both branches with WIDTH channels
            y = self.head(torch.cat([b, x], dim=self.dim))
        return self.fc(torch.flatten(self.gap(y), 1))


@pytest.mark.parametrize("dim", [1, 2, -1])
def test_concat(dim, tmp_path):
    torch.manual_seed(1)
    q = quantize(InceptionNet(dim))
    im = check_all(q, tmp_path, {"concat"})
    cats = [s for s in im.steps if isinstance(s, S.ConcatStep)]
    assert len(cats) == (2 if dim == 1 else 1) and all(s.dim == dim for s in cats)
    # one output scale calibrated on the concatenated tensor: the inputs are requantized to it
    assert all(any(xq != s.quant for xq in s.x_qs) for s in cats)
    if dim == 1:
        assert len(cats[1].inputs) == 3 and cats[1].inputs[0] == cats[1].inputs[2]


def test_concat_requant_is_the_requant_step():
    """Each input of a concat is requantized exactly like a standalone RequantStep."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (2, 3, 4, 4), dtype=np.uint8) for _ in range(2))
    qa, qb, qy = TensorQuant(8, 0.02, 10), TensorQuant(8, 0.05, 128), TensorQuant(8, 0.04, 100)
    cat = S.ConcatStep(name="c", inputs=("a", "b"), output="c", x_qs=(qa, qb), quant=qy, dim=1)
    assert S.step_from_dict(cat.to_dict()) == cat
    from pyzeroq.integer.convert import RUNTIME_HANDLERS, IntegerModel
    runner = IntegerModel.__new__(IntegerModel)
    runner.rounding = "float32_rne"
    got = RUNTIME_HANDLERS[S.ConcatStep](runner, cat, [a, b])
    parts = [RUNTIME_HANDLERS[S.RequantStep](runner, S.RequantStep(name="r", inputs=("x",), output="y", x_q=xq,
                                                                     quant=qy), [x]) for x, xq in ((a, qa), (b, qb))]
    np.testing.assert_array_equal(got, np.concatenate(parts, 1))
    assert got.dtype == np.uint8 and got.shape == (2, 6, 4, 4)


# ---------------------------------------------------------------------------- functional pools, spatial mean
HEADS = {
    "adaptive": lambda x: torch.flatten(F.adaptive_avg_pool2d(x, 1), 1),
    "mean": lambda x: x.mean((2, 3)),
    "mean_keepdim": lambda x: x.mean(dim=(2, 3), keepdim=True).flatten(1),
    "torch_mean": lambda x: torch.mean(x, (-2, -1)),
}


class PoolNet(nn.Module):
    """conv -> F.max_pool2d -> conv -> F.avg_pool2d (padded) -> conv -> a global-pool head -> linear."""

    def __init__(self, head: str):
        super().__init__()
        self.normalize = Normalize()
        self.c1, self.c2, self.c3 = _conv(1, WIDTH), _conv(WIDTH, WIDTH), _conv(WIDTH, WIDTH)
        self.head = head
        self.fc = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(self.normalize(x))), 2)
        x = F.avg_pool2d(F.relu(self.c2(x)), 3, stride=2, padding=1)
        return self.fc(HEADS[self.head](F.relu6(self.c3(x))))


@pytest.mark.parametrize("head", sorted(HEADS))
def test_functional_pools_and_mean(head, tmp_path):
    torch.manual_seed(2)
    q = quantize(PoolNet(head))
    im = check_all(q, tmp_path, {"max_pool", "avg_pool", "global_avg_pool"})
    pools = [s for s in im.steps if s.kind in ("max_pool", "avg_pool", "global_avg_pool")]
    assert [s.kind for s in pools] == ["max_pool", "avg_pool", "global_avg_pool"]
    assert pools[0].kernel == (2, 2) and pools[0].stride == (2, 2)
    assert pools[1].kernel == (3, 3) and pools[1].stride == (2, 2) and pools[1].padding == (1, 1)
    # a pool keeps its input's scale and zero point (as the pooling modules)
    assert all(s.x_q == s.quant for s in pools)
    if head in ("mean", "torch_mean"):  # keepdim False: the [N, C, 1, 1] codes reshaped to [N, C]
        after = im.steps[im.steps.index(pools[2]) + 1]
        assert isinstance(after, S.ReshapeStep) and after.inputs == (pools[2].output,)
        assert im.run(images(2))[after.output].shape == (2, WIDTH)


def test_unsupported_pool_arguments():
    class Bad(nn.Module):
        def __init__(self, channel_mean: bool):
            super().__init__()
            self.channel_mean = channel_mean
            self.c = _conv(1, WIDTH)
            self.fc = nn.Linear(WIDTH, CLASSES)

        def forward(self, x):
            x = F.max_pool2d(self.c(x), 2, dilation=1 if self.channel_mean else 2)
            if self.channel_mean:  # a mean over the channels is no pool: stays float
                return self.fc(x.mean((1, 2, 3), keepdim=True).flatten(1).expand(-1, WIDTH))
            return self.fc(x.mean((2, 3)))

    with pytest.raises(ValueError, match="mean"):
        quantize(Bad(channel_mean=True))
    q = quantize(Bad(channel_mean=True), float_ops="allow")
    assert any(op.startswith("mean") for op in q.report.float_ops)
    with pytest.raises(ValueError, match=r"max_pool2d \(max_pool2d\): MaxPool2d with dilation"):  # before calibration
        quantize(Bad(channel_mean=False))
    q = quantize(Bad(channel_mean=False), float_ops="allow")
    assert [op.split(" ")[0] for op in q.report.float_ops] == ["max_pool2d"]
    with pytest.raises(UnsupportedOperationError, match="dilation") as info:
        zq.to_integer(q)
    assert info.value.node == "max_pool2d"
