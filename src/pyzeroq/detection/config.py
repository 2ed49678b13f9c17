"""Configuration of task-specific zero-shot QAT for detection (frozen, validated dataclasses).

Defaults follow the method's public code (see the paper notes) scaled to our small
detector and a 2-core CPU budget:

* synthesis: Adam lr 0.2 with a cosine schedule from U[0, 1] noise (paper: 3000
  iterations, 2048 images; ours 200 iterations, 256 images); loss
  ``main_mult * L_det + r_feature * sum_l R_l + first_bn_coef * R_1 + tv_l1 * TV1 + tv_l2 * TV2``
  with R_l the project's BN-statistics loss (pyzeroq.distill.BNStatistics: per-sample,
  squared distances of mean/std — not the paper's batch-statistic norms, hence
  different coefficient magnitudes: r_feature 0.05, first_bn_coef 1.0, tv_l2 0.02 here,
  picked among three variants by the BN loss reached in 80 iterations; on real scenes
  the summed BN loss is ~600 and L_det ~1, on U[0, 1] noise the BN loss is ~9400, on
  our synthetic images ~190); ``main_mult`` 20 and ``max_labels`` 4 (real scenes: 3.3
  objects per image) make the images agree with their labels: the FP detector's mAP
  against its own synthetic labels (32 images, 80 iterations per pass, seed 0, two passes)
  is 80.7 with a GIoU box loss of 0.127 (real train scenes: 54.8 and 0.146), against 0.4
  with ``main_mult`` 0.5 / ``max_labels`` 10 (10 labels per image; 48.8 before the second
  pass) — the BN loss (~10 weighted) drowned the detection loss (~0.5 weighted);
  refinement between 27 % and 93 % of the iterations (paper: 800..2800 of 3000),
  every ``refine_every`` (a fraction, 0.03 as the paper's 100 of 3000) of the iterations,
  confidence 0.3 (paper 0.2 on YOLO's obj*cls; our FCOS score is sqrt(p_cls * p_ctr),
  higher for the same class probability), NMS IoU 0.6, match IoU 0.35,
  area fraction in (0.01, 0.85); the iterate kept is the one with the lowest detector loss
  on its own (current) labels; then a second pass from fresh U[0, 1] noise for ``iters``
  iterations with those labels fixed (the paper's re-synthesis), optionally followed by
  relabeling with the detector's predictions on the final images (``relabel``);
* QAT: LSQ fake quantization, weights per output channel, activations (conv inputs)
  per tensor, asymmetric with the zero point fixed at its min/max initialization and
  learned step; loss ``w_task * L_det + w_kd * tau^2 * KL + w_mse * MSE_fpn
  + w_head * MSE_head + w_modules * MSE_modules`` (tau 4; :mod:`pyzeroq.detection.kd`);
  Adam with linear warm-up, cosine schedule, gradient-norm clipping and an EMA of the
  weights as the result.

Defaults that differ from the paper's loss (``w_head``, ``kd_keys``): the paper matches the
FPN features and the class logits only; with that form the box branch of our detector is
taught by the task loss on approximate synthetic boxes alone and W4A8 loses ~7 mAP
against task-agnostic data (bench/results/detection.md). ``QATConfig(w_head=0.0,
kd_keys=("cls",), warmup=0.0, grad_clip=None, ema_decay=None)`` is the paper's form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..config import MAX_SEED

CALIBRATIONS = ("task_specific", "distilled", "gaussian", "real")
LOSS_WEIGHTS = ("w_task", "w_kd", "w_mse", "w_head", "w_modules")  # QATConfig's loss terms
MIN_BITS, MAX_BITS = 2, 16


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


def _positive_int(obj, name: str) -> None:
    v = getattr(obj, name)
    _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, f"must be an integer >= 1, got {v!r}")


def _nonneg(obj, name: str) -> None:
    v = getattr(obj, name)
    _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, name,
           f"must be a finite number >= 0, got {v!r}")


def _fraction(obj, name: str, lo_open: bool = False) -> None:
    v = getattr(obj, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (0 < v if lo_open else 0 <= v) and v <= 1
    _check(ok, name, f"must be a number in {'(' if lo_open else '['}0, 1], got {v!r}")


def _bits(v, name: str, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    _check(isinstance(v, int) and not isinstance(v, bool) and MIN_BITS <= v <= MAX_BITS, name,
           f"must be an integer in [{MIN_BITS}, {MAX_BITS}]{' or None (float)' if allow_none else ''}, got {v!r}")


def _check_device(device) -> None:
    """A device name torch parses (whether this machine has it is checked when it is used)."""
    _check(isinstance(device, (str, torch.device)), "device",
           f"must be a string such as 'cpu' or 'cuda' (or a torch.device), got {device!r}")
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from exc


def _check_calibration_data(data) -> None:
    """``(images, coco)``: uint8 scenes (or floats in [0, 1]) [N, H, W] / [N, 1, H, W], N >= 1,
    and the COCO dict of those N images (what ``make_scenes`` returns)."""
    name = "calibration_data"
    _check(isinstance(data, (tuple, list)) and len(data) == 2, name,
           f"must be a pair (uint8 images [N, H, W], COCO dict) as make_scenes returns, got {type(data).__name__}"
           f"{f' of {len(data)} items' if isinstance(data, (tuple, list)) else ''}")
    images, coco = data
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    _check(isinstance(images, np.ndarray), name, f"images must be a numpy array or torch tensor, got "
           f"{type(images).__name__}")
    _check(images.ndim in (3, 4) and (images.ndim == 3 or images.shape[1] == 1), name,
           f"images must have shape [N, H, W] or [N, 1, H, W], got {images.shape}")
    _check(len(images) > 0, name, f"images is empty (shape {images.shape})")
    _check(images.dtype == np.uint8 or images.dtype.kind == "f", name,
           f"images must be uint8 pixels or floats in [0, 1], got dtype {images.dtype}")
    if images.dtype != np.uint8:
        _check(bool(np.isfinite(images).all()) and images.min() >= 0 and images.max() <= 1, name,
               "float images must be finite and in [0, 1]")
    _check(isinstance(coco, dict) and isinstance(coco.get("images"), list) and
           isinstance(coco.get("annotations"), list), name, "the second item must be a COCO dict with lists "
           "'images' and 'annotations'")
    _check(len(coco["images"]) == len(images), name,
           f"the COCO dict describes {len(coco['images'])} images, the images array has {len(images)}")
    ids = {img.get("id") for img in coco["images"] if isinstance(img, dict)}
    unknown = [a.get("image_id") if isinstance(a, dict) else a for a in coco["annotations"]
               if not isinstance(a, dict) or a.get("image_id") not in ids or not isinstance(a.get("bbox"), list)
               or "category_id" not in a]
    _check(not unknown, name, f"annotations must be dicts with bbox, category_id and the image_id of one of "
           f"the images; {len(unknown)} are not (e.g. image_id {unknown[0]!r})" if unknown else "")


@dataclass(frozen=True)
class SynthesisConfig:
    num_images: int = 256
    batch_size: int = 64
    iters: int = 200
    lr: float = 0.2
    main_mult: float = 20.0       # detection-loss weight (0 = no task loss: ablation)
    r_feature: float = 0.05       # weight of the summed BN-statistics loss
    first_bn_coef: float = 1.0    # extra weight of the first BN's loss
    tv_l1: float = 0.0
    tv_l2: float = 0.02
    refine: bool = True           # box refinement from the detector's predictions
    refine_start: float = 0.27    # fraction of iters where refinement starts / ends
    refine_end: float = 0.93
    refine_every: float = 0.03    # fraction of iters between refinements (paper: 100 of 3000)
    refine_score: float = 0.3     # confidence threshold (FCOS score sqrt(p_cls * p_ctr)) of predictions used
    refine_nms_iou: float = 0.6
    match_iou: float = 0.35
    min_area: float = 0.01        # area fraction limits (exclusive) of added boxes
    max_area: float = 0.85
    max_labels: int = 4           # no refinement additions beyond this many labels per image
    box_min_frac: float = 0.2     # seed box side ~ U(box_min_frac, box_max_frac) * canvas
    box_max_frac: float = 0.8
    best_by: str = "task"         # iterate kept: lowest detector loss on its labels ("task") or total loss
    second_pass: bool = True      # re-synthesize from fresh noise for ``iters`` with the final labels fixed
    relabel: bool = False         # replace the labels by the detector's predictions on the final images

    def __post_init__(self):
        for n in ("num_images", "batch_size", "iters", "max_labels"):
            _positive_int(self, n)
        for n in ("lr",):
            _nonneg(self, n)
            _check(self.lr > 0, n, f"must be > 0, got {self.lr!r}")
        for n in ("main_mult", "r_feature", "first_bn_coef", "tv_l1", "tv_l2"):
            _nonneg(self, n)
        for n in ("refine_start", "refine_end", "refine_score", "refine_nms_iou", "match_iou", "min_area",
                  "max_area"):
            _fraction(self, n)
        for n in ("box_min_frac", "box_max_frac", "refine_every"):
            _fraction(self, n, lo_open=True)
        for n in ("refine", "second_pass", "relabel"):
            _check(isinstance(getattr(self, n), bool), n, f"must be a bool, got {getattr(self, n)!r}")
        _check(self.best_by in ("task", "total"), "best_by", f"must be 'task' or 'total', got {self.best_by!r}")
        _check(self.refine_start <= self.refine_end, "refine_end", "must be >= refine_start")
        _check(self.min_area < self.max_area, "max_area", "must be > min_area")
        _check(self.box_min_frac <= self.box_max_frac, "box_max_frac", "must be >= box_min_frac")


@dataclass(frozen=True)
class QATConfig:
    weight_bits: int = 4
    act_bits: int = 8
    first_layer_bits: int | None = 8   # weight and input bits of the first conv; None = float
    head_bits: int | None = 8          # bits of the final prediction convs; None = float
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-4                   # weights and BN parameters (paper: Adam 1e-4)
    step_lr: float = 1e-5              # LSQ step sizes (Adam moves a parameter by ~lr per step
                                       # whatever its size; 8-bit weight steps are ~1e-3)
    w_task: float = 0.04               # paper's YOLOv5 w_ori; with Adam the scale matters little
    w_kd: float = 1.0
    w_mse: float = 1.0
    tau: float = 4.0
    train_bn_stats: bool = False       # BN affine params always train; running stats update if True
    act_percentile: float | None = None  # activation range init: min/max (None) or percentile
    # None: the detector's total task loss (the paper). A tuple of part names: the sum of those
    # parts of ``loss(outputs, targets, reduce=False)`` only, e.g. ("cls",) learns the classes of
    # the synthetic labels and leaves the boxes to distillation (their boxes are approximate).
    task_loss_parts: tuple[str, ...] | None = None
    w_head: float = 1.0                # MSE on every raw head output (class, box, centerness; all levels)
    kd_keys: tuple[str, ...] = ("cls", "ctr")  # output keys of sigmoid logits under the KL (paper: class only)
    w_modules: float = 0.0             # mean MSE of every conv / linear / BN output, every call (reference form)
    warmup: float = 0.1                # fraction of steps with a linear learning-rate warm-up
    grad_clip: float | None = 10.0     # max global gradient norm; None = no clipping
    ema_decay: float | None = 0.99     # EMA of the weights (the result); None = the last iterate

    def __post_init__(self):
        _bits(self.weight_bits, "weight_bits")
        _bits(self.act_bits, "act_bits")
        _bits(self.first_layer_bits, "first_layer_bits", allow_none=True)
        _bits(self.head_bits, "head_bits", allow_none=True)
        _positive_int(self, "batch_size")
        _check(isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 0, "steps",
               f"must be an integer >= 0, got {self.steps!r}")
        for n in ("lr", "step_lr", "tau") + LOSS_WEIGHTS:
            _nonneg(self, n)
        _fraction(self, "warmup")
        _check(self.warmup < 1, "warmup", f"must be < 1, got {self.warmup!r}")
        _check(isinstance(self.kd_keys, tuple) and all(isinstance(n, str) and n for n in self.kd_keys), "kd_keys",
               f"must be a tuple of output-key names, got {self.kd_keys!r}")
        _check(self.kd_keys or self.w_kd == 0, "kd_keys", "must name at least one output key when w_kd > 0 "
               "(or set w_kd=0 to train without the KL)")
        _check(self.steps == 0 or any(getattr(self, n) > 0 for n in LOSS_WEIGHTS), "w_task",
               f"QAT needs a loss: one of {', '.join(LOSS_WEIGHTS)} must be > 0 (or steps=0 for PTQ)")
        if self.grad_clip is not None:
            _nonneg(self, "grad_clip")
            _check(self.grad_clip > 0, "grad_clip", f"must be None or > 0, got {self.grad_clip!r}")
        if self.ema_decay is not None:
            _check(isinstance(self.ema_decay, (int, float)) and not isinstance(self.ema_decay, bool)
                   and 0 < self.ema_decay < 1, "ema_decay", f"must be None or in (0, 1), got {self.ema_decay!r}")
        _check(self.tau > 0, "tau", f"must be > 0, got {self.tau!r}")
        _check(isinstance(self.train_bn_stats, bool), "train_bn_stats", "must be a bool")
        if self.task_loss_parts is not None:
            _check(isinstance(self.task_loss_parts, tuple) and len(self.task_loss_parts) > 0 and
                   all(isinstance(n, str) and n for n in self.task_loss_parts), "task_loss_parts",
                   f"must be None or a non-empty tuple of loss-part names, got {self.task_loss_parts!r}")
        if self.act_percentile is not None:
            _check(isinstance(self.act_percentile, (int, float)) and 50 <= self.act_percentile <= 100,
                   "act_percentile", f"must be None or in [50, 100], got {self.act_percentile!r}")


@dataclass(frozen=True)
class DetectionQuantConfig:
    """End-to-end settings of :func:`pyzeroq.detection.quantize_detector`.

    ``calibration``: "task_specific" (ours: labeled synthetic set), "distilled"
    (ZeroQ, BN matching only, no labels), "gaussian", or "real" (with
    ``calibration_data=(uint8 images, COCO dict)``). ``distill_iters`` is used for
    "distilled". ``synthesis_seed`` / ``qat_seed`` (None: ``seed``) seed the calibration set
    and the QAT batch order separately (e.g. one synthetic set, several QAT seeds). With
    ``qat.steps == 0`` the result is PTQ (min/max ranges on the calibration set).
    """
    qat: QATConfig = field(default_factory=QATConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    calibration: str = "task_specific"
    calibration_data: object = None
    distill_iters: int = 200
    seed: int = 0
    synthesis_seed: int | None = None   # seed of the calibration set (None: ``seed``)
    qat_seed: int | None = None         # seed of the QAT batch order (None: ``seed``)
    device: str = "cpu"
    progress: bool = True

    @property
    def seeds(self) -> tuple[int, int]:
        """(synthesis seed, QAT seed) with None resolved to ``seed``."""
        return (self.seed if self.synthesis_seed is None else self.synthesis_seed,
                self.seed if self.qat_seed is None else self.qat_seed)

    def __post_init__(self):
        _check(isinstance(self.qat, QATConfig), "qat", "must be a QATConfig")
        _check(isinstance(self.synthesis, SynthesisConfig), "synthesis", "must be a SynthesisConfig")
        _check(self.calibration in CALIBRATIONS, "calibration", f"must be one of {CALIBRATIONS}, got {self.calibration!r}")
        _check((self.calibration == "real") == (self.calibration_data is not None), "calibration_data",
               "must be given (images, coco) exactly when calibration='real'")
        if self.calibration_data is not None:
            _check_calibration_data(self.calibration_data)
        _positive_int(self, "distill_iters")
        for n in ("seed", "synthesis_seed", "qat_seed"):
            v = getattr(self, n)
            _check(v is None and n != "seed" or isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED,
                   n, f"must be an integer in [0, {MAX_SEED}]{'' if n == 'seed' else ' or None'}, got {v!r}")
        _check(isinstance(self.progress, bool), "progress", f"must be a bool, got {self.progress!r}")
        _check_device(self.device)
        object.__setattr__(self, "device", str(self.device))  # a torch.device is kept as its name (saved as data)


def describe(cfg) -> dict:
    """Plain dict of a config (nested configs included, calibration data left out)."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "calibration_data":
            v = None if v is None else "<given>"
        elif hasattr(v, "__dataclass_fields__"):
            v = describe(v)
        out[f.name] = v
    return out
