"""Tiny end-to-end run: untrained tiny detector, tiny canvas, a few iterations of each stage."""

import numpy as np
import pytest
import torch

from pyzeroq.detection import (
    DetectionQuantConfig,
    FCOSDetector,
    QATConfig,
    SynthesisConfig,
    coco_map,
    load_detector,
    quantize_detector,
)
from pyzeroq.detection.api import FORMAT_V1
from pyzeroq.detection.synthesis import plot_samples, save_synthetic, synthesize
from pyzeroq.quantizers import QUANT_LAYER_TYPES, QuantConv2d, Quantizer

CANVAS = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_detector():
    torch.manual_seed(0)
    return FCOSDetector(widths=(4, 4, 4, 4, 4), fpn_width=8, head_convs=1, input_size=CANVAS).eval()


SYN = SynthesisConfig(num_images=4, batch_size=4, iters=4, refine_every=0.25, refine_start=0.0, refine_end=1.0,
                      refine_score=0.0)


def test_synthesis_outputs_labeled_set(tmp_path):
    det = tiny_detector()
    before = {k: v.clone() for k, v in det.state_dict().items()}
    s = synthesize(det, SYN, seed=0, progress=False)
    assert s.images.shape == (4, 1, CANVAS, CANVAS) and 0 <= s.images.min() and s.images.max() <= 1
    assert len(s.targets) == 4 and all(len(t["labels"]) >= 1 for t in s.targets)
    assert all(torch.equal(before[k], v) for k, v in det.state_dict().items())
    npz, js = save_synthetic(s, tmp_path / "syn")
    assert npz.exists() and js.exists()
    assert plot_samples(s.images, s.targets, tmp_path / "grid.png", num=4).exists()
    s2 = synthesize(det, SYN, seed=0, progress=False)
    assert torch.equal(s.images, s2.images)


@pytest.mark.parametrize("calibration", ["task_specific", "distilled", "gaussian"])
def test_quantize_detector_end_to_end(tmp_path, calibration):
    det = tiny_detector()
    cfg = DetectionQuantConfig(qat=QATConfig(weight_bits=4, act_bits=8, steps=2, batch_size=2),
                               synthesis=SYN, calibration=calibration, distill_iters=2, progress=False)
    q = quantize_detector(det, cfg)
    assert any(isinstance(m, QuantConv2d) for m in q.modules())
    assert not any(isinstance(m, QuantConv2d) for m in det.modules())
    images = np.random.default_rng(0).random((3, CANVAS, CANVAS)).astype(np.float32)
    preds = q.predict(images, score_threshold=0.0)
    assert len(preds) == 3 and set(preds[0]) == {"boxes", "scores", "labels"}
    path = q.save(tmp_path / "q.pt")
    r = load_detector(path)
    assert_same_detector(q, r, images, preds)


def assert_same_detector(q, r, images, preds=None):
    """Identical state dicts (tensors bit for bit, quantizer extra state) and predict() output."""
    sq, sr = q.state_dict(), r.state_dict()
    assert list(sq) == list(sr)
    for k, v in sq.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == sr[k].dtype and torch.equal(v, sr[k]), k
        else:
            assert v == sr[k], k
    steps = [m for m in r.modules() if isinstance(m, Quantizer) and m.learned]
    assert steps and all(isinstance(m.scale, torch.nn.Parameter) for m in steps)
    preds = q.predict(images, score_threshold=0.0) if preds is None else preds
    for a, b in zip(preds, r.predict(images, score_threshold=0.0)):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def tiny_qat_detector():
    cfg = DetectionQuantConfig(qat=QATConfig(weight_bits=4, act_bits=8, steps=2, batch_size=2),
                               synthesis=SYN, calibration="gaussian", progress=False)
    return quantize_detector(tiny_detector(), cfg)


