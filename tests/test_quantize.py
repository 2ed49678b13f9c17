import itertools

import numpy as np
import pytest
import torch
from torch import nn
from toy_models import TinyNet, trained_tiny

import pyzeroq as zq
from pyzeroq import models, pipeline
from pyzeroq.data import load_fashion_mnist
from pyzeroq.distill import BNStatistics, NoBatchNormError, distill_data
from pyzeroq.models.layers import Normalize, conv_bn
from pyzeroq.modules import QuantAct, prepare, quant_layers, set_act_mode, set_weight_bits
from pyzeroq.pipeline import SAME_SIZE_BINS, _same_size_choice
from pyzeroq.sensitivity import JointEvaluator, kl_divergence

FAST = dict(num_samples=16, distill_iters=20, progress=False)
SHAPE = (1, 16, 16)


def test_quantize_does_not_modify_the_model_and_returns_bits():
    model = trained_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = zq.quantize(model, zq.QuantConfig(weight_bits=4, act_bits=8, **FAST), input_shape=SHAPE)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(q.bit_widths.values()) == {4}
    assert isinstance(q, zq.QuantizedModel)
    assert set(q.bit_widths) == set(q.report.layers)
    assert len(q.report.folded_bn) == 3 and not q.report.float_ops
    for stage in ("surgery", "activation_calibration"):
        assert stage in q.report.timings
    assert not q.report.sensitivity  # uniform precision: no sensitivity pass


def test_bn_is_folded_through_the_graph_and_float_path_is_unchanged():
    model = trained_tiny()
    gm, info = prepare(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert info.folded_bn == {"c1.1": "c1.0", "c2.1": "c2.0", "c3.1": "c3.0"}
    set_act_mode(gm, "off")
    set_weight_bits(gm, None)
    x = torch.rand(8, 1, 16, 16)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    # quantizers after normalize, c1+relu, c2 (feeds the add), add+relu, c3+relu6, pool;
    # the logits stay float
    assert sum(isinstance(m, QuantAct) for m in gm.modules()) == 6


def test_fake_quantized_weights_match_the_kernel_definition():
    model = trained_tiny()
    q = zq.quantize(model, zq.QuantConfig(weight_bits=3, act_bits=None, calibration="gaussian", **FAST),
                    input_shape=SHAPE)
    layer = quant_layers(q.graph_module)["c2.0"]
    w = layer.weight.detach().numpy()
    qw = layer.quantized_weight().detach().numpy()
    for c in range(w.shape[0]):
        lo, hi = min(w[c].min(), 0.0), max(w[c].max(), 0.0)
        scale = np.float32((np.float64(hi) - lo) / 7)
        zp = np.clip(np.rint(-lo / np.float64(scale)), 0, 7)
        ref = np.float32(scale) * (np.clip(np.rint(w[c] / scale) + zp, 0, 7) - zp).astype(np.float32)
        np.testing.assert_array_equal(qw[c], ref.astype(np.float32))


def test_same_seed_same_model_and_bits():
    model = trained_tiny()
    cfg = zq.QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=4, act_bits=8, **FAST)
    a = zq.quantize(model, cfg, input_shape=SHAPE)
    b = zq.quantize(model, cfg, input_shape=SHAPE)
    assert a.bit_widths == b.bit_widths
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # tensors, and the quantizers' extra state (plain values)
        assert torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k], k
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(a(x), b(x))


def test_mixed_precision_respects_budget_and_beats_inverse():
    model = trained_tiny()
    base = dict(weight_bits=(2, 4, 8), avg_weight_bits=4, act_bits=None, **FAST)
    zeroq = zq.quantize(model, zq.QuantConfig(mp_relaxation=False, **base), input_shape=SHAPE)
    inverse = zq.quantize(model, zq.QuantConfig(mp_method="inverse", **base), input_shape=SHAPE)
    params = zeroq.report.params
    budget = 4 * sum(params.values())
    for q in (zeroq, inverse):
        assert sum(params[n] * b for n, b in q.bit_widths.items()) <= budget
    omega = zeroq.report.sensitivity
    total = lambda q: sum(omega[n][b] for n, b in q.bit_widths.items())  # noqa: E731
    assert total(zeroq) <= total(inverse)
    # Random and Inverse use the budget (same model size), not the all-2-bit configuration
    size = lambda q: sum(params[n] * b for n, b in q.bit_widths.items())  # noqa: E731
    smallest = 2 * sum(params.values())
    slack = (8 * sum(params.values()) - smallest) / SAME_SIZE_BINS
    randoms = [zq.quantize(model, zq.QuantConfig(mp_method="random", seed=s, **base), input_shape=SHAPE)
               for s in (0, 1)]
    for q in [inverse] + randoms:
        assert budget - 2 * slack <= size(q) <= budget, (size(q), budget)


