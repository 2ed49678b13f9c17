"""Config validation: bad values -> ValueError naming the field."""

import pytest

from pyzeroq.detection.config import DetectionQuantConfig, QATConfig, SynthesisConfig


@pytest.mark.parametrize("field,value", [
    ("num_images", 0), ("batch_size", -1), ("iters", 1.5), ("lr", 0.0), ("main_mult", -1.0),
    ("r_feature", float("nan")), ("refine_start", 1.5), ("match_iou", -0.1), ("min_area", 0.9),
    ("box_min_frac", 0.0), ("refine", "yes"), ("refine_every", 0), ("refine_every", 10), ("max_labels", 0),
    ("second_pass", 1), ("relabel", "no"), ("best_by", "loss")])
def test_synthesis_config_errors(field, value):
    with pytest.raises(ValueError, match=field):
        SynthesisConfig(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("weight_bits", 1), ("act_bits", 17), ("first_layer_bits", 0), ("head_bits", 3.0), ("steps", -1),
    ("batch_size", 0), ("lr", -1e-3), ("tau", 0.0), ("w_kd", float("inf")), ("act_percentile", 10.0),
    ("train_bn_stats", 1), ("task_loss_parts", ()), ("task_loss_parts", "cls"), ("task_loss_parts", ("",)),
    ("w_head", -1.0), ("w_modules", float("nan")), ("kd_keys", "cls"), ("kd_keys", ("cls", "")), ("warmup", 1.0),
    ("grad_clip", 0.0), ("ema_decay", 1.0), ("ema_decay", 0.0)])
def test_qat_config_errors(field, value):
    with pytest.raises(ValueError, match=field):
        QATConfig(**{field: value})


def test_detection_config_errors():
    with pytest.raises(ValueError, match="calibration"):
        DetectionQuantConfig(calibration="imagenet")
    with pytest.raises(ValueError, match="calibration_data"):
        DetectionQuantConfig(calibration="real")
    with pytest.raises(ValueError, match="qat"):
        DetectionQuantConfig(qat={"weight_bits": 4})
    with pytest.raises(ValueError, match="max_area"):
        SynthesisConfig(min_area=0.5, max_area=0.4)
    for name in ("synthesis_seed", "qat_seed"):
        with pytest.raises(ValueError, match=name):
            DetectionQuantConfig(**{name: -1})
    with pytest.raises(ValueError, match="seed"):
        DetectionQuantConfig(seed=None)
    assert DetectionQuantConfig(seed=3).seeds == (3, 3)
    assert DetectionQuantConfig(seed=3, synthesis_seed=1, qat_seed=2).seeds == (1, 2)


def test_defaults_valid_and_frozen():
    cfg = DetectionQuantConfig()
    assert cfg.qat.weight_bits == 4 and cfg.synthesis.refine
    with pytest.raises(Exception):
        cfg.seed = 3
    assert QATConfig(first_layer_bits=None, head_bits=None).head_bits is None


def test_cli_parser_builds_config():
    import argparse

    from pyzeroq.detection.cli import add_parsers, build_config
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["detect-quantize", "--out", "x.pt", "--weight-bits", "6", "--act-bits", "6",
                              "--head-bits", "float", "--no-refine", "--qat-steps", "7"])
    cfg = build_config(args)
    assert cfg.qat.weight_bits == 6 and cfg.qat.head_bits is None and cfg.qat.steps == 7
    assert not cfg.synthesis.refine and cfg.calibration == "task_specific" and callable(args.func)
    with pytest.raises(ValueError, match="weight_bits"):
        build_config(parser.parse_args(["detect-quantize", "--out", "x.pt", "--weight-bits", "1"]))


def test_numpy_scalars_and_torch_devices_are_taken():
    import numpy as np
    import torch

    from pyzeroq.detection import DetectionQuantConfig, FCOSDetector
    from pyzeroq.detection.interface import predict

    assert DetectionQuantConfig(device=torch.device("cpu")).device == "cpu"
    det = FCOSDetector(widths=(4, 4, 4, 4, 4), fpn_width=8, head_convs=1, input_size=32).eval()
    out = predict(det, np.zeros((1, 32, 32), np.float32), score_threshold=np.float32(0.3), iou_threshold=np.float64(0.5))
    assert len(out) == 1


def test_predict_names_images_the_detector_cannot_take():
    import numpy as np
    import pytest as _pytest

    from pyzeroq.detection import FCOSDetector
    from pyzeroq.detection.interface import predict

    det = FCOSDetector(widths=(4, 4, 4, 4, 4), fpn_width=8, head_convs=1, input_size=32).eval()
    with _pytest.raises(ValueError, match=r"images of shape \(1, 50, 50\) do not fit the detector"):
        predict(det, np.zeros((1, 50, 50), np.float32))  # a raw torch size-mismatch RuntimeError before
