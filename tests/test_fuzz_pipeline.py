"""Graph fuzzer, default run: random small networks from the supported-op table (every op of
README's "Supported operators"; tests/graph_strategies.py lists them) through quantize ->
to_integer -> export_onnx -> onnxruntime; one logits tensor, a map or a tuple / list / dict of
outputs.

Properties checked on every example (graph_strategies.check_case), on every returned tensor:

1. no NaN / Inf in the fake-quant and integer outputs, every activation scale finite and > 0;
2. onnxruntime (graph optimizations off and on) reproduces the integer model's outputs and the
   codes of every intermediate activation bit for bit (float images, and uint8 pixels for a
   quarter of the examples, whose outputs also equal the float path's);
3. fake-quant vs integer, per activation with the integer model's input codes fed to the
   fake-quant graph: within 1 code (plus, after a conv / linear, what float32 accumulation in the
   fake-quant forward can explain); a final Linear's logits within float32 rounding, any other
   returned tensor exactly; the same for rounding="gemmlowp" and "dyadic";
4. save / load round trips of the fake-quant and the integer model are exact;
5. the integer-exact fake-quant mode (``zq.integer_exact``) equals the integer model: every
   activation's codes and every output.

Deterministic (derandomize=True) and a few seconds long. Failures of a known class
(graph_strategies.KNOWN_ISSUES, each with a regression test in tests/test_fuzz_regressions.py)
are counted as hypothesis events instead of failing; PYZEROQ_FUZZ_STRICT=1 makes them fail.
The onnxruntime part is skipped with PYZEROQ_FUZZ_NO_ONNX=1. Thousands of examples:
``python bench/fuzz_pipeline.py --minutes 10``.
"""

from __future__ import annotations

import os

import graph_strategies as gs
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings

from pyzeroq.outputs import output_leaves

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

torch.set_num_threads(1)

STRICT = os.environ.get("PYZEROQ_FUZZ_STRICT") == "1"
ONNX = os.environ.get("PYZEROQ_FUZZ_NO_ONNX") != "1"
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run(case: gs.Case, **kw):
    try:
        out = gs.check_case(case, onnx=ONNX, strict=STRICT, **kw)
    except gs.Unsupported as exc:
        event(f"unsupported: {str(exc)[:60]}")
        return None
    except gs.KnownIssue as exc:
        event(f"known issue: {exc.kind}")
        return None
    event("checked")
    return out


@FUZZ
@given(gs.cases())
def test_pipeline_properties(case):
    run(case, roundings=("gemmlowp", "dyadic"), roundtrip=True)


@settings(FUZZ, max_examples=18)
@given(gs.cases(max_ops=10))
def test_deeper_graphs(case):
    run(case)


# ------------------------------------------------------------------ the fuzzer's own machinery

