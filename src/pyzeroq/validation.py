"""Every check ``pyzeroq.quantize`` runs before (and right after the fx surgery, before) any
costly stage: argument types, a deep-copyable floating-point model, the input shape or the
calibration images, the model's output structure, the sensitivity measure it allows, float ops
the surgery left, and that the prepared graph still computes the float model.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ._checks import check_device, check_finite_model, check_model_state
from .config import QuantConfig
from .distill_genie import check_genie_shape
from .modules import is_normalizer, set_act_mode, set_weight_bits
from .outputs import check_output, output_leaves, resolve_measure

WORKING_DTYPE = torch.float32  # models of other float dtypes are quantized as a float32 copy
SURGERY_RTOL = 1e-3  # float model vs prepared graph (quantization off): BN folding reorders float ops
DRY_RUN_BATCH = 2  # images of the validation forward pass (eval mode); one image would look like an
# unbatched input to conv layers, letting an input_shape without its channel dimension through
# a model with input normalization takes float images in [0, 1]; calibration data reaching this
# far above are pixel values (0..255) given as floats (distilled images stay within a few units)
PIXEL_VALUES_THRESHOLD = 10.0
COPY_SEARCH_DEPTH = 16  # attribute levels searched for the part of a model deepcopy fails on


def _check_input_shape(input_shape) -> tuple[int, ...]:
    if not isinstance(input_shape, (tuple, list)) or not input_shape or \
            not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in input_shape):
        raise ValueError(f"input_shape must be a tuple of positive ints without the batch dimension, "
                         f"e.g. (1, 28, 28); got {input_shape!r}")
    return tuple(int(d) for d in input_shape)


class FloatOpsWarning(UserWarning):
    """Ops of the model that stay in float (listed in ``report.float_ops``)."""


SUPPORTED_OPS_HINT = "the README's 'Supported operators' table lists what pyzeroq quantizes"


def _check_float_ops(float_ops: list[str], mode: str) -> None:
    """QuantConfig.float_ops: raise ("error"), warn ("warn") or pass ("allow") when the surgery left
    ops in float."""
    if not float_ops or mode == "allow":
        return
    listing = f"{len(float_ops)} op(s) have no quantized or no integer-only form: {float_ops}"
    if mode == "error":
        raise ValueError(f"{listing}. Replace them with supported ops ({SUPPORTED_OPS_HINT}), or pass "
                         "QuantConfig(float_ops='warn') or 'allow' to keep them in float (to_integer and "
                         "export_onnx then refuse the model)")
    warnings.warn(f"{listing}; to_integer and export_onnx will refuse this model ({SUPPORTED_OPS_HINT})",
                  FloatOpsWarning, stacklevel=4)


def check_calibration_data(data, input_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``calibration_data`` as a float tensor [N, ...] (N >= 1), without copying.

    Accepts a float torch tensor or numpy array in the model's input domain. Raises
    TypeError for anything else (a tuple such as ``(images, labels)`` included: pass only
    the images) and ValueError for non-float values, no batch dimension, N == 0, NaN/Inf,
    or a sample shape other than ``input_shape`` (when given).
    """
    expected = "one float tensor or numpy array of images [N, C, H, W] in the model's input domain"
    if isinstance(data, (tuple, list)):
        raise TypeError(f"calibration_data must be {expected}; got a {type(data).__name__} of {len(data)} "
                        "items: pass only the images (not (images, labels))")
    if isinstance(data, np.ndarray):
        if not np.issubdtype(data.dtype, np.floating):
            raise ValueError(f"calibration_data must hold floats (e.g. uint8 pixels / 255), got dtype {data.dtype}")
        data = torch.from_numpy(np.ascontiguousarray(data))
    elif not isinstance(data, torch.Tensor):
        raise TypeError(f"calibration_data must be {expected}; got {type(data).__name__}")
    if not data.is_floating_point():
        raise ValueError(f"calibration_data must hold floats (e.g. uint8 pixels / 255), got dtype {data.dtype}")
    if data.dim() < 2:
        raise ValueError(f"calibration_data must be [N, ...] with a batch dimension first, "
                         f"got shape {tuple(data.shape)}")
    if data.shape[0] == 0:
        raise ValueError(f"calibration_data is empty (N = 0, shape {tuple(data.shape)})")
    if input_shape is not None and tuple(data.shape[1:]) != tuple(input_shape):
        raise ValueError(f"calibration_data samples have shape {tuple(data.shape[1:])} but input_shape is "
                         f"{tuple(input_shape)}")
    if not torch.isfinite(data).all():
        raise ValueError("calibration_data contains NaN or Inf")
    return data


