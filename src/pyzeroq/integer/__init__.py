"""Integer-only inference: the bit-exact integer ALU simulator (``simulate``), the typed
integer plan (``steps``) compiled from quantized models (``plan``) and the converter /
runtime ``to_integer`` with save / load (``convert``).

Errors: :class:`AccumulatorOverflowError` (simulator, ``overflow="error"``; the integer
model sets its ``layer``), :class:`PlanError` / :class:`UnsupportedOperationError` (``node``,
``op``) from compiling a model; all are ValueErrors.
"""

from __future__ import annotations

import importlib

from .simulate import *  # noqa: F401,F403
from .simulate import __all__ as _simulate_all

# name -> submodule; imported lazily so that the simulator works before / without the converter
_LAZY = {
    "to_integer": "convert", "load_integer": "convert", "IntegerModel": "convert", "IntegerReport": "convert",
    "compile_plan": "plan", "IntegerPlan": "plan", "PlanError": "plan", "UnsupportedOperationError": "plan",
    "Step": "steps", "InputStep": "steps", "ConvStep": "steps", "LinearStep": "steps", "LogitsStep": "steps",
    "AddStep": "steps", "GlobalAvgPoolStep": "steps", "AvgPoolStep": "steps", "MaxPoolStep": "steps",
    "RequantStep": "steps", "ClampStep": "steps", "ReshapeStep": "steps", "LookupStep": "steps",
    "ConcatStep": "steps", "DequantStep": "steps", "LayoutStep": "steps", "MulStep": "steps", "STEP_TYPES": "steps",
    "code_drift": "drift", "DriftReport": "drift", "LayerDrift": "drift", "integer_exact": "exact",
    "GemmlowpRangeWarning": "report", "gemmlowp_risks": "report",
}

__all__ = list(_simulate_all) + list(_LAZY)  # noqa: F405


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyzeroq.integer' has no attribute {name!r}")
