"""Adam on one tensor with a reduce-on-plateau learning rate: the optimizer of data distillation.

ZeroQ's public code optimizes the distilled images with ``torch.optim.Adam`` and
``ReduceLROnPlateau``. Constructing any ``torch.optim`` optimizer imports ``torch._dynamo``
(``Optimizer.add_param_group`` is wrapped by ``torch._disable_dynamo``): ~0.8 s in every fresh
process on the 2-core test machine, ~3 % of the README's main job, and ~0.3 ms of wrappers per
step. :class:`InputAdam` is the same update, bit for bit, as torch 2.x's single-tensor Adam
(``torch.optim.adam._single_tensor_adam``: the path torch takes for CPU tensors, no weight
decay, no amsgrad, not capturable / differentiable) followed by ``ReduceLROnPlateau(mode="min",
threshold_mode="rel", cooldown=0)`` -- tests/test_input_adam.py compares the two trajectories
for equality over steps that include learning-rate reductions.

Adam (Kingma & Ba 2015, Algorithm 1, in torch's operation order), step t = 1, 2, ...::

    m = lerp(m, g, 1 - beta1)                  # m + (1 - beta1) (g - m)
    v = v * beta2 + (1 - beta2) g g
    x = x - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Plateau rule: a loss ``< best * (1 - threshold)`` is an improvement; after more than
``patience`` steps without one, ``lr = max(lr * factor, min_lr)`` (kept when the change is
``<= PLATEAU_EPS``).
"""

from __future__ import annotations

import math

import torch

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
ADAM_EPS = 1e-8
PLATEAU_THRESHOLD = 1e-4  # ReduceLROnPlateau's defaults (relative threshold)
PLATEAU_EPS = 1e-8


class InputAdam:
    """Adam for the single leaf tensor ``x`` (real floating point; updated in place from
    ``x.grad``) with a reduce-on-plateau schedule: ``lr`` (> 0), ``factor`` in (0, 1),
    ``patience`` (steps, inf: never cut), ``min_lr`` (>= 0). :meth:`step` takes the loss of the
    step as a float. ValueError for a non-positive or NaN lr, a factor outside (0, 1) or a
    negative / NaN patience or min_lr; TypeError for a complex or integer ``x``."""

    def __init__(self, x: torch.Tensor, lr: float, factor: float, patience: float, min_lr: float):
        if not (lr > 0 and 0 < factor < 1 and patience >= 0 and min_lr >= 0):
            raise ValueError(f"need lr > 0, 0 < factor < 1, patience >= 0, min_lr >= 0; got lr={lr!r}, "
                             f"factor={factor!r}, patience={patience!r}, min_lr={min_lr!r}")
        if x.is_complex() or not x.is_floating_point():
            raise TypeError(f"x must be a real floating-point tensor, got {x.dtype}")
        # lr is kept as given until the first cut, as torch does: a numpy float32 lr makes the step
        # size a float32 product (NumPy 2 promotion); the cuts turn it into a Python float
        self.x, self.lr = x, lr
        self.factor, self.patience, self.min_lr = float(factor), patience, float(min_lr)
        self.steps = 0
        self.best = math.inf
        self.bad_steps = 0
        self._m = torch.zeros_like(x, memory_format=torch.preserve_format)
        self._v = torch.zeros_like(x, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, loss: float) -> None:
        """One Adam update of ``x`` with ``x.grad`` at the current lr, then the plateau rule on
        ``loss`` (as ``optimizer.step(); scheduler.step(loss)``). RuntimeError when ``x`` has
        no gradient."""
        grad = self.x.grad
        if grad is None:
            raise RuntimeError("InputAdam.step: x has no gradient (call backward first)")
        beta1, beta2 = ADAM_BETAS
        self.steps += 1
        self._m.lerp_(grad, 1 - beta1)
        self._v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = float(self.steps)  # torch keeps the step count in a float32 tensor
        step_size = self.lr / (1 - beta1**step)
        denom = (self._v.sqrt() / (1 - beta2**step) ** 0.5).add_(ADAM_EPS)
        self.x.addcdiv_(self._m, denom, value=-step_size)
        self._plateau(float(loss))

    def _plateau(self, loss: float) -> None:
        if loss < self.best * (1.0 - PLATEAU_THRESHOLD):
            self.best, self.bad_steps = loss, 0
        else:
            self.bad_steps += 1
        if self.bad_steps > self.patience:
            old_lr = float(self.lr)
            new_lr = max(old_lr * self.factor, self.min_lr)
            if old_lr - new_lr > PLATEAU_EPS:
                self.lr = new_lr
            self.bad_steps = 0
