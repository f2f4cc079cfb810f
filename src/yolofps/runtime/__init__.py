"""The one inference runtime: image files or arrays -> detections in original pixels, on every backend.

    pre-process (host: cv2 letterbox) -> backend (torch / ONNX Runtime / OpenVINO) -> post-process (NMS)

It imports `model/`-free pieces only (`device.py`, the image readers); `engine/`, `bench/`, `optimize/`,
`serving/` and the stages import it, never the other way round.
"""

from yolofps.runtime.host import Deployment, Letterboxed, read_rgb
from yolofps.runtime.pipeline import Execution, Pipeline, build_pipeline, eval_pipeline

__all__ = ["Deployment", "Execution", "Letterboxed", "Pipeline", "build_pipeline", "eval_pipeline", "read_rgb"]
