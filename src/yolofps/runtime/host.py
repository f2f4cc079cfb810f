"""The host (CPU) pre- and post-processing of the one inference path: cv2 decode + letterbox, numpy/OpenCV NMS.

Pre-process: decode the image file (to RGB), letterbox to S×S, HWC→CHW, host→device, uint8 → float 0..1.
Post-process: NMS at the deployment's settings (conf, IoU, max_det) and boxes mapped back to the original image,
in numpy and OpenCV: yolov5's rule (score = objectness × best class score, class-aware greedy NMS, best `max_det`)
without torch's per-op overhead. Evaluation (conf 0.001) and deployment (conf 0.25) use the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from yolofps import device as dev
from yolofps.data import formats
from yolofps.data.dataset import letterbox
from yolofps.errors import DataSetError

Image = Path | str | np.ndarray  # an image file, or a uint8 RGB HWC array


@dataclass(frozen=True)
class Deployment:
    """What a detector is asked to do: input size and the NMS settings (recorded with every figure)."""

    imgsz: int
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    # evaluation only (ultralytics' val): keep a box once for every class whose score passes conf, not just its best
    multi_label: bool = False

    @classmethod
    def evaluation(cls, imgsz: int, conf: float, iou: float, max_det: int) -> Deployment:
        """The settings mAP is measured at: ultralytics val's multi-label NMS, so figures compare with val.py's."""
        return cls(imgsz, conf, iou, max_det, multi_label=True)


@dataclass(frozen=True)
class Letterboxed:
    """Where an input image came from, to map its boxes back."""

    path: str
    orig_shape: tuple[int, int]
    ratio: float
    pad: tuple[float, float]

    @classmethod
    def from_loader(cls, meta: dict[str, Any]) -> Letterboxed:
        """The letterbox of an evaluation loader item (data.dataset.YoloDataset's meta)."""
        return cls(meta["path"], tuple(meta["orig_shape"]), float(meta["ratio"]), tuple(meta["pad"]))


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB HWC; a file that is not an image is a DataSetError naming it."""
    # 0.03 ms at 320 px; a numpy [..., ::-1] copy took 0.3 ms
    return cv2.cvtColor(formats.decode_image(path), cv2.COLOR_BGR2RGB)


def decode_rgb(data: bytes, source: str) -> np.ndarray:
    """`read_rgb` of an image file's bytes (an upload); not decodable is a DataSetError naming `source`."""
    return cv2.cvtColor(formats.decode_image_bytes(data, source), cv2.COLOR_BGR2RGB)


def preprocess(images: Sequence[Image], imgsz: int, info: dev.DeviceInfo) -> tuple[torch.Tensor, list[Letterboxed]]:
    """Image files (or uint8 RGB HWC arrays) -> float [B, 3, S, S] in 0..1 on the device, and their letterboxes."""
    arrays, metas = [], []
    for index, image in enumerate(images):
        source = f"array {index}" if isinstance(image, np.ndarray) else str(image)
        rgb = image if isinstance(image, np.ndarray) else read_rgb(image)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise DataSetError(f"{source}: expected a uint8 RGB image [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
        boxed, ratio, pad = letterbox(rgb, imgsz)
        arrays.append(boxed.transpose(2, 0, 1))  # HWC -> CHW
        metas.append(Letterboxed(source, rgb.shape[:2], ratio, pad))
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))
    return dev.to_device(batch, info), metas


def postprocess(predictions: torch.Tensor, metas: Sequence[Letterboxed], deployment: Deployment) -> list[np.ndarray]:
    """Decoded predictions [B, N, 5+nc] -> per image [k, 6] (x1, y1, x2, y2, score, class) in original pixels."""
    return [image_detections(pred, meta, deployment)
            for pred, meta in zip(predictions.float().cpu().numpy(), metas, strict=True)]


def image_detections(pred: np.ndarray, meta: Letterboxed, deployment: Deployment) -> np.ndarray:
    """One image's decoded [N, 5+nc] -> [k, 6] in its pixels: score = objectness x best class score above `conf`
    (every class score above it with `multi_label`), class-aware greedy NMS (OpenCV's NMSBoxesBatched), best
    `max_det` kept, mapped through the letterbox."""
    pred = pred[pred[:, 4] > deployment.conf]  # objectness pre-filter, as yolov5's non_max_suppression
    class_scores = pred[:, 5:] * pred[:, 4:5]
    if deployment.multi_label:  # (box, class) pairs in row-major order, as upstream's nonzero()
        rows, labels = np.nonzero(class_scores > deployment.conf)
        pred, scores = pred[rows], class_scores[rows, labels]
    else:
        labels = class_scores.argmax(1)
        scores = class_scores[np.arange(len(pred)), labels]
        keep = scores > deployment.conf
        pred, scores, labels = pred[keep], scores[keep], labels[keep]
    corner = pred[:, :2] - pred[:, 2:4] / 2  # OpenCV takes (x, y, w, h) with (x, y) the top-left corner
    kept = cv2.dnn.NMSBoxesBatched(np.concatenate((corner, pred[:, 2:4]), 1).astype(np.float64), scores, labels,
                                   deployment.conf, deployment.iou) if len(pred) else []
    kept = np.asarray(kept, dtype=np.int64).reshape(-1)[: deployment.max_det]  # by decreasing score
    boxes = np.concatenate((corner[kept], corner[kept] + pred[kept, 2:4]), 1)
    pad = np.array([*meta.pad, *meta.pad], np.float32)
    limits = np.array([meta.orig_shape[1], meta.orig_shape[0]] * 2, np.float32)
    boxes = np.minimum(np.maximum((boxes - pad) / meta.ratio, 0), limits)  # letterbox -> original pixels, clipped
    return np.concatenate((boxes, scores[kept, None], labels[kept, None]), 1).astype(np.float32)
