"""GENIE data synthesis: images made by a small generator from learnable per-sample latents.

Jeon, Lee and Kim 2023, "Genie: Show Me the Data for Quantization" (CVPR), Sec. 3.1-3.2: instead
of optimizing the pixels (ZeroQ, :func:`pyzeroq.distill.distill_data`), optimize a convolutional
generator G and one latent vector z_n per image jointly, the images being x_n = G(z_n). The
generator ties the pixels of an image together (smooth, image-like samples) and the latents keep
the samples apart. Both are trained against exactly the loss of ``distill_data``: ZeroQ's per-sample
BN-statistics loss (:class:`pyzeroq.distill.BNStatistics`, with DSG's ``relax``) plus the input
statistics term (:func:`pyzeroq.distill.input_statistics_loss`), optionally with the same jitter
(:func:`pyzeroq.distill.augment`). GENIE's code matches batch statistics and jitters the strided
convolutions ("swing conv"); here the loss and the jitter are ``distill_data``'s, so the two
sources differ only in how the images are parameterized.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from tqdm import tqdm

from .conv_grad import StepStemGrad
from .distill import (
    DistillResult,
    augment,
    check_relax,
    distill_session,
    find_normalizer,
    input_memory_format,
    input_statistics_loss,
)

# Defaults of GENIE's public code (github.com/SamsungLabs/Genie, distill.py and main.py): latent
# size 256, generator widths 128 / 64, Adam on the latents at lr 0.1 with reduce-on-plateau
# (patience 100, min lr 1e-4) and Adam on the generator at lr 0.01 decayed x0.95 every 100
# iterations (the code's names lr_g / lr_z are swapped relative to their use: z gets 0.1).
# GENIE runs 4000 iterations per batch of 128; the iterations and batch size here default to
# distill_data's 500 and 32 (CPU budget; bench/recon_table.py compares the two sources).
LATENT_DIM = 256
WIDTHS = (128, 64)
LATENT_LR = 0.1
GENERATOR_LR = 0.01
GENERATOR_DECAY = 0.95
DECAY_EVERY = 100
PLATEAU_PATIENCE = 100
PLATEAU_MIN_LR = 1e-4
LEAKY_SLOPE = 0.2
UPSAMPLING = 4  # two x2 nearest upsamplings
MIN_SEED_SIZE = 2  # the first feature map is at least 2 x 2 (its BatchNorm needs > 1 value per channel)


def check_genie_shape(input_shape) -> tuple[int, int, int]:
    """``input_shape`` as (C, H, W) ints; ValueError naming ``input_shape`` otherwise. The generator
    makes images, so it needs [C, H, W] samples (any H, W with H * W >= 2; e.g. 28 x 28 or 30 x 17)."""
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3 or not all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) positive ints for the GENIE generator (images only; "
                         f"use distill_method='zeroq' for other inputs), got {input_shape!r}")
    c, h, w = (int(d) for d in input_shape)
    if h * w < 2:
        raise ValueError(f"input_shape must have H * W >= 2 for the GENIE generator, got {input_shape!r}")
    return c, h, w


class GenieGenerator(nn.Module):
    """GENIE's generator (their ``Generator``), sized for ``out_shape`` = (C, H, W).

    z [N, latent_dim] -> Linear -> [N, c1, H0, W0] (H0 = max(ceil(H / 4), 2), same for W) -> BN ->
    x2 nearest upsampling -> 3x3 conv to c2 -> BN -> LeakyReLU(0.2) -> x2 upsampling -> 3x3 conv to C
    -> center crop to H x W (when H or W is not a multiple of 4) -> tanh -> BatchNorm without affine
    parameters. Output float32 [N, C, H, W]; in training mode (as GENIE trains and samples it) each
    channel has batch mean 0 and std 1: the model's *normalized* input domain.
    """

    def __init__(self, out_shape: tuple[int, int, int], latent_dim: int = LATENT_DIM,
                 widths: tuple[int, int] = WIDTHS):
        super().__init__()
        c, h, w = check_genie_shape(out_shape)
        c1, c2 = widths
        self.out_size = (h, w)
        self.seed_size = tuple(max(math.ceil(s / UPSAMPLING), MIN_SEED_SIZE) for s in (h, w))
        self.linear = nn.Linear(latent_dim, c1 * self.seed_size[0] * self.seed_size[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(c1), nn.Upsample(scale_factor=2), nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2), nn.LeakyReLU(LEAKY_SLOPE), nn.Upsample(scale_factor=2),
            nn.Conv2d(c2, c, 3, padding=1))
        self.head = nn.Sequential(nn.Tanh(), nn.BatchNorm2d(c, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.body(self.linear(z).view(z.shape[0], -1, *self.seed_size))
        (h, w), (big_h, big_w) = self.out_size, y.shape[2:]
        top, left = (big_h - h) // 2, (big_w - w) // 2
        return self.head(y[:, :, top:top + h, left:left + w])


def _check_args(input_shape, num_samples, iters, batch_size, lr, generator_lr, latent_dim, widths, relax) -> None:
    check_genie_shape(input_shape)
    for name, value, low in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1), ("iters", iters, 0),
                             ("latent_dim", latent_dim, 1)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, value in (("lr", lr), ("generator_lr", generator_lr)):
        if not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not (isinstance(widths, (tuple, list)) and len(widths) == 2 and all(
            isinstance(c, numbers.Integral) and not isinstance(c, bool) and c > 0 for c in widths)):
        raise ValueError(f"widths must be two positive ints (generator channels), got {widths!r}")
    check_relax(relax)


def _new_generator(shape, latent_dim, widths, rng: torch.Generator, device) -> GenieGenerator:
    """A generator initialized from ``rng`` (torch's default init under a derived seed; the global RNG
    is forked, so it is left as it was)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = GenieGenerator(shape, latent_dim, widths)
    return gen.to(device).train()


