"""YOLOv5 v6 model: spec, builder, loss and post-processing."""

from __future__ import annotations

from yolofps.model.loss import YOLOv5Loss
from yolofps.model.postprocess import batched_nms, non_max_suppression, scale_boxes, xywh2xyxy, xyxy2xywh
from yolofps.model.spec import ArchSpec, LayerSpec, preset
from yolofps.model.yolo import YOLOv5, build_model, model_info

__all__ = [
    "ArchSpec", "LayerSpec", "YOLOv5", "YOLOv5Loss", "batched_nms", "build_model", "model_info",
    "non_max_suppression", "preset", "scale_boxes", "xywh2xyxy", "xyxy2xywh",
]  # fmt: skip
