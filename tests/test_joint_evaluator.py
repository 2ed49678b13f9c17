"""The exact re-evaluation of the grouped search: graph split at the decided layers, prefix reuse,
chunking, the vmap / loop paths -- all bit-identical to evaluating the whole graph per configuration."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap
from zoo import ZOO, build

import pyzeroq as zq
from pyzeroq import models, pareto, pipeline, sensitivity
from pyzeroq.graph_split import cut, model_inputs, stage, tensor_nodes
from pyzeroq.models.layers import Normalize
from pyzeroq.modules import prepare, set_act_mode, set_weight_bits
from pyzeroq.sensitivity import JointEvaluator, kl_divergence

pytestmark = pytest.mark.usefixtures("one_thread")
CANDS = (2, 4, 8)


class Branchy(nn.Module):
    """A residual add, a branch reading the input beside the first layers, a concatenation, a
    lookup activation and an ``x.view(x.size(0), -1)``."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize((0.5,), (0.5,))
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.side = nn.Conv2d(1, 4, 1)
        self.u = nn.Conv2d(4, 4, 1)
        self.act = nn.Hardswish()
        self.fc = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x):
        x = self.normalize(x)
        h = torch.relu(self.a(x))
        h = self.b(h) + h
        s = self.act(self.side(x))
        c = torch.cat([self.u(h), s + h], 1)
        return self.fc(c.view(c.size(0), -1))


@torch.no_grad()
def whole_graph_kl(ev: JointEvaluator, choices: np.ndarray, vmapped: bool = True) -> np.ndarray:
    """c868dd5's evaluation: the whole graph, every row in one vmapped forward (or one forward per row);
    ``ev.reference``: the list of the model's output tensors (one: the logits)."""
    index = torch.as_tensor(choices)
    params = {f"{n}.weight": ev.qweights[n][index[:, j]] for j, n in enumerate(ev.names[:choices.shape[1]])}
    run = lambda p, x: functional_call(ev.gm, p, (x,))
    if vmapped:
        with warnings.catch_warnings():  # as JointEvaluator: vmap's as_strided_ fallback in adaptive pooling
            warnings.filterwarnings("ignore", message=sensitivity.AS_STRIDED_FALLBACK_WARNING)
            logits = vmap(run, in_dims=({k: 0 for k in params}, None))(params, ev.data)
    else:
        logits = torch.stack([run({k: v[r] for k, v in params.items()}, ev.data) for r in range(len(choices))])
    return kl_divergence(ev.reference[0].expand_as(logits), logits).numpy()


def grouped_rows(rng, layers: int, end: int, decided: int, rows: int = 24, prefixes: int = 3) -> np.ndarray:
    """Rows as the grouped search makes them: a few prefixes of ``decided`` columns, varied after."""
    pre = rng.integers(0, len(CANDS), (prefixes, decided))
    return np.concatenate([pre[rng.integers(0, prefixes, rows)], rng.integers(0, len(CANDS), (rows, end - decided))],
                          axis=1)


@pytest.mark.parametrize("decided", range(6))
def test_stages_through_a_cut_are_the_whole_graph(decided):
    gm, info = prepare(Branchy())
    set_act_mode(gm, "off")
    x = torch.rand(3, 1, 6, 6)
    c = cut(gm, info.layers, decided, tensor_nodes(gm, x))
    with torch.no_grad():
        values = stage(gm, model_inputs(gm), c)(x)
        assert torch.equal(stage(gm, c, None)(*values)[0], gm(x))
    assert len(c.varies) == len(values)
    assert any(c.varies) == (decided > 0)  # a decided layer's output is read after the cut


def test_chained_stages_in_any_layer_order():
    """Cuts follow the data flow: 'decided' may count layers in any order, and the stages between
    increasing cuts chain into the whole graph."""
    gm, info = prepare(Branchy())
    set_act_mode(gm, "off")
    x = torch.rand(2, 1, 6, 6)
    tensors = tensor_nodes(gm, x)
    for order in (info.layers, ["side", "fc", "a", "u", "b"]):
        assert sorted(order) == sorted(info.layers)
        for levels in ([1, 3, 5], [2, 4], [0, 5]):
            values, start = (x,), model_inputs(gm)
            with torch.no_grad():
                for d in levels:
                    end = cut(gm, order, d, tensors)
                    values, start = stage(gm, start, end)(*values), end
                assert torch.equal(stage(gm, start, None)(*values)[0], gm(x))
    with pytest.raises(ValueError, match="decided"):
        cut(gm, info.layers, 6, tensors)
    with pytest.raises(ValueError, match="precede"):
        stage(gm, cut(gm, info.layers, 4, tensors), cut(gm, info.layers, 1, tensors))


