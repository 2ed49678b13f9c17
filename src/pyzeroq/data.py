"""Fashion-MNIST loading (IDX files from the Debian package) and the embedded subset.

The IDX format: a big-endian header (magic number, then one uint32 per dimension)
followed by raw uint8 data. Images have magic 2051 and 3 dimensions, labels 2049
and 1 dimension. Files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
NUM_CLASSES = 10
IMAGE_SIZE = 28
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
EMBEDDED_PATH = Path(__file__).parent / "models" / "fashion_mnist_embedded.npz"
# sha256 of the embedded subset's image bytes then int64 label bytes; checked on every load.
EMBEDDED_SHA256 = "f903fa49bb0924940b1bfa2696b5285b1b9870455e50d9ec8ec6916e8733c303"
EMBEDDED_PER_CLASS = 200


class DatasetNotFoundError(FileNotFoundError):
    """Raised when the Fashion-MNIST IDX files cannot be found or parsed."""


def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install the Debian package "
        f"'{DEBIAN_PACKAGE}' (apt-get install -y {DEBIAN_PACKAGE}) or pass root= pointing at "
        f"the directory with the IDX files.")


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Parse one IDX file (optionally gzip'd) into a uint8 array, validating its header."""
    path = Path(path)
    try:
        with _open_idx(path) as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetNotFoundError(f"cannot read IDX file {path}: {exc} "
                                   f"(from Debian package '{DEBIAN_PACKAGE}'?)") from exc
    if len(raw) < 8:
        raise DatasetNotFoundError(f"IDX file {path} is truncated: {len(raw)} bytes, no header")
    magic, = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DatasetNotFoundError(f"IDX file {path} has magic number {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetNotFoundError(f"IDX file {path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise DatasetNotFoundError(
            f"IDX file {path} is truncated or corrupt: header {dims} needs {count} bytes of data, "
            f"found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_fashion_mnist(split: str = "test", root: str | os.PathLike | None = None):
    """Return (uint8 images [N, 28, 28], int64 labels [N]) for split 'train', 'test' or 'embedded'.

    'embedded' is a class-stratified 2,000-image subset of the test set shipped with
    the package (checksum-verified); the others read the IDX files from ``root``
    (default: where the Debian package installs them).
    """
    if not isinstance(split, str) or split not in ("train", "test", "embedded"):
        raise ValueError(f"split must be 'train', 'test' or 'embedded', got {split!r}")
    if split == "embedded":
        return load_embedded()
    if root is not None and (not isinstance(root, (str, os.PathLike)) or isinstance(root, bytes)):
        raise TypeError(f"root must be a directory path (str or os.PathLike) or None, got {type(root).__name__}")
    root = Path(root) if root is not None else DEFAULT_ROOT
    if root.exists() and not root.is_dir():
        raise DatasetNotFoundError(f"root {str(root)!r} is a file; pass the directory holding the Fashion-MNIST "
                                   "IDX files")
    image_stem, label_stem = _FILES[split]
    images = read_idx(_find(root, image_stem), IDX_IMAGES_MAGIC)
    labels = read_idx(_find(root, label_stem), IDX_LABELS_MAGIC).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetNotFoundError(f"unexpected image shape {images.shape} in {root}")
    if len(images) != len(labels):
        raise DatasetNotFoundError(f"{len(images)} images but {len(labels)} labels in {root}")
    return images, labels


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    root = Path(root) if root is not None else DEFAULT_ROOT
    try:
        for stem in _FILES["test"]:
            _find(root, stem)
    except DatasetNotFoundError:
        return False
    return True


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def load_embedded(path: str | os.PathLike = EMBEDDED_PATH, expected_sha256: str = EMBEDDED_SHA256):
    """The committed evaluation subset, verified against its recorded checksum."""
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(f"embedded subset missing at {path}; reinstall pyzeroq")
    with np.load(path) as archive:
        images, labels = archive["images"], archive["labels"].astype(np.int64)
    actual = _digest(images, labels)
    if actual != expected_sha256:
        raise DatasetNotFoundError(f"embedded subset {path} checksum mismatch: {actual} != {expected_sha256}")
    return images, labels


def make_embedded_subset(per_class: int = EMBEDDED_PER_CLASS, seed: int = 0, root=None,
                         path: str | os.PathLike = EMBEDDED_PATH) -> str:
    """Write the stratified test subset (``per_class`` images of every class) and return its sha256."""
    images, labels = load_fashion_mnist("test", root)
    rng = np.random.default_rng(seed)
    picks = np.concatenate([np.sort(rng.choice(np.flatnonzero(labels == c), per_class, replace=False))
                            for c in range(NUM_CLASSES)])
    picks.sort()
    sub_images, sub_labels = images[picks], labels[picks]
    digest = _digest(sub_images, sub_labels)
    np.savez_compressed(path, images=sub_images, labels=sub_labels)
    return digest
