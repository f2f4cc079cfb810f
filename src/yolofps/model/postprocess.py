"""Post-processing: box format helpers, class-aware NMS and yolov5's non_max_suppression (without its time limit)."""

from __future__ import annotations

import torch

try:  # torchvision's NMS kernel is faster; the torch-only path below gives the same answer
    from torchvision.ops import batched_nms as _tv_batched_nms
except ImportError:  # pragma: no cover - depends on the environment
    _tv_batched_nms = None

_NMS_CHUNK = 1024  # boxes resolved per step; bounds the IoU matrix at 1024 x 1024


def xywh2xyxy(x: torch.Tensor) -> torch.Tensor:
    """Centre-size boxes [..., 4] to corner boxes."""
    xy, wh = x[..., :2], x[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), dim=-1)


def xyxy2xywh(x: torch.Tensor) -> torch.Tensor:
    """Corner boxes [..., 4] to centre-size boxes."""
    return torch.cat(((x[..., :2] + x[..., 2:4]) / 2, x[..., 2:4] - x[..., :2]), dim=-1)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes [N, 4] x [M, 4] -> [N, M]."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)  # [N, M]
    return inter / (area1[:, None] + area2[None, :] - inter)


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS in chunks of sorted boxes; returns kept indices by decreasing score."""
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order]
    keep = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    kept_boxes = boxes[:0]
    for start in range(0, len(boxes), _NMS_CHUNK):
        chunk = boxes[start : start + _NMS_CHUNK]
        alive = ~(box_iou(chunk, kept_boxes) > iou_threshold).any(1)  # not hit by an earlier chunk's survivor
        overlaps = (box_iou(chunk, chunk) > iou_threshold).triu(1)  # [j, i]: higher-scored j would suppress i
        # greedy NMS is the unique fixed point of keep_i = alive_i and no kept j < i overlaps i; iterating
        # from "all alive" settles index i by step i, and in practice after a handful of vectorised steps
        survivors = alive
        while True:
            updated = alive & ~(overlaps & survivors[:, None]).any(0)
            if torch.equal(updated, survivors):
                break
            survivors = updated
        keep[start : start + len(chunk)] = survivors
        kept_boxes = torch.cat((kept_boxes, chunk[survivors]))
    return order[keep]


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    iou_threshold: float,
    max_candidates: int = 30000,
) -> torch.Tensor:
    """Class-aware NMS over xyxy boxes [N, 4]; returns kept indices into the inputs by decreasing score."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    candidates = torch.sort(scores, descending=True, stable=True).indices[:max_candidates]
    boxes, scores, classes = boxes[candidates], scores[candidates], classes[candidates]
    if _tv_batched_nms is not None:
        return candidates[_tv_batched_nms(boxes, scores, classes, iou_threshold)]
    # shift each class into its own disjoint region so one class-agnostic NMS handles all classes
    span = boxes.max() - boxes.min() + 1
    shifted = boxes + (classes.to(boxes.dtype) * span)[:, None]
    return candidates[_nms(shifted, scores, iou_threshold)]


def non_max_suppression(
    pred: torch.Tensor,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_det: int = 300,
    multi_label: bool = False,
    agnostic: bool = False,
    max_candidates: int = 30000,
) -> list[torch.Tensor]:
    """yolov5 NMS on decoded [B, N, 5+nc] predictions -> per image [k, 6] (x1, y1, x2, y2, score, class).

    Unlike upstream there is no wall-clock limit: results must not depend on how busy the machine is.
    """
    num_classes = pred.shape[-1] - 5
    multi_label &= num_classes > 1  # one class: the single label is the only label
    results = []
    for image_pred in pred:  # [N, 5+nc]
        image_pred = image_pred[image_pred[:, 4] > conf_threshold]  # objectness pre-filter
        class_scores = image_pred[:, 5:] * image_pred[:, 4:5]  # score = obj * cls, [n, nc]
        boxes = xywh2xyxy(image_pred[:, :4])
        if multi_label:
            rows, labels = (class_scores > conf_threshold).nonzero(as_tuple=True)
            boxes, scores = boxes[rows], class_scores[rows, labels]
        else:
            scores, labels = class_scores.max(1)
            keep = scores > conf_threshold
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        nms_classes = torch.zeros_like(labels) if agnostic else labels
        kept = batched_nms(boxes, scores, nms_classes, iou_threshold, max_candidates)[:max_det]
        detections = torch.cat((boxes[kept], scores[kept, None], labels[kept, None].to(boxes.dtype)), dim=1)
        results.append(detections)  # [k, 6]
    return results


def scale_boxes(
    boxes: torch.Tensor,
    from_shape: tuple[int, int],
    to_shape: tuple[int, int],
    ratio_pad: tuple[tuple[float, float], tuple[float, float]] | None = None,
) -> torch.Tensor:
    """Map xyxy boxes from a letterboxed (h, w) image back to the original (h, w) image, clipped to it.

    ratio_pad = ((gain_h, gain_w), (pad_w, pad_h)) as returned by the letterbox; if omitted it is recomputed
    assuming a centred letterbox, as yolov5 does.
    """
    if ratio_pad is None:
        gain = min(from_shape[0] / to_shape[0], from_shape[1] / to_shape[1])
        pad_w, pad_h = (from_shape[1] - to_shape[1] * gain) / 2, (from_shape[0] - to_shape[0] * gain) / 2
    else:
        gain, (pad_w, pad_h) = ratio_pad[0][0], ratio_pad[1]
    pad = boxes.new_tensor([pad_w, pad_h, pad_w, pad_h])
    scaled = (boxes[..., :4] - pad) / gain
    limits = boxes.new_tensor([to_shape[1], to_shape[0], to_shape[1], to_shape[0]])
    scaled = torch.minimum(scaled.clamp(min=0), limits)
    return torch.cat((scaled, boxes[..., 4:]), dim=-1)
