"""Seed labels and the box-refinement rules on hand-made cases."""

import torch

from pyzeroq.detection.sampling import refine_labels, seed_labels

CANVAS = 100


def T(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def P(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


def test_seed_labels_ranges_and_determinism():
    a = seed_labels(200, 10, 96, torch.Generator().manual_seed(0))
    b = seed_labels(200, 10, 96, torch.Generator().manual_seed(0))
    for t, u in zip(a, b):
        assert torch.equal(t["boxes"], u["boxes"]) and torch.equal(t["labels"], u["labels"])
        (x1, y1, x2, y2), = t["boxes"].tolist()
        assert 0 <= x1 and 0 <= y1 and x2 <= 96 and y2 <= 96
        assert 0.2 * 96 - 1e-4 <= x2 - x1 <= 0.8 * 96 + 1e-4 and 0.2 * 96 - 1e-4 <= y2 - y1 <= 0.8 * 96 + 1e-4
    assert len({int(t["labels"]) for t in a}) == 10


def test_unmatched_prediction_added_and_matched_label_kept():
    target = T([[10, 10, 40, 40]], [3])
    # first prediction matches the label (IoU 1), second is new (IoU 0, area 4 %)
    pred = P([[10, 10, 40, 40], [60, 60, 80, 80]], [0.9, 0.8], [5, 7])
    out = refine_labels(target, pred, CANVAS)
    assert out["boxes"].tolist() == [[10, 10, 40, 40], [60, 60, 80, 80]]
    assert out["labels"].tolist() == [3, 7]  # matched label keeps its class


def test_iou_threshold_boundaries():
    target = T([[0, 0, 20, 20]], [1])
    # IoU of [0,0,20,20] and [0,0,20,x]: x/20. x=7 -> 0.35 (matches, not added); x=6 -> 0.3 (added)
    out = refine_labels(target, P([[0, 0, 20, 7]], [0.9], [2]), CANVAS)
    assert out["labels"].tolist() == [1]
    out = refine_labels(target, P([[0, 0, 20, 6]], [0.9], [2]), CANVAS)
    # the old label is unmatched but the image keeps a label: here the new one replaces it
    assert out["labels"].tolist() == [2] and out["boxes"].tolist() == [[0, 0, 20, 6]]


def test_area_limits_are_exclusive():
    target = T([[0, 0, 10, 10]], [0])
    tiny = [50, 50, 60, 60]      # 100 / 10000 = 0.01 -> not added (limit exclusive)
    small = [50, 50, 61, 60]     # 0.011 -> added
    huge = [0, 0, 100, 90]       # 0.90 -> not added
    out = refine_labels(target, P([tiny, small, huge], [0.9, 0.9, 0.9], [1, 2, 3]), CANVAS)
    # label [0,0,10,10]: IoU with huge = 100/9000 < 0.35 -> unmatched, removed; small added
    assert out["labels"].tolist() == [2]


def test_keep_at_least_one_label():
    target = T([[0, 0, 10, 10], [50, 50, 70, 70]], [4, 6])
    # only prediction: outside the area limits, matches nothing
    out = refine_labels(target, P([[0, 0, 100, 100]], [0.9], [1]), CANVAS)
    # neither label matched, nothing added -> keep the one with the highest best IoU (the second: 400/10000)
    assert out["labels"].tolist() == [6]
    # unmatched labels are removed when others remain
    out = refine_labels(target, P([[50, 50, 70, 70]], [0.9], [6]), CANVAS)
    assert out["labels"].tolist() == [6] and out["boxes"].tolist() == [[50, 50, 70, 70]]


def test_no_predictions_or_low_scores_change_nothing():
    target = T([[0, 0, 10, 10], [50, 50, 70, 70]], [4, 6])
    out = refine_labels(target, P([[20, 20, 40, 40]], [0.1], [1]), CANVAS, score_threshold=0.2)
    assert torch.equal(out["boxes"], target["boxes"]) and torch.equal(out["labels"], target["labels"])
    out = refine_labels(target, P(torch.zeros(0, 4).tolist(), [], []), CANVAS)
    assert torch.equal(out["labels"], target["labels"])


def test_overlapping_predictions_add_one_box_and_cap():
    target = T([[0, 0, 10, 10]], [0])
    pred = P([[50, 50, 70, 70], [50, 50, 70, 71], [20, 20, 40, 40], [0, 0, 10, 10]],
             [0.5, 0.9, 0.4, 0.3], [1, 2, 3, 0])
    out = refine_labels(target, pred, CANVAS)
    # the 0.9 box is added, the 0.5 box overlaps it (IoU 20/21) and is not; the label is matched
    assert out["labels"].tolist() == [0, 2, 3]
    out = refine_labels(target, pred, CANVAS, max_labels=2)
    assert out["labels"].tolist() == [0, 2]