def test_qat_detector_file_is_plain_data_and_round_trips_bit_exact(tmp_path):
    q = tiny_qat_detector()
    q.quant_info["extra"] = {"array": np.arange(3), "number": np.float32(0.5), "path": tmp_path}
    path = q.save(tmp_path / "q.pt")
    ckpt = torch.load(path, weights_only=True)  # plain data only
    assert ckpt["format"] == "pyzeroq.detection/2" and ckpt["quant"]["weight_bits"] == 4
    assert ckpt["info"]["extra"] == {"array": [0, 1, 2], "number": 0.5, "path": str(tmp_path)}
    images = np.random.default_rng(2).random((3, CANVAS, CANVAS)).astype(np.float32)
    r = load_detector(path)
    assert_same_detector(q, r, images)
    r2 = load_detector(r.save(tmp_path / "again.pt"))  # a loaded detector saves the same again
    assert_same_detector(q, r2, images)


def test_load_detector_rejects_files_that_are_not_detector_checkpoints(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {}, "config": SynthesisConfig()}, unsafe)  # a pickled object, not plain data
    for path in (text, other, unsafe):
        with pytest.raises(ValueError, match=path.name):
            load_detector(path)
    with pytest.raises(FileNotFoundError):
        load_detector(tmp_path / "missing.pt")


def to_v1_state_dict(q) -> dict:
    """The pyzeroq.detection/1 layout (the former detection-only LSQ layers) of a QAT detector."""
    inner = {n: "conv" if isinstance(m, QuantConv2d) else "linear" for n, m in q.named_modules()
             if isinstance(m, QUANT_LAYER_TYPES)}
    state = {}
    for k, v in q.state_dict().items():
        layer, _, rest = k.rpartition(".")
        if rest == "_extra_state":
            continue
        if layer in inner:  # X.weight / X.bias -> X.conv.weight / X.conv.bias
            state[f"{layer}.{inner[layer]}.{rest}"] = v
        elif rest == "scale":  # float [C] or [1]
            state[k] = v.reshape(-1).clone()
        elif rest == "zero_point":  # float [C] or [1]
            state[k] = v.reshape(-1).float()
            state[f"{layer}.initialized"] = torch.tensor(True)
        else:
            state[k] = v
    return state


def test_v1_checkpoint_is_converted_on_load(tmp_path):
    q = tiny_qat_detector()
    ckpt = torch.load(q.save(tmp_path / "q.pt"), weights_only=True)
    ckpt.update(format=FORMAT_V1, state_dict=to_v1_state_dict(q))
    torch.save(ckpt, tmp_path / "v1.pt")
    r = load_detector(tmp_path / "v1.pt")
    assert r.quant_info["converted_from"] == FORMAT_V1
    assert_same_detector(q, r, np.random.default_rng(3).random((2, CANVAS, CANVAS)).astype(np.float32))
    zp = next(k for k in ckpt["state_dict"] if k.endswith("weight_quant.zero_point"))
    ckpt["state_dict"][zp] = ckpt["state_dict"][zp] + 100.0  # not a 4- or 8-bit code
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="zero points"):
        load_detector(tmp_path / "bad.pt")


def test_real_calibration_and_float_first_and_head(tmp_path):
    det = tiny_detector()
    images = (np.random.default_rng(1).random((4, CANVAS, CANVAS)) * 255).astype(np.uint8)
    coco = {"images": [{"id": i + 1, "width": CANVAS, "height": CANVAS} for i in range(4)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 20, 20],
                             "area": 400, "iscrowd": 0} for i in range(4)],
            "categories": [{"id": c + 1, "name": str(c)} for c in range(10)]}
    cfg = DetectionQuantConfig(qat=QATConfig(steps=1, batch_size=2, first_layer_bits=None, head_bits=None),
                               calibration="real", calibration_data=(images, coco), progress=False)
    q = quantize_detector(det, cfg)
    assert not isinstance(q.stem[0], QuantConv2d) and not isinstance(q.cls_out, QuantConv2d)
    assert isinstance(q.layer1.conv1[0], QuantConv2d)


