"""End-to-end entry points: the committed FP detector, quantize_detector, save / load."""

from __future__ import annotations

import os
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._checks import check_device, check_finite_model, output_path
from .config import DetectionQuantConfig, QATConfig, describe
from .interface import check_detector
from .model import FCOSDetector
from .qat import check_float_detector, prepare_qat, run_qat
from .scenes import coco_to_targets
from .synthesis import distilled_set, gaussian_set, synthesize

PRETRAINED_PATH = Path(__file__).parent / "detector.pt"
FORMAT = "pyzeroq.detection/2"
# /1: the detection-only LSQ layers (before the shared quantizers of pyzeroq.quantizers);
# converted on load by :func:`convert_v1_state_dict`
FORMAT_V1 = "pyzeroq.detection/1"
_V1_MARK = ".weight_quant.initialized"
_V1_INNER = ("conv.", "linear.")


class NoPretrainedDetectorError(FileNotFoundError):
    pass


def load_pretrained_detector(path: str | Path | None = None, device: torch.device | str = "cpu") -> FCOSDetector:
    """The committed FP detector (eval mode), trained by ``python -m pyzeroq.detection.train``."""
    path = Path(path) if path is not None else PRETRAINED_PATH
    if not path.exists():
        raise NoPretrainedDetectorError(f"no detector checkpoint at {path}; train one with "
                                        "`python -m pyzeroq.detection.train`")
    return load_detector(path, device=device)


def _plain(value):
    """``value`` as plain data that ``torch.load(weights_only=True)`` reads back: dicts (str keys),
    lists, tuples, str / int / float / bool / None and tensors; numpy values become Python
    numbers or lists, dataclass configs dicts, anything else its ``str``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return tuple(items) if type(value) is tuple else items
    if hasattr(value, "__dataclass_fields__"):
        return _plain(describe(value))
    return str(value)


def save_detector(detector: nn.Module, path: str | Path, info: dict | None = None) -> Path:
    """Save a (quantized or FP) detector: architecture config, quantization settings, weights
    (with the quantizers' steps, zero points and bit widths), all as plain data (loads with
    ``torch.load(weights_only=True)``). TypeError / ValueError naming ``detector`` or ``path``
    (not a path, a directory, under a file; PermissionError: not writable)."""
    if not isinstance(detector, nn.Module):
        raise TypeError(f"detector must be an nn.Module, got {type(detector).__name__}")
    path = output_path(path, "path", create_parents=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    qcfg = getattr(detector, "qat_config", None)
    state = {k: v.detach().cpu().contiguous().clone() if isinstance(v, torch.Tensor) else _plain(v)
             for k, v in detector.state_dict().items()}
    torch.save({"format": FORMAT, "arch": type(detector).__name__, "config": _plain(getattr(detector, "config", None)),
                "quant": describe(qcfg) if qcfg is not None else None, "state_dict": state,
                "info": _plain(info if info is not None else getattr(detector, "quant_info", None))}, path)
    return path


def _attach_save(model: nn.Module) -> nn.Module:
    if not hasattr(type(model), "save"):
        model.save = types.MethodType(save_detector, model)
    return model


def _v1_layers(state: dict) -> list[str]:
    return sorted(k[:-len(_V1_MARK)] for k in state if k.endswith(_V1_MARK))


def _v1_zero_point(v: torch.Tensor, like: torch.Tensor, bits: int, key: str) -> torch.Tensor:
    if not torch.equal(v, v.round()) or v.min() < 0 or v.max() > (1 << bits) - 1:
        raise ValueError(f"{key}: zero points {v.tolist()} are not {bits}-bit codes (the stored quant config "
                         "does not match the weights)")
    return v.round().to(torch.int64).reshape(like.shape)


def convert_v1_state_dict(state: dict, model: nn.Module) -> dict:
    """A ``pyzeroq.detection/1`` state dict in the layout of ``model`` (:func:`prepare_qat` of the
    stored quant config).

    Old layout, per quantized layer ``X``: ``X.conv.weight`` / ``X.conv.bias`` (``X.linear.*``),
    ``X.weight_quant.scale`` float [C], ``X.weight_quant.zero_point`` float [C],
    ``X.act_quant.scale`` / ``zero_point`` float [1], ``X.*.initialized`` bool. New layout:
    ``X.weight`` / ``X.bias``, ``X.weight_quant.scale`` [C] (the LSQ step, unchanged),
    ``zero_point`` int64 [C], ``X.act_quant.scale`` / ``zero_point`` of shape (), and each
    quantizer's ``_extra_state`` (bits from ``model``, learned step, mode "quantize" when it was
    initialized). Values are unchanged; the forward differs only in the bias, now rounded to
    int32 at ``input_scale * weight_scale``. Raises ValueError when a zero point is not an
    integer code of the model's bit width."""
    target = model.state_dict()
    layers = _v1_layers(state)
    out = {}
    for key, v in state.items():
        layer = next((x for x in layers if key.startswith(x + ".")), None)
        rest = key[len(layer) + 1:] if layer is not None else ""
        if layer is None:
            out[key] = v
        elif rest.startswith(_V1_INNER):
            out[f"{layer}.{rest.split('.', 1)[1]}"] = v
        elif rest.endswith(".initialized"):
            continue
        elif rest not in ("weight_quant.scale", "weight_quant.zero_point", "act_quant.scale", "act_quant.zero_point"):
            raise ValueError(f"{key}: unknown entry of a {FORMAT_V1} quantized layer")
        else:
            quant = rest.split(".")[0]
            extra = target.get(f"{layer}.{quant}._extra_state")
            if extra is None:
                raise ValueError(f"{key}: the model has no quantizer {layer}.{quant} (quant config mismatch)")
            new_key, like = f"{layer}.{rest}", target[f"{layer}.{rest}"]
            out[new_key] = v.float().reshape(like.shape) if rest.endswith("scale") else \
                _v1_zero_point(v, like, extra["bits"], key)
    for layer in layers:
        for quant in ("weight_quant", "act_quant"):
            extra = target.get(f"{layer}.{quant}._extra_state")
            if extra is not None:
                init = bool(state.get(f"{layer}.{quant}.initialized", True))
                out[f"{layer}.{quant}._extra_state"] = {"bits": extra["bits"], "mode": "quantize" if init else "off",
                                                         "learned": True}
    return out


