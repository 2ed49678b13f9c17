"""Argument checks shared by the public entry points (a leaf module: no pyzeroq imports).

Each check raises a TypeError / ValueError (or FileNotFoundError / PermissionError for an
output path) whose message names the offending argument, so that bad input fails before
any expensive stage with a message that says what to change.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import torch
from torch import nn

# the device types pyzeroq runs on (its C++ kernels run on the CPU; "meta" tensors hold no values)
DEVICE_TYPES = ("cpu", "cuda")
# what the command lines print as "error: <message>" instead of a traceback
USER_ERRORS = (ValueError, TypeError, OSError)


def is_int(value) -> bool:
    """An integer that is not a bool (``True`` is an int to Python, not to us)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_device(device, argument: str = "device") -> torch.device:
    """``device`` as a torch.device that this machine has; ValueError naming ``argument`` otherwise."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{argument} must be a string such as 'cpu' or 'cuda', got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"{argument} {str(device)!r} is not a torch device: {exc}") from exc
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"{argument} {str(device)!r}: pyzeroq runs on {' or '.join(map(repr, DEVICE_TYPES))} devices")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{argument} {str(device)!r}: CUDA is not available on this machine (use 'cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{argument} {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)")
    return dev


BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # those pyzeroq folds and distills from


def check_model_state(model: nn.Module, argument: str = "model") -> None:
    """TypeError / ValueError naming ``argument`` for a model pyzeroq cannot take as it is: a
    TorchScript module, uninitialized lazy parameters, a BatchNorm without running statistics
    (in eval mode it normalizes with the batch's: nothing to fold) or with a negative variance."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{argument} is a TorchScript module; pass the original nn.Module (pyzeroq traces it "
                        "with torch.fx and copies it)")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if isinstance(p, nn.parameter.UninitializedTensorMixin):
            raise ValueError(f"{argument} has uninitialized lazy parameters ({name!r}): run one forward pass "
                             "on an input of the right shape first")
    for name, m in model.named_modules():
        if not isinstance(m, BATCHNORM_TYPES):
            continue
        if m.running_mean is None or m.running_var is None:
            raise ValueError(f"{argument}: BatchNorm {name!r} keeps no running statistics "
                             "(track_running_stats=False): in eval mode it normalizes with each batch's own, "
                             "which cannot be folded into a quantized layer")
        if bool(((m.running_var < 0) & torch.isfinite(m.running_var)).any()):
            raise ValueError(f"{argument}: BatchNorm {name!r} has a negative running_var (not a variance): "
                             "the model is broken")


def check_finite_model(model: nn.Module, argument: str = "model") -> None:
    """ValueError naming the first parameter or floating-point buffer of ``model`` holding NaN / Inf."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all()):
            bad = int((~torch.isfinite(t.detach())).sum())
            kind = "parameter" if isinstance(t, nn.Parameter) else "buffer"
            raise ValueError(f"{argument} {kind} {name!r} contains NaN or Inf ({bad} of {t.numel()} values): "
                             "the model is broken (diverged training or a bad checkpoint?)")


def check_unit_images(images: torch.Tensor, taker: str, argument: str = "images") -> None:
    """ValueError naming ``argument`` when float ``images`` hold NaN / Inf or values outside
    [0, 1] (what ``taker``, e.g. "the models", take); an empty tensor passes."""
    if not images.numel():
        return
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{argument} contains NaN or Inf")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{argument} are floats in [{lo:g}, {hi:g}], {taker} take [0, 1]: pass uint8 pixels "
                         "or divide by 255")


def output_path(path, argument: str = "path", create_parents: bool = False) -> Path:
    """``path`` as a Path a file can be written to: TypeError for a non-path, FileNotFoundError
    when its directory does not exist (unless ``create_parents``: the writer makes it),
    ValueError when it is a directory or lies under a file, PermissionError when its directory
    is not writable. Checked before the work whose result would be written."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise TypeError(f"{argument} must be a file path (str or os.PathLike), got {type(path).__name__}")
    p = Path(path)
    if str(path) == "" or p.is_dir():
        raise ValueError(f"{argument} {str(path)!r} is a directory, not a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if create_parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{argument} {str(path)!r}: {str(parent)!r} is a file, not a directory")
    if not parent.is_dir():
        raise FileNotFoundError(f"{argument} {str(path)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise PermissionError(f"{argument} {str(path)!r}: not writable")
    return p


# OSErrors that say what is wrong with the path itself; any other OSError while reading a
# file (e.g. EINVAL from a truncated zip archive) means the content is broken
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def read_torch_file(path, what: str, argument: str = "path"):
    """``torch.load(path, weights_only=True)`` on the CPU: TypeError for a non-path, the path's own
    OSError (missing, a directory, no permission), ValueError naming the path for anything that does
    not load safely (not a torch file, truncated, pickled objects)."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise TypeError(f"{argument} must be a file path (str or os.PathLike), got {type(path).__name__}")
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except PATH_ERRORS:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip), EOFError, OSError (truncated), ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"{path} is not {what} that loads safely: torch.load(weights_only=True) refused it "
                         f"({type(exc).__name__}: {first})") from exc


def float_images(x):
    """``x`` unchanged when it is a floating-point tensor (or not a tensor); TypeError for integer
    pixels, which a fake-quant model would read as floats 0..255 (the integer model takes uint8)."""
    if isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"the fake-quant model takes float images in [0, 1], got a {x.dtype} tensor: divide uint8 "
                        "pixels by 255 (pyzeroq.to_integer's integer model takes them as they are)")
    return x
