""""Fashion-MNIST scenes": a deterministic synthetic detection data set.

Each scene is a ``CANVAS x CANVAS`` uint8 grey image with a textured background
(smooth low-frequency noise plus fine noise, values in ``[0, BACKGROUND_MAX]``)
onto which 1-6 Fashion-MNIST items are pasted:

* every item is rescaled by a factor drawn log-uniformly from
  ``[MIN_SCALE, MAX_SCALE]`` (0.5x-3x, i.e. 14-84 px) with antialiased bilinear
  interpolation (torch ``F.interpolate``), rounded to uint8; interpolation
  fringes below ``ITEM_MIN_VALUE`` are set to 0;
* **the box is the tight box of the rescaled item's nonzero pixels** (after that
  clean-up): ``x1 = first nonzero column``, ``x2 = last nonzero column + 1``
  (pixel-edge convention, so a box covers whole pixel squares; COCO ``bbox`` is
  ``[x1, y1, x2 - x1, y2 - y1]``);
* the item is placed at a uniformly random position with its box fully inside the
  canvas; partial overlap is allowed (a placement is rejected and redrawn when its
  box has IoU > ``MAX_IOU`` with an earlier box or covers more than
  ``MAX_COVER`` of an earlier box; after ``PLACEMENT_TRIES`` failures the item is
  dropped, the first item always fits);
* pasting replaces the canvas where the item is nonzero, so later items occlude
  earlier ones.

The train split draws items from the Fashion-MNIST training images, the test split
from the test images only. Same arguments -> same scenes (numpy PCG64 seeded by
``(seed, split)``; torch's CPU bilinear resize is deterministic).

COCO categories use ``category_id = label + 1`` (COCO ids start at 1); detectors
predict ``labels`` 0..9 (Fashion-MNIST class indices).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, load_fashion_mnist

CANVAS = 96
MIN_ITEMS, MAX_ITEMS = 1, 6
MIN_SCALE, MAX_SCALE = 0.5, 3.0
ITEM_MIN_VALUE = 16          # rescaled item pixels below this are interpolation fringe -> 0
BACKGROUND_MAX = 40          # background texture values lie in [0, BACKGROUND_MAX]
BACKGROUND_GRID = 8          # low-frequency noise: a GRID x GRID field upsampled to the canvas
BACKGROUND_FINE = 0.35       # share of the background amplitude given to per-pixel noise
MAX_IOU = 0.3
MAX_COVER = 0.35
PLACEMENT_TRIES = 20
SPLITS = ("train", "test")
_SPLIT_CODE = {"train": 1, "test": 2}
CATEGORY_OFFSET = 1          # COCO category_id = label + CATEGORY_OFFSET
MAX_SCENES = 1_000_000       # make_scenes refuses more (~9 GB of uint8 images) up front


@lru_cache(maxsize=2)
def _source(split: str) -> tuple[np.ndarray, np.ndarray]:
    return load_fashion_mnist(split)


def _rescale(item: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(item).float().view(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=size < IMAGE_SIZE)
    out = out.round().clamp(0, 255).to(torch.uint8).view(size, size).numpy()
    out[out < ITEM_MIN_VALUE] = 0
    return out


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = torch.from_numpy(rng.random((1, 1, BACKGROUND_GRID, BACKGROUND_GRID), dtype=np.float32))
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    smooth = smooth.clamp(0, 1).view(size, size).numpy()
    fine = rng.random((size, size), dtype=np.float32)
    bg = ((1 - BACKGROUND_FINE) * smooth + BACKGROUND_FINE * fine) * BACKGROUND_MAX
    return np.clip(np.round(bg), 0, BACKGROUND_MAX).astype(np.uint8)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2) of the nonzero pixels of a 2-D mask, pixel-edge convention; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _iou_cover(box, others: list) -> tuple[float, float]:
    """Max IoU of ``box`` with ``others`` and max fraction of an other box it covers."""
    best_iou = best_cover = 0.0
    x1, y1, x2, y2 = box
    area = (x2 - x1) * (y2 - y1)
    for ox1, oy1, ox2, oy2 in others:
        iw = max(0, min(x2, ox2) - max(x1, ox1))
        ih = max(0, min(y2, oy2) - max(y1, oy1))
        inter = iw * ih
        oarea = (ox2 - ox1) * (oy2 - oy1)
        best_iou = max(best_iou, inter / (area + oarea - inter))
        best_cover = max(best_cover, inter / oarea)
    return best_iou, best_cover


def generate(rng: np.random.Generator, split: str, num_images: int, canvas: int = CANVAS
             ) -> tuple[np.ndarray, list[list[tuple[int, int, int, int, int]]]]:
    """Draw ``num_images`` scenes from ``rng``: (uint8 [N, canvas, canvas], per image a
    list of (x1, y1, x2, y2, label))."""
    images_src, labels_src = _source(split)
    max_size = min(int(round(IMAGE_SIZE * MAX_SCALE)), canvas)
    images = np.empty((num_images, canvas, canvas), dtype=np.uint8)
    objects = []
    for i in range(num_images):
        img = _background(rng, canvas)
        boxes: list[tuple[int, int, int, int]] = []
        objs = []
        for _ in range(int(rng.integers(MIN_ITEMS, MAX_ITEMS + 1))):
            idx = int(rng.integers(len(images_src)))
            scale = float(np.exp(rng.uniform(np.log(MIN_SCALE), np.log(MAX_SCALE))))
            size = int(np.clip(round(IMAGE_SIZE * scale), 2, max_size))
            item = _rescale(images_src[idx], size)
            box = tight_box(item)
            if box is None:
                continue
            bx1, by1, bx2, by2 = box
            for _try in range(PLACEMENT_TRIES):
                # position of the box's top-left corner; the box lies fully inside the canvas
                px = int(rng.integers(0, canvas - (bx2 - bx1) + 1))
                py = int(rng.integers(0, canvas - (by2 - by1) + 1))
                placed = (px, py, px + bx2 - bx1, py + by2 - by1)
                iou, cover = _iou_cover(placed, boxes)
                if iou <= MAX_IOU and cover <= MAX_COVER:
                    break
            else:
                continue
            crop = item[by1:by2, bx1:bx2]
            region = img[placed[1]:placed[3], placed[0]:placed[2]]
            np.copyto(region, crop, where=crop > 0)
            boxes.append(placed)
            objs.append((*placed, int(labels_src[idx])))
        images[i] = img
        objects.append(objs)
    return images, objects


def to_coco(objects, canvas: int = CANVAS, split: str = "test") -> dict:
    """COCO-format annotation dict for per-image object lists (x1, y1, x2, y2, label)."""
    images, annotations = [], []
    ann_id = 1
    for i, objs in enumerate(objects):
        images.append({"id": i + 1, "width": canvas, "height": canvas, "file_name": f"{split}_{i:06d}.png"})
        for x1, y1, x2, y2, label in objs:
            w, h = float(x2 - x1), float(y2 - y1)
            annotations.append({"id": ann_id, "image_id": i + 1, "category_id": int(label) + CATEGORY_OFFSET,
                                "bbox": [float(x1), float(y1), w, h], "area": w * h, "iscrowd": 0})
            ann_id += 1
    categories = [{"id": c + CATEGORY_OFFSET, "name": CLASS_NAMES[c]} for c in range(NUM_CLASSES)]
    return {"info": {"description": f"Fashion-MNIST scenes ({split})"}, "images": images,
            "annotations": annotations, "categories": categories}


def make_scenes(split: str = "test", num_images: int = 2000, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Deterministic Fashion-MNIST scenes: (uint8 images [N, 96, 96], COCO annotation dict)."""
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(num_images, (int, np.integer)) or isinstance(num_images, bool) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if num_images > MAX_SCENES:
        raise ValueError(f"num_images must be at most {MAX_SCENES} ({CANVAS}x{CANVAS} bytes each), got {num_images!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.Generator(np.random.PCG64([int(seed), _SPLIT_CODE[split]]))
    images, objects = generate(rng, split, int(num_images))
    return images, to_coco(objects, split=split)


def coco_to_targets(coco: dict, num_images: int | None = None) -> list[dict]:
    """Per image {"boxes": float [M, 4] x1y1x2y2, "labels": int64 [M]} from a COCO dict."""
    ids = [img["id"] for img in coco["images"]]
    index = {img_id: i for i, img_id in enumerate(ids)}
    boxes: list[list] = [[] for _ in ids]
    labels: list[list] = [[] for _ in ids]
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        i = index[ann["image_id"]]
        boxes[i].append([x, y, x + w, y + h])
        labels[i].append(ann["category_id"] - CATEGORY_OFFSET)
    return [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
             "labels": torch.tensor(l, dtype=torch.int64)} for b, l in zip(boxes, labels)]


def targets_from_objects(objects) -> list[dict]:
    return [{"boxes": torch.tensor([o[:4] for o in objs], dtype=torch.float32).reshape(-1, 4),
             "labels": torch.tensor([o[4] for o in objs], dtype=torch.int64)} for objs in objects]
