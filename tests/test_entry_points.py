"""Bad input at every public entry point: a TypeError / ValueError (FileNotFoundError for a
missing file) naming the argument, raised before any expensive stage; never a crash, a late
error or silent garbage. The command lines print ``error: <message>`` and exit non-zero
without a traceback. One test per case (parametrized); tiny models only."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from toy_models import TinyNet, trained_tiny

import pyzeroq as zq
from pyzeroq import cli, data, models, pipeline
from pyzeroq.integer import convert

SHAPE = (1, 16, 16)
FAST = dict(num_samples=4, distill_iters=2, progress=False, calibration="gaussian")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return trained_tiny(steps=5)


@pytest.fixture(scope="module")
def qmodel(tiny):
    return zq.quantize(tiny, zq.QuantConfig(weight_bits=8, act_bits=8, **FAST), input_shape=SHAPE)


@pytest.fixture(scope="module")
def int_model(qmodel):
    return zq.to_integer(qmodel)


@pytest.fixture
def no_expensive_stage(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("an expensive stage ran before the arguments were validated")
    for name in ("distill_data", "gaussian_inputs", "calibration_data", "layer_sensitivities", "select_bits",
                 "prepare"):
        monkeypatch.setattr(pipeline, name, fail)


def _image(n=1, c=1, dtype=torch.float32):
    return torch.rand(n, c, 16, 16).to(dtype) if dtype.is_floating_point else torch.zeros(n, c, 16, 16, dtype=dtype)


# ------------------------------------------------------------------------------ quantize

@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["c2.0.weight", "c2.1.running_var", "c2.1.running_mean", "fc.bias"])
def test_quantize_names_a_non_finite_parameter_or_buffer(no_expensive_stage, tiny, name, value):
    model = TinyNet()
    model.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        model.state_dict()[name].view(-1)[0] = value
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(repr(name)) + " contains NaN or Inf"):
        zq.quantize(model, zq.QuantConfig(**FAST), input_shape=SHAPE)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():  # the given model is not modified
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape", [None, "1,16,16", (1, 16.0, 16), (1, -16, 16), (0, 16, 16), (), 16,
                                   (True, 16, 16), np.array([1, 16, 16])], ids=repr)
def test_quantize_bad_input_shape(no_expensive_stage, tiny, shape):
    with pytest.raises(ValueError, match="input_shape must be a tuple of positive ints"):
        zq.quantize(tiny, zq.QuantConfig(**FAST), input_shape=shape)


@pytest.mark.parametrize("field, value", [("calibration", "random"), ("mp_method", "greedy"),
                                          ("act_range", "kl"), ("budget_metric", "flops")])
def test_quantize_unknown_names(field, value):
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        zq.QuantConfig(**{field: value})


def test_quantize_input_channels_the_normalization_does_not_hold(no_expensive_stage):
    """3-channel mean / std broadcast a 1-channel image to 3 channels: the model runs, but the
    integer model and the ONNX export would refuse such inputs; quantize names input_shape."""
    from pyzeroq.models.layers import Normalize

    model = nn.Sequential(Normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.2)), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.Linear(4 * 14 * 14, 2)).eval()
    with pytest.raises(ValueError, match=r"input_shape=\(1, 16, 16\): .*input normalization '0'.*3 values"):
        zq.quantize(model, zq.QuantConfig(**FAST), input_shape=(1, 16, 16))
    with pytest.raises(AssertionError, match="an expensive stage ran"):  # 3 channels pass every check
        zq.quantize(model, zq.QuantConfig(**FAST), input_shape=(3, 16, 16))


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_quantize_device_type_pyzeroq_does_not_run_on(no_expensive_stage, tiny, device):
    with pytest.raises(ValueError, match=f"config.device '{device}': pyzeroq runs on 'cpu' or 'cuda'"):
        zq.quantize(tiny, zq.QuantConfig(device=device, **FAST), input_shape=SHAPE)


@NO_CUDA
def test_quantize_device_this_machine_lacks(no_expensive_stage, tiny):
    with pytest.raises(ValueError, match="config.device 'cuda': CUDA is not available"):
        zq.quantize(tiny, zq.QuantConfig(device="cuda", **FAST), input_shape=SHAPE)


# ------------------------------------------------------------------------------ to_integer

@pytest.mark.parametrize("obj", [TinyNet(), None, "model.pzq"], ids=["nn.Module", "None", "str"])
def test_to_integer_needs_a_quantized_model(obj):
    with pytest.raises(TypeError, match="qmodel must be a QuantizedModel"):
        zq.to_integer(obj)


def test_to_integer_of_float_activations(tiny):
    qm = zq.quantize(tiny, zq.QuantConfig(weight_bits=8, act_bits=None, **FAST), input_shape=SHAPE)
    with pytest.raises(ValueError, match="act_bits=None"):
        zq.to_integer(qm)


@pytest.mark.parametrize("kwargs, field", [
    (dict(rounding="round"), "rounding"), (dict(rounding=None), "rounding"), (dict(acc_bits=64), "acc_bits"),
    (dict(acc_bits=1), "acc_bits"), (dict(acc_bits=16.0), "acc_bits"), (dict(acc_bits=True), "acc_bits"),
    (dict(overflow="clip"), "overflow")], ids=repr)
def test_to_integer_bad_settings(qmodel, kwargs, field):
    with pytest.raises(ValueError, match=field):
        zq.to_integer(qmodel, **kwargs)


@pytest.mark.parametrize("x, error, match", [
    (torch.full((1, 1, 16, 16), float("nan")), ValueError, "x contains NaN or Inf"),
    (torch.full((1, 1, 16, 16), float("inf")), ValueError, "x contains NaN or Inf"),
    (torch.rand(1, 16, 16), ValueError, r"x must have shape \[N, C, H, W\]"),
    (torch.rand(1, 1, 1, 16, 16), ValueError, r"x must have shape \[N, C, H, W\]"),
    (torch.rand(1, 3, 16, 16), ValueError, "x has 3 channels .* the model takes 1"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), ValueError, "x has 3 channels"),
    (torch.zeros(1, 1, 16, 16, dtype=torch.int64), TypeError, "x must be float images .* dtype int64"),
    (torch.zeros(1, 1, 16, 16, dtype=torch.bool), TypeError, "x must be float images .* dtype bool"),
    (np.zeros((1, 1, 16, 16), np.complex64), TypeError, "x must be float images .* dtype complex64"),
    ([[[[0.0] * 16] * 16]], TypeError, "x must be a numpy array or a torch tensor"),
], ids=["nan", "inf", "rank3", "rank5", "channels", "channels-uint8", "int64", "bool", "complex", "list"])
def test_integer_model_bad_input(int_model, x, error, match):
    with pytest.raises(error, match=match):
        int_model(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_integer_model_empty_batch_is_an_empty_output(int_model, qmodel, dtype):
    """As the torch models: [0, classes], float32; the statistics do not count it."""
    int_model.reset_stats()
    int_model(_image(2))
    before = int_model.report()
    out = int_model(_image(0, dtype=dtype))
    assert isinstance(out, torch.Tensor) and out.shape == qmodel(_image(0)).shape == (0, 10)
    assert out.dtype == torch.float32
    assert int_model(_image(0, dtype=dtype).numpy()).shape == (0, 10)
    assert int_model.report().images == before.images == 2 and int_model.report().layers == before.layers


# ------------------------------------------------------------------------------ export_onnx

@pytest.fixture
def no_build(monkeypatch):
    """export_onnx must check its arguments before compiling the integer plan."""
    from pyzeroq import export

    def fail(*args, **kwargs):
        raise AssertionError("export built the model before checking its arguments")
    monkeypatch.setattr(export, "to_integer", fail)


@pytest.mark.parametrize("where, error, match", [
    (None, TypeError, "path must be a file path"),
    (123, TypeError, "path must be a file path"),
    ("missing/model.onnx", FileNotFoundError, "directory .*missing' does not exist"),
    ("", ValueError, "is a directory"),
    ("file.txt/model.onnx", ValueError, "is a file, not a directory"),
], ids=["None", "int", "missing-dir", "directory", "under-a-file"])
def test_export_bad_path(qmodel, tmp_path, no_build, where, error, match):
    pytest.importorskip("onnx")
    (tmp_path / "file.txt").write_text("x")
    path = str(tmp_path / where) if isinstance(where, str) else where
    with pytest.raises(error, match=match):
        zq.export_onnx(qmodel, path, _image())


@pytest.mark.parametrize("example, error, match", [
    (torch.rand(1, 16, 16), ValueError, r"example_input must have shape \[N, C, H, W\]"),
    (torch.full((1, 1, 16, 16), float("nan")), ValueError, "example_input contains NaN"),
    (torch.rand(1, 3, 16, 16), ValueError, "example_input has 3 channels"),
    (torch.zeros(1, 1, 16, 16, dtype=torch.int64), TypeError, "example_input must be float images"),
    (None, TypeError, "example_input must be a numpy array or a torch tensor"),
], ids=["rank3", "nan", "channels", "int64", "None"])
def test_export_bad_example_input(qmodel, tmp_path, example, error, match):
    pytest.importorskip("onnx")
    with pytest.raises(error, match=match):
        zq.export_onnx(qmodel, tmp_path / "m.onnx", example)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("kwargs, match", [(dict(pixels="int8"), "pixels must be one of"),
                                           (dict(add_op="qadd"), "add_op must be one of"),
                                           (dict(pixels=["uint8"]), "pixels must be one of")], ids=repr)
def test_export_unknown_names(qmodel, tmp_path, no_build, kwargs, match):
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match=match):
        zq.export_onnx(qmodel, tmp_path / "m.onnx", _image(), **kwargs)


def test_export_needs_a_quantized_model(tiny, tmp_path):
    pytest.importorskip("onnx")
    with pytest.raises(TypeError, match="qmodel must be a QuantizedModel"):
        zq.export_onnx(tiny, tmp_path / "m.onnx", _image())


# ------------------------------------------------------------------------------ save / load

@pytest.fixture(scope="module")
def saved(qmodel, int_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    qmodel.save(d / "model.pzq")
    int_model.save(d / "model.pzi")
    (d / "garbage.bin").write_bytes(bytes(range(256)) * 8)
    (d / "empty.bin").write_bytes(b"")
    torch.save({"weights": torch.zeros(3)}, d / "other.pt")
    np.save(d / "array.npy", np.zeros(3))
    for name in ("model.pzq", "model.pzi"):
        raw = (d / name).read_bytes()
        (d / f"truncated.{name}").write_bytes(raw[:len(raw) // 2])
    return d


@pytest.mark.parametrize("name, error, match", [
    ("missing.pzq", FileNotFoundError, "missing.pzq"),
    ("garbage.bin", ValueError, "garbage.bin is not a pyzeroq file"),
    ("empty.bin", ValueError, "empty.bin is not a pyzeroq file"),
    ("other.pt", ValueError, "other.pt: unknown file format"),
    ("array.npy", ValueError, "array.npy is not a pyzeroq file"),
    ("truncated.model.pzi", ValueError, "truncated.model.pzi"),
])
def test_load_bad_file(saved, name, error, match):
    with pytest.raises(error, match=match):
        zq.load(saved / name)


def test_load_directory_names_it(saved):
    with pytest.raises(OSError, match=re.escape(str(saved))):
        zq.load(saved)


def test_load_truncated_quantized_model_names_the_path(saved):
    with pytest.raises(ValueError, match="truncated.model.pzq"):
        zq.load(saved / "truncated.model.pzq")


@pytest.mark.parametrize("name, error, match", [
    ("missing.pzi", FileNotFoundError, "missing.pzi"),
    ("garbage.bin", ValueError, "garbage.bin:? (is )?not a pyzeroq integer model"),
    ("model.pzq", ValueError, "model.pzq: not a pyzeroq integer model"),
    ("truncated.model.pzi", ValueError, "truncated.model.pzi:? (is )?not a pyzeroq integer model"),
])
def test_load_integer_bad_file(saved, name, error, match):
    with pytest.raises(error, match=match):
        convert.load_integer(saved / name)


# ------------------------------------------------------------------------------ evaluate

class _Fixed(nn.Module):
    def forward(self, x):
        return nn.functional.conv2d(x, torch.ones(10, 1, 1, 1)).mean(dim=(2, 3))


_U8 = np.zeros((4, 16, 16), np.uint8)


@pytest.mark.parametrize("model, images, labels, kwargs, error, match", [
    (_Fixed(), _U8, [0, 1], {}, ValueError, "labels has 2 entries but images has 4"),
    (_Fixed(), _U8, [0, 1, 2, 10], {}, ValueError, r"labels must lie in \[0, 10\)"),
    (_Fixed(), _U8, [0, 1, 2, -1], {}, ValueError, r"labels must lie in \[0, 10\)"),
    (_Fixed(), _U8, [0.0, 1.5, 2.0, 3.0], {}, TypeError, "labels must be integer class indices"),
    (_Fixed(), _U8, [[0, 1, 2, 3]], {}, ValueError, "labels must be 1-D"),
    (_Fixed(), _U8[:0], [], {}, ValueError, "images is empty"),
    (_Fixed(), _U8.astype(np.int32), [0, 1, 2, 3], {}, TypeError, "images must be uint8 pixels or floats"),
    (_Fixed(), np.full((4, 16, 16), np.nan, np.float32), [0, 1, 2, 3], {}, ValueError, "images contains NaN"),
    (_Fixed(), np.full((4, 16, 16), 255.0, np.float32), [0, 1, 2, 3], {}, ValueError,
     r"images are floats in \[255, 255\], the models take \[0, 1\]"),
    (_Fixed(), np.zeros((4, 3, 16, 16), np.uint8), [0, 1, 2, 3], {}, ValueError, "images do not fit the model"),
    (_Fixed(), _U8.tolist(), [0, 1, 2, 3], {}, TypeError, "images must be a numpy array or a torch tensor"),
    ("resnet20", _U8, [0, 1, 2, 3], {}, TypeError, "model must be an nn.Module or a callable"),
    (_Fixed(), _U8, [0, 1, 2, 3], dict(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
], ids=["length", "label-10", "label-neg", "label-float", "label-2d", "empty", "int32", "nan", "float-255",
        "channels", "list", "model-str", "batch0"])
def test_evaluate_bad_input(model, images, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        zq.evaluate(model, images, labels, **kwargs)


def test_evaluate_takes_an_integer_model(int_model):
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    result = zq.evaluate(int_model, images, [0, 1, 2])
    assert result.predictions.tolist() == int_model.predict(images[:, None]).tolist()


# ------------------------------------------------------------------------------ data / models

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(split="val"), ValueError, "split must be"),
    (dict(split=None), ValueError, "split must be"),
    (dict(split="test", root=5), TypeError, "root must be a directory path"),
    (dict(split="test", root="FILE"), data.DatasetNotFoundError, "root .* is a file"),
    (dict(split="test", root="/nonexistent/fashion"), data.DatasetNotFoundError, "not found in /nonexistent"),
], ids=["split", "split-None", "root-int", "root-file", "root-missing"])
def test_load_fashion_mnist_bad_arguments(tmp_path, kwargs, error, match):
    if kwargs.get("root") == "FILE":
        kwargs["root"] = tmp_path / "f"
        kwargs["root"].write_text("x")
    with pytest.raises(error, match=match):
        data.load_fashion_mnist(**kwargs)


@pytest.mark.parametrize("name", ["resnet50", None, 20])
def test_load_pretrained_unknown_name(name):
    with pytest.raises(ValueError, match="name must be one of"):
        models.load_pretrained(name)


# ------------------------------------------------------------------------------ detection

det = pytest.importorskip("pyzeroq.detection")
CANVAS = 32


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return det.FCOSDetector(widths=(4, 4, 4, 4, 4), fpn_width=8, head_convs=1, input_size=CANVAS).eval()


def _coco(n):
    return {"images": [{"id": i + 1, "width": CANVAS, "height": CANVAS} for i in range(n)], "annotations": [],
            "categories": [{"id": c + 1, "name": str(c)} for c in range(10)]}


_SCENES = np.zeros((2, CANVAS, CANVAS), np.uint8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="val"), "split must be one of"), (dict(split=["test"]), "split must be one of"),
    (dict(num_images=0), "num_images must be a positive integer"),
    (dict(num_images=True), "num_images must be a positive integer"),
    (dict(num_images=2.0), "num_images must be a positive integer"),
    (dict(num_images=10 ** 12), "num_images must be at most"),
    (dict(seed=-1), "seed must be a non-negative integer"), (dict(seed=1.5), "seed must be a non-negative"),
    (dict(seed=None), "seed must be a non-negative"), (dict(seed=True), "seed must be a non-negative"),
], ids=repr)
def test_make_scenes_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        det.make_scenes(**{"num_images": 1, **kwargs})


@pytest.fixture
def no_calibration(monkeypatch):
    from pyzeroq.detection import api

    def fail(*args, **kwargs):
        raise AssertionError("calibration / QAT ran before the arguments were validated")
    for name in ("synthesize", "distilled_set", "gaussian_set", "prepare_qat", "run_qat"):
        monkeypatch.setattr(api, name, fail)


_DCFG = dict(qat=det.QATConfig(steps=0, batch_size=2), synthesis=det.SynthesisConfig(num_images=2, batch_size=2,
                                                                                     iters=1, refine=False),
             calibration="gaussian", progress=False)


@pytest.mark.parametrize("target, config, calibration, error, match", [
    (nn.Linear(2, 2), None, None, TypeError, "detector must be an nn.Module with forward"),
    ("fcos", None, None, TypeError, "detector must be an nn.Module with forward"),
    ("DET", {"calibration": "gaussian"}, None, TypeError, "config must be a DetectionQuantConfig"),
    ("DET", det.QATConfig(), None, TypeError, "config must be a DetectionQuantConfig"),
    ("NAN", None, None, ValueError, "detector parameter 'stem.0.weight' contains NaN or Inf"),
    ("DET", None, (torch.rand(2, 1, 32, 32), None), TypeError, "calibration must be None or"),
    ("DET", None, "calibration.npz", TypeError, "calibration must be None or"),
    ("DET", None, (torch.rand(0, 1, 32, 32), None, {}), ValueError, "calibration images must have shape"),
    ("DET", None, (torch.rand(2, 1, 32, 32) * 255, None, {}), ValueError, "calibration images must be finite"),
    ("DET", None, (torch.rand(2, 1, 32, 32), [{}], {}), ValueError, "calibration targets must be None or a list"),
], ids=["linear", "str", "config-dict", "config-qat", "nan-weight", "calib-pair", "calib-str", "calib-empty",
        "calib-255", "calib-targets"])
def test_quantize_detector_bad_arguments(detector, no_calibration, target, config, calibration, error, match):
    if target in ("DET", "NAN"):
        fresh = det.FCOSDetector(**detector.config).eval()
        fresh.load_state_dict(detector.state_dict())
        if target == "NAN":
            with torch.no_grad():
                fresh.stem[0].weight.view(-1)[0] = float("nan")
        target = fresh
    config = det.DetectionQuantConfig(**_DCFG) if config is None else config
    with pytest.raises(error, match=match):
        det.quantize_detector(target, config, calibration=calibration)


@NO_CUDA
def test_quantize_detector_device_this_machine_lacks(detector, no_calibration):
    with pytest.raises(ValueError, match="config.device 'cuda': CUDA is not available"):
        det.quantize_detector(detector, det.DetectionQuantConfig(**{**_DCFG, "device": "cuda"}))


@pytest.mark.parametrize("kwargs, match", [
    (dict(calibration="real", calibration_data=(_SCENES,)), "calibration_data: must be a pair"),
    (dict(calibration="real", calibration_data=(_SCENES[:0], _coco(0))), "calibration_data: images is empty"),
    (dict(calibration="real", calibration_data=(_SCENES, _coco(1))), "describes 1 images, the images array has 2"),
    (dict(calibration="real", calibration_data=(np.full((2, 32, 32), np.nan, np.float32), _coco(2))),
     "calibration_data: float images must be finite"),
    (dict(calibration="real", calibration_data=(_SCENES, [1, 2])), "calibration_data: the second item"),
    (dict(calibration="real", calibration_data=(_SCENES, {**_coco(2), "annotations": [{"image_id": 9}]})),
     "calibration_data: annotations must be dicts"),
    (dict(calibration="real", calibration_data=(_SCENES.astype(np.int64), _coco(2))), "calibration_data: images "
     "must be uint8"),
    (dict(device="bogus"), "device: 'bogus' is not a torch device"), (dict(device=5), "device: must be a string"),
    (dict(progress="yes"), "progress: must be a bool"), (dict(seed=-1), "seed: must be an integer in \\[0, "),
    (dict(calibration="labels"), "calibration: must be one of"),
], ids=["pair", "empty", "coco-count", "nan", "coco-list", "annotation", "int64", "device", "device-int",
        "progress", "seed", "calibration"])
def test_detection_config_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        det.DetectionQuantConfig(**kwargs)


@pytest.mark.parametrize("target, images, coco, error, match", [
    ("DET", _SCENES[:1], _coco(2), ValueError, "coco_gt describes 2 images but images has 1"),
    ("DET", _SCENES.tolist(), _coco(2), TypeError, "images must be uint8 scenes"),
    ("DET", _SCENES, [1, 2], TypeError, "coco_gt must be a COCO annotation dict"),
    ("DET", _SCENES, {"annotations": []}, ValueError, "coco_gt must hold a list 'images'"),
    ("DET", _SCENES[:0], _coco(0), ValueError, "images is empty"),
    ("DET", _SCENES.astype(np.int64), _coco(2), TypeError, "images must be uint8 pixels"),
    ("DET", _SCENES.astype(np.float32) + 255, _coco(2), ValueError, "images are floats outside"),
    ("DET", np.zeros((2, 3, 32, 32), np.uint8), _coco(2), ValueError, r"images must have shape \[N, H, W\]"),
    (nn.Linear(2, 2), _SCENES, _coco(2), TypeError, "detector must be an nn.Module with forward"),
], ids=["count", "list", "coco-list", "coco-keys", "empty", "int64", "float-255", "channels", "linear"])
def test_evaluate_detector_bad_arguments(detector, target, images, coco, error, match):
    with pytest.raises(error, match=match):
        det.evaluate_detector(detector if target == "DET" else target, images, coco)


@pytest.mark.parametrize("images, kwargs, error, match", [
    (torch.full((2, 32, 32), float("nan")), {}, ValueError, "images contains NaN or Inf"),
    (torch.full((2, 32, 32), float("inf")), {}, ValueError, "images contains NaN or Inf"),
    (torch.zeros(2, 32, 32, dtype=torch.uint8), {}, TypeError, "divide uint8 pixels by 255"),
    (torch.zeros(2, 32, 32, dtype=torch.int64), {}, TypeError, "images must be float images"),
    (torch.zeros(2, 32, 32, dtype=torch.bool), {}, TypeError, "images must be float images"),
    (torch.rand(2, 32, 32) * 255, {}, ValueError, r"detectors take \[0, 1\]"),
    (torch.rand(32, 32), {}, ValueError, r"images must have shape \[N, H, W\]"),
    (torch.rand(2, 3, 32, 32), {}, ValueError, r"images must have shape \[N, H, W\]"),
    ("scene.png", {}, TypeError, "images must be a float numpy array or torch tensor"),
    (torch.rand(2, 32, 32), dict(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
    (torch.rand(2, 32, 32), dict(score_threshold=float("nan")), ValueError, "score_threshold must be a number"),
    (torch.rand(2, 32, 32), dict(iou_threshold=2.0), ValueError, "iou_threshold must be a number"),
], ids=["nan", "inf", "uint8", "int64", "bool", "float-255", "rank2", "channels", "str", "batch0",
        "score-nan", "iou-2"])
def test_predict_bad_input(detector, images, kwargs, error, match):
    with pytest.raises(error, match=match):
        det.predict(detector, images, **kwargs)


def test_predict_empty_batch_is_an_empty_list(detector):
    assert det.predict(detector, torch.rand(0, 32, 32)) == []


@pytest.fixture(scope="module")
def det_files(detector, tmp_path_factory):
    d = tmp_path_factory.mktemp("detectors")
    det.save_detector(detector, d / "det.pt")
    (d / "garbage.pt").write_bytes(bytes(range(256)))
    torch.save({"a": 1}, d / "other.pt")
    raw = (d / "det.pt").read_bytes()
    (d / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    return d


@pytest.mark.parametrize("name, kwargs, error, match", [
    ("missing.pt", {}, FileNotFoundError, "no detector checkpoint at .*missing.pt"),
    (".", {}, ValueError, "is a directory"),
    ("garbage.pt", {}, ValueError, "garbage.pt is not a pyzeroq detector checkpoint"),
    ("other.pt", {}, ValueError, "other.pt is not a pyzeroq detector checkpoint"),
    ("truncated.pt", {}, ValueError, "truncated.pt is not a pyzeroq detector checkpoint"),
    (None, {}, TypeError, "path must be a file path"),
    ("det.pt", dict(model=nn.Linear(2, 2)), ValueError, "the saved weights do not fit model"),
    ("det.pt", dict(model="FCOSDetector"), TypeError, "model must be None or an nn.Module"),
    ("det.pt", dict(device="bogus"), ValueError, "device 'bogus' is not a torch device"),
], ids=["missing", "directory", "garbage", "other", "truncated", "None", "wrong-model", "model-str", "device"])
def test_load_detector_bad_arguments(det_files, name, kwargs, error, match):
    with pytest.raises(error, match=match):
        det.load_detector(det_files / name if name is not None else None, **kwargs)


@pytest.mark.parametrize("target, where, error, match", [
    ("detector.pt", "d.pt", TypeError, "detector must be an nn.Module"),
    ("DET", "DIR", ValueError, "is a directory"),
    ("DET", "FILE/x.pt", ValueError, "is a file, not a directory"),
    ("DET", None, TypeError, "path must be a file path"),
], ids=["not-module", "directory", "under-a-file", "None"])
def test_save_detector_bad_arguments(detector, tmp_path, target, where, error, match):
    (tmp_path / "FILE").write_text("x")
    path = None if where is None else tmp_path if where == "DIR" else tmp_path / where
    with pytest.raises(error, match=match):
        det.save_detector(detector if target == "DET" else target, path)


# ------------------------------------------------------------------------------ command line

def _run_cli(main, argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv, match", [
    (["eval", "--model", "foo"], "argument --model: invalid choice: 'foo'"),
    (["eval", "--split", "val"], "argument --split: invalid choice: 'val'"),
    (["quantize", "--model", "resnet50"], "argument --model: invalid choice"),
    (["quantize", "--weight-bits", "abc"], "argument --weight-bits: invalid int value"),
    (["quantize", "--weight-bits", "1", "--eval", "none"], "weight_bits must be an integer in"),
    (["quantize", "--act-bits", "-1", "--eval", "none"], "act_bits must be an integer in"),
    (["quantize", "--mixed", "2,4,8", "--eval", "none"], "--mixed needs --avg-weight-bits"),
    (["quantize", "--mixed", "2,4,8", "--avg-weight-bits", "9", "--eval", "none"], "avg_weight_bits must lie"),
    (["quantize", "--num-samples", "0", "--eval", "none"], "num_samples must be a positive integer"),
    (["quantize", "--percentile", "200", "--eval", "none"], "percentile must be in"),
    (["quantize", "--seed", "-1", "--eval", "none"], r"seed must be an integer in \[0, 9223372036854775807\]"),
    (["quantize", "--seed", "99999999999999999999", "--eval", "none"], "seed must be an integer in"),
    (["quantize", "--distill-iters", "99999999999999999999", "--eval", "none"], "distill_iters must be an integer in"),
    (["quantize", "--num-samples", "99999999999999999999", "--eval", "none"], "num_samples must be a positive integer up"),
    (["quantize", "--plot", "PNG", "--eval", "none"], "--plot draws the Pareto frontier .* needs --mixed"),
    (["quantize", "--mixed", "2,4,8", "--avg-weight-bits", "4", "--plot", "MISSING/p.png", "--eval", "none"],
     "--plot .* does not exist"),
    (["quantize", "--device", "bogus", "--eval", "none"], "config.device 'bogus' is not a torch device"),
    (["detect-quantize", "--out", "OUT", "--weight-bits", "1"], "weight_bits: must be an integer in"),
    (["detect-quantize", "--out", "OUT", "--num-images", "0"], "num_images: must be an integer >= 1"),
    (["detect-quantize", "--out", "OUT", "--seed", "-1"], "seed: must be an integer in \\[0, "),
    (["detect-quantize", "--out", "OUT", "--w-task", "nan"], "w_task: must be a finite number"),
    (["detect-quantize", "--out", "OUT", "--first-layer-bits", "abc"], "argument --first-layer-bits"),
    (["detect-quantize", "--out", "OUT", "--calibration", "labels"], "argument --calibration: invalid choice"),
    (["detect-quantize", "--out", "OUT", "--detector", "MISSING/det.pt"], "no detector checkpoint at"),
    (["detect-quantize", "--out", "OUT", "--detector", "GARBAGE"], "is not a pyzeroq detector checkpoint"),
    (["detect-quantize", "--out", "DIR"], "--out .* is a directory"),
    (["detect-quantize", "--out", "GARBAGE/det.pt"], "--out .* is a file, not a directory"),
    (["detect-quantize", "--out", "OUT", "--samples-png", "GARBAGE/s.png"], "--samples-png .* is a file"),
    (["detect-quantize", "--out", "OUT", "--eval-images", "-1"], "--eval-images must be in \\[0, "),
    (["detect-quantize", "--out", "OUT", "--device", "bogus"], "--device 'bogus' is not a torch device"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_bad_argument_is_one_error_line(tmp_path, capsys, argv, match):
    (tmp_path / "GARBAGE").write_bytes(b"not a checkpoint")
    names = {"PNG": tmp_path / "p.png", "OUT": tmp_path / "out.pt", "DIR": tmp_path, "GARBAGE": tmp_path / "GARBAGE"}
    argv = [str(names[a]) if a in names else re.sub(r"^(MISSING|GARBAGE)/", lambda m: str(tmp_path / m[1]) + "/", a)
            for a in argv]
    code, err = _run_cli(cli.main, argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    assert re.search("error: .*" + match, err), err
    assert not (tmp_path / "out.pt").exists()


@NO_CUDA
@pytest.mark.parametrize("argv", [["quantize", "--device", "cuda", "--eval", "none"],
                                  ["detect-quantize", "--out", "OUT", "--device", "cuda"]], ids=" ".join)
def test_cli_device_this_machine_lacks(tmp_path, capsys, argv):
    argv = [str(tmp_path / "o.pt") if a == "OUT" else a for a in argv]
    code, err = _run_cli(cli.main, argv, capsys)
    assert code == 2 and "CUDA is not available" in err and "Traceback" not in err


def test_detection_cli_module_reports_errors_the_same_way(tmp_path, capsys):
    from pyzeroq.detection import cli as det_cli

    code, err = _run_cli(det_cli.main, ["detect-quantize", "--out", str(tmp_path)], capsys)
    assert code == 2 and "error: --out" in err and "is a directory" in err


def test_cli_process_prints_no_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for argv, match in ([["quantize", "--weight-bits", "1", "--eval", "none"], "weight_bits"],
                        [["detect-quantize", "--out", str(tmp_path)], "--out"]):
        r = subprocess.run([sys.executable, "-m", "pyzeroq.cli", *argv], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(f"pyzeroq: error: {match}")


def test_save_and_load_check_path_and_device(saved, tmp_path):
    qmodel = zq.load(saved / "model.pzq")
    for bad, error in [(None, TypeError), (tmp_path, ValueError), (tmp_path / "no" / "dir.pzq", FileNotFoundError)]:
        with pytest.raises(error, match="path"):
            qmodel.save(bad)
        with pytest.raises(error, match="path"):
            zq.to_integer(qmodel).save(bad)
    with pytest.raises(ValueError, match="device"):
        zq.load(saved / "model.pzq", device="bogus")
