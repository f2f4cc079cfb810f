"""Run a detector over an evaluation loader and score it with the COCO protocol (after every epoch and at the end).

The detector is a `runtime.Pipeline`: the same backend and post-processing that the bench times and the registered
model serves, at the evaluation's NMS settings (ultralytics val: conf 0.001, IoU 0.6, max_det 300). The loader's
letterbox is the pipeline's pre-processing (`data.dataset.letterbox`), done once per image for every epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from yolofps import device as dev
from yolofps.data import formats
from yolofps.engine.evaluate import EvalResult, evaluate_detections
from yolofps.metric_names import MAP50, MAP50_95
from yolofps.runtime import Deployment, Letterboxed, Pipeline, eval_pipeline


@dataclass(frozen=True)
class Predictions:
    """Detections per image in original pixels (x1, y1, x2, y2, score, class) and the matching ground truth."""

    paths: list[str]
    detections: list[np.ndarray]  # [k, 6]
    ground_truth: list[np.ndarray]  # [n, 5] (class, x1, y1, x2, y2)
    image_sizes: list[tuple[int, int]]  # (height, width)


def predict(pipeline: Pipeline, loader: Iterable) -> Predictions:
    """Backend + NMS on every loader batch, boxes mapped back through the letterbox, ground truth from the labels."""
    out = Predictions([], [], [], [])
    for images, _, _, metas in loader:
        boxes = [Letterboxed.from_loader(meta) for meta in metas]
        for dets, meta in zip(pipeline.infer(dev.to_device(images, pipeline.info), boxes), boxes):
            out.paths.append(meta.path)
            out.detections.append(dets)
            out.ground_truth.append(ground_truth_pixels(Path(meta.path), meta.orig_shape))
            out.image_sizes.append(meta.orig_shape)
    return out


def ground_truth_pixels(image: Path, shape: Sequence[int]) -> np.ndarray:
    """Label rows of an image as (class, x1, y1, x2, y2) in original pixels."""
    rows = formats.read_labels(formats.label_path_for(image))
    height, width = shape
    cx, cy, w, h = rows[:, 1] * width, rows[:, 2] * height, rows[:, 3] * width, rows[:, 4] * height
    return np.stack([rows[:, 0], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)


def evaluate_pipeline(pipeline: Pipeline, loader: Iterable, names: Sequence[str]) -> tuple[EvalResult, Predictions]:
    """COCO mAP of a pipeline (at its deployment's NMS settings) on an evaluation loader."""
    preds = predict(pipeline, loader)
    return evaluate_detections(preds.detections, preds.ground_truth, preds.image_sizes, names), preds


def evaluate_model(model: nn.Module, loader, info: dev.DeviceInfo, names: Sequence[str], *, conf: float = 0.001,
                   iou: float = 0.6, max_det: int = 300) -> tuple[EvalResult, Predictions]:
    """COCO mAP of a torch model as it is (eval mode, the device's autocast); ultralytics val settings by default."""
    model.eval()
    deployment = Deployment.evaluation(loader.dataset.image_size, conf, iou, max_det)
    return evaluate_pipeline(eval_pipeline(model, info, deployment), loader, names)


def fitness(metrics: dict[str, float]) -> float:
    """ultralytics' model fitness: 0.1 * mAP50 + 0.9 * mAP50-95."""
    return 0.1 * metrics.get(MAP50, 0.0) + 0.9 * metrics.get(MAP50_95, 0.0)