def test_same_size_choice_maximizes_among_budget_sized_configs():
    rng = np.random.default_rng(3)
    omega = rng.random((5, 3))
    cost = np.array([[2, 4, 8]] * 5) * rng.integers(1, 5, (5, 1))
    budget = float(cost[:, 1].sum())
    best = _same_size_choice(omega.max() - omega, cost, budget, 10 ** 6)  # fine grid: exact sizes
    configs = list(itertools.product(range(3), repeat=5))
    sizes = {c: sum(cost[i, b] for i, b in enumerate(c)) for c in configs}
    top = max(v for v in sizes.values() if v <= budget)
    want = max((c for c in configs if sizes[c] == top), key=lambda c: sum(omega[i, b] for i, b in enumerate(c)))
    assert tuple(best) == want


def test_joint_evaluator_matches_sequential_quantization():
    model = trained_tiny()
    gm, info = prepare(model)
    data = torch.rand(6, 1, 16, 16)
    cands = (2, 4, 8)
    ev = JointEvaluator(gm, info.layers, cands, data)
    choices = np.array(list(itertools.product(range(3), repeat=2)))
    fast = ev(choices)
    set_act_mode(gm, "off")
    for row, value in zip(choices, fast):
        set_weight_bits(gm, {info.layers[j]: cands[c] for j, c in enumerate(row)})
        with torch.no_grad():
            slow = float(kl_divergence(ev.reference[0], gm(data)))
        assert value == pytest.approx(slow, rel=1e-4, abs=1e-9)  # grouped vs plain float32 conv
    # the per-configuration loop (models that fail under vmap) gives the same values
    set_weight_bits(gm, None)  # the evaluator's state (float weights, activations off)
    ev.vmapped = False
    np.testing.assert_allclose(ev(choices), fast, rtol=1e-4, atol=1e-9)


def test_joint_evaluator_in_float64_matches_a_float64_forward_and_leaves_the_graph_float32():
    model = trained_tiny()
    gm, info = prepare(model)
    data = torch.rand(6, 1, 16, 16)
    cands = (2, 4, 8)
    ev = JointEvaluator(gm, info.layers, cands, data, dtype=torch.float64)
    assert all(p.dtype == torch.float32 for p in gm.parameters())  # the caller's graph is not cast
    assert ev.reference[0].dtype == torch.float64
    choices = np.array(list(itertools.product(range(3), repeat=2)))
    values = ev(choices)
    # independent: quantized weights (float32, exact in float64) put into a float64 copy of the model
    reference = prepare(model)[0].double()
    set_act_mode(reference, "off")
    for row, value in zip(choices, values):
        qweights = {}
        for j, c in enumerate(row):
            set_weight_bits(gm, {info.layers[j]: cands[c]})
            qweights[info.layers[j]] = quant_layers(gm)[info.layers[j]].quantized_weight().double()
        set_weight_bits(gm, None)
        with torch.no_grad():
            state = {f"{n}.weight": w for n, w in qweights.items()}
            out = torch.func.functional_call(reference, state, (data.double(),))
            want = float(kl_divergence(ev.reference[0], out))
        assert value == pytest.approx(want, rel=1e-9, abs=1e-15)  # float64: vmapped vs plain conv
    float32 = JointEvaluator(gm, info.layers, cands, data)(choices)
    np.testing.assert_allclose(values, float32, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="dtype"):
        JointEvaluator(gm, info.layers, cands, data, dtype=torch.float16)


