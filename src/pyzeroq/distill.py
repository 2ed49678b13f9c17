"""ZeroQ distilled data (Cai et al. 2020, Eq. 3) and the other calibration sources.

Distilled data are inputs optimized until, at every BatchNorm layer, the per-channel
mean and standard deviation of the BN's *input* match the BN's running statistics:

    min_x  sum_i ||mu_i(x) - running_mean_i||^2 / N + ||sigma_i(x) - running_std_i||^2 / N
           + ||mu_0(x) - 0||^2 / N + ||sigma_0(x) - 1||^2 / N

where mu_i, sigma_i are per-sample, per-channel statistics over the spatial positions
(as in the paper's public code: every image matches the statistics on its own), N the
batch size, and mu_0, sigma_0 the statistics of the normalized input itself.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from tqdm import tqdm

from ._checks import BATCHNORM_TYPES
from .conv_grad import StepStemGrad
from .eval_bn import Derived, eval_batchnorm_grad
from .input_adam import InputAdam

BN_TYPES = BATCHNORM_TYPES
STD_EPS = 1e-6  # added under the sqrt of the variance, as the paper's code does
PLATEAU_PATIENCE = 100
PLATEAU_MIN_LR = 1e-4
PLATEAU_FACTOR = 0.1
CHANNELS_LAST_DIMS = 4  # inputs of this rank ([N, C, H, W]) may run in torch.channels_last
AUGMENT_SHIFT = 2  # pixels of the random shift of distill_data(augment=True)


class NoBatchNormError(ValueError):
    """Distilled data needs BatchNorm statistics to match."""


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BN_TYPES)]


def _positions_last(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``t`` with at least one position dim ([N, C] -> [N, C, 1], a view) and its position dims."""
    if t.dim() < 2:
        raise ValueError(f"x must be a [N, C, ...] tensor (batch, channels, positions), got shape {tuple(t.shape)}")
    t = t if t.dim() > 2 else t.unsqueeze(-1)
    return t, tuple(range(2, t.dim()))


class _SampleStatsLoss(torch.autograd.Function):
    """``sum_{n,c} (mu_nc - m_c)^2 / N + (sigma_nc - s_c)^2 / N`` with its gradient in closed form.

    ``mu_nc``, ``sigma_nc = sqrt(var_nc + STD_EPS)``: mean and population variance of sample
    ``n``, channel ``c`` over the P positions, two passes (mean, then the sum of the squared
    centered values; torch's ``var`` / ``var_mean`` run 20-100x slower than ``mean`` on one CPU
    thread, and ``linalg.vector_norm`` ~10x slower on channels_last tensors).
    Backward (``d mu / dx = 1 / P``, ``d sigma / dx = (x - mu) / (P sigma)``)::

        dL/dx = 2 / (N P) * [(mu - m) + (sigma - s) / sigma * (x - mu)]

    one expression per element instead of autograd's chain through mean, var, sqrt and the
    squares. Gradients flow to ``x`` only (the targets are statistics, not parameters).
    """

    @staticmethod
    def forward(ctx, x, target_mean, target_std):
        t, dims = _positions_last(x.detach())
        positions = math.prod(t.shape[d] for d in dims)
        mean = t.mean(dim=dims, keepdim=True)
        centered = t - mean  # kept for the backward, which would otherwise compute it again
        sq_sum = centered.square().sum(dim=dims, keepdim=True)
        std = torch.sqrt(sq_sum / positions + STD_EPS)
        target_mean = torch.as_tensor(target_mean, dtype=t.dtype, device=t.device)
        target_std = torch.as_tensor(target_std, dtype=t.dtype, device=t.device)
        # [C] (or scalar) targets shared by every sample; [N, C] per-sample targets (DSG relaxation)
        target_shape = ((t.shape[0], -1) if target_mean.dim() == 2 else (1, -1)) + (1,) * len(dims)
        d_mean = mean - target_mean.reshape(target_shape)
        d_std = std - target_std.reshape(target_shape)
        ctx.save_for_backward(centered, std, d_mean, d_std)
        ctx.x_shape = x.shape
        return (d_mean.square().sum() + d_std.square().sum()) / t.shape[0]

    @staticmethod
    @once_differentiable  # a second derivative through it raises instead of being silently wrong
    def backward(ctx, grad):
        centered, std, d_mean, d_std = ctx.saved_tensors
        k = grad * (2.0 / (centered.shape[0] * math.prod(centered.shape[2:])))
        dx = centered.mul(d_std / std * k).add_(d_mean * k)  # not in place: a second backward reads centered
        # a tensor of x's rank is returned as is: autograd then adds the BN's gradient into dx in place
        return (dx if dx.shape == ctx.x_shape else dx.reshape(ctx.x_shape)), None, None


