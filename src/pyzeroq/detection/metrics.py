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


def evaluate_detector(detector, images: np.ndarray, coco_gt: dict, **predict_kwargs) -> dict:
    """Run ``predict`` on uint8 scenes and score with pycocotools."""
    from .interface import predict

    preds = predict(detector, images.astype(np.float32) / 255.0, **predict_kwargs)
    return coco_map(coco_gt, preds)
