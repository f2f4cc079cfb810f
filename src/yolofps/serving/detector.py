"""A deployable detector: image files or arrays in, detections in original pixels out — the bench stage's path.

The same pre-processing (letterbox), model call and post-processing (NMS at deployment settings) that the bench
stage times serve the registered model, so its `fps_b1` tag describes what a caller of the model gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from yolofps import device as dev
from yolofps.bench import measure
from yolofps.bench.variants import Variant, build
from yolofps.engine import checkpoint

COLUMNS = ["image_index", "x1", "y1", "x2", "y2", "score", "class_id", "class_name"]


@dataclass(frozen=True)
class ServingConfig:
    """How the registered variant runs (the MLflow model_config; every value JSON-friendly)."""

    runtime: str  # torch | onnxruntime
    mode: str  # eager | channels_last | trace | compile | cudagraph
    dtype: str  # fp32 | fp16 | bf16 | int8
    imgsz: int
    names: list[str]
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    device: str = "auto"  # where a torch variant runs when loaded (onnxruntime variants run on the CPU)
    threads: int = 0  # onnxruntime intra-op threads the variant was benchmarked with; 0 = onnxruntime's default

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Detector:
    """Load a model artifact (a checkpoint folder or an ONNX file) and detect objects in images."""

    def __init__(self, artifact: str | Path, config: ServingConfig) -> None:
        self.config = config
        artifact = Path(artifact)
        self.deployment = measure.Deployment(config.imgsz, config.conf, config.iou, config.max_det)
        wanted = "cpu" if config.runtime == "onnxruntime" else config.device
        self.info = dev.resolve(wanted, amp=False)
        variant = Variant("served", config.runtime, config.mode, config.dtype, self.info.kind, config.threads)
        if artifact.suffix == ".onnx":
            self.model = build(variant, None, self.info, config.imgsz, onnx_path=artifact, threads=None)
        else:
            torch_model, _ = checkpoint.load_model(artifact)
            self.model = build(variant, torch_model.eval(), self.info, config.imgsz, onnx_path=None, threads=None)

    def detect(self, images: Sequence[str | Path | np.ndarray]) -> list[np.ndarray]:
        """Per image [k, 6] (x1, y1, x2, y2, score, class) in its own pixels; arrays are uint8 RGB HWC."""
        with torch.inference_mode():
            return measure.detect(self.model, list(images), self.deployment, self.info)

    def rows(self, images: Sequence[str | Path | np.ndarray]) -> list[dict[str, Any]]:
        """Detections as records: image index, box xyxy in original pixels, score, class id and name."""
        names = self.config.names
        out = []
        for index, dets in enumerate(self.detect(images)):
            for x1, y1, x2, y2, score, cls in dets.tolist():
                out.append({"image_index": index, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score,
                            "class_id": int(cls), "class_name": names[int(cls)] if int(cls) < len(names) else str(cls)})
        return out
