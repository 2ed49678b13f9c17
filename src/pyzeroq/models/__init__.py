"""Reference model zoo: BN-based nets trained here on Fashion-MNIST, with checked checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .layers import Normalize
from .mobilenet import MobileNetV2, mobilenetv2
from .resnet import ResNet20, resnet20

_BUILDERS = {"resnet20": resnet20, "mobilenetv2": mobilenetv2}
CHECKPOINT_DIR = Path(__file__).parent
REGISTRY_PATH = CHECKPOINT_DIR / "checkpoints.json"
MODEL_NAMES = tuple(_BUILDERS)

__all__ = ["MODEL_NAMES", "build_model", "load_pretrained", "Normalize", "ResNet20", "MobileNetV2",
           "resnet20", "mobilenetv2", "ChecksumError"]


class ChecksumError(RuntimeError):
    """A committed checkpoint does not match the checksum recorded for it."""


def _check_name(name) -> str:
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    return name


def build_model(name: str) -> nn.Module:
    """A freshly initialized (untrained) reference model."""
    return _BUILDERS[_check_name(name)]()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def registry() -> dict:
    """The recorded checkpoints: file, sha256, accuracy on the embedded subset and full test set."""
    return json.loads(REGISTRY_PATH.read_text()) if REGISTRY_PATH.exists() else {}


def load_pretrained(name: str) -> nn.Module:
    """The committed trained model ``name`` in eval mode, after verifying its checksum."""
    _check_name(name)
    entry = registry().get(name)
    if entry is None:
        raise FileNotFoundError(f"no committed checkpoint for {name!r} (train it: python -m pyzeroq.models.train {name})")
    path = CHECKPOINT_DIR / entry["file"]
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise ChecksumError(f"checkpoint {path} has sha256 {digest}, expected {entry['sha256']}")
    model = build_model(name)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