def _synthesize_batch(model, stats, captured, gen: GenieGenerator, z: torch.Tensor, to_input, iters: int,
                      lrs: tuple[float, float], label: str, progress: bool,
                      jitter: torch.Generator | None) -> tuple[list[float], float, torch.Tensor]:
    """Train ``gen`` and the leaf ``z`` jointly; (loss per iteration, final loss, images)."""
    opt_z = torch.optim.Adam([z], lr=lrs[0])
    opt_g = torch.optim.Adam(gen.parameters(), lr=lrs[1])
    sched_z = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, patience=PLATEAU_PATIENCE, min_lr=PLATEAU_MIN_LR)
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=GENERATOR_DECAY)
    bar = tqdm(range(iters), desc=label, disable=not progress, leave=False)
    history = []
    stem_grad = StepStemGrad()
    for it in bar:
        opt_z.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        x = to_input(gen(z))
        with stem_grad.step():  # the model's stem input gradient by one forward conv (conv_grad.py)
            model(x if jitter is None else augment(x, jitter))
        loss = stats.loss() + input_statistics_loss(captured.get("z", x))
        loss.backward()
        opt_z.step()
        opt_g.step()
        value = loss.item()
        sched_z.step(value)
        if (it + 1) % DECAY_EVERY == 0:
            sched_g.step()
        history.append(value)
        if progress:
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
    with torch.no_grad():  # the images of the trained generator (training-mode BN, as GENIE samples)
        x = to_input(gen(z))
        model(x)
        final = (stats.loss() + input_statistics_loss(captured.get("z", x))).item()
    return history, final, x


def distill_genie(model: nn.Module, input_shape: tuple[int, int, int], num_samples: int = 32, iters: int = 500,
                  batch_size: int = 32, lr: float = LATENT_LR, generator_lr: float = GENERATOR_LR,
                  latent_dim: int = LATENT_DIM, widths: tuple[int, int] = WIDTHS, seed: int = 0,
                  device: torch.device | str = "cpu", progress: bool = True, relax: float = 0.0,
                  augment: bool = False) -> DistillResult:
    """``num_samples`` synthetic images of shape ``input_shape`` = (C, H, W), made GENIE's way.

    Per batch of ``batch_size``: a fresh :class:`GenieGenerator` and latents z [n, latent_dim] ~
    N(0, 1), both trained ``iters`` steps with Adam (latents at ``lr`` with reduce-on-plateau,
    generator at ``generator_lr`` decayed x0.95 every 100 steps) against ``distill_data``'s loss.
    The generator's output is the normalized input; the model's normalizer (buffers ``mean``,
    ``std``, as :func:`pyzeroq.distill.gaussian_inputs`) maps it to the input domain. Defaults: GENIE's
    code, except ``iters`` / ``batch_size`` (``distill_data``'s; GENIE runs 4000 x 128).

    Returns a :class:`DistillResult`: ``data`` float32 [num_samples, C, H, W] contiguous on
    ``device`` (the trained generator's images), the loss per iteration (``history``), its first
    value and the loss of the returned images. relax / augment as in ``distill_data``. The same
    arguments give the same images in any process (everything random derives from ``seed``; the
    global torch RNG is left unchanged); ``model`` runs in eval mode and is left unchanged. ValueError
    naming the argument before any work: ``input_shape`` not (C, H, W) with H * W >= 2 (use
    ``distill_data`` for other inputs), bad sizes, rates, ``widths`` or ``relax``.
    """
    _check_args(input_shape, num_samples, iters, batch_size, lr, generator_lr, latent_dim, widths, relax)
    if not isinstance(augment, bool):
        raise TypeError(f"augment must be a bool, got {augment!r}")
    shape = check_genie_shape(input_shape)
    rng = torch.Generator().manual_seed(seed)
    norm = find_normalizer(model)
    scale, shift = (None, None) if norm is None else (norm.std.to(device), norm.mean.to(device))
    batches, history, finals, layout = [], [], [], None
    with distill_session(model, relax) as (stats, captured):
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            gen = _new_generator(shape, latent_dim, widths, rng, device)
            z = torch.randn((n, latent_dim), generator=rng).to(device).requires_grad_(True)
            stats.draw_targets(n, rng)
            if layout is None:
                layout = input_memory_format(model, torch.zeros((1, *shape), device=device))

            def to_input(y, layout=layout):
                return (y if norm is None else y * scale + shift).contiguous(memory_format=layout)

            hist, final, x = _synthesize_batch(model, stats, captured, gen, z, to_input, iters, (lr, generator_lr),
                                               f"genie {start // batch_size + 1}", progress,
                                               rng if augment else None)
            history.extend(hist)
            finals.append(final)
            batches.append(x)
    initial = history[0] if history else finals[0]
    return DistillResult(torch.cat(batches).contiguous(), initial, finals[-1], tuple(history))
