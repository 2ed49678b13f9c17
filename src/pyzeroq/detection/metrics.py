"""mAP@[.5:.95] and mAP@.5 by pycocotools (the reference COCO evaluator, not a rewrite)."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

from .._optional import require
from .scenes import CATEGORY_OFFSET


def detections_to_coco(predictions: list[dict], image_ids: list[int]) -> list[dict]:
    """Per-image predict() dicts -> COCO result list (bbox [x, y, w, h], category_id = label + 1)."""
    out = []
    for img_id, det in zip(image_ids, predictions):
        boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(det["labels"]).reshape(-1)
        for (x1, y1, x2, y2), s, lab in zip(boxes, scores, labels):
            out.append({"image_id": int(img_id), "category_id": int(lab) + CATEGORY_OFFSET,
                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(s)})
    return out


def coco_map(coco_gt: dict, predictions: list[dict]) -> dict:
    """{"map": mAP@[.5:.95], "map50": mAP@.5, "map75": mAP@.75} of ``predictions`` (one dict per
    image of ``coco_gt["images"]``, in that order) by pycocotools COCOeval."""
    require("pycocotools", "detection", "mAP evaluation")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    check_coco(coco_gt)
    if not isinstance(predictions, list):
        raise TypeError(f"predictions must be a list of per-image dicts (predict's output), got "
                        f"{type(predictions).__name__}")
    if len(predictions) != len(coco_gt["images"]):
        raise ValueError(f"predictions has {len(predictions)} entries, the ground truth {len(coco_gt['images'])} images")
    results = detections_to_coco(predictions, [img["id"] for img in coco_gt["images"]])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(coco_gt)
        gt.createIndex()
        if not results:
            return {"map": 0.0, "map50": 0.0, "map75": 0.0}
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": float(ev.stats[0]), "map50": float(ev.stats[1]), "map75": float(ev.stats[2])}


def check_coco(coco_gt, num_images: int | None = None, argument: str = "coco_gt") -> None:
    """TypeError / ValueError naming ``argument`` unless ``coco_gt`` is a COCO dict (lists
    ``images`` with ids and ``annotations``) of ``num_images`` images (when given)."""
    if not isinstance(coco_gt, dict):
        raise TypeError(f"{argument} must be a COCO annotation dict (as make_scenes returns), got "
                        f"{type(coco_gt).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(coco_gt.get(key), list):
            raise ValueError(f"{argument} must hold a list {key!r} (COCO format), got "
                             f"{type(coco_gt.get(key)).__name__}")
    if not all(isinstance(img, dict) and "id" in img for img in coco_gt["images"]):
        raise ValueError(f"{argument}['images'] entries must be dicts with an 'id'")
    if num_images is not None and len(coco_gt["images"]) != num_images:
        raise ValueError(f"{argument} describes {len(coco_gt['images'])} images but images has {num_images}")


def scene_images(images, argument: str = "images") -> np.ndarray:
    """uint8 scenes [N, H, W] / [N, 1, H, W] (numpy or torch; N >= 1) as float32 in [0, 1], or a
    TypeError / ValueError naming ``argument`` (float input must already lie in [0, 1])."""
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{argument} must be uint8 scenes [N, H, W] (numpy or torch, as make_scenes returns), "
                        f"got {type(images).__name__}")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[1] != 1):
        raise ValueError(f"{argument} must have shape [N, H, W] or [N, 1, H, W], got {images.shape}")
    if len(images) == 0:
        raise ValueError(f"{argument} is empty (shape {images.shape}): nothing to evaluate")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if images.dtype.kind != "f":
        raise TypeError(f"{argument} must be uint8 pixels (or floats in [0, 1]), got dtype {images.dtype}")
    if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError(f"{argument} are floats outside [0, 1] or NaN / Inf: pass the uint8 scenes")
    return images.astype(np.float32)


def evaluate_detector(detector, images: np.ndarray, coco_gt: dict, **predict_kwargs) -> dict:
    """Run ``predict`` on uint8 scenes [N, H, W] (or floats in [0, 1]) and score with
    pycocotools against ``coco_gt`` (COCO dict of the same N images, in order). TypeError /
    ValueError naming the argument for a detector outside the protocol, other images, an empty
    set or a ``coco_gt`` of other images, before any prediction."""
    from .interface import check_detector, predict

    check_detector(detector)
    x = scene_images(images)
    check_coco(coco_gt, len(x))
    preds = predict(detector, x, **predict_kwargs)
    return coco_map(coco_gt, preds)
