"""BatchNorm in inference mode with a cheaper input gradient, for data distillation.

Distillation differentiates a frozen model in eval mode with respect to its input. There a
BatchNorm layer is the per-channel affine map ``y = (x - mean) * invstd * weight + bias`` with
``invstd = 1 / sqrt(running_var + eps)``, and its input gradient is::

    dL/dx = dL/dy * invstd * weight        (per channel)

torch's ``native_batch_norm_backward`` takes ~3x the time of these two multiplications on
ResNet-20's activations (it is written for training mode). :func:`eval_batchnorm_grad` makes
the BatchNorm layers of a model use them, with ``invstd`` computed as torch's CPU kernel does
(``1 / sqrt(var + eps)`` in double, rounded to float), so that the gradient is bit-identical
to torch's (tests/test_eval_bn.py). The forward is ``F.batch_norm``'s own.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["eval_batchnorm_grad", "Derived"]

# The plain BatchNorm classes whose eval forward is F.batch_norm with the running statistics
# (subclasses may override forward: they are left alone).
PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Derived:
    """A value computed from some tensors, computed again only when one of them changed: another
    tensor object, or the same one written in place (its ``_version``; a write through ``.data``
    bypasses that counter and is not seen). It keeps references to them, so that an ``id`` cannot
    be reused while cached. Distillation reads the same BatchNorm statistics at each of its
    hundreds of steps (a few small ops per layer and step saved)."""

    def __init__(self):
        self._key: tuple | None = None
        self._sources: tuple = ()
        self._value = None

    def get(self, sources: tuple, extra, make):
        """``make()``, or its cached result when ``sources`` (tensors or None) and the hashable
        ``extra`` are unchanged."""
        key = (extra, *(None if t is None else (id(t), t._version) for t in sources))
        if key != self._key:
            self._value, self._key, self._sources = make(), key, sources
        return self._value


def _grad_factors(bn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``invstd`` and ``weight`` of ``bn`` shaped [1, C, 1, ...] for ``x``'s rank."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    invstd = (1 / torch.sqrt(bn.running_var.double() + bn.eps)).to(x.dtype)
    return invstd.reshape(shape), None if bn.weight is None else bn.weight.detach().reshape(shape)


class _EvalBatchNorm(torch.autograd.Function):
    """``F.batch_norm`` with the running statistics; input gradient ``g * invstd * weight``."""

    @staticmethod
    def forward(ctx, x, bn, factors: Derived):
        ctx.invstd, ctx.weight = factors.get((bn.running_var, bn.weight), (x.dtype, x.dim(), bn.eps),
                                             lambda: _grad_factors(bn, x))
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    @staticmethod
    def backward(ctx, grad):
        dx = grad * ctx.invstd
        return (dx if ctx.weight is None else dx.mul_(ctx.weight)), None, None


def _eligible(m: nn.Module) -> bool:
    frozen = all(not p.requires_grad for p in m.parameters(recurse=False))
    return (type(m) in PLAIN_BATCHNORMS and not m.training and frozen and m.running_mean is not None
            and m.running_var is not None and "forward" not in vars(m))


@contextlib.contextmanager
def eval_batchnorm_grad(model: nn.Module) -> Iterator[int]:
    """Inside the block, every plain BatchNorm layer of ``model`` in eval mode with frozen
    parameters and running statistics computes its input gradient as ``g * invstd * weight``
    (module docstring); the others are unchanged. Forward hooks still run. Yields how many
    layers it switched; on exit (also on an exception) they are as before."""
    layers = [m for m in model.modules() if _eligible(m)]
    for bn in layers:
        bn.forward = lambda x, bn=bn, factors=Derived(): _EvalBatchNorm.apply(x, bn, factors)
    try:
        yield len(layers)
    finally:
        for bn in layers:
            del bn.forward
