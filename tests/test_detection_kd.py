"""Distillation targets of the detection QAT: captures see every call of a shared module, the
loss vanishes for teacher == student and teaches the box branch, EMA, same seed -> same weights."""

import copy

import pytest
import torch

from pyzeroq.detection import FCOSDetector, QATConfig
from pyzeroq.detection.kd import Capture, WeightAverage, distillation_loss, module_names
from pyzeroq.detection.qat import prepare_qat, run_qat

pytestmark = pytest.mark.usefixtures("one_thread")
CANVAS = 32
ALL_ON = QATConfig(w_kd=1.0, w_mse=1.0, w_head=1.0, w_modules=1.0)


def tiny_detector(seed=0):
    torch.manual_seed(seed)
    det = FCOSDetector(widths=(4, 4, 4, 4, 4), fpn_width=8, head_convs=1, input_size=CANVAS).eval()
    with torch.no_grad():  # non-trivial head outputs (the init puts the box / class convs near 0)
        for m in (det.cls_out, det.reg_out, det.ctr_out):
            m.weight.normal_(0, 0.3)
    return det


def _loss(teacher, student, x, cfg):
    feats = tuple(teacher.feature_modules)
    mods = module_names(teacher)
    caps = [Capture(teacher, feats), Capture(student, feats), Capture(teacher, mods), Capture(student, mods)]
    try:
        with torch.no_grad():
            t_out = teacher(x)
        s_out = student(x)
        return distillation_loss(t_out, s_out, *caps, cfg), caps
    finally:
        for c in caps:
            c.remove()


def test_capture_collects_every_call_of_shared_modules():
    det = tiny_detector()
    x = torch.rand(2, 1, CANVAS, CANVAS)
    with Capture(det, ["cls_convs.0", "reg_out", "cls_bns.1", "fpn_out.2"]) as cap:
        out = det(x)
        # the head towers and prediction convs are shared by the 3 FPN levels: one entry per level
        assert [len(cap.out[n]) for n in ("cls_convs.0", "reg_out", "cls_bns.1", "fpn_out.2")] == [3, 3, 1, 1]
        assert [t.shape[-1] for t in cap.out["reg_out"]] == [t.shape[-1] for t in out["reg"]] == [4, 2, 1]
        cap.clear()
        assert all(v == [] for v in cap.out.values())
        det(x)
        assert len(cap.out["reg_out"]) == 3
    assert not det.reg_out._forward_hooks
    with pytest.raises(AttributeError):
        Capture(det, ["no_such_module"])


def test_distillation_zero_for_identical_models_and_teaches_the_box_branch():
    teacher = tiny_detector()
    x = torch.rand(2, 1, CANVAS, CANVAS)
    parts, _ = _loss(teacher, copy.deepcopy(teacher), x, ALL_ON)
    assert set(parts) == {"kd", "mse", "head", "modules"}
    assert all(float(v.detach()) == 0.0 for v in parts.values()), parts
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.reg_out.weight.add_(0.1)  # perturb the box branch only
    parts, _ = _loss(teacher, student, x, ALL_ON)
    assert float(parts["head"].detach()) > 0 and float(parts["modules"].detach()) > 0
    assert float(parts["mse"].detach()) == 0.0  # FPN features do not see the box branch
    parts["head"].backward()
    assert student.reg_out.weight.grad.abs().sum() > 0 and student.scales[0].scale.grad.abs().sum() > 0


def test_kd_covers_centerness_and_module_matching_on_a_quantized_student():
    teacher = tiny_detector()
    x = torch.rand(2, 1, CANVAS, CANVAS)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.ctr_out.bias.add_(1.0)
    cls_only, _ = _loss(teacher, student, x, QATConfig(kd_keys=("cls",)))
    both, _ = _loss(teacher, student, x, QATConfig(kd_keys=("cls", "ctr")))
    assert float(cls_only["kd"].detach()) == 0.0 and float(both["kd"].detach()) > 0
    with pytest.raises(ValueError, match="kd_keys"):
        _loss(teacher, student, x, QATConfig(kd_keys=("boxes",)))
    q = prepare_qat(teacher, QATConfig(weight_bits=4, act_bits=4))
    run_qat(q, teacher, x, None, QATConfig(steps=0), progress=False)  # calibrate only
    parts, caps = _loss(teacher, q, x, ALL_ON)
    assert len(caps[3].out["cls_out"]) == 3 and torch.isfinite(parts["modules"]) and float(parts["modules"].detach()) > 0


def test_weight_average():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = WeightAverage(lin, decay=0.99)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # first decay: min(0.99, 1 / 10) = 0.1
    target = torch.nn.Linear(1, 1, bias=False)
    ema.copy_to(target)
    assert target.weight.item() == pytest.approx(0.9)


def _train(seed, cfg):
    teacher = tiny_detector()
    images = torch.rand(6, 1, CANVAS, CANVAS, generator=torch.Generator().manual_seed(1))
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]]), "labels": torch.tensor([i % 3])} for i in range(6)]
    student = prepare_qat(teacher, cfg)
    log = run_qat(student, teacher, images, targets, cfg, seed=seed, progress=False)
    return student.state_dict(), log


def test_same_seed_same_weights():
    cfg = QATConfig(weight_bits=4, act_bits=8, steps=4, batch_size=2, w_modules=0.5, lr=1e-2)
    a, log = _train(0, cfg)
    b, _ = _train(0, cfg)
    c, _ = _train(1, cfg)
    assert set(log["parts"]) == {"task", "kd", "mse", "head", "modules"}
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(a[k], b[k]) for k in tensors)
    assert any(not torch.equal(a[k], c[k]) for k in tensors)
    # the EMA is what is returned: it differs from the last iterate
    d, _ = _train(0, QATConfig(weight_bits=4, act_bits=8, steps=4, batch_size=2, w_modules=0.5, lr=1e-2,
                               ema_decay=None))
    assert any(not torch.equal(a[k], d[k]) for k in tensors)
