"""The detector protocol: how a user's own detector plugs into pyzeroq.detection.

A detector is an ``nn.Module`` with

* ``forward(x)`` -> raw head outputs: a dict whose ``"cls"`` entry is a list of
  class-logit tensors ``[N, C, ...]`` (one per feature level; sigmoid/focal-style
  logits). The QAT distills these logits (KL with temperature). Other entries are
  free (box regression, centerness, ...);
* ``loss(outputs, targets)`` -> scalar detection loss, ``targets`` a list (one per
  image) of dicts ``{"boxes": float [M, 4] x1y1x2y2 pixels, "labels": int64 [M]}``;
* ``decode(outputs, score_threshold=..., iou_threshold=...)`` -> per image a dict
  ``boxes`` [K, 4], ``scores`` [K], ``labels`` [K] (after NMS);
* optionally ``feature_modules``: names of submodules whose outputs the QAT matches
  with a feature MSE (default: the raw head outputs), ``head_modules``: names of the
  final prediction layers (precision set by ``head_bits``; default: the last conv),
  ``num_classes`` and ``input_size`` (canvas side, for synthesis).

Inputs are float images in [0, 1], shape [N, 1, H, W]. :func:`predict` works for
every detector following the protocol; :class:`Detector` gives it as a method.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from .._checks import check_unit_images

PREDICT_BATCH = 256
DEFAULT_SCORE_THRESHOLD = 0.05
DEFAULT_IOU_THRESHOLD = 0.6
MAX_DETECTIONS = 100


@runtime_checkable
class DetectorProtocol(Protocol):
    def forward(self, x: torch.Tensor) -> dict: ...

    def loss(self, outputs: dict, targets: list[dict]) -> torch.Tensor: ...

    def decode(self, outputs: dict, score_threshold: float = DEFAULT_SCORE_THRESHOLD,
               iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> list[dict]: ...


def check_detector(detector) -> None:
    missing = [m for m in ("forward", "loss", "decode") if not callable(getattr(detector, m, None))]
    if missing or not isinstance(detector, nn.Module):
        raise TypeError("detector must be an nn.Module with forward(x), loss(outputs, targets) and "
                        f"decode(outputs) (see pyzeroq.detection.interface); missing: {missing or 'nn.Module'}")


def as_input(images, device: torch.device | str = "cpu") -> torch.Tensor:
    """Float images in [0, 1] ([N, H, W] or [N, 1, H, W], numpy or torch) -> float32 [N, 1, H, W]."""
    if not isinstance(images, torch.Tensor):
        try:
            arr = np.asarray(images)
        except (TypeError, ValueError) as exc:  # ragged nested lists, ...
            raise TypeError(f"images must be a float numpy array or torch tensor, got {type(images).__name__} "
                            f"({exc})") from exc
        if arr.dtype.kind not in "biufc":
            raise TypeError(f"images must be a float numpy array or torch tensor, got {type(images).__name__} "
                            f"of dtype {arr.dtype}")
        images = arr
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        raise TypeError("predict expects float images in [0, 1]; divide uint8 pixels by 255 first")
    if not x.is_floating_point():
        raise TypeError(f"images must be float images in [0, 1], got dtype {x.dtype}")
    x = x.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"images must have shape [N, H, W] or [N, 1, H, W], got {tuple(x.shape)}")
    return x.to(device)


@torch.no_grad()
def predict(detector: nn.Module, images, score_threshold: float = DEFAULT_SCORE_THRESHOLD,
            iou_threshold: float = DEFAULT_IOU_THRESHOLD, batch_size: int = PREDICT_BATCH) -> list[dict]:
    """Per image {"boxes" [K, 4] x1y1x2y2 pixels, "scores" [K], "labels" [K]} (CPU tensors).

    TypeError / ValueError naming the argument for: a ``detector`` outside the protocol;
    ``images`` not float, not [N, H, W] / [N, 1, H, W], holding NaN / Inf or values outside
    [0, 1]; thresholds outside [0, 1]; ``batch_size`` < 1. An empty batch gives an empty list."""
    check_detector(detector)
    for name, value in (("score_threshold", score_threshold), ("iou_threshold", iou_threshold)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:  # numpy too
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = next(detector.parameters()).device
    x = as_input(images, device)
    check_unit_images(x, "detectors")
    was_training = detector.training
    detector.eval()
    results = []
    try:
        for start in range(0, len(x), batch_size):
            try:
                out = detector(x[start:start + batch_size])
            except RuntimeError as exc:  # e.g. an FPN whose levels do not line up at this size
                raise ValueError(f"images of shape {tuple(x.shape[1:])} do not fit the detector (input_size "
                                 f"{getattr(detector, 'input_size', '?')}): {str(exc).splitlines()[0]}") from exc
            for det in detector.decode(out, score_threshold=score_threshold, iou_threshold=iou_threshold):
                results.append({k: v.detach().cpu() for k, v in det.items()})
    finally:
        detector.train(was_training)
    return results


class Detector(nn.Module):
    """Base class giving protocol detectors a ``predict`` method."""

    def predict(self, images, score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> list[dict]:
        return predict(self, images, score_threshold, iou_threshold)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode without parameter gradients inside the block (teachers, synthesis);
    its mode and ``requires_grad`` flags are restored afterwards."""
    training, flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(training)
