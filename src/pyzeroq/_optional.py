"""Optional dependencies: imported on first use, with an error naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` naming the pip extra that provides it.

    ``extra``: one of the ``[project.optional-dependencies]`` of pyproject.toml
    ("onnx", "detection", "plot", "all"); ``feature``: what needed it (for the message).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{feature} needs the optional dependency {module.split('.')[0]!r}: "
                          f"pip install 'pyzeroq[{extra}]' (or 'pyzeroq[all]')") from exc
