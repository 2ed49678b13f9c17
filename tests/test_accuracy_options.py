"""The accuracy options beside reconstruction: MSE weight ranges (quantizers.mse_weight_range vs
mse_clip_range row by row), activation-aware sensitivity (QuantConfig.sensitivity_act_quant vs a
hand-computed KL), DSG-relaxed BN targets and jitter in distillation (per-sample loss vs the plain
formula, determinism)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_models import trained_tiny

import pyzeroq as zq
from pyzeroq import models
from pyzeroq.distill import STD_EPS, BNStatistics, augment, distill_data, sample_stats_loss
from pyzeroq.modules import act_quants, prepare, quant_layers, set_act_mode, set_weight_bits
from pyzeroq.outputs import kl_divergence
from pyzeroq.qspec import CodeFormat
from pyzeroq.quantizers import mse_clip_range, mse_weight_range
from pyzeroq.sensitivity import JointEvaluator, layer_sensitivities


@pytest.mark.parametrize("bits, fmt", [(2, CodeFormat()), (3, CodeFormat()),
                                       (4, CodeFormat(signed=True, narrow_range=True, symmetric=True))])
def test_mse_weight_range_is_mse_clip_range_per_row(bits, fmt):
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(7, 40, generator=g) * torch.rand(7, 1, generator=g)).numpy()
    w[3] = np.abs(w[3])  # one channel without negative weights
    got = mse_weight_range(w, bits, fmt)
    want = np.array([mse_clip_range(row, bits, fmt) for row in w], dtype=np.float32)
    np.testing.assert_array_equal(got, want)
    assert (got[:, 1] - got[:, 0] < w.max(1) - np.minimum(w.min(1), 0)).any()  # some channel clipped


def test_mse_weight_range_lowers_weight_error_in_the_pipeline():
    model = models.load_pretrained("resnet20")
    errs = {}
    for wr in ("minmax", "mse"):
        gm, _ = prepare(model, None)
        for layer in quant_layers(gm).values():
            layer.weight_quant.weight_range = wr
        set_weight_bits(gm, 3)
        errs[wr] = sum(float((layer.quantized_weight() - layer.weight).detach().square().sum())
                       for layer in quant_layers(gm).values())
    assert errs["mse"] < 0.7 * errs["minmax"]


def calibrated_graph(model, data, act_bits, weight_bits=8, act_range="mse"):
    """``prepare(model)`` with its activation quantizers calibrated on ``data`` (weights at
    ``weight_bits`` while observing) and frozen: (graph, quantized layer names). Also used by
    tests/test_reconstruct.py."""
    gm, info = prepare(model, act_bits, act_range=act_range)
    set_weight_bits(gm, weight_bits)
    set_act_mode(gm, "observe")
    with torch.no_grad():
        gm(data)
    for q in act_quants(gm).values():
        q.freeze()
    return gm, list(info.layers)


def test_activation_aware_sensitivity_matches_hand_kl(one_thread):
    model = models.load_pretrained("resnet20")
    data = torch.rand((16, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    gm, layers = calibrated_graph(model, data, 4)
    names, omega = layer_sensitivities(gm, data, (2, 4), act_quant=True)
    _, omega_float = layer_sensitivities(gm, data, (2, 4))  # activations float
    assert names == layers and not np.allclose(omega, omega_float)
    # by hand: float reference (everything off), then activations quantized and one layer at 2 bits
    with torch.no_grad():
        set_act_mode(gm, "off")
        set_weight_bits(gm, None)
        ref = gm(data)
        set_act_mode(gm, "quantize")
        quant_layers(gm)[layers[5]].set_weight_bits(2)
        kl = float(kl_divergence(ref, gm(data)))
    assert omega[5, 0] == pytest.approx(kl, rel=1e-6)
    # act quantization alone costs every layer the same: at 4-bit activations Omega >> float-act Omega
    assert (omega[:, 1] > omega_float[:, 1]).all()


def test_activation_aware_sensitivity_needs_calibration():
    gm, _ = prepare(models.load_pretrained("resnet20"), 4)
    with pytest.raises(ValueError, match="act_quant"):
        layer_sensitivities(gm, torch.rand(2, 1, 28, 28), (2, 4), act_quant=True)


def test_activation_aware_joint_evaluator_matches_hand_kl(one_thread):
    model = models.load_pretrained("resnet20")
    data = torch.rand((8, 1, 28, 28), generator=torch.Generator().manual_seed(1))
    gm, layers = calibrated_graph(model, data, 4)
    choices = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 1], [1, 1, 1]])
    with JointEvaluator(gm, layers, (2, 4), data, act_quant=True) as ev:
        aware = ev(choices, decided=1)
        assert ev.memory_format == torch.contiguous_format  # NCHW: bit for bit the model's forward
    assert all(q.mode == "off" for q in act_quants(gm).values())  # closed: activations off again
    plain = JointEvaluator(gm, layers, (2, 4), data)(choices)
    assert not np.allclose(aware, plain)  # the activation error is in
    with torch.no_grad():
        set_act_mode(gm, "off")
        set_weight_bits(gm, None)
        ref = gm(data)
        set_act_mode(gm, "quantize")
        for row, value in zip(choices, aware):
            set_weight_bits(gm, {layers[j]: (2, 4)[c] for j, c in enumerate(row)})
            # the integer model's bias (int32 at input scale x weight scale) is in the evaluation too
            assert value == pytest.approx(float(kl_divergence(ref, gm(data))), rel=1e-6)
            set_weight_bits(gm, None)
    gm_uncalibrated, info = prepare(model, 4)
    with pytest.raises(ValueError, match="act_quant"):
        JointEvaluator(gm_uncalibrated, list(info.layers), (2, 4), data, act_quant=True)


def test_activation_aware_sensitivity_in_quantize(one_thread):
    model = models.load_pretrained("resnet20")
    base = dict(weight_bits=(2, 4, 8), avg_weight_bits=4, act_bits=4, calibration="gaussian", num_samples=8,
                progress=False, mp_relaxation=False)
    plain = zq.quantize(model, zq.QuantConfig(**base), input_shape=(1, 28, 28))
    aware = zq.quantize(model, zq.QuantConfig(**base, sensitivity_act_quant=True), input_shape=(1, 28, 28))
    a, p = aware.report.sensitivity, plain.report.sensitivity
    assert all(a[n][2] > p[n][2] for n in a)
    # activations are recalibrated for the chosen bits afterwards: same act ranges for the same bits
    if aware.bit_widths == plain.bit_widths:
        assert torch.equal(aware(torch.zeros(1, 1, 28, 28)), plain(torch.zeros(1, 1, 28, 28)))


def test_per_sample_targets_match_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    m, s = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.rand(3, 4, generator=g, dtype=torch.float64) + .5
    flat = x.reshape(3, 4, -1)
    want = ((flat.mean(2) - m).square().sum() + (torch.sqrt(flat.var(2, unbiased=False) + STD_EPS) - s).square().sum()) / 3
    got = sample_stats_loss(x, m, s)
    torch.testing.assert_close(got, want)
    gw, = torch.autograd.grad(want, x)
    gg, = torch.autograd.grad(sample_stats_loss(x, m, s), x)
    torch.testing.assert_close(gg, gw)


def test_relaxed_targets_drawn_around_running_stats():
    model = trained_tiny()
    stats = BNStatistics(model, relax=0.5)
    stats.draw_targets(4000, torch.Generator().manual_seed(0))
    (_, bn), (mean, std) = stats.layers[0], stats._targets[0]
    run_std = torch.sqrt(bn.running_var + STD_EPS)
    assert mean.shape == (4000, bn.num_features)
    torch.testing.assert_close(mean.mean(0), bn.running_mean, atol=0.05 * float(run_std.max()) + 1e-3, rtol=0)
    torch.testing.assert_close(((mean - bn.running_mean) / run_std).std(0), torch.full_like(run_std, 0.5),
                               atol=0.05, rtol=0)
    assert (std > 0).all()
    stats.remove()


def test_augment_shift_and_flip():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    seen = set()
    for seed in range(40):
        y = augment(x, torch.Generator().manual_seed(seed))
        dy, dx, flip = torch.randint(-2, 3, (3,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = torch.roll(x, (dy, dx), (2, 3))
        torch.testing.assert_close(y, torch.flip(want, (3,)) if flip > 0 else want, rtol=0, atol=0)
        seen.add((dy, dx, flip > 0))
    assert len(seen) > 10
    assert augment(torch.ones(2, 3), torch.Generator()).shape == (2, 3)


def test_distill_options_deterministic_and_different(one_thread):
    model = trained_tiny()
    kw = dict(num_samples=4, iters=5, batch_size=4, progress=False)
    plain = distill_data(model, (1, 16, 16), **kw).data
    assert torch.equal(plain, distill_data(model, (1, 16, 16), **kw, relax=0.0, augment=False).data)
    for opts in (dict(relax=0.3), dict(augment=True)):
        a = distill_data(model, (1, 16, 16), **kw, **opts).data
        assert torch.equal(a, distill_data(model, (1, 16, 16), **kw, **opts).data)
        assert not torch.equal(a, plain)
    for bad in (-1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="relax"):
            distill_data(model, (1, 16, 16), **kw, relax=bad)


def test_first_last_bits(one_thread):
    model = models.load_pretrained("resnet20")
    cfg = dict(weight_bits=3, act_bits=4, calibration="gaussian", num_samples=8, progress=False)
    plain = zq.quantize(model, zq.QuantConfig(**cfg), input_shape=(1, 28, 28))
    q = zq.quantize(model, zq.QuantConfig(**cfg, first_last_bits=8), input_shape=(1, 28, 28))
    layers = q.report.layers
    assert q.bit_widths[layers[0]] == q.bit_widths[layers[-1]] == 8
    assert all(q.bit_widths[n] == 3 for n in layers[1:-1])
    records = {n: r.weight.bits for n, r in zq.modules.layer_records(q.graph_module).items()}
    assert records == q.bit_widths
    extra = (q.report.params[layers[0]] + q.report.params[layers[-1]]) * 5 / 8
    assert q.report.size_bytes - plain.report.size_bytes == int(extra) or \
        abs(q.report.size_bytes - plain.report.size_bytes - extra) < 1
    # the first layer's input (the image) at 8 bits, every other activation at act_bits
    inputs = {n: r.input.bits for n, r in zq.modules.layer_records(q.graph_module).items()}
    assert inputs[layers[0]] == 8 and all(inputs[n] == 4 for n in layers[1:])
    assert zq.modules.layer_records(plain.graph_module)[layers[0]].input.bits == 4
    with pytest.raises(ValueError, match="first_last_bits"):
        zq.QuantConfig(weight_bits=(2, 4), avg_weight_bits=3, first_last_bits=8)
    with pytest.raises(ValueError, match="first_last_bits"):
        zq.QuantConfig(first_last_bits=1)


def test_first_last_bits_integer_paths(one_thread, tmp_path):
    """8-bit image and first / last weights beside 4-bit activations and 3-bit weights: the integer
    model, integer_exact and onnxruntime agree with the fake-quant model (tests/test_zoo.py)."""
    from test_zoo import check_integer_paths
    q = zq.quantize(models.load_pretrained("resnet20"),
                    zq.QuantConfig(weight_bits=3, act_bits=4, calibration="gaussian", num_samples=8, progress=False,
                                   first_last_bits=8), input_shape=(1, 28, 28))
    check_integer_paths(q, torch.rand((16, 1, 28, 28), generator=torch.Generator().manual_seed(2)),
                        tmp_path / "fl8.onnx")
