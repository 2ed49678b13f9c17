"""Box utilities and a hand-written (batched, class-aware) non-maximum suppression.

torchvision cannot be installed beside the CPU torch used here, so NMS is written
by hand: greedy NMS in score order over one pairwise IoU matrix; "batched" (one
NMS per class in a single call) by the usual coordinate-offset trick: boxes of
different classes are shifted apart so that they never overlap. Tested against a
brute-force per-class loop in tests/test_detection_nms.py.
"""

from __future__ import annotations

import numpy as np
import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of boxes a [N, 4] and b [M, 4] (x1, y1, x2, y2) -> [N, M]; 0 where the union is 0."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices of kept boxes, by decreasing score. A box is suppressed when
    its IoU with an already kept, higher-scoring box is > ``iou_threshold``.
    Ties in score keep the lower index first (stable sort)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(boxes[order], boxes[order]).numpy()
    n = len(order)
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.int64)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """NMS independently per label (coordinate-offset trick); kept indices by decreasing score."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    span = (boxes.max() - boxes.min()).clamp(min=0) + 1
    offset = labels.to(boxes.dtype) * span
    shifted = boxes + offset[:, None]
    return nms(shifted, scores, iou_threshold)


def giou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - GIoU of matching rows of pred and target [N, 4] -> [N]."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(pred) + box_area(target) - inter + eps
    iou = inter / union
    elt = torch.minimum(pred[:, :2], target[:, :2])
    erb = torch.maximum(pred[:, 2:], target[:, 2:])
    ewh = (erb - elt).clamp(min=0)
    enclose = ewh[:, 0] * ewh[:, 1] + eps
    return 1 - (iou - (enclose - union) / enclose)
