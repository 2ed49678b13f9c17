"""GENIE data synthesis (distill_genie): the loss falls, the images are seeded (also in a fresh
process), any (C, H, W) size works, the model is left unchanged, bad arguments fail before any
work, and QuantConfig(distill_method="genie") runs through calibration_data / guard_data / quantize."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from toy_models import trained_tiny

import pyzeroq as zq
from pyzeroq import distill_genie as genie_mod
from pyzeroq import pipeline
from pyzeroq.config import ReconstructionConfig
from pyzeroq.distill import gaussian_inputs
from pyzeroq.distill_genie import GenieGenerator, distill_genie

SHAPE = (1, 16, 16)
FAST = dict(num_samples=4, batch_size=4, iters=6, progress=False)


@pytest.fixture(scope="module")
def tiny():
    return trained_tiny()


def _plain(channels: int) -> nn.Module:
    """conv-BN-ReLU head without an input normalizer (the generator's output is the input)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def test_loss_decreases(one_thread, tiny):
    res = distill_genie(tiny, SHAPE, num_samples=8, batch_size=8, iters=40, progress=False)
    assert len(res.history) == 40 and res.initial_loss == res.history[0]
    assert res.history[-1] < 0.5 * res.history[0] and res.final_loss < 0.5 * res.initial_loss
    assert res.data.dtype == torch.float32 and res.data.is_contiguous() and torch.isfinite(res.data).all()


def test_same_seed_same_images_other_seed_other_images(one_thread, tiny):
    rng = torch.get_rng_state()
    a = distill_genie(tiny, SHAPE, seed=3, **FAST)
    b = distill_genie(tiny, SHAPE, seed=3, **FAST)
    c = distill_genie(tiny, SHAPE, seed=4, **FAST)
    assert torch.equal(a.data, b.data) and a.history == b.history and a.final_loss == b.final_loss
    assert not torch.equal(a.data, c.data)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not used


def test_same_images_in_a_fresh_process(one_thread, tiny, tmp_path):
    torch.save(tiny.state_dict(), tmp_path / "tiny.pt")
    want = distill_genie(tiny, SHAPE, seed=5, **FAST).data
    script = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from toy_models import TinyNet\n"
        "from pyzeroq.distill_genie import distill_genie\n"
        "m = TinyNet()\n"
        f"m.load_state_dict(torch.load({str(tmp_path / 'tiny.pt')!r}))\n"
        f"torch.save(distill_genie(m.eval(), {SHAPE!r}, seed=5, **{FAST!r}).data, {str(tmp_path / 'x.pt')!r})\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert torch.equal(torch.load(tmp_path / "x.pt"), want)


@pytest.mark.parametrize("shape", [(1, 13, 10), (3, 9, 6), (2, 1, 6)], ids=str)
def test_shapes_not_multiple_of_four(one_thread, tiny, shape):
    model = tiny if shape[0] == 1 else _plain(shape[0])
    res = distill_genie(model, shape, num_samples=5, batch_size=4, iters=3, progress=False)  # batches 4 + 1
    assert res.data.shape == (5, *shape) and torch.isfinite(res.data).all() and res.data.is_contiguous()
    gen = GenieGenerator(shape, latent_dim=8, widths=(6, 4)).train()
    y = gen(torch.randn(7, 8))
    assert y.shape == (7, *shape)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(shape[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(shape[0]), atol=1e-3, rtol=0)


def test_images_are_generator_output_through_the_normalizer(one_thread, tiny):
    """TinyNet normalizes its input: (x - mean) / std of the images is the generator's output, whose
    channels have batch mean 0 and std 1 (affine-free BatchNorm in training mode)."""
    x = distill_genie(tiny, SHAPE, **FAST).data
    z = (x - tiny.normalize.mean) / tiny.normalize.std
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.var(unbiased=False)) - 1) < 1e-3
    assert abs(float(x.std(unbiased=False)) - float(tiny.normalize.std)) < 1e-3  # mapped, not the raw output


def test_model_unchanged(one_thread):
    model = trained_tiny(steps=5).train()
    model.zero_grad(set_to_none=True)
    model.c2[0].weight.requires_grad_(False)
    model.c3.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    distill_genie(model, SHAPE, augment=True, relax=0.3, **FAST)
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == flags and [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())


