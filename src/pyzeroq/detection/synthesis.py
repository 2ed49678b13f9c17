"""Stage 1: a labeled synthetic calibration set from the detector alone, and the
task-agnostic baselines (ZeroQ distilled images, Gaussian noise).

Task-specific synthesis (per batch): seed labels (:mod:`.sampling`), images from
U[0, 1] noise optimized with Adam (cosine learning-rate schedule) on

    main_mult * L_det(model(x), labels) + r_feature * sum_l R_l + first_bn_coef * R_1
    + tv_l1 * TV1(x) + tv_l2 * TV2(x)

(R_l: the project's BN-statistics loss, :class:`pyzeroq.distill.BNStatistics`; TV1 the
mean absolute, TV2 the mean squared difference of neighbouring pixels), images
clamped to [0, 1] after every step; box refinement from the detector's own confident
predictions at regular iterations (``refine_every``, a fraction of the run); the iterate
(images and labels) with the lowest detector loss on its own labels is kept; then
(``second_pass``) the images are re-synthesized from fresh noise for a full run with
those labels fixed, and optionally (``relabel``) the labels are replaced by the
detector's predictions on the final images. ``info["label_quality"]`` records the
detector's mAP and box loss against the final labels. The detector is used in eval mode
and left unchanged. Several processes (``torchrun``) share out whole batches
(:mod:`pyzeroq.detection.distributed`).
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
from . import distributed as ddp
from .config import SynthesisConfig, describe
from .interface import frozen
from .nms import box_area
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


def _refine_iterations(cfg: SynthesisConfig) -> set[int]:
    """Iterations of a pass at which labels are refined: every ``refine_every * iters``
    (at least 1) iterations from ``refine_start * iters`` to ``refine_end * iters``."""
    if not cfg.refine:
        return set()
    start = int(round(cfg.refine_start * cfg.iters))
    end = int(round(cfg.refine_end * cfg.iters))
    every = max(1, int(round(cfg.refine_every * cfg.iters)))
    return set(range(start, min(end, cfg.iters - 1) + 1, every))


def _optimize(model, stats, x0: torch.Tensor, labels: list, cfg: SynthesisConfig, refine_at: set, device,
              progress: bool, desc: str, counts: dict):
    """One synthesis pass of one batch from the images ``x0``: returns (best images, their
    labels, per-iteration loss). Best: the lowest detector loss on the labels of that
    iterate (``best_by="task"`` with a task loss), else the lowest total loss."""
    canvas = x0.shape[-1]
    x = x0.to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    best, best_x, best_labels, hist = math.inf, x.detach().clone(), labels, []
    bar = tqdm(range(cfg.iters), desc=desc, disable=not progress, leave=False, mininterval=5)
    for it in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * it / cfg.iters))
        out = model(x)
        bn = stats.losses()
        tv1, tv2 = total_variation(x)
        loss = cfg.r_feature * torch.stack(bn).sum() + cfg.first_bn_coef * bn[0] + cfg.tv_l1 * tv1 + cfg.tv_l2 * tv2
        det = None
        if cfg.main_mult > 0:
            det = model.loss(out, [{k: v.to(device) for k, v in t.items()} for t in labels])
            loss = loss + cfg.main_mult * det
        value = loss.item()
        hist.append(value)
        key = det.item() if det is not None and cfg.best_by == "task" else value
        if key < best:
            best, best_x, best_labels = key, x.detach().clone(), labels
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
    return best_x.cpu(), best_labels, hist


def _relabel(model, images: torch.Tensor, labels: list, cfg: SynthesisConfig, device) -> list:
    """The detector's predictions (score > refine_score, NMS refine_nms_iou, area fraction in
    (min_area, max_area), at most max_labels) as labels; an image without any keeps its labels."""
    canvas = images.shape[-1]
    with torch.no_grad():
        preds = model.decode(model(images.to(device)), score_threshold=cfg.refine_score,
                             iou_threshold=cfg.refine_nms_iou)
    out = []
    for t, p in zip(labels, preds):
        boxes, labs = p["boxes"].cpu().float(), p["labels"].cpu().to(torch.int64)
        frac = box_area(boxes) / float(canvas * canvas)
        keep = torch.nonzero((frac > cfg.min_area) & (frac < cfg.max_area)).squeeze(1)[:cfg.max_labels]
        out.append({"boxes": boxes[keep].clone(), "labels": labs[keep].clone()} if len(keep) else t)
    return out


def synthesize(detector: nn.Module, cfg: SynthesisConfig = SynthesisConfig(), seed: int = 0,
               device: torch.device | str = "cpu", progress: bool = True) -> SyntheticSet:
    """Task-specific labeled synthetic set (see the module docstring): images float
    [num_images, 1, H, W] in [0, 1] and per image {"boxes" float [M, 4] x1y1x2y2, "labels"
    int64 [M]}. ``info["label_quality"]``: the detector's mAP and loss parts against its own
    synthetic labels (:func:`label_quality`). The detector is left unchanged. Under an initialized
    process group of several processes the batches are shared out and every process returns
    the whole set (:mod:`pyzeroq.detection.distributed`)."""
    canvas = int(detector.input_size)
    num_classes = int(detector.num_classes)
    gen = torch.Generator().manual_seed(seed)
    refine_at = _refine_iterations(cfg)
    done = []   # (batch number, images, labels, loss history, refinement counts)
    dp = ddp.data_parallel()   # several processes: whole batches round-robin (module distributed)
    progress = progress and ddp.is_main()
    with frozen(detector) as model, BNStatistics(model) as stats:
        for start in range(0, cfg.num_images, cfg.batch_size):
            n = min(cfg.batch_size, cfg.num_images - start)
            b = start // cfg.batch_size + 1
            labels = seed_labels(n, num_classes, canvas, gen, cfg.box_min_frac, cfg.box_max_frac)
            x0 = torch.rand(n, 1, canvas, canvas, generator=gen)
            x0_fixed = torch.rand(n, 1, canvas, canvas, generator=gen) if cfg.second_pass else None
            if dp is not None and not dp.owns(b - 1):
                continue  # another process runs this batch; its numbers were drawn all the same
            counts = {"added": 0, "removed": 0}
            x, labels, hist = _optimize(model, stats, x0, labels, cfg, refine_at, device, progress,
                                        f"synthesize {b}", counts)
            if cfg.second_pass:
                x, labels, hist2 = _optimize(model, stats, x0_fixed, labels, cfg, set(), device, progress,
                                             f"synthesize {b} (labels fixed)", counts)
                hist = hist + hist2
            if cfg.relabel:
                labels = _relabel(model, x, labels, cfg, device)
            done.append((b, x, labels, hist, counts))
    if dp is not None:
        done = sorted((r for part in dp.gather(done) for r in part), key=lambda r: r[0])
    images = torch.cat([r[1] for r in done])
    targets = [t for r in done for t in r[2]]
    history = [r[3] for r in done]
    counts = {k: sum(r[4][k] for r in done) for k in ("added", "removed")}
    quality = label_quality(detector, images, targets, device=device)
    info = {"kind": "task_specific", "config": describe(cfg), "seed": seed, "refinement": counts,
            "boxes_per_image": float(np.mean([len(t["labels"]) for t in targets])), "label_quality": quality}
    return SyntheticSet(images, targets, history, info)


@torch.no_grad()
def label_quality(detector: nn.Module, images: torch.Tensor, targets: list, batch_size: int = 64,
                  device: torch.device | str = "cpu") -> dict:
    """How well labels fit images, judged by ``detector`` (eval mode for the call):
    {"teacher_map", "teacher_map50", "teacher_map75"} (pycocotools, x1 fractions, of its
    predictions against ``targets``), {"loss_<part>"} (the detector's loss parts on them,
    image-weighted mean over batches; "loss_reg" is the GIoU box loss of our FCOS) and
    "labels_per_image". ``images``: float [N, 1, H, W] in [0, 1]; ``targets``: N dicts
    {"boxes" [M, 4], "labels" [M]}. ValueError when the counts differ."""
    from .interface import predict
    from .metrics import coco_map

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise TypeError("images must be a float tensor [N, 1, H, W]")
    if not isinstance(targets, list) or len(targets) != len(images):
        raise ValueError(f"targets must be a list of {len(images)} dicts, got "
                         f"{len(targets) if isinstance(targets, list) else type(targets).__name__}")
    was = detector.training
    detector.eval()
    try:
        sums: dict[str, float] = {}
        for s in range(0, len(images), batch_size):
            x = images[s:s + batch_size].to(device)
            tg = [{k: v.to(device) for k, v in t.items()} for t in targets[s:s + batch_size]]
            try:
                _, parts = detector.loss(detector(x), tg, reduce=False)
            except TypeError:  # a detector whose loss has no parts
                parts = {"total": detector.loss(detector(x), tg)}
            for k, v in parts.items():
                sums[f"loss_{k}"] = sums.get(f"loss_{k}", 0.0) + float(v) * len(x)
        preds = predict(detector, images[:, 0].cpu().numpy())
    finally:
        detector.train(was)
    objects = [[(*b.tolist(), int(lab)) for b, lab in zip(t["boxes"], t["labels"])] for t in targets]
    m = coco_map(to_coco(objects, canvas=images.shape[-1], split="synthetic"), preds)
    out = {"teacher_map": m["map"], "teacher_map50": m["map50"], "teacher_map75": m["map75"],
           **{k: v / len(images) for k, v in sums.items()},
           "labels_per_image": float(np.mean([len(t["labels"]) for t in targets]))}
    return out


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
