"""The one inference runtime: image files or arrays -> detections in original pixels, on every backend.

    pre-process (host: cv2 letterbox) -> backend (torch / ONNX Runtime / OpenVINO) -> post-process (NMS)

`host` is the CPU pre/post, `backends` and `openvino` the backends, `pipeline` puts them together, `ondevice` is
the GPU path (letterbox and NMS on the device, CUDA graphs). It imports only `device.py`, `data.dataset` (the
letterbox) and `model.postprocess`; `engine/`, `bench/`, `optimize/`, `serving/` and the stages import it, never
the other way round.
"""

from yolofps.runtime.host import Deployment, Letterboxed, read_rgb
from yolofps.runtime.pipeline import Execution, Pipeline, build_pipeline, eval_pipeline

__all__ = ["Deployment", "Execution", "Letterboxed", "Pipeline", "build_pipeline", "eval_pipeline", "read_rgb"]