LAYOUTS = [torch.channels_last, torch.contiguous_format]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_prefix_reuse_is_bit_identical_to_the_whole_graph(name, layout, monkeypatch):
    gm, info = prepare(models.load_pretrained(name))
    ev = JointEvaluator(gm, info.layers, CANDS, torch.rand(2, 1, 28, 28), memory_format=layout)
    assert ev.memory_format == layout
    rng = np.random.default_rng(0)
    layers = len(info.layers)
    for decided, end in ((0, 5), (5, 10), (layers - 5, layers)):
        rows = grouped_rows(rng, layers, end, decided)
        want = whole_graph_kl(ev, rows)
        assert np.array_equal(ev(rows, decided=decided), want)
        # other chunkings (several prefix chunks, partial row chunks): the same bits
        monkeypatch.setattr(sensitivity, "JOINT_EVAL_IMAGES_PER_CHUNK", 6)
        monkeypatch.setattr(sensitivity, "JOINT_EVAL_PREFIX_IMAGES", 4)
        assert np.array_equal(ev(rows, decided=decided), want)
        monkeypatch.undo()
    assert ev.vmapped and ev.configurations == 6 * 24


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loop_fallback_and_prefix_reuse_on_a_branchy_graph(layout):
    """Branchy's 1x1 convs and 1-channel convs take NHWC or NCHW kernels after the layout of their
    input: the prefix reuse must hand activations across a cut in the layout they had."""
    gm, info = prepare(Branchy())
    ev = JointEvaluator(gm, info.layers, CANDS, torch.rand(3, 1, 6, 6), memory_format=layout)
    rng = np.random.default_rng(1)
    rows = grouped_rows(rng, 5, 4, 2)
    vmapped = ev(rows, decided=2)
    assert np.array_equal(vmapped, ev(rows))
    if ev.vmapped:
        assert np.array_equal(vmapped, whole_graph_kl(ev, rows))
    ev.vmapped = False  # the path of models that fail under vmap: one forward per configuration
    looped = ev(rows, decided=2)
    assert np.array_equal(looped, whole_graph_kl(ev, rows, vmapped=False))
    assert np.array_equal(looped, ev(rows))
    np.testing.assert_allclose(looped, vmapped, rtol=1e-4, atol=1e-9)  # grouped vs plain float32 conv


def test_memory_is_bounded_by_the_chunk_budget(monkeypatch):
    gm, info = prepare(Branchy())
    ev = JointEvaluator(gm, info.layers, CANDS, torch.rand(2, 1, 6, 6))
    widths = []
    real_vmap = sensitivity.vmap

    def recording_vmap(fn, in_dims):
        def call(params, *args):
            widths.append(max(v.shape[0] for v in params.values()))
            return real_vmap(fn, in_dims=in_dims)(params, *args)
        return call

    monkeypatch.setattr(sensitivity, "vmap", recording_vmap)
    monkeypatch.setattr(sensitivity, "JOINT_EVAL_IMAGES_PER_CHUNK", 32)
    rows = grouped_rows(np.random.default_rng(2), 5, 5, 3, rows=200, prefixes=20)
    want = ev(rows)
    assert np.array_equal(ev(rows, decided=3), want)
    assert max(widths) == 32 // 2  # configurations per forward, whatever the 200 rows
    # at least 2 configurations and ONEDNN_MIN_BATCH images per forward of a call with several rows
    assert min(widths) == sensitivity.ONEDNN_MIN_BATCH // 2
    widths.clear()
    ev(rows[:1], decided=3)
    assert widths == [1, 1]  # one row: prefix and suffix forwards of one configuration