@settings(FUZZ, max_examples=40)
@given(gs.graphs(max_ops=10))
def test_strategy_builds_valid_traceable_models(g):
    """Every drawn spec is a model that runs in float and traces with torch.fx; shapes as inferred
    (every returned tensor); a final Linear is a plain one (the logits)."""
    model = gs.FuzzNet(g)
    x = torch.rand(2, *g.input_shape)
    with torch.no_grad():
        y = model(x)
    shapes = g.shapes()
    assert [tuple(t.shape) for t in output_leaves(y)] == [(2,) + shapes[v] for v in gs.returned(g)]
    if g.outputs is None and isinstance(g.ops[-1], gs.Linear):
        assert g.ops[-1].act is None
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        for a, b in zip(output_leaves(traced(x)), output_leaves(y)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_spec_repr_reproduces():
    """A shrunk failure prints as a constructor call: repr -> eval gives the same case and weights."""
    g = gs.GraphSpec((2, 8, 8), (0.5, 0.5), (0.5, 0.5), (
        gs.Conv(0, 4, 3, 2, 1, groups=2, init=gs.Init(seed=3, scales=(1e-9, 1e3), zero=(1,), const=(2,), bias=1.0),
                bn=gs.BN(seed=1, var=1e-10, zero_gamma=(0,)), act="relu6"),
        gs.Add(1, 1, act="relu"), gs.Pool(2, "avg", 3, 1, 1), gs.Cat((3, 1), 1), gs.Act(4, "m_tanh"),
        gs.Flatten(5, "view_int"), gs.Linear(6, 3)))
    again = eval(repr(g), {k: getattr(gs, k) for k in gs.SPEC_NAMES})
    assert g.shapes()[-3] == (8, 4, 4)
    assert again == g
    a, b = gs.FuzzNet(g), gs.FuzzNet(again)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    w = a.layers["op0"].weight.detach().numpy()
    assert (w[1] == 0).all() and (w[2] == 0).all() and float(a.layers["op0"].bias.detach()[2]) == 3.0
    assert np.abs(w[0]).max() < 1e-7 and np.abs(w[3]).max() > 1.0


def test_fixed_issue_is_no_longer_excused():
    """A grouped conv then .view(...) under mixed precision once crashed the joint evaluator (vmap);
    it passes now, and no known-issue class excuses it any more."""
    case = gs.Case(graph=gs.GraphSpec((3, 6, 6), (0.5,) * 3, (0.5,) * 3, (
        gs.Conv(0, 3, 3, 1, 1, groups=3), gs.Flatten(1, "view_int"), gs.Linear(2, 2))), mixed=4.0)
    gs.check_case(case, strict=True)
    assert "vmap_view" not in gs.KNOWN_ISSUES


def _every_op_image_graph() -> "gs.GraphSpec":
    """One image network with each newer op once (squeeze-excite gates, layout ops and their
    inverse, view with sizes, channel shuffle, ConvTranspose2d, standalone BN, adaptive / ceil
    pools, Linear on [N, C, H, W]) and a dict output with a nested list."""
    conv = dict(init=gs.Init(seed=1, bias=0.1))
    return gs.GraphSpec((2, 8, 8), (0.5, 0.4), (0.5, 0.3), (
        gs.Conv(0, 4, 3, 1, 1, **conv, bn=gs.BN(seed=2), act="relu"),                                  # 1
        gs.Pool(1, "mean_keep"), gs.Conv(2, 2, 1, 1, 0, **conv, act="relu"),                           # 2, 3
        gs.Conv(3, 4, 1, 1, 0, **conv, act="hardsigmoid"), gs.Mul(1, 4),                               # 4, 5
        gs.Layout(5, "permute", (0, 2, 3, 1)), gs.Layout(6, "contiguous"),                             # 6, 7
        gs.Layout(7, "torch_permute", (0, 3, 1, 2)), gs.Shuffle(8, 2, "size", "transpose"),            # 8, 9
        gs.Layout(9, "chunk", (2, 1, 0)), gs.Layout(9, "chunk", (2, 1, 1)), gs.Cat((11, 10), 1),       # 10-12
        gs.Layout(12, "upsample", (2, 2)), gs.Layout(13, "zeropad", (1, 0, 0, 1)),                     # 13, 14
        gs.Pool(14, "max", 3, 2, 1, ceil=True), gs.Norm(15, gs.BN(seed=3), "relu"),                    # 15, 16
        gs.ConvT(16, 3, 2, 2, 0, **conv, act="relu6"), gs.Pool(17, "adaptive", (6, 3)),                # 17, 18
        gs.Layout(18, "transpose", (2, 3)), gs.Layout(19, "pad", (1, 1)),                              # 19, 20
        gs.Linear(20, 5, **conv, act="relu"), gs.Reshape(21, (("size", 21, 0), ("size", 21, 1), -1)),  # 21, 22
        gs.Pool(12, "mean"), gs.Linear(23, 4, **conv, act="sigmoid"),                                  # 23, 24
        gs.Reshape(24, (("size", 24, 0), -1, 1, 1), "view", "shape"), gs.Mul(25, 12, style="torch"),  # 25, 26
        gs.Flatten(22), gs.Linear(27, 3, **conv)),                                                     # 27, 28
        gs.Out("dict", (("logits", 28), ("maps", gs.Out("list", (26, 17))))))


def _every_op_signal_graph() -> "gs.GraphSpec":
    """One signal network [C, L]: Conv1d + BN1d, BatchNorm1d standalone, a view to an image and
    back, AdaptiveAvgPool1d(1), a final Linear on [N, C, L] in a tuple with a hidden value."""
    conv = dict(init=gs.Init(seed=4, bias=0.1))
    return gs.GraphSpec((2, 12), (0.5, 0.5), (0.25, 0.5), (
        gs.Conv1d(0, 4, 3, 1, 1, **conv, bn=gs.BN(seed=5), act="relu"),                                # 1
        gs.Norm(1, gs.BN(seed=6)), gs.Reshape(2, (("size", 2, 0), ("size", 2, 1), 3, ("floordiv", ("size", 2, 2), 3))),
        gs.Conv(3, 4, 3, 1, 1, **conv, act="relu"), gs.Reshape(4, (("size", 4, 0), ("size", 4, 1), -1), "reshape"),
        gs.Pool(5, "gap1d"), gs.Mul(5, 6), gs.Layout(7, "transpose", (1, 2)),                          # 6, 7, 8
        gs.Linear(8, 3, **conv)),                                                                      # 9
        gs.Out("tuple", (9, 6)))


@pytest.mark.parametrize("graph", [_every_op_image_graph, _every_op_signal_graph])
def test_every_newer_op_once(graph):
    """A fixed network with each newer op: whatever the hypothesis draws, each is checked."""
    g = graph()
    again = eval(repr(g), {k: getattr(gs, k) for k in gs.SPEC_NAMES})
    assert again == g
    case = gs.Case(graph=g, mixed=4.0, uint8=True) if len(g.input_shape) == 3 else gs.Case(graph=g, weight_bits=4, act_bits=4)
    gs.check_case(case, strict=True, roundtrip=True)