def test_relaxation_with_one_group_and_unlimited_k_equals_exhaustive_search():
    model = trained_tiny()
    cfg = zq.QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=4, act_bits=None, mp_group_size=4,
                         mp_keep_estimate=10 ** 6, mp_keep_exact=10 ** 6, mp_size_bins=10 ** 4, **FAST)
    q = zq.quantize(model, cfg, input_shape=SHAPE)
    names = q.report.layers
    params = q.report.params
    budget = 4 * sum(params.values())
    # exhaustive search with the same calibration images the pipeline evaluated on
    calib = distill_data(model, SHAPE, num_samples=cfg.num_samples, iters=cfg.distill_iters, seed=cfg.seed,
                         progress=False).data[:cfg.mp_eval_samples]
    ev = JointEvaluator(prepare(model)[0], names, (2, 4, 8), calib)
    best, best_cfg = np.inf, None
    for combo in itertools.product(range(3), repeat=len(names)):
        if sum(params[n] * (2, 4, 8)[c] for n, c in zip(names, combo)) > budget:
            continue
        value = ev(np.array([combo]))[0]
        if value < best:
            best, best_cfg = value, combo
    assert tuple((2, 4, 8).index(q.bit_widths[n]) for n in names) == best_cfg
    assert q.report.relaxation["exact_kl"] == pytest.approx(best, rel=1e-9)


def test_distillation_lowers_bn_loss_by_an_order_of_magnitude():
    model = trained_tiny()
    result = distill_data(model, SHAPE, num_samples=8, iters=200, progress=False)
    assert result.final_loss < result.initial_loss / 10
    with BNStatistics(model) as stats, torch.no_grad():
        model(result.data)
        assert len(stats.losses()) == 3


def test_distilled_needs_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(1, 1, 8, 8))
    with pytest.raises(NoBatchNormError, match="gaussian"):
        zq.quantize(model, zq.QuantConfig(**FAST), input_shape=(1, 8, 8))
    q = zq.quantize(model, zq.QuantConfig(calibration="gaussian", **FAST), input_shape=(1, 8, 8))
    assert len(q.bit_widths) == 2


def test_real_calibration_data_is_used():
    model = trained_tiny()
    data = torch.rand(16, 1, 16, 16)
    q = zq.quantize(model, zq.QuantConfig(calibration="real", calibration_data=data, num_samples=16,
                                          progress=False))
    assert q.report.distill_loss is None and len(q.bit_widths) == 4


@pytest.mark.parametrize("shape", [None, (0, 16, 16), "1x16x16", (1.5, 16, 16)])
def test_bad_input_shape(shape):
    with pytest.raises(ValueError, match="input_shape"):
        zq.quantize(trained_tiny(steps=1), zq.QuantConfig(**FAST), input_shape=shape)


def test_bad_model_and_config_types():
    with pytest.raises(TypeError, match="model"):
        zq.quantize("resnet20", zq.QuantConfig())
    with pytest.raises(TypeError, match="config"):
        zq.quantize(TinyNet(), {"weight_bits": 8}, input_shape=SHAPE)


def test_pareto_plot(tmp_path):
    q = zq.quantize(trained_tiny(), zq.QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=4,
                                                   mp_relaxation=False, **FAST), input_shape=SHAPE)
    out = tmp_path / "pareto.png"
    q.report.plot_pareto(str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bops = zq.quantize(trained_tiny(), zq.QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=4, budget_metric="bops",
                                                      mp_relaxation=False, **FAST), input_shape=SHAPE)
    bops.report.plot_pareto(str(tmp_path / "bops.png"))  # in cost units (a KeyError on size_bytes before)
    assert (tmp_path / "bops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rand = zq.quantize(trained_tiny(), zq.QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=4, mp_method="random",
                                                      **FAST), input_shape=SHAPE)
    with pytest.raises(ValueError, match="mp_method='zeroq'"):
        rand.report.plot_pareto(str(tmp_path / "none.png"))


def test_w8a8_resnet20_agrees_with_fp_on_embedded_subset():
    if "resnet20" not in models.registry():
        pytest.skip("no committed resnet20 checkpoint")
    torch.set_num_threads(2)
    model = models.load_pretrained("resnet20")
    x, y = load_fashion_mnist("embedded")
    q = zq.quantize(model, zq.QuantConfig(weight_bits=8, act_bits=8, num_samples=32, distill_iters=100,
                                          progress=False), input_shape=(1, 28, 28))
    fp = zq.evaluate(model, x, y)
    qr = zq.evaluate(q, x, y)
    assert (fp.predictions == qr.predictions).mean() >= 0.99


