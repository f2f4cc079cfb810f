"""A deployable detector: image files or arrays in, detections in original pixels out — the bench stage's pipeline.

The registered model runs through `runtime.build_pipeline` with the execution it was benchmarked with (runtime,
mode, dtype, threads), so its `fps_b1` tag describes what a caller of the model gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yolofps import device as dev
from yolofps.engine import checkpoint
from yolofps.runtime import Deployment, Execution, build_pipeline

COLUMNS = ["image_index", "x1", "y1", "x2", "y2", "score", "class_id", "class_name"]


@dataclass(frozen=True)
class ServingConfig:
    """How the registered variant runs (the MLflow model_config; every value JSON-friendly)."""

    runtime: str  # torch | onnxruntime | openvino
    mode: str  # eager | channels_last | trace | compile | cudagraph
    dtype: str  # fp32 | fp16 | bf16 | int8
    imgsz: int
    names: list[str]
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    device: str = "auto"  # where a torch variant runs when loaded (ONNX Runtime and OpenVINO run on the CPU)
    threads: int = 0  # ONNX Runtime / OpenVINO intra-op threads the variant was benchmarked with; 0 = all cores

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def load_pipeline(artifact: Path, execution: Execution, deployment: Deployment, device: str = "auto"):
    """The pipeline of a model artifact: a checkpoint folder for torch, an ONNX file or IR folder for the others."""
    info = dev.resolve("cpu" if execution.runtime in ("onnxruntime", "openvino") else device, amp=False)
    if execution.runtime in ("torch", "xla"):
        torch_model, _ = checkpoint.load_model(artifact)
        return build_pipeline(execution, deployment, info, model=torch_model.eval())
    return build_pipeline(execution, deployment, info, artifact=Path(artifact))


class Detector:
    """Load a model artifact (a checkpoint folder, an ONNX file or an OpenVINO IR folder) and detect objects."""

    def __init__(self, artifact: str | Path, config: ServingConfig) -> None:
        self.config = config
        artifact = Path(artifact)
        deployment = Deployment(config.imgsz, config.conf, config.iou, config.max_det)
        execution = Execution(config.runtime, config.mode, config.dtype, config.threads)
        self.pipeline = load_pipeline(artifact, execution, deployment, config.device)

    def detect(self, images: Sequence[str | Path | np.ndarray]) -> list[np.ndarray]:
        """Per image [k, 6] (x1, y1, x2, y2, score, class) in its own pixels; arrays are uint8 RGB HWC."""
        return self.pipeline.detect(list(images))

    def rows(self, images: Sequence[str | Path | np.ndarray]) -> list[dict[str, Any]]:
        """Detections as records: image index, box xyxy in original pixels, score, class id and name."""
        return self.records(self.detect(images))

    def records(self, detections: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Per-image [k, 6] detections (`detect`'s, or a timed pipeline run's) as `rows`' records (COLUMNS)."""
        return detection_rows(detections, self.config.names)


def detection_rows(detections: Sequence[np.ndarray], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per-image [k, 6] detections as COLUMNS records (image_index is the position in `detections`)."""
    out = []
    for index, dets in enumerate(detections):
        for x1, y1, x2, y2, score, cls in dets.tolist():
            out.append({"image_index": index, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score,
                        "class_id": int(cls), "class_name": names[int(cls)] if int(cls) < len(names) else str(cls)})
    return out
