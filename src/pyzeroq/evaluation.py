"""Top-1 / per-class accuracy of an image classifier."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ._checks import check_device, check_unit_images
from .data import CLASS_NAMES

# images per forward: 100 keeps a ResNet-20 activation of 28x28 images (~5 MB) in cache; 500 took
# twice as long on the 2-core test machine (bench/eval_batch.py)
DEFAULT_BATCH = 100
PIXEL_MAX = 255.0


def images_to_tensor(images) -> torch.Tensor:
    """uint8 [N, H, W] / [N, C, H, W] (numpy or torch) -> float32 [N, C, H, W] in [0, 1];
    float input is passed through (channel dim added when missing). TypeError / ValueError
    naming ``images`` for another type or dtype, another rank, NaN / Inf, or float values
    outside [0, 1] (e.g. pixels 0..255 as floats: they would be scored silently wrong)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        images = images.float() / PIXEL_MAX
    elif not images.is_floating_point():
        raise TypeError(f"images must be uint8 pixels or floats in [0, 1], got dtype {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"images must have shape [N, H, W] or [N, C, H, W], got {tuple(images.shape)}")
    images = images.float()
    check_unit_images(images, "the models")
    return images


def check_labels(labels, num_images: int, num_classes: int) -> np.ndarray:
    """``labels`` as int64 [N] class indices in [0, num_classes), or a TypeError / ValueError naming it."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    try:
        labels = np.asarray(labels)
    except ValueError as exc:  # ragged nesting, e.g. an (images, labels) pair
        raise ValueError(f"labels must be a 1-D array of class indices ({exc})") from exc
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if len(labels) != num_images:
        raise ValueError(f"labels has {len(labels)} entries but images has {num_images}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (one per class name), got values in "
                         f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


@dataclass(frozen=True)
class EvalResult:
    top1: float
    per_class: dict[str, float]
    num_images: int
    predictions: np.ndarray

    def table(self) -> str:
        lines = ["| class | top-1 |", "|---|---|"]
        lines += [f"| {name} | {acc * 100:.2f} % |" for name, acc in self.per_class.items()]
        lines.append(f"| **all ({self.num_images})** | **{self.top1 * 100:.2f} %** |")
        return "\n".join(lines)


@torch.no_grad()
def _dry_forward(model, sample: torch.Tensor) -> None:
    """ValueError naming ``images`` when the model rejects one image or returns no [1, classes] logits."""
    try:
        out = model(sample)
    except Exception as exc:  # the model's own error, whatever its type
        raise ValueError(f"images do not fit the model: a forward pass on shape {tuple(sample.shape)} failed with "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(out, (torch.Tensor, np.ndarray)) or out.ndim != 2 or out.shape[0] != 1:
        raise ValueError(f"model must return logits [N, classes], got {type(out).__name__} of shape "
                         f"{tuple(getattr(out, 'shape', ()))}")


@torch.no_grad()
def predict(model: nn.Module, images, batch_size: int = DEFAULT_BATCH, progress: bool = False,
            device: str | torch.device = "cpu") -> np.ndarray:
    """Arg-max class of every image, batched: int64 [N]. ``model``: as for :func:`evaluate`
    (TypeError otherwise); ValueError when it returns no [batch, classes] logits."""
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a callable returning logits, got {type(model).__name__}")
    x = images_to_tensor(images)
    if not (isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    preds = []
    for start in tqdm(range(0, len(x), batch_size), desc="evaluate", disable=not progress, leave=False):
        batch = x[start:start + batch_size]
        logits = torch.as_tensor(model(batch.to(device)))
        if logits.dim() != 2 or logits.shape[0] != len(batch):
            raise ValueError(f"model must return logits [N, classes], got shape {tuple(logits.shape)} for "
                             f"{len(batch)} images")
        preds.append(logits.argmax(1).cpu())
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def evaluate(model: nn.Module, images, labels, batch_size: int = DEFAULT_BATCH, progress: bool = False,
             class_names=CLASS_NAMES, device: str | torch.device = "cpu") -> EvalResult:
    """Top-1 accuracy and per-class accuracy of ``model`` (put in eval mode) on the images.

    ``model``: an ``nn.Module`` or another callable on float images [N, C, H, W] returning
    logits [N, classes] (e.g. a :class:`pyzeroq.integer.IntegerModel`). ``images``: uint8 pixels
    or floats in [0, 1], [N, H, W] or [N, C, H, W], N >= 1; ``labels``: int [N] in
    [0, len(class_names)). Bad arguments raise TypeError / ValueError naming them before the
    evaluation (a forward pass on one image checks that the images fit the model)."""
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a callable returning logits, got {type(model).__name__}")
    check_device(device, "device")
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence) or not class_names:
        raise TypeError(f"class_names must be a non-empty sequence of names, got {type(class_names).__name__}")
    x = images_to_tensor(images)
    if len(x) == 0:
        raise ValueError(f"images is empty (shape {tuple(x.shape)}): nothing to evaluate")
    labels = check_labels(labels, len(x), len(class_names))
    module = model if isinstance(model, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        _dry_forward(model, x[:1].to(device))
        preds = predict(model, x, batch_size, progress, device)
    finally:
        if module is not None:
            module.train(was_training)
    correct = preds == labels
    per_class = {}
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            per_class[name] = float(correct[mask].mean())
    top1 = float(correct.mean()) if len(labels) else float("nan")
    return EvalResult(top1, per_class, len(labels), preds)
