"""YOLOv5 v6 loss (utils/loss.py ComputeLoss) with static-shape target assignment.

Upstream selects matched (target, anchor, cell) triples with boolean indexing, so its tensor shapes depend on the
data. Here every level builds a fixed candidate set of B x max_boxes x num_anchors x 3 cells (the target's own cell
plus its nearest horizontal and vertical neighbours) with a 0/1 weight, gathers predictions at clamped indices and
takes weighted means. No host syncs and no data-dependent shapes, so the same code runs under torch-xla.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from yolofps.model.spec import ArchSpec

NEIGHBOUR_MARGIN = 0.5  # upstream g: a neighbour cell joins when the centre is within 0.5 cell of their border


class YOLOv5Loss(nn.Module):
    """CIoU box + IoU-target objectness + BCE class loss, with hyp.scratch-low defaults and yolov5's gain scaling."""

    def __init__(
        self,
        spec: ArchSpec,
        *,
        image_size: int = 640,
        box: float = 0.05,
        obj: float = 1.0,
        cls: float = 0.5,
        anchor_t: float = 4.0,
        balance: tuple[float, ...] = (4.0, 1.0, 0.4),
        label_smoothing: float = 0.0,
        cls_pw: float = 1.0,
        obj_pw: float = 1.0,
    ) -> None:
        super().__init__()
        num_levels = len(spec.strides)
        if len(balance) != num_levels:
            raise ValueError(f"balance needs one weight per level ({num_levels}), got {balance}")
        self.num_classes = spec.num_classes
        # train.py rescales the gains for the number of levels, classes and the image size
        self.box_gain = box * 3 / num_levels
        self.cls_gain = cls * spec.num_classes / 80 * 3 / num_levels
        self.obj_gain = obj * (image_size / 640) ** 2 * 3 / num_levels
        self.anchor_t = anchor_t
        self.balance = tuple(balance)
        self.cls_positive, self.cls_negative = 1.0 - 0.5 * label_smoothing, 0.5 * label_smoothing
        self.register_buffer("cls_pos_weight", torch.tensor([cls_pw]))
        self.register_buffer("obj_pos_weight", torch.tensor([obj_pw]))
        anchors = torch.tensor(spec.anchors).view(num_levels, spec.num_anchors, 2)
        strides = torch.tensor(spec.strides, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("anchors", anchors / strides)  # [L, A, 2] in grid units, like model.24.anchors

    def forward(self, preds: list[torch.Tensor], targets: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """preds: raw [B, A, H, W, 5+nc] per level; targets: [B, M, 5] (cls, cx, cy, w, h) in 0..1; mask: [B, M]."""
        # padded rows become a harmless dummy box so garbage in them cannot leak NaNs through the 0 weights
        dummy = targets.new_tensor([0.0, 0.5, 0.5, 0.1, 0.1])
        targets = torch.where(mask[..., None], targets, dummy)  # [B, M, 5]
        box_loss = obj_loss = cls_loss = preds[0].new_zeros(())
        for level, pred in enumerate(preds):
            level_box, level_obj, level_cls = self._level_loss(pred, self.anchors[level], targets, mask)
            box_loss = box_loss + level_box
            obj_loss = obj_loss + level_obj * self.balance[level]
            cls_loss = cls_loss + level_cls
        box_loss, obj_loss, cls_loss = box_loss * self.box_gain, obj_loss * self.obj_gain, cls_loss * self.cls_gain
        batch_size = preds[0].shape[0]
        total = (box_loss + obj_loss + cls_loss) * batch_size  # upstream scales by batch size
        return {"loss": total, "box": box_loss, "obj": obj_loss, "cls": cls_loss}

    def _level_loss(
        self, pred: torch.Tensor, anchors: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Box, objectness and class loss of one level, before gains and the level's balance weight."""
        batch, num_anchors, height, width, num_outputs = pred.shape
        cand = build_candidates(targets, mask, anchors, height, width, self.anchor_t)
        flat_pred = pred.view(batch, num_anchors * height * width, num_outputs)
        index = cand["index"].view(batch, -1)  # [B, K]
        picked = flat_pred.gather(1, index[..., None].expand(-1, -1, num_outputs))  # [B, K, 5+nc]
        weight = cand["weight"].view(batch, -1)  # [B, K]
        count = weight.sum().clamp(min=1)

        pxy = picked[..., :2].sigmoid() * 2 - 0.5  # [B, K, 2] offset from the cell corner
        pwh = (picked[..., 2:4].sigmoid() * 2) ** 2 * cand["anchor"].reshape(batch, -1, 2)  # [B, K, 2]
        iou = bbox_ciou(torch.cat((pxy, pwh), -1), cand["box"].reshape(batch, -1, 4))  # [B, K]
        box_loss = (weight * (1.0 - iou)).sum() / count

        # objectness target = IoU of the matched prediction; when several candidates land on one
        # (anchor, cell), keep the largest IoU (upstream's last-write-wins is not deterministic on GPU)
        score = torch.where(weight > 0, iou.detach().clamp(min=0), 0.0).to(pred.dtype)  # [B, K]
        obj_target = pred.new_zeros(batch, num_anchors * height * width)
        obj_target = obj_target.scatter_reduce(1, index, score, reduce="amax")  # [B, A*H*W]
        obj_logits = flat_pred[..., 4]  # [B, A*H*W]
        obj_loss = F.binary_cross_entropy_with_logits(obj_logits, obj_target, pos_weight=self.obj_pos_weight)

        cls_loss = pred.new_zeros(())
        if self.num_classes > 1:  # upstream has no class loss for single-class models
            # compare with arange rather than F.one_hot, whose range check can be a host sync on accelerators
            classes = cand["cls"].reshape(batch, -1, 1).clamp(max=self.num_classes - 1)  # [B, K, 1]
            class_ids = torch.arange(self.num_classes, device=pred.device)
            one_hot = (classes == class_ids).to(pred.dtype)  # [B, K, nc]
            cls_target = one_hot * (self.cls_positive - self.cls_negative) + self.cls_negative
            bce = F.binary_cross_entropy_with_logits(
                picked[..., 5:], cls_target, pos_weight=self.cls_pos_weight, reduction="none"
            )  # [B, K, nc]
            cls_loss = (weight * bce.sum(-1)).sum() / (count * self.num_classes)
        return box_loss, obj_loss, cls_loss


def build_candidates(
    targets: torch.Tensor, mask: torch.Tensor, anchors: torch.Tensor, height: int, width: int, anchor_t: float
) -> dict[str, torch.Tensor]:
    """Fixed-size candidate set [B, M, A, 3] for one level: flat index, 0/1 weight, box target, anchor, class.

    The 3 cells are the target's own cell, its nearest horizontal neighbour and its nearest vertical neighbour,
    each valid under upstream's conditions. Upstream adds both the left and the right (or upper and lower) neighbour
    only when the centre lies exactly on a cell border, and then the extra one is the centre cell again, a
    duplicate that double-counts it; we skip that duplicate.
    """
    batch, max_boxes, _ = targets.shape
    num_anchors = anchors.shape[0]
    size = targets.new_tensor([width, height])
    gxy = targets[..., 1:3] * size  # [B, M, 2] centre in grid units
    gwh = targets[..., 3:5].clamp(min=1e-6) * size  # [B, M, 2]
    ratio = gwh[:, :, None] / anchors  # [B, M, A, 2]
    matched = torch.max(ratio, 1 / ratio).amax(-1) < anchor_t  # [B, M, A]

    cell, cell_ok = _candidate_cells(gxy, size)  # [B, M, 3, 2], [B, M, 3]
    weight = mask[:, :, None, None] & matched[..., None] & cell_ok[:, :, None]  # [B, M, A, 3]
    # like upstream, indices are clamped (a centre exactly on the right/bottom edge) while the box target is not
    gi = cell[..., 0].clamp(0, width - 1).long()  # [B, M, 3]
    gj = cell[..., 1].clamp(0, height - 1).long()
    anchor_ids = torch.arange(num_anchors, device=targets.device).view(1, 1, -1, 1)
    index = (anchor_ids * height + gj[:, :, None]) * width + gi[:, :, None]  # [B, M, A, 3]
    box = torch.cat((gxy[:, :, None] - cell, gwh[:, :, None].expand(-1, -1, 3, -1)), -1)  # [B, M, 3, 4]
    classes = targets[..., 0].long().clamp(0, None)  # [B, M]
    shape = (batch, max_boxes, num_anchors, 3)
    return {
        "index": index,
        "weight": weight.to(targets.dtype),
        "box": box[:, :, None].expand(*shape, 4),
        "anchor": anchors.view(1, 1, num_anchors, 1, 2).expand(*shape, 2),
        "cls": classes[:, :, None, None].expand(shape),
    }


def _candidate_cells(gxy: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Own cell, nearest horizontal and nearest vertical neighbour of each centre, with upstream's validity test."""
    frac, inverse = gxy % 1, size - gxy
    before = frac < NEIGHBOUR_MARGIN  # the left/upper neighbour is nearer than the right/lower one
    valid_before = before & (gxy > 1)
    valid_after = (inverse % 1 < NEIGHBOUR_MARGIN) & (inverse > 1)
    neighbour_ok = torch.where(before, valid_before, valid_after)  # [B, M, 2] (x, y)
    step = torch.where(before, -1.0, 1.0)  # [B, M, 2]
    zero = torch.zeros_like(step[..., 0])
    offsets = torch.stack((torch.zeros_like(step), torch.stack((step[..., 0], zero), -1),
                           torch.stack((zero, step[..., 1]), -1)), dim=2)  # [B, M, 3, 2]  # fmt: skip
    cell = gxy.floor()[:, :, None] + offsets  # [B, M, 3, 2]
    cell_ok = torch.cat((torch.ones_like(neighbour_ok[..., :1]), neighbour_ok), dim=-1)  # [B, M, 3]
    return cell, cell_ok


def bbox_ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise Complete IoU of xywh boxes [..., 4] (yolov5 bbox_iou with CIoU=True)."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.unbind(-1), box2.unbind(-1)
    b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = (torch.minimum(b1_x2, b2_x2) - torch.maximum(b1_x1, b2_x1)).clamp(0) * (
        torch.minimum(b1_y2, b2_y2) - torch.maximum(b1_y1, b2_y1)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    hull_w = torch.maximum(b1_x2, b2_x2) - torch.minimum(b1_x1, b2_x1)
    hull_h = torch.maximum(b1_y2, b2_y2) - torch.minimum(b1_y1, b2_y1)
    hull_diag2 = hull_w**2 + hull_h**2 + eps
    centre_dist2 = ((x2 - x1) ** 2 + (y2 - y1) ** 2)
    aspect = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = aspect / (aspect - iou + (1 + eps))
    return iou - (centre_dist2 / hull_diag2 + aspect * alpha)