def _read_checkpoint(path: Path) -> dict:
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory, not a detector checkpoint")
    if not path.is_file():
        raise FileNotFoundError(f"no detector checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding more than plain data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a pyzeroq detector checkpoint (torch.load(weights_only=True): {first})") \
            from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path} is not a pyzeroq detector checkpoint (no state_dict)")
    if ckpt.get("format") not in (None, FORMAT, FORMAT_V1):
        raise ValueError(f"{path}: unknown detector checkpoint format {ckpt.get('format')!r} (this pyzeroq reads "
                         f"{FORMAT} and {FORMAT_V1})")
    return ckpt


def _qat_config(quant: dict) -> QATConfig:
    return QATConfig(**{k: tuple(v) if k in ("task_loss_parts", "kd_keys") and isinstance(v, list) else v
                        for k, v in quant.items()})


def load_detector(path: str | Path, model: nn.Module | None = None,
                  device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a detector saved by :func:`save_detector` (read with ``torch.load(weights_only=True)``;
    ``pyzeroq.detection/1`` files are converted). Our FCOS detectors are rebuilt from the stored
    config; for a user's detector pass an FP instance of its architecture as ``model``.
    Raises ValueError (naming the path) for a file that is not a detector checkpoint,
    FileNotFoundError for a missing one, TypeError / ValueError naming ``path``, ``model`` or
    ``device`` for arguments of another kind, a model the weights do not fit, a device this
    machine does not have."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be None or an nn.Module (an FP instance of the saved architecture), got "
                        f"{type(model).__name__}")
    check_device(device, "device")
    path = Path(path)
    ckpt = _read_checkpoint(path)
    if model is None:
        if ckpt.get("arch", "FCOSDetector") != "FCOSDetector" or ckpt.get("config") is None:
            raise ValueError(f"{path} holds a {ckpt.get('arch')!r}; pass model= (an instance of that architecture)")
        model = FCOSDetector(**ckpt["config"])
    if ckpt.get("quant") is not None:
        model = prepare_qat(model, _qat_config(ckpt["quant"]))
    state, info = ckpt["state_dict"], ckpt.get("info")
    if _v1_layers(state):
        state = convert_v1_state_dict(state, model)
        info = {**(info or {}), "converted_from": FORMAT_V1}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing / unexpected keys, shapes
        raise ValueError(f"{path}: the saved weights do not fit model ({type(model).__name__}): "
                         f"{' '.join(str(exc).split())[:400]}") from exc
    model.quant_info = info
    return _attach_save(model.to(device).eval())


