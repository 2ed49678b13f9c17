"""Stage 1: a labeled synthetic calibration set from the detector alone, and the
task-agnostic baselines (ZeroQ distilled images, Gaussian noise).

Task-specific synthesis (per batch): seed labels (:mod:`.sampling`), images from
U[0, 1] noise optimized with Adam (cosine learning-rate schedule) on

    main_mult * L_det(model(x), labels) + r_feature * sum_l R_l + first_bn_coef * R_1
    + tv_l1 * TV1(x) + tv_l2 * TV2(x)

(R_l: the project's BN-statistics loss, :class:`pyzeroq.distill.BNStatistics`; TV1 the
mean absolute, TV2 the mean squared difference of neighbouring pixels), images
clamped to [0, 1] after every step; box refinement from the detector's own confident
predictions at regular iterations; the iterate (images and labels) with the lowest
loss is kept. The detector is used in eval mode and left unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .._optional import require
from ..distill import BNStatistics, distill_data, gaussian_inputs
from .config import SynthesisConfig, describe
from .sampling import refine_labels, seed_labels
from .scenes import to_coco


@dataclass
class SyntheticSet:
    images: torch.Tensor            # float [N, 1, H, W]
    targets: list | None            # per image {"boxes", "labels"}, None for unlabeled sets
    history: list                   # per batch: per-iteration loss values
    info: dict


def total_variation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    tv1 = dx.abs().mean() + dy.abs().mean()
    tv2 = dx.pow(2).mean() + dy.pow(2).mean()
    return tv1, tv2


class _Frozen:
    """Eval mode and no parameter gradients for the duration of a block."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.flags = [p.requires_grad for p in self.model.parameters()]
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc):
        for p, f in zip(self.model.parameters(), self.flags):
            p.requires_grad_(f)
        self.model.train(self.training)


def _refine_iterations(cfg: SynthesisConfig) -> set[int]:
    if not cfg.refine:
        return set()
    start = int(round(cfg.refine_start * cfg.iters))
    end = int(round(cfg.refine_end * cfg.iters))
    return set(range(start, min(end, cfg.iters - 1) + 1, cfg.refine_every))


def synthesize(detector: nn.Module, cfg: SynthesisConfig = SynthesisConfig(), seed: int = 0,
               device: torch.device | str = "cpu", progress: bool = True) -> SyntheticSet:
    """Task-specific labeled synthetic set (see the module docstring)."""
    canvas = int(detector.input_size)
    num_classes = int(detector.num_classes)
    gen = torch.Generator().manual_seed(seed)
    refine_at = _refine_iterations(cfg)
    images, targets, history = [], [], []
    counts = {"added": 0, "removed": 0}
    with _Frozen(detector) as model, BNStatistics(model) as stats:
        for start in range(0, cfg.num_images, cfg.batch_size):
            n = min(cfg.batch_size, cfg.num_images - start)
            labels = seed_labels(n, num_classes, canvas, gen, cfg.box_min_frac, cfg.box_max_frac)
            x = torch.rand(n, 1, canvas, canvas, generator=gen).to(device).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=cfg.lr)
            best, best_x, best_labels, hist = math.inf, x.detach().clone(), labels, []
            bar = tqdm(range(cfg.iters), desc=f"synthesize {start // cfg.batch_size + 1}", disable=not progress,
                       leave=False, mininterval=5)
            for it in bar:
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * it / cfg.iters))
                out = model(x)
                bn = stats.losses()
                tv1, tv2 = total_variation(x)
                loss = cfg.r_feature * torch.stack(bn).sum() + cfg.first_bn_coef * bn[0] \
                    + cfg.tv_l1 * tv1 + cfg.tv_l2 * tv2
                dev_labels = [{k: v.to(device) for k, v in t.items()} for t in labels]
                if cfg.main_mult > 0:
                    loss = loss + cfg.main_mult * model.loss(out, dev_labels)
                value = loss.item()
                hist.append(value)
                if value < best:
                    best, best_x, best_labels = value, x.detach().clone(), labels
                if it in refine_at:
                    preds = model.decode({k: [t.detach() for t in v] for k, v in out.items()},
                                         score_threshold=cfg.refine_score, iou_threshold=cfg.refine_nms_iou)
                    new = [refine_labels(t, {k: v.cpu() for k, v in p.items()}, canvas, cfg.match_iou,
                                         cfg.min_area, cfg.max_area, max_labels=cfg.max_labels)
                           for t, p in zip(labels, preds)]
                    counts["added"] += sum(max(0, len(a["labels"]) - len(b["labels"])) for a, b in zip(new, labels))
                    counts["removed"] += sum(max(0, len(b["labels"]) - len(a["labels"])) for a, b in zip(new, labels))
                    labels = new
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.clamp_(0, 1)
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            images.append(best_x.cpu())
            targets.extend(best_labels)
            history.append(hist)
    info = {"kind": "task_specific", "config": describe(cfg), "seed": seed, "refinement": counts,
            "boxes_per_image": float(np.mean([len(t["labels"]) for t in targets]))}
    return SyntheticSet(torch.cat(images), targets, history, info)


