"""A small FCOS-style one-stage detector with BatchNorm throughout.

Backbone: ResNet-style (stem conv stride 2, then one BasicBlock per stage, each
stride 2) -> C3, C4, C5 at strides 8, 16, 32 (12x12, 6x6, 3x3 on a 96x96 canvas).
FPN: 1x1 lateral conv-BN, nearest top-down upsampling + add, 3x3 output conv-BN.
Head (FCOS, Tian et al. 2019): conv towers *shared* across levels with one BN per
level (shared BN statistics across levels would mix three distributions, and the
data synthesis matches each BN's statistics), a class-logit conv (focal loss), a
box conv (distances l, t, r, b = exp(s_level * x) * stride, GIoU loss) and a
centerness conv (BCE); positives by FCOS size ranges and center sampling.
Traceable by torch.fx (fixed Python loops only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data import NUM_CLASSES
from ..models.layers import Normalize
from .distributed import global_sum
from .interface import DEFAULT_IOU_THRESHOLD, DEFAULT_SCORE_THRESHOLD, MAX_DETECTIONS, Detector
from .nms import batched_nms, giou_loss
from .scenes import CANVAS

# Pixel statistics of the train scenes (make_scenes("train", 2000)), in [0, 1].
SCENE_MEAN = 0.209
SCENE_STD = 0.257
STRIDES = (8, 16, 32)
# FCOS size ranges: a location on level l regresses objects with max(l, t, r, b) in
# (SIZE_RANGES[l], SIZE_RANGES[l + 1]].
SIZE_RANGES = (0.0, 24.0, 48.0, math.inf)
CENTER_RADIUS = 1.5            # center sampling radius, in strides
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
PRIOR_PROB = 0.01
MAX_LOG_DISTANCE = 6.0         # clamp of the box logits before exp
PRE_NMS_TOP_K = 200            # candidates per level before NMS
DEFAULT_WIDTHS = (16, 32, 48, 64, 96)


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn_act(cin, cout, 3, stride)
        self.conv2 = conv_bn_act(cout, cout, 3, 1, act=False)
        self.shortcut = conv_bn_act(cin, cout, 1, stride, act=False) if (stride != 1 or cin != cout) \
            else nn.Identity()
        self.act = nn.ReLU(inplace=False)

    def forward(self, x):
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale


class FCOSDetector(Detector):
    """FCOS-style detector for 1-channel images in [0, 1]; see the module docstring."""

    # loss() divides by the positive count / box weight summed over data-parallel processes
    global_loss_normalization = True

    def __init__(self, num_classes: int = NUM_CLASSES, widths=DEFAULT_WIDTHS, fpn_width: int = 48,
                 head_convs: int = 2, input_size: int = CANVAS):
        super().__init__()
        self.config = {"num_classes": num_classes, "widths": tuple(widths), "fpn_width": fpn_width,
                       "head_convs": head_convs, "input_size": input_size}
        self.num_classes = num_classes
        self.input_size = input_size
        w = widths
        self.normalize = Normalize((SCENE_MEAN,), (SCENE_STD,))
        self.stem = conv_bn_act(1, w[0], 3, 2)
        self.layer1 = BasicBlock(w[0], w[1], 2)   # stride 4
        self.layer2 = BasicBlock(w[1], w[2], 2)   # stride 8  (C3)
        self.layer3 = BasicBlock(w[2], w[3], 2)   # stride 16 (C4)
        self.layer4 = BasicBlock(w[3], w[4], 2)   # stride 32 (C5)
        self.lateral = nn.ModuleList([conv_bn_act(c, fpn_width, 1, act=False) for c in w[2:]])
        self.fpn_out = nn.ModuleList([conv_bn_act(fpn_width, fpn_width, 3, act=False) for _ in w[2:]])
        n_levels = len(STRIDES)
        self.cls_convs = nn.ModuleList([nn.Conv2d(fpn_width, fpn_width, 3, 1, 1, bias=False)
                                        for _ in range(head_convs)])
        self.reg_convs = nn.ModuleList([nn.Conv2d(fpn_width, fpn_width, 3, 1, 1, bias=False)
                                        for _ in range(head_convs)])
        # one BN per (level, tower layer): index level * head_convs + layer
        self.cls_bns = nn.ModuleList([nn.BatchNorm2d(fpn_width) for _ in range(n_levels * head_convs)])
        self.reg_bns = nn.ModuleList([nn.BatchNorm2d(fpn_width) for _ in range(n_levels * head_convs)])
        self.cls_out = nn.Conv2d(fpn_width, num_classes, 3, 1, 1)
        self.reg_out = nn.Conv2d(fpn_width, 4, 3, 1, 1)
        self.ctr_out = nn.Conv2d(fpn_width, 1, 3, 1, 1)
        self.scales = nn.ModuleList([Scale() for _ in range(n_levels)])
        self.head_convs = head_convs
        for m in (self.cls_out, self.reg_out, self.ctr_out, *self.cls_convs, *self.reg_convs):
            nn.init.normal_(m.weight, std=0.01)
        for m in (self.cls_out, self.reg_out, self.ctr_out):
            nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        self.feature_modules = tuple(f"fpn_out.{i}" for i in range(n_levels))
        self.head_modules = ("cls_out", "reg_out", "ctr_out")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> dict:
        x = self.normalize(x)
        x = self.stem(x)
        x = self.layer1(x)
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        p5 = self.lateral[2](c5)
        p4 = self.lateral[1](c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest")
        p3 = self.lateral[0](c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        feats = [self.fpn_out[0](p3), self.fpn_out[1](p4), self.fpn_out[2](p5)]
        cls, reg, ctr = [], [], []
        for level, f in enumerate(feats):
            c, r = f, f
            for j in range(self.head_convs):
                c = F.relu(self.cls_bns[level * self.head_convs + j](self.cls_convs[j](c)))
                r = F.relu(self.reg_bns[level * self.head_convs + j](self.reg_convs[j](r)))
            cls.append(self.cls_out(c))
            reg.append(self.scales[level](self.reg_out(r)))
            ctr.append(self.ctr_out(r))
        return {"cls": cls, "reg": reg, "ctr": ctr}

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def points(sizes: list[tuple[int, int]], device) -> list[torch.Tensor]:
        """Location centers (x, y) per level, [H*W, 2] in pixels."""
        pts = []
        for (h, w), s in zip(sizes, STRIDES):
            ys = torch.arange(h, device=device, dtype=torch.float32) * s + s // 2
            xs = torch.arange(w, device=device, dtype=torch.float32) * s + s // 2
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
        return pts

    @staticmethod
    def _flatten(outputs: dict, key: str) -> torch.Tensor:
        """[N, C, H, W] per level -> [N, sum(H*W), C]."""
        return torch.cat([t.flatten(2).transpose(1, 2) for t in outputs[key]], 1)

    def _distances(self, outputs: dict) -> torch.Tensor:
        strides = torch.cat([torch.full((t.shape[2] * t.shape[3],), float(s), device=t.device)
                             for t, s in zip(outputs["reg"], STRIDES)])
        return torch.exp(self._flatten(outputs, "reg").clamp(max=MAX_LOG_DISTANCE)) * strides[None, :, None]

    def assign(self, points: list[torch.Tensor], target: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """FCOS targets for one image: (label per location, -1 = background; box [P, 4])."""
        pts = torch.cat(points)
        n_pts = len(pts)
        boxes, labels = target["boxes"].to(pts.device), target["labels"].to(pts.device)
        if len(boxes) == 0:
            return torch.full((n_pts,), -1, dtype=torch.int64, device=pts.device), pts.new_zeros(n_pts, 4)
        level_stride = torch.cat([torch.full((len(p),), float(s), device=pts.device) for p, s in zip(points, STRIDES)])
        lo = torch.cat([torch.full((len(p),), SIZE_RANGES[i], device=pts.device) for i, p in enumerate(points)])
        hi = torch.cat([torch.full((len(p),), SIZE_RANGES[i + 1], device=pts.device) for i, p in enumerate(points)])
        x, y = pts[:, 0:1], pts[:, 1:2]
        ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], 2)  # [P, M, 4]
        in_box = ltrb.min(2).values > 0
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        rad = level_stride[:, None] * CENTER_RADIUS
        in_center = ((x - torch.maximum(cx - rad, boxes[:, 0])) > 0) & ((torch.minimum(cx + rad, boxes[:, 2]) - x) > 0) \
            & ((y - torch.maximum(cy - rad, boxes[:, 1])) > 0) & ((torch.minimum(cy + rad, boxes[:, 3]) - y) > 0)
        max_reg = ltrb.max(2).values
        ok = in_box & in_center & (max_reg > lo[:, None]) & (max_reg <= hi[:, None])
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None, :].expand(n_pts, -1)
        area = torch.where(ok, area, torch.full_like(area, math.inf))
        best_area, best = area.min(1)
        lab = torch.where(torch.isfinite(best_area), labels[best], torch.full_like(best, -1))
        return lab, boxes[best]

    # ------------------------------------------------------------------ loss
    def loss(self, outputs: dict, targets: list[dict], reduce: bool = True):
        sizes = [tuple(t.shape[2:]) for t in outputs["cls"]]
        device = outputs["cls"][0].device
        points = self.points(sizes, device)
        pts = torch.cat(points)
        cls = self._flatten(outputs, "cls")            # [N, P, C]
        ctr = self._flatten(outputs, "ctr")[..., 0]    # [N, P]
        dist = self._distances(outputs)                # [N, P, 4]
        assigned = [self.assign(points, t) for t in targets]
        labels = torch.stack([a[0] for a in assigned])  # [N, P]
        gt = torch.stack([a[1] for a in assigned])      # [N, P, 4]
        pos = labels >= 0
        p = pts[None].expand(len(targets), -1, -1)[pos]
        g = gt[pos]
        lr_ = torch.stack([p[:, 0] - g[:, 0], g[:, 2] - p[:, 0]], 1)
        tb = torch.stack([p[:, 1] - g[:, 1], g[:, 3] - p[:, 1]], 1)
        ctr_t = torch.sqrt((lr_.min(1).values / lr_.max(1).values).clamp(min=0) *
                           (tb.min(1).values / tb.max(1).values).clamp(min=0))
        # normalizers: summed over the processes of a data-parallel step (identity otherwise)
        norms = global_sum(torch.stack([pos.sum().to(ctr_t.dtype), ctr_t.sum()]))
        num_pos = max(norms[0].item(), 1.0)
        onehot = torch.zeros_like(cls)
        onehot[pos] = F.one_hot(labels[pos], self.num_classes).to(cls.dtype)
        cls_loss = sigmoid_focal_loss(cls, onehot).sum() / num_pos
        if pos.any():
            d = dist[pos]
            pred_boxes = torch.cat([p - d[:, :2], p + d[:, 2:]], 1)
            reg_loss = (giou_loss(pred_boxes, g) * ctr_t).sum() / norms[1].clamp(min=1e-6)
            ctr_loss = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t, reduction="sum") / num_pos
        else:
            reg_loss = ctr_loss = dist.sum() * 0
        parts = {"cls": cls_loss, "reg": reg_loss, "ctr": ctr_loss}
        total = cls_loss + reg_loss + ctr_loss
        return total if reduce else (total, parts)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode(self, outputs: dict, score_threshold: float = DEFAULT_SCORE_THRESHOLD,
               iou_threshold: float = DEFAULT_IOU_THRESHOLD, max_detections: int = MAX_DETECTIONS) -> list[dict]:
        sizes = [tuple(t.shape[2:]) for t in outputs["cls"]]
        points = self.points(sizes, outputs["cls"][0].device)
        level_sizes = [len(p) for p in points]
        pts = torch.cat(points)
        scores_all = torch.sqrt(torch.sigmoid(self._flatten(outputs, "cls")) *
                                torch.sigmoid(self._flatten(outputs, "ctr")))   # [N, P, C]
        dist = self._distances(outputs)
        results = []
        for n in range(scores_all.shape[0]):
            boxes_l, scores_l, labels_l = [], [], []
            start = 0
            for size in level_sizes:
                s = scores_all[n, start:start + size]          # [size, C]
                flat = s.reshape(-1)
                keep = torch.nonzero(flat > score_threshold).squeeze(1)
                if len(keep) > PRE_NMS_TOP_K:
                    keep = keep[flat[keep].topk(PRE_NMS_TOP_K).indices]
                loc, lab = keep // self.num_classes + start, keep % self.num_classes
                p, d = pts[loc], dist[n, loc]
                boxes_l.append(torch.cat([p - d[:, :2], p + d[:, 2:]], 1).clamp(0, self.input_size))
                scores_l.append(flat[keep])
                labels_l.append(lab)
                start += size
            boxes, scores, labels = torch.cat(boxes_l), torch.cat(scores_l), torch.cat(labels_l)
            keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = FOCAL_ALPHA,
                       gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return a_t * ce * (1 - p_t) ** gamma
