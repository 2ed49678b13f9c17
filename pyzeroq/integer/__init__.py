"""Integer-only inference: the bit-exact integer ALU simulator (``simulate``)
and, later, the converter of quantized models (``to_integer``, in convert.py).
"""

from __future__ import annotations

import importlib

from .simulate import *  # noqa: F401,F403
from .simulate import __all__ as _simulate_all

__all__ = list(_simulate_all) + ["to_integer"]


# --- to_integer: provided by pyzeroq/integer/convert.py (added by the model-converter issue) ---
# Imported lazily so that the simulator works before / without the converter.
def __getattr__(name: str):
    if name == "to_integer":
        value = getattr(importlib.import_module(".convert", __name__), "to_integer")
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyzeroq.integer' has no attribute {name!r}")
