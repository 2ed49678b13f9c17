"""Integer-only inference: the bit-exact integer ALU simulator (``simulate``), the
graph planning of quantized models into integer steps (``plan``) and the converter /
runtime ``to_integer`` (``convert``).
"""

from __future__ import annotations

import importlib

from .simulate import *  # noqa: F401,F403
from .simulate import __all__ as _simulate_all

__all__ = list(_simulate_all) + ["to_integer"]  # noqa: F405


# --- to_integer lives in convert.py (with torch / fx imports) ---
# Imported lazily so that the simulator works before / without the converter.
def __getattr__(name: str):
    if name == "to_integer":
        value = importlib.import_module(".convert", __name__).to_integer
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyzeroq.integer' has no attribute {name!r}")