def sample_stats_loss(x: torch.Tensor, target_mean, target_std) -> torch.Tensor:
    """ZeroQ's statistics loss of one tensor (Eq. 3 of Cai et al. 2020, per sample as their code).

    ``x``: [N, C, *positions] (or [N, C]); ``target_mean`` / ``target_std``: [C] tensors or
    scalars, or [N, C] per-sample targets (DSG's relaxed targets, :class:`BNStatistics`).
    Returns the 0-d tensor ``sum_{n,c} (mu_nc - target_mean_c)^2 / N +
    (sigma_nc - target_std_c)^2 / N`` where ``mu_nc`` / ``sigma_nc`` are the mean and
    ``sqrt(population variance + STD_EPS)`` of sample n, channel c over all positions.
    Differentiable in ``x`` (closed-form backward); ValueError for fewer than 2 dims.
    """
    return _SampleStatsLoss.apply(x, target_mean, target_std)


class BNStatistics:
    """Forward hooks on every BatchNorm layer of ``model``; after a forward pass,
    :meth:`losses` gives one BN-statistics loss per BN layer (module order).

    Usable as a context manager; the hooks are removed on exit. Shared by ZeroQ
    distillation and the detection data synthesis.
    """

    def __init__(self, model: nn.Module, relax: float = 0.0):
        self.relax = float(relax)
        self._targets: list | None = None
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise NoBatchNormError(
                "the model has no BatchNorm layer, so there are no statistics to distill data from; "
                "use calibration='gaussian' or calibration='real' with calibration_data=...")
        self._inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self._stds = [Derived() for _ in self.layers]  # sqrt(running_var + STD_EPS), once per statistics
        self._handles = [m.register_forward_hook(self._make_hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _make_hook(self, index: int):
        def hook(module, inputs, output):
            self._inputs[index] = inputs[0]
        return hook

    def draw_targets(self, n: int, generator: torch.Generator) -> None:
        """Per-sample relaxed targets for the next batch of ``n`` images (``relax`` > 0): for every
        BN, sample and channel ``mean + relax * std * e1`` and ``std * max(1 + relax * e2, 0.1)``,
        e1, e2 ~ N(0, 1) from ``generator`` -- the slack of DSG (Zhang et al. 2021, "Diversifying
        Sample Generation for Accurate Data-Free Quantization", Sec. 3.2: each sample need not
        match the BN statistics exactly, which diversifies the samples), written as random
        per-sample targets. ``relax == 0``: the running statistics for every sample (ZeroQ)."""
        if self.relax == 0:
            self._targets = None
            return
        targets = []
        for i, (_, bn) in enumerate(self.layers):
            mean, std = bn.running_mean, self._target_std(i, bn)
            e1 = torch.randn((n, mean.numel()), generator=generator).to(mean.device, mean.dtype)
            e2 = torch.randn((n, mean.numel()), generator=generator).to(mean.device, mean.dtype)
            targets.append((mean + self.relax * std * e1, std * torch.clamp(1 + self.relax * e2, min=0.1)))
        self._targets = targets

    def losses(self) -> list[torch.Tensor]:
        out = []
        for i, ((name, bn), x) in enumerate(zip(self.layers, self._inputs)):
            if x is None:
                raise RuntimeError(f"BatchNorm {name!r} was not reached by the last forward pass")
            if self._targets is not None:
                out.append(sample_stats_loss(x, *self._targets[i]))
            else:
                out.append(sample_stats_loss(x, bn.running_mean, self._target_std(i, bn)))
        return out

    def _target_std(self, i: int, bn: nn.Module) -> torch.Tensor:
        """sqrt(running_var + STD_EPS), kept across forwards in eval mode (a BatchNorm in training
        mode updates its running variance in place without bumping its version: computed anew)."""
        make = lambda: torch.sqrt(bn.running_var + STD_EPS)
        return make() if bn.training else self._stds[i].get((bn.running_var,), None, make)

    def loss(self) -> torch.Tensor:
        return torch.stack(self.losses()).sum()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "BNStatistics":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def find_normalizer(model: nn.Module) -> nn.Module | None:
    """The model's input-normalization module (buffers ``mean`` and ``std``), if any."""
    for m in model.modules():
        if m is not model and hasattr(m, "mean") and hasattr(m, "std") and \
                isinstance(m.mean, torch.Tensor) and isinstance(m.std, torch.Tensor):
            return m
    return None


def input_statistics_loss(normalized: torch.Tensor) -> torch.Tensor:
    """Pull the per-sample statistics of the normalized input to mean 0, std 1."""
    return sample_stats_loss(normalized, 0.0, 1.0)


def gaussian_inputs(model: nn.Module, shape: tuple[int, ...], generator: torch.Generator,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, 1) in the model's normalized domain, mapped back to its input domain."""
    z = torch.randn(shape, generator=generator).to(device)
    norm = find_normalizer(model)
    if norm is None:
        return z
    return z * norm.std.to(device) + norm.mean.to(device)


@dataclass(frozen=True)
class DistillResult:
    data: torch.Tensor
    initial_loss: float
    final_loss: float
    history: tuple[float, ...]


def input_memory_format(model: nn.Module, example: torch.Tensor) -> torch.memory_format:
    """The layout distillation runs ``model`` in: ``torch.channels_last`` for 4-D inputs (NHWC:
    torch's CPU convolutions, pooling and the statistics reductions run faster on it, e.g. max
    pooling ~10x on one thread) when a one-sample forward on that layout works, else
    ``torch.contiguous_format`` (e.g. a model calling ``.view`` on a spatial activation, or
    asserting ``is_contiguous()``: any exception of the probe; a model that fails on every
    layout fails again in the distillation itself). torch ops give the same values on both
    layouts up to float rounding; custom code reading raw memory (``data_ptr``) is not covered."""
    if example.dim() != CHANNELS_LAST_DIMS:
        return torch.contiguous_format
    try:
        with torch.no_grad():
            model(example[:1].contiguous(memory_format=torch.channels_last))
    except Exception:
        return torch.contiguous_format
    return torch.channels_last


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random jitter of the batch ``x`` [N, C, H, W] (differentiable): a circular shift by up
    to ``AUGMENT_SHIFT`` pixels per spatial axis and a horizontal flip with probability 1/2, the
    same for the whole batch, drawn from ``generator`` -- DeepInversion's jitter and flip (Yin et
    al. 2020, "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", Sec. 3.2).
    Other ranks are returned unchanged."""
    if x.dim() != CHANNELS_LAST_DIMS:
        return x
    dy, dx, flip = torch.randint(-AUGMENT_SHIFT, AUGMENT_SHIFT + 1, (3,), generator=generator).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return torch.flip(x, dims=(3,)) if flip > 0 else x


def _distill_batch(model: nn.Module, stats: BNStatistics, captured: dict, x: torch.Tensor, iters: int,
                   lr: float, bar_label: str, progress: bool,
                   jitter: torch.Generator | None = None) -> tuple[list[float], float]:
    """Optimize the leaf ``x`` in place; returns (loss per iteration, loss after the last step).
    ``jitter``: a generator for :func:`augment` at every step (None: no augmentation)."""
    opt = InputAdam(x, lr, factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE, min_lr=PLATEAU_MIN_LR)
    bar = tqdm(range(iters), desc=bar_label, disable=not progress, leave=False)
    history = []
    stem_grad = StepStemGrad()
    for _ in bar:
        x.grad = None
        with stem_grad.step():  # the first layer's input gradient by one forward conv (conv_grad.py)
            model(x if jitter is None else augment(x, jitter))
        loss = stats.loss() + input_statistics_loss(captured.get("z", x))
        loss.backward()
        value = loss.item()
        opt.step(value)
        history.append(value)
        if progress:
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
    with torch.no_grad():
        model(x)
        final = (stats.loss() + input_statistics_loss(captured.get("z", x))).item()
    return history, final


def check_relax(relax) -> None:
    """ValueError naming ``relax`` unless it is a finite real number >= 0 (an infinite slack would
    give NaN targets and NaN images)."""
    if not (isinstance(relax, numbers.Real) and not isinstance(relax, bool) and math.isfinite(relax)
            and relax >= 0):
        raise ValueError(f"relax must be a finite number >= 0, got {relax!r}")


@contextmanager
def distill_session(model: nn.Module, relax: float = 0.0) -> Iterator[tuple[BNStatistics, dict]]:
    """``model`` ready for data synthesis: eval mode, every parameter's ``requires_grad`` off, a
    :class:`BNStatistics` (``relax``) on its BatchNorms and a hook keeping the output of its input
    normalizer (:func:`find_normalizer`) as ``captured["z"]`` after each forward pass (no key when
    the model has none); its BatchNorms take their input gradient by :func:`eval_batchnorm_grad`
    (bit-identical to torch's, cheaper). Yields ``(stats, captured)``; on exit the hooks are removed and the
    training flags (of every submodule: a model in training mode with some submodules in eval mode
    gets them back as they were) and ``requires_grad`` flags are restored, also on an exception."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    normalizer = find_normalizer(model)
    try:
        with BNStatistics(model, relax) as stats, eval_batchnorm_grad(model):
            captured: dict = {}
            handle = normalizer.register_forward_hook(lambda m, i, o: captured.__setitem__("z", o)) \
                if normalizer is not None else None
            try:
                yield stats, captured
            finally:
                if handle is not None:
                    handle.remove()
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def distill_data(model: nn.Module, input_shape: tuple[int, ...], num_samples: int = 32,
                 iters: int = 500, batch_size: int = 32, lr: float = 0.5, seed: int = 0,
                 device: torch.device | str = "cpu", progress: bool = True, relax: float = 0.0,
                 augment: bool = False) -> DistillResult:
    """Generate ``num_samples`` distilled inputs of shape ``input_shape`` (no batch dim).

    Adam (lr 0.5) with a reduce-on-plateau schedule, ``iters`` steps per batch of
    ``batch_size``, starting from N(0, 1) in the normalized domain — the defaults of
    the paper's public code. The model is used in eval mode and left unchanged; it runs in
    the layout :func:`input_memory_format` picks; ``data`` is returned contiguous.

    relax: DSG-style per-sample relaxed BN targets (:meth:`BNStatistics.draw_targets`; 0: ZeroQ).
    augment: random shift / flip at every step (:func:`augment`). Both draw from the seeded
    generator: the same arguments give the same images. ValueError for bad sizes, an lr that
    is not a finite number > 0 or a relax that is not a finite number >= 0.
    """
    if num_samples < 1 or batch_size < 1 or iters < 0:
        raise ValueError("num_samples and batch_size must be >= 1 and iters >= 0")
    check_relax(relax)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not isinstance(augment, bool):
        raise TypeError(f"augment must be a bool, got {augment!r}")
    generator = torch.Generator().manual_seed(seed)
    batches, history, finals = [], [], []
    with distill_session(model, relax) as (stats, captured):
        layout = None
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            x = gaussian_inputs(model, (n, *input_shape), generator, device)
            if layout is None:
                layout = input_memory_format(model, x)
            x = x.contiguous(memory_format=layout).requires_grad_(True)
            stats.draw_targets(n, generator)
            hist, final = _distill_batch(model, stats, captured, x, iters, lr,
                                         f"distill {start // batch_size + 1}", progress,
                                         generator if augment else None)
            history.extend(hist)
            finals.append(final)
            batches.append(x.detach())
    initial = history[0] if history else finals[0]  # iters=0: the loss of the starting images
    return DistillResult(torch.cat(batches).contiguous(), initial, finals[-1], tuple(history))