def _check_arguments(detector, config) -> None:
    check_detector(detector)
    if not isinstance(config, DetectionQuantConfig):
        raise TypeError(f"config must be a DetectionQuantConfig, got {type(config).__name__}")
    check_device(config.device, "config.device")
    check_finite_model(detector, "detector")
    check_float_detector(detector)


@torch.no_grad()
def _check_outputs(detector: nn.Module, qat: QATConfig, device) -> None:
    """``qat.kd_keys`` and ``qat.task_loss_parts`` against what ``detector`` returns for one blank
    image and an empty target (ValueError naming them: QAT found them after the calibration set).
    A detector whose loss takes no ``reduce`` keyword leaves the parts to QAT's own check."""
    if qat.steps == 0:
        return
    side = int(getattr(detector, "input_size", 0)) or None
    if side is None:
        return
    was = detector.training
    detector.eval()
    try:
        outputs = detector(torch.zeros(1, 1, side, side, device=device))
        if qat.w_kd > 0:
            missing = [k for k in qat.kd_keys if not isinstance(outputs, dict) or k not in outputs]
            if missing:
                raise ValueError(f"qat.kd_keys: the detector's output has no key(s) {missing} (keys: "
                                 f"{sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__})")
        if qat.task_loss_parts is not None and qat.w_task > 0:
            empty = [{"boxes": torch.zeros(0, 4, device=device), "labels": torch.zeros(0, dtype=torch.int64,
                                                                                      device=device)}]
            try:
                _, parts = detector.loss(outputs, empty, reduce=False)
            except TypeError:
                return
            unknown = [n for n in qat.task_loss_parts if n not in parts]
            if unknown:
                raise ValueError(f"qat.task_loss_parts: unknown parts {unknown}; the detector's loss has "
                                 f"{sorted(parts)}")
    finally:
        detector.train(was)


def calibration_set(detector: nn.Module, config: DetectionQuantConfig):
    """(images float [N, 1, H, W], targets or None, info) for the configured calibration source.
    The arguments are checked first as in :func:`quantize_detector`."""
    _check_arguments(detector, config)
    syn = config.synthesis
    if config.calibration == "task_specific":
        s = synthesize(detector, syn, config.seeds[0], config.device, config.progress)
        return s.images, s.targets, s.info
    if config.calibration == "distilled":
        s = distilled_set(detector, syn.num_images, config.distill_iters, syn.batch_size, config.seeds[0],
                          config.device, config.progress)
        return s.images, None, s.info
    if config.calibration == "gaussian":
        s = gaussian_set(detector, syn.num_images, config.seeds[0], config.device)
        return s.images, None, s.info
    images, coco = config.calibration_data
    images = np.asarray(images)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1) if images.dtype == np.uint8 \
        else torch.as_tensor(images, dtype=torch.float32).reshape(len(images), 1, *images.shape[-2:])
    return x, coco_to_targets(coco), {"kind": "real", "num_images": len(x)}