def _children(obj, path: str):
    """(path, value) of what deepcopy of ``obj`` recurses into (modules by their child names)."""
    if isinstance(obj, dict):
        return [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    out = []
    for name, value in (getattr(obj, "__dict__", None) or {}).items():
        if isinstance(obj, nn.Module) and name in ("_modules", "_parameters", "_buffers"):
            out += [(f"{path}.{k}", v) for k, v in value.items()]
        else:
            out.append((f"{path}.{name}", value))
    return out


def _find_uncopyable(obj, path: str, seen: set, depth: int = 0):
    """(path, value, exception) of the innermost part of ``obj`` that deepcopy fails on, or None."""
    if depth > COPY_SEARCH_DEPTH or id(obj) in seen:
        return None
    seen.add(id(obj))
    for child_path, value in _children(obj, path):
        try:
            copy.deepcopy(value)
        except Exception as exc:  # whatever the attribute's __deepcopy__ / pickling raises
            return _find_uncopyable(value, child_path, seen, depth + 1) or (child_path, value, exc)
    return None


def _deepcopy_model(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        found = _find_uncopyable(model, "model", set())
        path, value, error = found if found is not None else ("model", model, exc)
        raise TypeError(f"model cannot be deep-copied (quantize works on a copy and never modifies the given "
                        f"model): {path} ({type(value).__name__}) fails with {type(error).__name__}: {error}; "
                        "remove that attribute or make it copyable (e.g. define __deepcopy__)") from exc


def _working_copy(model: nn.Module, device: str, notes: list[str]) -> nn.Module:
    """A float32, eval-mode copy of ``model`` on ``device``; a note when the dtype changed."""
    work = _deepcopy_model(model)
    not_float = [f"{n} ({p.dtype})" for n, p in work.named_parameters() if not p.is_floating_point()]
    if not_float:
        raise TypeError(f"model parameters must be floating point; not: {', '.join(not_float)}")
    tensors = list(work.parameters()) + [b for b in work.buffers() if b.is_floating_point()]
    dtypes = sorted({str(t.dtype) for t in tensors if t.dtype != WORKING_DTYPE})
    if dtypes:
        notes.append(f"the model holds {', '.join(dtypes)} tensors: a float32 copy was quantized "
                     "(the given model is unchanged)")
        work = work.float()
    return work.eval().to(device)


def _dry_forward(model: nn.Module, sample: torch.Tensor, argument: str) -> list:
    """One forward pass on ``sample``; its output leaves (:func:`pyzeroq.outputs.check_output`),
    ValueError naming ``argument`` when the model rejects it."""
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as exc:  # the model's own error, whatever its type
        raise ValueError(f"{argument} does not fit the model: a forward pass on a batch of shape "
                         f"{tuple(sample.shape)} failed with {type(exc).__name__}: {exc}") from exc
    return check_output(out, sample.shape[0], argument)


@contextmanager
def _normalizers_keep_shape(model: nn.Module, argument: str):
    """Around the dry forward pass: ValueError naming ``argument`` when an input normalization
    module's output has another shape than its input (per-channel statistics for another number of
    channels broadcast a 1-channel image to 3 channels; the integer model and the ONNX export
    would refuse the input only later)."""
    seen = []
    handles = [m.register_forward_hook(lambda m, i, o, name=name: seen.append((name, m, i[0].shape, o.shape)))
               for name, m in model.named_modules() if is_normalizer(m)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    for name, m, shape_in, shape_out in seen:
        if shape_in != shape_out:
            raise ValueError(f"{argument}: the model's input normalization {name!r} (mean / std of "
                             f"{m.mean.numel()} values) turns inputs of shape {tuple(shape_in)} into "
                             f"{tuple(shape_out)}: the input has another number of channels than its statistics")


def _check_input_domain(model: nn.Module, config: QuantConfig, data, notes: list[str]) -> None:
    """Models with an input normalization module take float images in [0, 1] (its range fixes the
    first quantizer): real calibration data far above 1 (pixel values 0..255 as floats) is an
    error; without such a module the synthetic data set the input range, which is noted."""
    if any(is_normalizer(m) for m in model.modules()):
        if data is not None and float(data.max()) > PIXEL_VALUES_THRESHOLD:
            raise ValueError(f"calibration_data must be float images in [0, 1] (the model normalizes its "
                             f"input), got values up to {float(data.max()):.4g}; divide uint8 pixels by 255")
    elif config.calibration != "real":
        notes.append("the model has no input normalization module (buffers mean / std), so the input "
                     "quantizer's range comes from the synthetic calibration data and may not match real "
                     "inputs: pass calibration='real' with calibration_data, or start the model with a "
                     "normalization module (pyzeroq.models.Normalize)")
    if data is not None and len(data) < config.num_samples:
        notes.append(f"calibration_data holds {len(data)} samples, fewer than num_samples={config.num_samples}: "
                     "all of them are used")


def _check_selection(selection, config: QuantConfig) -> None:
    from .pipeline import Selection  # the record type lives with the pipeline that makes it

    if selection is None:
        return
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be a pyzeroq.pipeline.Selection (QuantizedModel.selection), "
                        f"got {type(selection).__name__}")
    if not config.mixed_precision:
        raise ValueError("selection is only used with mixed precision (several weight_bits candidates)")
    if selection.candidates != config.weight_candidates:
        raise ValueError(f"selection was made over weight bits {selection.candidates}, "
                         f"config has {config.weight_candidates}")


def _validated_copy(model, config: QuantConfig, input_shape, selection, notes: list[str]):
    """Every cheap check before any expensive stage; (working copy, input_shape, real data or None)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a pyzeroq.QuantConfig, got {type(config).__name__}")
    check_device(config.device, "config.device")
    real = config.calibration == "real"
    shape = _check_input_shape(input_shape) if not real or input_shape is not None else None
    if config.calibration == "distilled" and config.distill_method == "genie":
        check_genie_shape(shape)  # the generator makes (C, H, W) images only
    data = check_calibration_data(config.calibration_data, shape) if real else None
    _check_selection(selection, config)
    check_model_state(model)
    check_finite_model(model)  # NaN / Inf weights would only surface as garbage or a late kernel error
    work = _working_copy(model, config.device, notes)
    _check_input_domain(work, config, data, notes)
    argument = "calibration_data" if real else f"input_shape={shape}"
    with _normalizers_keep_shape(work, argument):
        if real:
            sample = data[:1].expand(DRY_RUN_BATCH, *data.shape[1:])
            leaves = _dry_forward(work, sample.to(WORKING_DTYPE).to(config.device), argument)
        else:
            leaves = _dry_forward(work, torch.zeros((DRY_RUN_BATCH, *shape), device=config.device), argument)
    measure = resolve_measure(leaves, config.sensitivity)  # "kl" on a non-logits output fails here, early
    return work, shape, measure


def _check_surgery(work: nn.Module, gm: nn.Module, config: QuantConfig, shape) -> torch.Tensor:
    """The prepared graph with quantization off must compute what the model computes (BN
    folding, op rewiring) on a few seeded random images (returned); ValueError naming the largest
    difference otherwise (e.g. a BatchNorm1d after a Linear on [N, L, F] inputs, whose channels
    are not the Linear's features)."""
    if config.calibration == "real":
        sample = check_calibration_data(config.calibration_data)[:DRY_RUN_BATCH].to(WORKING_DTYPE)
    else:
        sample = torch.rand((DRY_RUN_BATCH, *shape), generator=torch.Generator().manual_seed(config.seed))
    sample = sample.to(config.device)
    set_act_mode(gm, "off")
    set_weight_bits(gm, None)
    with torch.no_grad():
        want, got = output_leaves(work(sample)), output_leaves(gm(sample))
    for w, g in zip(want, got):
        tol = SURGERY_RTOL * max(1.0, float(w.abs().max()))
        if w.shape != g.shape or not torch.allclose(g, w, rtol=SURGERY_RTOL, atol=tol):
            diff = float((g - w).abs().max()) if w.shape == g.shape else float("inf")
            raise ValueError(f"model: folding its BatchNorms / preparing its graph changed its float output (max "
                             f"difference {diff:.3g}); a BatchNorm that reads a Linear's output must normalize the "
                             "Linear's features (inputs [N, F])")
    return sample
