"""Synthesis schedule (fractions of the run), second pass, relabeling and label quality, tiny sizes."""

import pytest
import torch
from test_detection_kd import tiny_detector

from pyzeroq.detection import SynthesisConfig, predict
from pyzeroq.detection.synthesis import _refine_iterations, label_quality, synthesize

pytestmark = pytest.mark.usefixtures("one_thread")


def confident_detector():
    det = tiny_detector()
    with torch.no_grad():
        det.cls_out.bias.fill_(1.0)
        det.ctr_out.bias.fill_(1.0)
    return det


def test_refinement_schedule_is_a_fraction_of_the_run():
    assert sorted(_refine_iterations(SynthesisConfig(iters=3000))) == list(range(810, 2791, 90))
    assert sorted(_refine_iterations(SynthesisConfig(iters=100))) == list(range(27, 94, 3))
    assert sorted(_refine_iterations(SynthesisConfig(iters=10, refine_every=0.01, refine_start=0.0,
                                                     refine_end=1.0))) == list(range(10))
    assert _refine_iterations(SynthesisConfig(refine=False)) == set()


def test_label_quality_of_own_predictions_and_of_shifted_boxes():
    det = confident_detector()
    x = torch.rand(3, 1, 32, 32)
    preds = predict(det, x, score_threshold=0.3)
    assert all(len(p["labels"]) for p in preds)
    own = [{"boxes": p["boxes"], "labels": p["labels"]} for p in preds]
    q = label_quality(det, x, own)
    assert q["teacher_map"] == pytest.approx(1.0) and q["labels_per_image"] == pytest.approx(
        sum(len(p["labels"]) for p in preds) / 3)
    assert {"loss_cls", "loss_reg", "loss_ctr"} <= set(q)
    shifted = [{"boxes": (t["boxes"] + 6).clamp(max=32), "labels": t["labels"]} for t in own]
    q2 = label_quality(det, x, shifted)
    assert q2["teacher_map"] < q["teacher_map"]
    with pytest.raises(ValueError, match="targets"):
        label_quality(det, x, own[:2])


def test_second_pass_and_relabel():
    det = confident_detector()
    before = {k: v.clone() for k, v in det.state_dict().items()}
    cfg = SynthesisConfig(num_images=3, batch_size=3, iters=3, refine_start=0.0, refine_end=1.0, refine_every=0.34,
                          second_pass=True, relabel=True, max_labels=2)
    s = synthesize(det, cfg, seed=0, progress=False)
    assert len(s.history) == 1 and len(s.history[0]) == 2 * cfg.iters
    assert all(torch.equal(before[k], v) for k, v in det.state_dict().items())
    preds = predict(det, s.images, score_threshold=cfg.refine_score, iou_threshold=cfg.refine_nms_iou)
    for t, p in zip(s.targets, preds):
        assert 1 <= len(t["labels"]) <= cfg.max_labels
        if len(p["labels"]):  # relabeled: the labels are among the detector's own boxes
            assert all(any(torch.allclose(b, pb) for pb in p["boxes"]) for b in t["boxes"])
    q = s.info["label_quality"]
    assert set(q) >= {"teacher_map", "loss_reg", "labels_per_image"}
    one = synthesize(det, SynthesisConfig(num_images=3, batch_size=3, iters=3, second_pass=False), progress=False)
    assert len(one.history[0]) == 3


def test_precomputed_task_agnostic_sets_may_leave_the_pixel_range():
    from pyzeroq.detection.api import _check_calibration

    x = torch.randn(2, 1, 8, 8) * 2
    for kind in ("gaussian", "distilled"):
        _check_calibration((x, None, {"kind": kind}))
    for info in ({}, {"kind": "task_specific"}):
        with pytest.raises(ValueError, match=r"finite and in \[0, 1\]"):
            _check_calibration((x, None, info))
    with pytest.raises(ValueError, match="finite"):
        _check_calibration((x * float("nan"), None, {"kind": "gaussian"}))
