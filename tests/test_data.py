import gzip
import struct

import numpy as np
import pytest

from pyzeroq import data
from pyzeroq.data import DatasetNotFoundError, load_fashion_mnist, read_idx


def _write_idx(path, array, magic, compress=True):
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)


def _fake_root(tmp_path, n=5, compress=True):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, data.IDX_IMAGES_MAGIC, compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, data.IDX_LABELS_MAGIC, compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_reads_idx_headers_and_payload(tmp_path, compress):
    images, labels = _fake_root(tmp_path, compress=compress)
    x, y = load_fashion_mnist("test", root=tmp_path)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels.astype(np.int64))
    assert x.dtype == np.uint8 and y.dtype == np.int64


def test_rejects_truncated_file(tmp_path):
    _fake_root(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(DatasetNotFoundError, match="truncated"):
        load_fashion_mnist("test", root=tmp_path)


def test_rejects_wrong_magic(tmp_path):
    path = tmp_path / "x.gz"
    _write_idx(path, np.zeros((2, 28, 28), np.uint8), 1234)
    with pytest.raises(DatasetNotFoundError, match="magic"):
        read_idx(path, data.IDX_IMAGES_MAGIC)


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)


@pytest.mark.parametrize("split", ["val", None, 3])
def test_bad_split(split):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(split)


def test_embedded_subset_matches_checksum_and_is_stratified():
    x, y = load_fashion_mnist("embedded")
    assert x.shape == (2000, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(y), [data.EMBEDDED_PER_CLASS] * data.NUM_CLASSES)


def test_embedded_checksum_mismatch_is_detected(tmp_path):
    x, y = load_fashion_mnist("embedded")
    bad = tmp_path / "bad.npz"
    x = x.copy()
    x[0, 0, 0] ^= 1
    np.savez_compressed(bad, images=x, labels=y)
    with pytest.raises(DatasetNotFoundError, match="checksum"):
        data.load_embedded(bad)


def test_embedded_subset_is_drawn_from_the_real_test_set():
    from conftest import fashion_mnist_installed
    if not fashion_mnist_installed():
        pytest.skip("dataset-fashion-mnist not installed")
    test_x, test_y = load_fashion_mnist("test")
    x, y = load_fashion_mnist("embedded")
    index = {img.tobytes(): lbl for img, lbl in zip(test_x, test_y)}
    assert all(index.get(img.tobytes()) == lbl for img, lbl in zip(x, y))
