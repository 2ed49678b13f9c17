"""Bounding-box and category sampling: seed labels and their refinement.

Seed labels (the method's step 1): one box per image, width and height drawn
independently from U(min_frac, max_frac) of the canvas side, the center drawn
uniformly among positions that keep the box inside the canvas, the class uniform
over all classes.

Refinement (step 3, run periodically during synthesis on the detector's own
confident predictions after NMS). Matching is class-agnostic (IoU of boxes only):

* a prediction whose best IoU with the image's *current* labels is < ``match_iou``
  and whose area, as a fraction of the canvas area, lies strictly inside
  (``min_area``, ``max_area``) is added as a new label (its predicted class);
  predictions are visited by decreasing score and an added box counts as a current
  label for the later ones (so overlapping predictions of different classes add one
  box, not several), and no addition is made once the image would hold more than
  ``max_labels`` labels (kept + added);
* a current label that no prediction matches (best IoU < ``match_iou``) is removed —
  but an image never loses its last label: if removal would leave the image with
  no label at all (nothing added, nothing matched), the label with the highest
  best-IoU (the first one on ties) is kept.

Removal uses the labels as they were before this refinement step.
"""

from __future__ import annotations

import torch

from .nms import box_area, box_iou


def seed_labels(num_images: int, num_classes: int, canvas: int, generator: torch.Generator,
                min_frac: float = 0.2, max_frac: float = 0.8) -> list[dict]:
    """One random box and class per image: list of {"boxes" [1, 4], "labels" [1]}."""
    wh = (min_frac + (max_frac - min_frac) * torch.rand(num_images, 2, generator=generator)) * canvas
    free = canvas - wh
    xy = torch.rand(num_images, 2, generator=generator) * free
    boxes = torch.cat([xy, xy + wh], 1)
    labels = torch.randint(0, num_classes, (num_images,), generator=generator)
    return [{"boxes": boxes[i:i + 1].clone(), "labels": labels[i:i + 1].clone()} for i in range(num_images)]


def refine_labels(target: dict, prediction: dict, canvas: int, match_iou: float = 0.35,
                  min_area: float = 0.01, max_area: float = 0.85, score_threshold: float = 0.0,
                  max_labels: int = 10) -> dict:
    """One refinement step for one image (rules in the module docstring).

    ``prediction``: {"boxes" [K, 4], "scores" [K], "labels" [K]} after NMS; predictions with
    score <= ``score_threshold`` are ignored. Returns a new target dict.
    """
    boxes, labels = target["boxes"], target["labels"]
    keep_pred = prediction["scores"] > score_threshold
    p_boxes = prediction["boxes"][keep_pred].to(boxes.dtype)
    p_labels = prediction["labels"][keep_pred].to(labels.dtype)
    if len(p_boxes) == 0:
        return {"boxes": boxes.clone(), "labels": labels.clone()}
    if len(boxes):
        label_best = box_iou(p_boxes, boxes).max(0).values
        keep = label_best >= match_iou
    else:
        label_best = torch.zeros(0)
        keep = torch.zeros(0, dtype=torch.bool)
    # additions in decreasing score order; an added box counts as a label for the later ones
    frac = box_area(p_boxes) / float(canvas * canvas)
    area_ok = (frac > min_area) & (frac < max_area)   # float32 comparisons throughout
    n_kept = int(keep.sum())
    current = boxes.clone()
    added = []
    for i in torch.sort(prediction["scores"][keep_pred], descending=True, stable=True).indices.tolist():
        if n_kept + len(added) >= max_labels:
            break
        if not bool(area_ok[i]):
            continue
        if len(current) == 0 or bool(box_iou(p_boxes[i:i + 1], current).max() < match_iou):
            added.append(i)
            current = torch.cat([current, p_boxes[i:i + 1]])
    add = torch.tensor(added, dtype=torch.int64)
    new_boxes = torch.cat([boxes[keep], p_boxes[add]])
    new_labels = torch.cat([labels[keep], p_labels[add]])
    if len(new_boxes) == 0 and len(boxes):
        best = int(torch.argmax(label_best))  # first maximum on ties
        new_boxes, new_labels = boxes[best:best + 1], labels[best:best + 1]
    return {"boxes": new_boxes.clone(), "labels": new_labels.clone()}