def distilled_set(detector: nn.Module, num_images: int, iters: int, batch_size: int = 64, seed: int = 0,
                  device: torch.device | str = "cpu", progress: bool = True) -> SyntheticSet:
    """Task-agnostic ZeroQ distilled images (BN matching only, no labels)."""
    canvas = int(detector.input_size)
    res = distill_data(detector, (1, canvas, canvas), num_samples=num_images, iters=iters,
                       batch_size=batch_size, seed=seed, device=device, progress=progress)
    return SyntheticSet(res.data.cpu(), None, [list(res.history)],
                        {"kind": "distilled", "iters": iters, "seed": seed, "final_loss": res.final_loss})


def gaussian_set(detector: nn.Module, num_images: int, seed: int = 0,
                 device: torch.device | str = "cpu") -> SyntheticSet:
    """N(0, 1) in the detector's normalized input domain (no labels)."""
    canvas = int(detector.input_size)
    gen = torch.Generator().manual_seed(seed)
    x = gaussian_inputs(detector, (num_images, 1, canvas, canvas), gen, device)
    return SyntheticSet(x.cpu(), None, [], {"kind": "gaussian", "seed": seed})


# ---------------------------------------------------------------------- saving / viewing

def save_synthetic(synthetic: SyntheticSet, stem: str | Path) -> tuple[Path, Path | None]:
    """``<stem>.npz`` (float32 images [N, 1, H, W]) and, for labeled sets, ``<stem>.json``
    (COCO format, category_id = label + 1)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    npz = stem.with_suffix(".npz")
    np.savez_compressed(npz, images=synthetic.images.numpy().astype(np.float32))
    if synthetic.targets is None:
        return npz, None
    objects = [[(*b.tolist(), int(lab)) for b, lab in zip(t["boxes"], t["labels"])] for t in synthetic.targets]
    coco = to_coco(objects, canvas=synthetic.images.shape[-1], split="synthetic")
    coco["info"]["synthesis"] = synthetic.info
    js = stem.with_suffix(".json")
    js.write_text(json.dumps(coco))
    return npz, js


def plot_samples(images: torch.Tensor, targets: list | None, path: str | Path, num: int = 16,
                 cols: int = 8, title: str | None = None) -> Path:
    """PNG grid of the first ``num`` images with their boxes and class names (matplotlib)."""
    matplotlib = require("matplotlib", "plot", "plot_samples")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ..data import CLASS_NAMES

    num = min(num, len(images))
    rows = max(1, math.ceil(num / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows + (0.4 if title else 0)))
    for i, ax in enumerate(np.atleast_1d(axes).flat):
        ax.axis("off")
        if i >= num:
            continue
        ax.imshow(images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        if targets is not None:
            for (x1, y1, x2, y2), lab in zip(targets[i]["boxes"].tolist(), targets[i]["labels"].tolist()):
                ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color="red", lw=1))
                ax.text(x1, y1, CLASS_NAMES[lab], color="yellow", fontsize=6, va="bottom")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