def _check_calibration(calibration) -> None:
    """TypeError / ValueError naming ``calibration`` unless it is (images, targets, info) as
    :func:`calibration_set` returns."""
    if not isinstance(calibration, (tuple, list)) or len(calibration) != 3:
        raise TypeError("calibration must be None or (images, targets, info) as calibration_set returns, got "
                        f"{type(calibration).__name__}"
                        f"{f' of {len(calibration)} items' if isinstance(calibration, (tuple, list)) else ''}")
    images, targets, info = calibration
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"calibration images must be a float tensor [N, 1, H, W], got {type(images).__name__}"
                        f"{f' of dtype {images.dtype}' if isinstance(images, torch.Tensor) else ''}")
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[0] == 0:
        raise ValueError(f"calibration images must have shape [N, 1, H, W] with N >= 1, got {tuple(images.shape)}")
    if not isinstance(info, dict):
        raise TypeError(f"calibration info must be a dict, got {type(info).__name__}")
    # the task-agnostic sets of calibration_set (Gaussian noise, ZeroQ distilled data) lie partly
    # outside the pixel range by construction; every other set must be pixels in [0, 1]
    unbounded = info.get("kind") in ("gaussian", "distilled")
    if not bool(torch.isfinite(images).all()) or not unbounded and (float(images.min()) < 0 or float(images.max()) > 1):
        raise ValueError("calibration images must be finite" + ("" if unbounded else " and in [0, 1]") +
                         " (info['kind'] 'gaussian' / 'distilled' sets may leave [0, 1])")
    if targets is not None and (not isinstance(targets, list) or len(targets) != len(images)):
        raise ValueError(f"calibration targets must be None or a list of {len(images)} dicts (one per image), got "
                         f"{type(targets).__name__}{f' of {len(targets)}' if isinstance(targets, list) else ''}")
    for i, t in enumerate(targets or []):
        if not (isinstance(t, dict) and isinstance(t.get("boxes"), torch.Tensor) and isinstance(t.get("labels"), torch.Tensor)
                and t["boxes"].dim() == 2 and t["boxes"].shape[-1] == 4 and t["labels"].shape == t["boxes"].shape[:1]):
            raise ValueError(f"calibration targets[{i}] must be a dict with 'boxes' float [M, 4] and 'labels' int [M] "
                             f"tensors, got {t!r:.120}")


def quantize_detector(detector: nn.Module, config: DetectionQuantConfig = DetectionQuantConfig(),
                      calibration=None) -> nn.Module:
    """Stage 1 (calibration set; labeled synthetic for "task_specific") + stage 2 (LSQ QAT with
    KD and task loss) -> a quantized copy of ``detector`` with the same ``predict`` and a
    ``save(path)`` method. ``detector`` is not modified. ``calibration``: a precomputed
    (images, targets, info) to reuse (e.g. one synthetic set for several bit widths).

    Checked before any synthesis or training (TypeError / ValueError naming the argument):
    ``detector`` follows the protocol and holds no NaN / Inf parameter or buffer (named);
    ``config`` is a DetectionQuantConfig whose device this machine has; ``calibration`` is
    (finite float images [N, 1, H, W], N >= 1, in [0, 1] unless ``info["kind"]`` is "gaussian" or
    "distilled"; None or N targets; info dict)."""
    _check_arguments(detector, config)
    if calibration is not None:
        _check_calibration(calibration)
    _check_outputs(detector, config.qat, config.device)
    t0 = time.time()
    images, targets, info = calibration if calibration is not None else calibration_set(detector, config)
    t1 = time.time()
    student = prepare_qat(detector, config.qat).to(config.device)
    log = run_qat(student, detector, images, targets, config.qat, config.seeds[1], config.device, config.progress)
    student.quant_info = {"calibration": info, "config": describe(config), "qat_final_loss":
                          log["loss"][-1] if log["loss"] else None, "qat_final_parts": log["parts"],
                          "seconds": {"calibration_set": round(t1 - t0, 1), "qat": round(time.time() - t1, 1)}}
    return _attach_save(student.eval())
