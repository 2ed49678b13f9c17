"""Hand-written NMS against a brute-force version; IoU / GIoU values."""

import numpy as np
import torch

from pyzeroq.detection.nms import batched_nms, box_iou, giou_loss, nms


def iou_ref(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def brute_nms(boxes, scores, labels, thr):
    """Repeatedly take the best remaining box, drop same-label boxes overlapping it by > thr."""
    remaining = list(range(len(boxes)))
    keep = []
    while remaining:
        best = max(remaining, key=lambda i: (scores[i], -i))
        keep.append(best)
        remaining = [i for i in remaining if i != best and
                     not (labels[i] == labels[best] and iou_ref(boxes[i], boxes[best]) > thr)]
    return keep


def random_boxes(rng, n):
    xy = rng.uniform(0, 80, (n, 2))
    wh = rng.uniform(1, 40, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_box_iou_matches_reference():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    got = box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ref = np.array([[iou_ref(x.astype(np.float64), y.astype(np.float64)) for y in b] for x in a])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert box_iou(torch.tensor([[0., 0, 0, 0]]), torch.tensor([[0., 0, 0, 0]])).item() == 0.0


def test_nms_equals_brute_force():
    rng = np.random.default_rng(1)
    for trial in range(30):
        n = int(rng.integers(0, 60))
        boxes = random_boxes(rng, n)
        scores = np.round(rng.random(n), 2).astype(np.float32)  # rounding makes score ties
        labels = rng.integers(0, 3, n)
        thr = float(rng.choice([0.3, 0.5, 0.7]))
        got = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), thr)
        assert got.tolist() == brute_nms(boxes.astype(np.float64), scores, labels, thr)
        got1 = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr)
        assert got1.tolist() == brute_nms(boxes.astype(np.float64), scores, np.zeros(n), thr)


def test_nms_simple_case():
    boxes = torch.tensor([[0., 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1, 2]


def test_giou_loss_values():
    a = torch.tensor([[0., 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[0., 0, 10, 10], [20, 0, 30, 10]])
    loss = giou_loss(a, b)
    assert abs(loss[0].item()) < 1e-6
    # disjoint: IoU 0, enclosing 300, union 200 -> GIoU = -1/3
    assert abs(loss[1].item() - (1 + 1 / 3)) < 1e-5
