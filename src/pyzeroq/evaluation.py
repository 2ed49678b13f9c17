"""Top-1 / per-class accuracy of an image classifier."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data import CLASS_NAMES

DEFAULT_BATCH = 500
PIXEL_MAX = 255.0


def images_to_tensor(images) -> torch.Tensor:
    """uint8 [N, H, W] / [N, C, H, W] (numpy or torch) -> float32 [N, C, H, W] in [0, 1];
    float input is passed through (channel dim added when missing)."""
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
    return images.float()


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
def predict(model: nn.Module, images, batch_size: int = DEFAULT_BATCH, progress: bool = False,
            device: str | torch.device = "cpu") -> np.ndarray:
    """Arg-max class of every image, batched."""
    x = images_to_tensor(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    preds = []
    for start in tqdm(range(0, len(x), batch_size), desc="evaluate", disable=not progress, leave=False):
        preds.append(model(x[start:start + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def evaluate(model: nn.Module, images, labels, batch_size: int = DEFAULT_BATCH, progress: bool = False,
             class_names=CLASS_NAMES, device: str | torch.device = "cpu") -> EvalResult:
    """Top-1 accuracy and per-class accuracy of ``model`` (put in eval mode) on the images."""
    labels = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"labels has {len(labels)} entries but images has {len(images)}")
    was_training = model.training
    model.eval()
    try:
        preds = predict(model, images, batch_size, progress, device)
    finally:
        model.train(was_training)
    correct = preds == labels
    per_class = {}
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            per_class[name] = float(correct[mask].mean())
    top1 = float(correct.mean()) if len(labels) else float("nan")
    return EvalResult(top1, per_class, len(labels), preds)