def test_grouped_search_with_prefix_reuse_selects_the_same(monkeypatch):
    gm, info = prepare(models.load_pretrained("resnet20"))
    data = torch.rand(2, 1, 28, 28)
    names = info.layers
    omega = np.random.default_rng(3).random((len(names), 3)) * np.array([1.0, 0.1, 0.01])
    cost = np.array([[gm.get_submodule(n).weight.numel() * b for b in CANDS] for n in names]) // 4
    budget = int(cost[:, 1].sum())
    kwargs = dict(group_size=6, keep_per_bin_estimate=3, size_bins=8, keep_per_bin_exact=2)
    with JointEvaluator(gm, names, CANDS, data, progress=True) as ev:
        new = pareto.grouped_search(omega, cost, budget, ev, pass_decided=True, **kwargs)
        assert ev._bar.n == ev._bar.total == ev.configurations == sum(new.evaluations)
    set_weight_bits(gm, None)
    old = pareto.grouped_search(omega, cost, budget, lambda c: whole_graph_kl(ev, c), **kwargs)
    for field in ("choice", "kept_choices", "kept_totals", "kept_bin"):
        assert np.array_equal(getattr(new, field), getattr(old, field)), field
    assert new.total == old.total and new.evaluations == old.evaluations


def test_grouped_search_passes_the_group_start():
    rng = np.random.default_rng(4)
    s, c = rng.random((7, 3)), rng.integers(1, 9, (7, 3))
    budget = int(c.sum(axis=1).mean() * 1.5)
    seen = []

    def additive(p, decided=None):
        seen.append((decided, len(np.unique(p[:, :decided], axis=0)) if decided else 1))
        return s[np.arange(p.shape[1]), p].sum(axis=1) + 0.01 * (p == 0).sum(axis=1) ** 2  # not additive
    kwargs = dict(group_size=3, keep_per_bin_estimate=4, size_bins=5, keep_per_bin_exact=2)
    plain = pareto.grouped_search(s, c, budget, additive, **kwargs)
    assert [d for d, _ in seen] == [None] * 3
    seen.clear()
    hinted = pareto.grouped_search(s, c, budget, additive, pass_decided=True, **kwargs)
    assert [d for d, _ in seen] == [0, 3, 6]
    assert all(prefixes <= 5 * 2 for _, prefixes in seen)  # at most the kept configurations
    assert np.array_equal(plain.choice, hinted.choice) and plain.total == hinted.total
    with pytest.raises(TypeError, match="pass_decided"):
        pareto.grouped_search(s, c, budget, additive, pass_decided=1)


def test_bad_arguments():
    gm, info = prepare(Branchy())
    ev = JointEvaluator(gm, info.layers, CANDS, torch.rand(2, 1, 6, 6))
    with pytest.raises(ValueError, match="decided"):
        ev(np.zeros((2, 3), dtype=np.int64), decided=4)
    with pytest.raises(ValueError, match="decided"):
        ev(np.zeros((2, 3), dtype=np.int64), decided=-1)
    with pytest.raises(ValueError, match="choices"):
        ev(np.zeros((2, 6), dtype=np.int64))
    assert ev(np.zeros((0, 2), dtype=np.int64), decided=1).shape == (0,)
    with pytest.raises(TypeError, match="GraphModule"):
        JointEvaluator(Branchy(), info.layers, CANDS, torch.rand(2, 1, 6, 6))


