"""Fashion-MNIST scenes: determinism, exact boxes, COCO format."""

import numpy as np
import pytest

from pyzeroq.detection import scenes
from pyzeroq.detection.scenes import make_scenes, tight_box


def test_same_arguments_same_scenes():
    a_img, a_coco = make_scenes("test", 12, seed=3)
    b_img, b_coco = make_scenes("test", 12, seed=3)
    assert a_img.dtype == np.uint8 and a_img.shape == (12, scenes.CANVAS, scenes.CANVAS)
    assert np.array_equal(a_img, b_img)
    assert a_coco == b_coco
    c_img, _ = make_scenes("test", 12, seed=4)
    assert not np.array_equal(a_img, c_img)
    d_img, _ = make_scenes("train", 12, seed=3)
    assert not np.array_equal(a_img, d_img)


def test_counts_and_boxes_inside_canvas():
    _, coco = make_scenes("test", 40, seed=0)
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=41)[1:]
    assert per_image.min() >= scenes.MIN_ITEMS and per_image.max() <= scenes.MAX_ITEMS
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= scenes.CANVAS and y + h <= scenes.CANVAS and w > 0 and h > 0
        assert 1 <= a["category_id"] <= 10 and a["area"] == w * h


def test_tight_box():
    m = np.zeros((10, 12), dtype=np.uint8)
    assert tight_box(m) is None
    m[2, 3] = 1
    m[6, 9] = 5
    assert tight_box(m) == (3, 2, 10, 7)


def test_boxes_are_exact_tight_boxes(monkeypatch):
    # one item per scene on a black background: the box must be the tight box of the nonzero pixels
    monkeypatch.setattr(scenes, "MAX_ITEMS", 1)
    monkeypatch.setattr(scenes, "_background",
                        lambda rng, size: (rng.random((1,)), np.zeros((size, size), np.uint8))[1])
    images, coco = make_scenes("test", 20, seed=1)
    assert len(coco["annotations"]) == 20
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert tight_box(images[a["image_id"] - 1] > 0) == (x, y, x + w, y + h)


def test_pycocotools_reads_it_and_bad_args():
    from pycocotools.coco import COCO
    _, coco = make_scenes("test", 5, seed=0)
    gt = COCO()
    gt.dataset = coco
    gt.createIndex()
    assert len(gt.getImgIds()) == 5 and len(gt.getCatIds()) == 10
    with pytest.raises(ValueError, match="split"):
        make_scenes("val", 5)
    with pytest.raises(ValueError, match="num_images"):
        make_scenes("test", 0)
