"""ONNX export of the eval-mode detector, and an onnxruntime session that stands in for the torch model."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from yolofps.model.yolo import YOLOv5

INPUT_NAME = "images"  # float32 [B, 3, S, S] RGB in 0..1
OUTPUT_NAME = "predictions"  # float32 [B, N, 5 + nc]: xywh pixels, objectness, class scores (sigmoid applied)


def export_onnx(model: YOLOv5, path: Path, image_size: int, *, opset: int = 17) -> Path:
    """ONNX of the eval-mode model: 'images' float32 [B, 3, S, S] in 0..1 -> decoded 'predictions' [B, N, 5+nc]."""
    # a CPU fp32 copy: the caller's model keeps its device, dtype and train/eval mode
    model = copy.deepcopy(model).cpu().float().eval()
    example = torch.zeros(1, 3, image_size, image_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        # dynamo=False: the TorchScript exporter needs no onnxscript; in eval mode it folds BatchNorm into the convs
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
    onnx.checker.check_model(str(path))
    return path


def session_options(threads: int | None = None, *, spin: bool = True) -> ort.SessionOptions:
    """Full graph optimization (QDQ and Conv fusions, NHWC/NCHWc layouts), sequential, `threads` intra-op threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a CNN is one chain: inter-op threads only contend
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spin:
        # busy-waiting workers save ~25% on a quiet 2-core CPU (yolov5n 320: 7.1 -> 5.2 ms) but keep their cores
        # after each run; with another process busy, spinning doubled latency (yolov5s: 27 -> 55 ms)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OrtDetector:
    """An onnxruntime session behind the same call as a torch detector: eval(), __call__(images) -> predictions.

    The ONNX file has a dynamic batch dimension; each batch size seen gets its own session with that dimension
    fixed (onnxruntime's free-dimension override), so the graph's shape arithmetic (Shape/Gather/Concat feeding
    every Reshape of the Detect head) is folded away: about 0.2 ms per call for yolov5n at 320 px on a 2-core CPU.
    """

    def __init__(self, path: Path, *, threads: int | None = None, spin: bool = True):
        self.path = Path(path)
        self.threads, self.spin = threads, spin
        self.session = self._session()  # batch dimension left dynamic: the model's signature, and the fallback
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        self.batch_dim = model_input.shape[0] if isinstance(model_input.shape[0], str) else None
        self.sessions: dict[int, ort.InferenceSession] = {}  # batch size -> session with that batch fixed

    def _session(self, batch: int | None = None) -> ort.InferenceSession:
        options = session_options(self.threads, spin=self.spin)
        if batch is not None:
            options.add_free_dimension_override_by_name(self.batch_dim, batch)
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def session_for(self, batch: int) -> ort.InferenceSession:
        """The session for inputs of `batch` images (made on first use)."""
        if self.batch_dim is None:
            return self.session
        if batch not in self.sessions:
            self.sessions[batch] = self._session(batch)
        return self.sessions[batch]

    def eval(self) -> OrtDetector:
        """No-op (a session has no train mode); returns self like nn.Module.eval."""
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] in 0..1 (any device) -> decoded predictions [B, N, 5+nc] on the same device."""
        batch = np.ascontiguousarray(images.detach().cpu().float().numpy())
        (predictions,) = self.session_for(len(batch)).run([self.output_name], {self.input_name: batch})
        return torch.from_numpy(predictions).to(images.device)