class SpatialView(nn.Module):
    """``x.view(x.size(0), -1)`` on a spatial conv output: fails on channels_last activations."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return self.fc(h.view(h.size(0), -1))


def test_a_model_failing_on_channels_last_runs_nchw(capfd):
    gm, info = prepare(SpatialView())
    data = torch.rand(4, 1, 5, 5)
    ev = JointEvaluator(gm, info.layers, CANDS, data)
    assert ev.memory_format == torch.contiguous_format  # the probe failed, quietly
    assert capfd.readouterr().err == ""
    rows = grouped_rows(np.random.default_rng(5), 3, 3, 1)
    plain = JointEvaluator(gm, info.layers, CANDS, data, memory_format=torch.contiguous_format)
    assert np.array_equal(ev(rows, decided=1), plain(rows, decided=1))
    assert ev.vmapped


def test_layout_argument():
    gm, info = prepare(Branchy())
    with pytest.raises(ValueError, match="memory_format"):
        JointEvaluator(gm, info.layers, CANDS, torch.rand(2, 1, 6, 6), memory_format=torch.preserve_format)
    ev = JointEvaluator(gm, info.layers, CANDS, torch.rand(2, 1, 6, 6), dtype=torch.float64)
    assert ev.memory_format == torch.contiguous_format  # float64 runs as given
    assert JointEvaluator(gm, info.layers, CANDS, torch.rand(2, 1, 6, 6)).memory_format == torch.channels_last
    first = [p for p in gm.parameters() if p.dim() == 4][0]
    JointEvaluator(gm, info.layers, CANDS, torch.rand(2, 1, 6, 6))
    assert first.is_contiguous()  # the channels_last weights live in a copy


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_channels_last_selects_as_c868dd5(name):
    """NHWC kernels change the exact KL in the last float bits only: the grouped search on them
    keeps and selects the same configurations as on c868dd5's NCHW evaluation."""
    gm, info = prepare(models.load_pretrained(name))
    data = torch.rand(2, 1, 28, 28)
    names = info.layers
    omega = np.random.default_rng(6).random((len(names), 3)) * np.array([1.0, 0.1, 0.01])
    cost = np.array([[gm.get_submodule(n).weight.numel() * b for b in CANDS] for n in names]) // 4
    budget = int(cost[:, 1].sum())
    kwargs = dict(group_size=6, keep_per_bin_estimate=3, size_bins=8, keep_per_bin_exact=2, pass_decided=True)
    results = {}
    for layout in LAYOUTS:
        ev = JointEvaluator(gm, names, CANDS, data, memory_format=layout)
        results[layout] = pareto.grouped_search(omega, cost, budget, ev, **kwargs)
    nhwc, nchw = results[torch.channels_last], results[torch.contiguous_format]
    for field in ("choice", "kept_choices", "kept_bin"):
        assert np.array_equal(getattr(nhwc, field), getattr(nchw, field)), field
    assert nhwc.evaluations == nchw.evaluations
    np.testing.assert_allclose(nhwc.kept_totals, nchw.kept_totals, rtol=1e-5, atol=1e-12)
    assert nhwc.total == pytest.approx(nchw.total, rel=1e-5)


@pytest.mark.parametrize("name", ["shufflenetv2", "inception"])
def test_zoo_mixed_precision_chooses_the_same_bits_in_both_layouts(name, monkeypatch):
    """Architectures pyzeroq did not ship (channel shuffle, concatenating branches) through the whole
    pipeline: the NHWC evaluation (it does run NHWC on them) picks the bit widths NCHW picks."""
    chosen, layouts = {}, []
    for layout in LAYOUTS:
        def evaluator(*args, layout=layout, **kwargs):
            ev = JointEvaluator(*args, memory_format=layout, **kwargs)
            layouts.append(ev.memory_format)
            return ev
        monkeypatch.setattr(pipeline, "JointEvaluator", evaluator)
        cfg = zq.QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=4, act_bits=8, num_samples=8, distill_iters=20,
                             progress=False)
        chosen[layout] = zq.quantize(build(name), cfg, input_shape=ZOO[name][1]).bit_widths
    assert layouts == LAYOUTS
    assert chosen[torch.channels_last] == chosen[torch.contiguous_format]
    assert len(set(chosen[torch.channels_last].values())) > 1  # a mixed choice, not a trivial one


def test_parameter_swap_is_undone_also_on_an_exception():
    """The evaluator's stand-in for torch.func.functional_call puts the given tensors in place of
    the parameters for one call and restores the very same Parameter objects afterwards."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 1))
    before = dict(model.named_parameters())
    x = torch.randn(2, 1, 5, 5)
    new = {"0.weight": torch.randn(2, 1, 3, 3), "2.bias": torch.randn(2)}
    out = sensitivity._call_with(model, new, (x,))
    assert torch.equal(out, functional_call(model, new, (x,)))
    assert all(p is before[n] for n, p in model.named_parameters())
    with pytest.raises(RuntimeError):
        sensitivity._call_with(model, {"0.weight": torch.randn(2, 3, 3, 3)}, (x,))  # wrong in-channels
    assert all(p is before[n] for n, p in model.named_parameters())
