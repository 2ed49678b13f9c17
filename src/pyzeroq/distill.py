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

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
STD_EPS = 1e-6  # added under the sqrt of the variance, as the paper's code does
PLATEAU_PATIENCE = 100
PLATEAU_MIN_LR = 1e-4
PLATEAU_FACTOR = 0.1


class NoBatchNormError(ValueError):
    """Distilled data needs BatchNorm statistics to match."""


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BN_TYPES)]


def _per_sample_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over all positions: [N, C] each."""
    flat = t.reshape(t.shape[0], t.shape[1], -1)
    mean = flat.mean(dim=2)
    std = torch.sqrt(flat.var(dim=2, unbiased=False) + STD_EPS)
    return mean, std


def _stat_loss(stat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (stat - target).pow(2).sum() / stat.shape[0]


class BNStatistics:
    """Forward hooks on every BatchNorm layer of ``model``; after a forward pass,
    :meth:`losses` gives one BN-statistics loss per BN layer (module order).

    Usable as a context manager; the hooks are removed on exit. Shared by ZeroQ
    distillation and the detection data synthesis.
    """

    def __init__(self, model: nn.Module):
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise NoBatchNormError(
                "the model has no BatchNorm layer, so there are no statistics to distill data from; "
                "use calibration='gaussian' or calibration='real' with calibration_data=...")
        self._inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [m.register_forward_hook(self._make_hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _make_hook(self, index: int):
        def hook(module, inputs, output):
            self._inputs[index] = inputs[0]
        return hook

    def losses(self) -> list[torch.Tensor]:
        out = []
        for (name, bn), x in zip(self.layers, self._inputs):
            if x is None:
                raise RuntimeError(f"BatchNorm {name!r} was not reached by the last forward pass")
            mean, std = _per_sample_stats(x)
            running_std = torch.sqrt(bn.running_var + STD_EPS)
            out.append(_stat_loss(mean, bn.running_mean) + _stat_loss(std, running_std))
        return out

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
    mean, std = _per_sample_stats(normalized)
    return _stat_loss(mean, torch.zeros_like(mean)) + _stat_loss(std, torch.ones_like(std))


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


def distill_data(model: nn.Module, input_shape: tuple[int, ...], num_samples: int = 32,
                 iters: int = 500, batch_size: int = 32, lr: float = 0.5, seed: int = 0,
                 device: torch.device | str = "cpu", progress: bool = True) -> DistillResult:
    """Generate ``num_samples`` distilled inputs of shape ``input_shape`` (no batch dim).

    Adam (lr 0.5) with a reduce-on-plateau schedule, ``iters`` steps per batch of
    ``batch_size``, starting from N(0, 1) in the normalized domain — the defaults of
    the paper's public code. The model is used in eval mode and left unchanged.
    """
    if num_samples < 1 or batch_size < 1 or iters < 0:
        raise ValueError("num_samples and batch_size must be >= 1 and iters >= 0")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    normalizer = find_normalizer(model)
    batches, history = [], []
    initial = final = 0.0
    try:
        with BNStatistics(model) as stats:
            captured = {}
            handle = normalizer.register_forward_hook(lambda m, i, o: captured.__setitem__("z", o)) \
                if normalizer is not None else None
            try:
                for start in range(0, num_samples, batch_size):
                    n = min(batch_size, num_samples - start)
                    x = gaussian_inputs(model, (n, *input_shape), generator, device).requires_grad_(True)
                    opt = torch.optim.Adam([x], lr=lr)
                    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                        opt, factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE, min_lr=PLATEAU_MIN_LR)
                    bar = tqdm(range(iters), desc=f"distill {start // batch_size + 1}", disable=not progress,
                               leave=False)
                    for it in bar:
                        opt.zero_grad(set_to_none=True)
                        model(x)
                        z = captured.get("z", x)
                        loss = stats.loss() + input_statistics_loss(z)
                        loss.backward()
                        opt.step()
                        value = loss.item()
                        sched.step(value)
                        if it == 0 and start == 0:
                            initial = value
                        history.append(value)
                        bar.set_postfix(loss=f"{value:.4f}")
                    with torch.no_grad():
                        model(x)
                        final = (stats.loss() + input_statistics_loss(captured.get("z", x))).item()
                    batches.append(x.detach())
            finally:
                if handle is not None:
                    handle.remove()
    finally:
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
        model.train(was_training)
    return DistillResult(torch.cat(batches), initial, final, tuple(history))