def test_coco_map_perfect_and_empty():
    from pyzeroq.detection.scenes import make_scenes
    _, coco = make_scenes("test", 5, seed=0)
    preds = [{"boxes": [], "scores": [], "labels": []} for _ in coco["images"]]
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        p = preds[a["image_id"] - 1]
        p["boxes"].append([x, y, x + w, y + h])
        p["scores"].append(0.9)
        p["labels"].append(a["category_id"] - 1)
    m = coco_map(coco, preds)
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)
    assert coco_map(coco, [{"boxes": [], "scores": [], "labels": []}] * 5)["map"] == 0.0


def test_fx_traceable():
    g = torch.fx.symbolic_trace(tiny_detector())
    x = torch.rand(2, 1, CANVAS, CANVAS)
    assert torch.equal(g(x)["cls"][0], tiny_detector()(x)["cls"][0])


def test_task_loss_parts_select_terms_of_the_detector_loss():
    from pyzeroq.detection.qat import _task_loss
    det = tiny_detector()
    x = torch.rand(2, 1, CANVAS, CANVAS, generator=torch.Generator().manual_seed(0))
    targets = [{"boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]), "labels": torch.tensor([c])} for c in (1, 7)]
    out = det(x)
    total, parts = det.loss(out, targets, reduce=False)
    assert torch.equal(_task_loss(det, out, targets, None), det.loss(out, targets))
    assert torch.equal(_task_loss(det, out, targets, ("cls",)), parts["cls"])
    assert torch.allclose(_task_loss(det, out, targets, ("cls", "reg", "ctr")), total)
    with pytest.raises(ValueError, match="task_loss_parts"):
        _task_loss(det, out, targets, ("box",))
    # a class-only task loss still runs end to end
    cfg = DetectionQuantConfig(qat=QATConfig(steps=1, batch_size=2, task_loss_parts=("cls",)),
                               synthesis=SYN, calibration="task_specific", progress=False)
    assert any(isinstance(m, QuantConv2d) for m in quantize_detector(det, cfg).modules())


def test_mistakes_are_named_before_the_calibration_set(monkeypatch):
    """Found by a fresh user: an already quantized detector, kd_keys / task_loss_parts the detector does not
    have, malformed calibration targets were refused only after the synthesis (or crashed inside QAT)."""
    import pyzeroq.detection.api as api

    monkeypatch.setattr(api, "synthesize", lambda *a, **k: pytest.fail("the calibration set was made first"))
    det = tiny_detector()
    cfg = DetectionQuantConfig(qat=QATConfig(steps=1, batch_size=2), synthesis=SYN, progress=False)
    with pytest.raises(ValueError, match="detector is already quantized"):
        quantize_detector(tiny_qat_detector(), cfg)
    for qat, match in ((QATConfig(steps=1, kd_keys=("bogus",)), r"qat.kd_keys: .*no key\(s\) \['bogus'\]"),
                       (QATConfig(steps=1, task_loss_parts=("bogus",)), r"qat.task_loss_parts: unknown parts")):
        with pytest.raises(ValueError, match=match):
            quantize_detector(det, DetectionQuantConfig(qat=qat, synthesis=SYN, progress=False))
    images = torch.rand(2, 1, CANVAS, CANVAS)
    for targets in ([{}, {}], [1, 1]):
        with pytest.raises(ValueError, match=r"calibration targets\[0\] must be a dict with 'boxes'"):
            quantize_detector(det, cfg, calibration=(images, targets, {"kind": "real"}))


@pytest.mark.parametrize("kwargs, field", [
    (dict(kd_keys=()), "kd_keys"),  # crashed in torch.stack inside QAT
    (dict(w_task=0.0, w_kd=0.0, w_mse=0.0, w_head=0.0, w_modules=0.0), "w_task"),  # no loss: a raw RuntimeError
])
def test_qat_config_needs_a_loss(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QATConfig(**kwargs)
    QATConfig(**kwargs, **({"w_kd": 0.0} if field == "kd_keys" else {"steps": 0}))  # fine without the KL / PTQ


def test_seeds_are_bounded():
    with pytest.raises(ValueError, match="qat_seed"):
        DetectionQuantConfig(qat_seed=2**64)  # "Overflow when unpacking long long" after the synthesis