def test_options_change_the_images(one_thread, tiny):
    plain = distill_genie(tiny, SHAPE, **FAST).data
    for opts in (dict(relax=0.3), dict(augment=True)):
        a = distill_genie(tiny, SHAPE, **FAST, **opts).data
        assert torch.equal(a, distill_genie(tiny, SHAPE, **FAST, **opts).data) and not torch.equal(a, plain)


@pytest.mark.parametrize("kw, name", [
    (dict(input_shape=(1, 16)), "input_shape"), (dict(input_shape=(1, 2, 16, 16)), "input_shape"),
    (dict(input_shape=(1, 1, 1)), "input_shape"), (dict(input_shape=(1, 16.0, 16)), "input_shape"),
    (dict(num_samples=0), "num_samples"), (dict(batch_size=0), "batch_size"), (dict(iters=-1), "iters"),
    (dict(lr=0.0), "lr"), (dict(generator_lr=float("nan")), "generator_lr"), (dict(latent_dim=0), "latent_dim"),
    (dict(widths=(8,)), "widths"), (dict(widths=(8, 0)), "widths"), (dict(relax=-1.0), "relax"),
], ids=lambda v: v if isinstance(v, str) else repr(v))
def test_bad_arguments_fail_before_any_work(monkeypatch, tiny, kw, name):
    def fail(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")
    monkeypatch.setattr(genie_mod, "distill_session", fail)
    args = dict(FAST, input_shape=SHAPE)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        distill_genie(tiny, **args)


def test_config_distill_method():
    assert zq.QuantConfig().distill_method == "zeroq" and zq.QuantConfig(distill_method="genie").distill_method == "genie"
    for bad in ("gan", "GENIE", None, 1):
        with pytest.raises(ValueError, match="distill_method"):
            zq.QuantConfig(distill_method=bad)
    with pytest.raises(ValueError, match="distill_lr"):
        zq.QuantConfig(distill_method="genie", distill_lr=0.1)
    zq.QuantConfig(distill_method="zeroq", distill_lr=0.1)


def test_calibration_and_guard_data_dispatch(one_thread, tiny):
    rec = ReconstructionConfig(guard_samples=3, guard_data="distilled")
    cfg = zq.QuantConfig(num_samples=4, distill_iters=5, distill_method="genie", seed=2, progress=False,
                         reconstruction=rec)
    data, losses = pipeline.calibration_data(tiny, cfg, SHAPE)
    want = distill_genie(tiny, SHAPE, num_samples=4, iters=5, seed=2, progress=False)
    assert torch.equal(data, want.data) and losses == (want.initial_loss, want.final_loss)
    guard = pipeline.guard_data(tiny, cfg, SHAPE)  # held out: seed + 1
    assert torch.equal(guard, distill_genie(tiny, SHAPE, num_samples=3, iters=5, seed=3, progress=False).data)
    # the default guard: Gaussian images from seed + 1, whatever the distillation method
    gauss = pipeline.guard_data(tiny, replace(cfg, reconstruction=ReconstructionConfig(guard_samples=3)), SHAPE)
    assert torch.equal(gauss, gaussian_inputs(tiny, (3, *SHAPE), torch.Generator().manual_seed(3)))


def test_quantize_end_to_end(one_thread, tiny, tmp_path):
    cfg = zq.QuantConfig(weight_bits=4, act_bits=8, num_samples=8, distill_iters=30, distill_method="genie",
                         progress=False)
    q = zq.quantize(tiny, cfg, input_shape=SHAPE)
    assert q.report.distill_loss is not None and q.report.distill_loss[1] < q.report.distill_loss[0]
    x = torch.rand(3, *SHAPE)
    assert torch.isfinite(q(x)).all()
    zeroq = zq.quantize(tiny, zq.QuantConfig(weight_bits=4, act_bits=8, num_samples=8, distill_iters=5,
                                             progress=False), input_shape=SHAPE)
    assert not torch.equal(q(x), zeroq(x))  # calibrated on other images
    loaded = zq.load(q.save(tmp_path / "genie.pzq"))
    assert loaded.config.distill_method == "genie" and torch.equal(loaded(x), q(x))


def test_quantize_rejects_non_image_inputs_early(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("an expensive stage ran before the arguments were validated")
    monkeypatch.setattr(pipeline, "calibration_data", fail)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match="input_shape"):
        zq.quantize(model, zq.QuantConfig(distill_method="genie", progress=False), input_shape=(6,))
