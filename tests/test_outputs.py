"""Models that return more than logits: a conv head's map, a tuple, a dict, nested structures.

A Linear whose only user is the output keeps its float (dequantized accumulator) logits; every
other returned tensor is quantized by the fake-quant model and dequantized by the integer model
(DequantStep) and by the ONNX graph (DequantizeLinear), each as a separate graph output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_integer_convert import fq_codes, images, quantize
from test_ops_coverage import _conv
from torch import nn

import pyzeroq as zq
from pyzeroq.export import build_onnx, output_names
from pyzeroq.integer import steps as S
from pyzeroq.models import Normalize

WIDTH = 8
CLASSES = 5
BATCH = 16
MAX_CODE_DIFF_FRACTION = 0.01  # conv requantization near-ties (see test_integer_convert)


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.normalize = Normalize()
        self.c1 = _conv(1, WIDTH, 2)
        self.c2 = _conv(WIDTH, WIDTH, 2)
        self.relu = nn.ReLU()

    def features(self, x):
        return self.relu(self.c2(self.relu(self.c1(self.normalize(x)))))


class SegHead(Backbone):
    """A plain conv head: the class map [N, K, H, W] is the output (no Linear)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(WIDTH, CLASSES, 1)

    def forward(self, x):
        return self.head(self.features(x))


class TupleOut(Backbone):
    """(logits, feature map): the logits stay float, the map is dequantized."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        f = self.features(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1)), f


class DictOut(Backbone):
    """A detection-style dict with a nested list and a repeated tensor."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Conv2d(WIDTH, CLASSES, 1)
        self.box = nn.Conv2d(WIDTH, 4, 3, padding=1)

    def forward(self, x):
        f = self.features(x)
        # "input" is also the name of the ONNX graph input: the export renames that output
        return {"scores": self.cls(f), "levels": [self.box(f), f], "input": f}


def _leaves(out) -> list:
    if isinstance(out, dict):
        return [v for e in out.values() for v in _leaves(e)]
    if isinstance(out, (list, tuple)):
        return [v for e in out for v in _leaves(e)]
    return [out]


@pytest.fixture(scope="module", params=[SegHead, TupleOut, DictOut], ids=lambda c: c.__name__)
def case(request):
    torch.manual_seed(0)
    model = request.param().eval()
    q = quantize(model)
    return model, q, zq.to_integer(q)


def test_structure_and_steps(case):
    model, q, im = case
    assert q.report.float_ops == []
    x = images(BATCH)
    with torch.no_grad():
        want, fp = q(x), model(x)
    got = im(x)
    assert type(got) is type(want) is type(fp)
    if isinstance(want, dict):
        assert list(got) == list(want) and isinstance(got["levels"], list)
    leaves = _leaves(got)
    assert [t.shape for t in leaves] == [t.shape for t in _leaves(want)]
    assert all(t.dtype == torch.float32 for t in leaves)
    dequant = [s for s in im.steps if isinstance(s, S.DequantStep)]
    logits = [s for s in im.steps if isinstance(s, S.LogitsStep)]
    assert len(dequant) + len(logits) == len({slot for _, slot in S.output_leaves(im.output)})
    assert len(logits) == isinstance(model, TupleOut)


def test_integer_matches_fake_quant(case):
    """Dequantized outputs: the fake-quant model's codes x scale (a few conv near-ties may move
    one code); logits: as in every classifier test."""
    _, q, im = case
    x = images(BATCH)
    _, want = fq_codes(q, x)
    got = im(x)
    steps = {s.output: s for s in im.steps}
    for (path, slot), g, w in zip(S.output_leaves(im.output), _leaves(got), _leaves(want)):
        step = steps[slot]
        if isinstance(step, S.DequantStep):
            scale = np.float32(step.x_q.scale_value)
            codes_diff = np.abs(np.rint(g.numpy() / scale) - np.rint(w.numpy() / scale))
            assert codes_diff.max() <= 1 and (codes_diff > 0).mean() <= MAX_CODE_DIFF_FRACTION, path
        else:
            assert (g.argmax(1) == w.argmax(1)).float().mean() >= 0.9, path


def test_onnx_outputs_bit_exact(case):
    ort = pytest.importorskip("onnxruntime")
    _, _, im = case
    x = images(BATCH).numpy()
    model = build_onnx(im, x[:1])
    names = [o.name for o in model.graph.output]
    assert len(names) == len(S.output_leaves(im.output)) == len(set(names))
    if isinstance(im.output, dict):
        assert names == ["scores", "levels.0", "levels.1", "input_output"]
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    env = im.run(x)
    renamed = {"input_output": "input"}
    slots = dict(output_names(im.output))
    for name, value in zip(names, sess.run(None, {"input": x})):
        np.testing.assert_array_equal(value, env[slots[renamed.get(name, name)]], err_msg=name)


def test_save_load_and_predict(case, tmp_path):
    model, q, im = case
    x = images(BATCH)
    q.save(tmp_path / "q.pzq")
    im.save(tmp_path / "im.pt")
    q2, im2 = zq.load(tmp_path / "q.pzq"), zq.load(tmp_path / "im.pt")
    assert im2.output == im.output and zq.to_integer(q2).steps == im.steps
    with torch.no_grad():
        for a, b in zip(_leaves(q2(x)), _leaves(q(x))):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(_leaves(im2(x)), _leaves(im(x))):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    if isinstance(model, SegHead):
        assert im.predict(x).shape == (BATCH, 7, 7)  # argmax over the classes (axis 1) of the map
    else:
        with pytest.raises(ValueError, match="one output tensor"):
            im.predict(x)


def test_mixed_precision_on_structured_outputs():
    """sensitivity="auto" picks the normalised MSE for a dict / map output; "kl" is refused
    before any costly stage."""
    torch.manual_seed(0)
    mp = dict(weight_bits=(2, 4, 8), avg_weight_bits=4)
    q = quantize(DictOut().eval(), **mp)
    assert q.report.sensitivity_measure == "mse"
    omega = np.array([list(v.values()) for v in q.report.sensitivity.values()])
    assert np.isfinite(omega).all() and (omega[:, 0] > omega[:, -1]).all()  # 2 bits hurt more than 8
    assert q.report.relaxation is not None
    assert set(q.bit_widths.values()) <= {2, 4, 8}
    assert zq.to_integer(q)(images(2))["scores"].shape == (2, CLASSES, 7, 7)
    with pytest.raises(ValueError, match="sensitivity='kl' needs a model returning one logits"):
        quantize(SegHead().eval(), sensitivity="kl", **mp)
    assert quantize(TupleOut().eval(), **{**mp, "mp_relaxation": False}).report.sensitivity_measure == "mse"


def test_single_logit_models_use_mse():
    """A binary classifier returning [N, 1] logits: a softmax over one logit is always 1, so the KL
    would be 0 for every layer and bit width (all-lowest bits, a guard that never accepts). "auto"
    picks the MSE; "kl" is refused by name."""
    class OneLogit(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 1)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    mp = dict(weight_bits=(2, 4, 8), avg_weight_bits=4, mp_relaxation=False)
    q = quantize(OneLogit().eval(), **mp)
    assert q.report.sensitivity_measure == "mse"
    omega = np.array([list(v.values()) for v in q.report.sensitivity.values()])
    assert (omega[:, 0] > 0).all()
    with pytest.raises(ValueError, match=r"classes >= 2"):
        quantize(OneLogit().eval(), sensitivity="kl", **mp)
