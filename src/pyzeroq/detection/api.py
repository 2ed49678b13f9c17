"""End-to-end entry points: the committed FP detector, quantize_detector, save / load."""

from __future__ import annotations

import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import DetectionQuantConfig, QATConfig, describe
from .interface import check_detector
from .model import FCOSDetector
from .qat import prepare_qat, run_qat
from .scenes import coco_to_targets
from .synthesis import distilled_set, gaussian_set, synthesize

PRETRAINED_PATH = Path(__file__).parent / "detector.pt"
FORMAT = "pyzeroq.detection/1"


class NoPretrainedDetectorError(FileNotFoundError):
    pass


def load_pretrained_detector(path: str | Path | None = None, device: torch.device | str = "cpu") -> FCOSDetector:
    """The committed FP detector (eval mode), trained by ``python -m pyzeroq.detection.train``."""
    path = Path(path) if path is not None else PRETRAINED_PATH
    if not path.exists():
        raise NoPretrainedDetectorError(f"no detector checkpoint at {path}; train one with "
                                        "`python -m pyzeroq.detection.train`")
    return load_detector(path, device=device)


def save_detector(detector: nn.Module, path: str | Path, info: dict | None = None) -> Path:
    """Save a (quantized or FP) detector: architecture config, quantization settings, weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    qcfg = getattr(detector, "qat_config", None)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in detector.state_dict().items()}
    torch.save({"format": FORMAT, "arch": type(detector).__name__, "config": getattr(detector, "config", None),
                "quant": describe(qcfg) if qcfg is not None else None, "state_dict": state,
                "info": info or getattr(detector, "quant_info", None)}, path)
    return path


def _attach_save(model: nn.Module) -> nn.Module:
    if not hasattr(type(model), "save"):
        model.save = types.MethodType(save_detector, model)
    return model


def load_detector(path: str | Path, model: nn.Module | None = None,
                  device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a detector saved by :func:`save_detector`. Our FCOS detectors are rebuilt from
    the stored config; for a user's detector pass an FP instance of its architecture as ``model``."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=False)
    if "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a pyzeroq detector checkpoint")
    if model is None:
        if ckpt.get("arch", "FCOSDetector") != "FCOSDetector" or ckpt.get("config") is None:
            raise ValueError(f"{path} holds a {ckpt.get('arch')!r}; pass model= (an instance of that architecture)")
        model = FCOSDetector(**ckpt["config"])
    if ckpt.get("quant") is not None:
        model = prepare_qat(model, QATConfig(**ckpt["quant"]))
    model.load_state_dict(ckpt["state_dict"])
    model.quant_info = ckpt.get("info")
    return _attach_save(model.to(device).eval())


def calibration_set(detector: nn.Module, config: DetectionQuantConfig):
    """(images float [N, 1, H, W], targets or None, info) for the configured calibration source."""
    syn = config.synthesis
    if config.calibration == "task_specific":
        s = synthesize(detector, syn, config.seed, config.device, config.progress)
        return s.images, s.targets, s.info
    if config.calibration == "distilled":
        s = distilled_set(detector, syn.num_images, config.distill_iters, syn.batch_size, config.seed,
                          config.device, config.progress)
        return s.images, None, s.info
    if config.calibration == "gaussian":
        s = gaussian_set(detector, syn.num_images, config.seed, config.device)
        return s.images, None, s.info
    images, coco = config.calibration_data
    images = np.asarray(images)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1) if images.dtype == np.uint8 \
        else torch.as_tensor(images, dtype=torch.float32).reshape(len(images), 1, *images.shape[-2:])
    return x, coco_to_targets(coco), {"kind": "real", "num_images": len(x)}


def quantize_detector(detector: nn.Module, config: DetectionQuantConfig = DetectionQuantConfig(),
                      calibration=None) -> nn.Module:
    """Stage 1 (calibration set; labeled synthetic for "task_specific") + stage 2 (LSQ QAT with
    KD and task loss) -> a quantized copy of ``detector`` with the same ``predict`` and a
    ``save(path)`` method. ``detector`` is not modified. ``calibration``: a precomputed
    (images, targets, info) to reuse (e.g. one synthetic set for several bit widths)."""
    check_detector(detector)
    if not isinstance(config, DetectionQuantConfig):
        raise TypeError(f"config must be a DetectionQuantConfig, got {type(config).__name__}")
    t0 = time.time()
    images, targets, info = calibration if calibration is not None else calibration_set(detector, config)
    t1 = time.time()
    student = prepare_qat(detector, config.qat).to(config.device)
    log = run_qat(student, detector, images, targets, config.qat, config.seed, config.device, config.progress)
    student.quant_info = {"calibration": info, "config": describe(config), "qat_final_loss":
                          log["loss"][-1] if log["loss"] else None,
                          "seconds": {"calibration_set": round(t1 - t0, 1), "qat": round(time.time() - t1, 1)}}
    return _attach_save(student.eval())