def test_precomputed_distilled_data_gives_the_same_model():
    """bench/zeroq_tables.py distills once and passes the data in; that must change nothing."""
    model = trained_tiny()
    cfg = zq.QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=4, **FAST)
    direct = zq.quantize(model, cfg, input_shape=SHAPE)
    data = distill_data(model, SHAPE, num_samples=cfg.num_samples, iters=cfg.distill_iters, seed=cfg.seed,
                        progress=False).data
    reused = zq.quantize(model, zq.QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=4, calibration="real",
                                               calibration_data=data, num_samples=16, progress=False))
    assert direct.bit_widths == reused.bit_widths
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(direct(x), reused(x))


def test_pyzeroq_quantize_is_the_function_and_importing_the_pipeline_keeps_it(tmp_path):
    import os
    import subprocess
    import sys

    import pyzeroq
    code = ("import inspect, types, pyzeroq; f = pyzeroq.quantize; "
            "import pyzeroq.pipeline; from pyzeroq.pipeline import QuantizedModel, QuantReport, quantize; "
            "assert isinstance(pyzeroq.quantize, types.FunctionType) and pyzeroq.quantize is f is quantize; "
            "assert isinstance(pyzeroq.pipeline, types.ModuleType); "
            "assert list(inspect.signature(pyzeroq.quantize).parameters)[:3] == ['model', 'config', 'input_shape']")
    # a fresh interpreter that imports the same pyzeroq as this process (not a source tree in cwd)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(pyzeroq.__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    # in this process too, whatever the import order
    import pyzeroq.pipeline
    assert zq.quantize is pyzeroq.pipeline.quantize


def test_a_selection_is_reused_explicitly_and_skips_the_search(monkeypatch):
    """bench/zeroq_tables.py quantizes the same weights at several activation settings with one
    search: QuantizedModel.selection passed back in gives the model a fresh search gives."""
    model = trained_tiny()
    base = dict(weight_bits=(2, 4, 8), avg_weight_bits=4, **FAST)
    first = zq.quantize(model, zq.QuantConfig(act_bits=8, **base), input_shape=SHAPE)
    assert first.selection.bit_widths == first.bit_widths and first.selection.relaxation is not None
    fresh = zq.quantize(model, zq.QuantConfig(act_bits=4, **base), input_shape=SHAPE)

    def no_search(*args, **kwargs):
        raise AssertionError("select_bits ran although a selection was given")
    monkeypatch.setattr(pipeline, "select_bits", no_search)
    reused = zq.quantize(model, zq.QuantConfig(act_bits=4, **base), input_shape=SHAPE, selection=first.selection)
    assert reused.selection == fresh.selection and reused.bit_widths == fresh.bit_widths
    for field in ("chosen", "frontier", "relaxation", "sensitivity"):
        assert getattr(reused.report, field) == getattr(fresh.report, field), field
    x = torch.rand(4, *SHAPE)
    assert torch.equal(reused(x), fresh(x))


def test_a_selection_that_does_not_fit_is_rejected():
    model = trained_tiny(steps=1)
    base = dict(weight_bits=(2, 4, 8), **FAST)
    sel = zq.quantize(model, zq.QuantConfig(avg_weight_bits=4, mp_relaxation=False, **base),
                      input_shape=SHAPE).selection
    with pytest.raises(TypeError, match="selection"):
        zq.quantize(model, zq.QuantConfig(avg_weight_bits=4, **base), input_shape=SHAPE, selection=sel.bit_widths)
    with pytest.raises(ValueError, match="selection is only used with mixed precision"):
        zq.quantize(model, zq.QuantConfig(weight_bits=4, **FAST), input_shape=SHAPE, selection=sel)
    with pytest.raises(ValueError, match="selection was made over weight bits"):
        zq.quantize(model, zq.QuantConfig(weight_bits=(2, 8), avg_weight_bits=4, **FAST), input_shape=SHAPE,
                    selection=sel)
    with pytest.raises(ValueError, match="selection was made under another cost budget"):
        zq.quantize(model, zq.QuantConfig(avg_weight_bits=3, **base), input_shape=SHAPE, selection=sel)
    other = nn.Sequential(Normalize(), conv_bn(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 10)).eval()
    with pytest.raises(ValueError, match="selection was made for another model"):
        zq.quantize(other, zq.QuantConfig(avg_weight_bits=4, **base), input_shape=SHAPE, selection=sel)
