"""InputAdam: torch.optim.Adam + ReduceLROnPlateau on one tensor, bit for bit, without importing
torch._dynamo (which every torch.optim optimizer does on construction: ~0.8 s per process)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pyzeroq.input_adam import InputAdam


def _loss(x: torch.Tensor, target: torch.Tensor, step: int) -> torch.Tensor:
    # a quartic bowl plus a term that keeps changing sign: the loss improves, then plateaus
    # (every few steps no relative gain of 1e-4), so the schedule cuts the lr several times
    return ((x - target) ** 4).mean() + 1e-3 * torch.sin(x * (step % 3 + 1)).sum()


def _trajectory(use_torch: bool, steps: int, lr, patience, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=g).contiguous(memory_format=layout).requires_grad_(True)
    target = torch.randn(4, 3, 5, 6, generator=g)
    if use_torch:
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=patience, min_lr=1e-4)
    else:
        opt = InputAdam(x, lr, factor=0.1, patience=patience, min_lr=1e-4)
    lrs, xs = [], []
    for step in range(steps):
        x.grad = None
        loss = _loss(x, target, step)
        loss.backward()
        value = loss.item()
        if use_torch:
            opt.step()
            sched.step(value)
            lrs.append(opt.param_groups[0]["lr"])
        else:
            opt.step(value)
            lrs.append(opt.lr)
        xs.append(x.detach().clone())
    return lrs, xs


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("lr, patience", [(0.5, 3), (0.05, 0), (2.0, 5)])
def test_same_trajectory_as_torch_adam_with_reduce_on_plateau(layout, lr, patience):
    ref_lrs, ref_xs = _trajectory(True, 120, lr, patience, layout)
    lrs, xs = _trajectory(False, 120, lr, patience, layout)
    assert lrs == ref_lrs
    assert len(set(lrs)) >= 2  # the schedule did reduce the lr (down to min_lr for some)
    for a, b in zip(xs, ref_xs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lr, patience", [(np.float32(0.05), 3), (np.float64(0.5), 3), (0.5, float("inf")),
                                          (0.5, 2.5)])
def test_numpy_learning_rates_and_float_patience_as_torch(lr, patience):
    """A numpy float32 lr makes torch's step size a float32 product until the first cut (NumPy 2
    promotion), an infinite patience never cuts: the same here."""
    ref_lrs, ref_xs = _trajectory(True, 60, lr, patience, torch.contiguous_format)
    lrs, xs = _trajectory(False, 60, lr, patience, torch.contiguous_format)
    assert lrs == ref_lrs and all(torch.equal(a, b) for a, b in zip(xs, ref_xs))
    if patience == float("inf"):
        assert set(lrs) == {lr}


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_complex_or_integer_tensors_are_refused(dtype):
    with pytest.raises(TypeError, match="real floating-point"):
        InputAdam(torch.zeros(3, dtype=dtype), 0.5, 0.1, 100, 1e-4)


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(lr=float("nan")), dict(factor=1.0), dict(factor=0.0),
                                    dict(patience=-1), dict(patience=float("nan")), dict(min_lr=-1e-3)])
def test_bad_settings_are_value_errors(kwargs):
    args = dict(lr=0.5, factor=0.1, patience=100, min_lr=1e-4) | kwargs
    with pytest.raises(ValueError, match="lr > 0"):
        InputAdam(torch.zeros(3, requires_grad=True), **args)


def test_a_step_without_gradient_is_a_runtime_error():
    opt = InputAdam(torch.zeros(3, requires_grad=True), 0.5, 0.1, 100, 1e-4)
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step(1.0)


def test_quantize_imports_neither_dynamo_nor_sympy():
    """The main job's stages (distillation, the integer-support check, the grouped search, evaluation)
    run without torch._dynamo (~0.8 s to import) and sympy (~0.2 s, via torch.fx's ShapeProp)."""
    code = textwrap.dedent("""
        import sys
        import torch
        import pyzeroq as zq
        from toy_models import TinyNet
        torch.manual_seed(0)
        model = TinyNet().train()
        with torch.no_grad():  # BN statistics without an optimizer (torch.optim would import dynamo)
            for _ in range(5):
                model(torch.rand(16, 1, 28, 28))
        model.eval()
        cfg = zq.QuantConfig(weight_bits=(2, 4, 8), avg_weight_bits=4, act_bits=8, num_samples=8,
                             distill_iters=3, mp_eval_samples=4)
        q = zq.quantize(model, cfg, input_shape=(1, 28, 28))
        zq.evaluate(q, torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.int64))
        print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__import__("pathlib").Path(__file__).parent)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
