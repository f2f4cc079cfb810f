"""Run a detector over a loader and score it with the COCO protocol (used after every epoch and at the end)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from yolofps import device as dev
from yolofps.data import formats
from yolofps.engine.evaluate import EvalResult, evaluate_detections
from yolofps.model.postprocess import non_max_suppression, scale_boxes


@dataclass(frozen=True)
class Predictions:
    """Detections per image in original pixels (x1, y1, x2, y2, score, class) and the matching ground truth."""

    paths: list[str]
    detections: list[np.ndarray]  # [k, 6]
    ground_truth: list[np.ndarray]  # [n, 5] (class, x1, y1, x2, y2)
    image_sizes: list[tuple[int, int]]  # (height, width)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, info: dev.DeviceInfo, *, conf: float, iou: float,
            max_det: int) -> Predictions:
    """Decode + NMS every batch, map boxes back through the letterbox, read ground truth from the label files."""
    model.eval()
    out = Predictions([], [], [], [])
    for images, _, _, metas in loader:
        with dev.autocast(info):
            decoded = model(dev.to_device(images, info))  # [B, N, 5+nc] in input pixels
        input_shape = tuple(images.shape[2:])
        for dets, meta in zip(non_max_suppression(decoded.float(), conf, iou, max_det=max_det), metas):
            dets = dets.cpu().clone()
            ratio_pad = ((meta["ratio"], meta["ratio"]), meta["pad"])
            dets[:, :4] = scale_boxes(dets[:, :4], input_shape, meta["orig_shape"], ratio_pad)
            out.paths.append(meta["path"])
            out.detections.append(dets.numpy())
            out.ground_truth.append(ground_truth_pixels(Path(meta["path"]), meta["orig_shape"]))
            out.image_sizes.append(tuple(meta["orig_shape"]))
    return out


def ground_truth_pixels(image: Path, shape: Sequence[int]) -> np.ndarray:
    """Label rows of an image as (class, x1, y1, x2, y2) in original pixels."""
    rows = formats.read_labels(formats.label_path_for(image))
    height, width = shape
    cx, cy, w, h = rows[:, 1] * width, rows[:, 2] * height, rows[:, 3] * width, rows[:, 4] * height
    return np.stack([rows[:, 0], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)


def evaluate_model(model: nn.Module, loader: Iterable, info: dev.DeviceInfo, names: Sequence[str], *,
                   conf: float = 0.001, iou: float = 0.6, max_det: int = 300) -> tuple[EvalResult, Predictions]:
    """COCO mAP of a model on a loader (ultralytics val settings by default)."""
    preds = predict(model, loader, info, conf=conf, iou=iou, max_det=max_det)
    result = evaluate_detections(preds.detections, preds.ground_truth, preds.image_sizes, names)
    return result, preds


def fitness(metrics: dict[str, float]) -> float:
    """ultralytics' model fitness: 0.1 * mAP50 + 0.9 * mAP50-95."""
    return 0.1 * metrics.get("metrics/mAP50B", 0.0) + 0.9 * metrics.get("metrics/mAP50-95B", 0.0)
