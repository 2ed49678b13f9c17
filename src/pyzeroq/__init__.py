"""pyzeroq: zero-shot quantization for PyTorch.

Public API (see README):

    import pyzeroq as zq
    qmodel = zq.quantize(model, zq.QuantConfig(weight_bits=8, act_bits=8), input_shape=(1, 28, 28))
    int_model = zq.to_integer(qmodel)
    zq.export_onnx(qmodel, "model.onnx", example_input)

Submodules are imported on first use so that ``import pyzeroq`` stays cheap.
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# Developer/CI hook: a directory holding an alternative build of the extension
# (e.g. the sanitizer build CI runs the kernel tests under) is searched first.
_CORE_DIR_ENV = "PYZEROQ_CORE_DIR"
if os.environ.get(_CORE_DIR_ENV):
    __path__.insert(0, os.path.abspath(os.environ[_CORE_DIR_ENV]))  # noqa: F821 (package __path__)

# public name -> (module, attribute)
_LAZY = {
    "QuantConfig": ("pyzeroq.config", "QuantConfig"),
    "ReconstructionConfig": ("pyzeroq.config", "ReconstructionConfig"),
    "quantize": ("pyzeroq.pipeline", "quantize"),
    "QuantizedModel": ("pyzeroq.pipeline", "QuantizedModel"),  # what quantize returns
    "evaluate": ("pyzeroq.evaluation", "evaluate"),
    "to_integer": ("pyzeroq.integer.convert", "to_integer"),
    "integer_exact": ("pyzeroq.integer.exact", "integer_exact"),
    "export_onnx": ("pyzeroq.export", "export_onnx"),
    "load": ("pyzeroq.io", "load"),
    "set_num_threads": ("pyzeroq.threads", "set_num_threads"),
    "get_num_threads": ("pyzeroq.threads", "get_num_threads"),
}
_SUBMODULES = ("ops", "data", "models", "pareto", "integer", "detection", "distill", "distill_genie",
               "sensitivity", "modules", "config", "export", "cli", "pipeline", "io", "threads", "reconstruct")

__all__ = sorted(_LAZY) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        value = importlib.import_module(f"pyzeroq.{name}")
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyzeroq' has no attribute {name!r}")


def __dir__():
    return __all__
