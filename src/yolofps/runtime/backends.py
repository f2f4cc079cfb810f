"""Backends of the inference path: float images [B, 3, S, S] in 0..1 -> decoded predictions [B, N, 5+nc] (float32).

torch (eager, channels_last, TorchScript trace, torch.compile, CUDA graph; fp32/fp16/bf16), ONNX Runtime and
OpenVINO (`runtime/openvino.py`) all take the same input and give the same output, so one pre- and post-process
serves every one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from yolofps import device as dev

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend:
    """A torch model behind the backend call: float32 images in 0..1 -> float32 decoded predictions.

    Casts the input to the model's dtype and memory format, so every variant takes the same images. On XLA the
    predictions come back to the host: NMS has data-dependent shapes and runs there. `amp` runs the call under the
    device's autocast (training-time evaluation of an fp32 model on CUDA/XLA).
    """

    def __init__(self, model: Callable, dtype: torch.dtype = torch.float32, *, channels_last: bool = False,
                 to_host: bool = False, amp: dev.DeviceInfo | None = None) -> None:
        self.model, self.dtype, self.channels_last, self.to_host, self.amp = model, dtype, channels_last, to_host, amp

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.dtype)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.amp is not None:
            with dev.autocast(self.amp):
                predictions = self.model(images)
        else:
            predictions = self.model(images)
        predictions = predictions.float()
        return predictions.cpu() if self.to_host else predictions


class CudaGraphBackend:
    """fp16 model replayed from a captured CUDA graph (static input and output buffers, one per batch size)."""

    def __init__(self, model: torch.nn.Module, info: dev.DeviceInfo) -> None:
        self.model, self.info = model, info
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _capture(self, shape: tuple[int, ...]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = torch.zeros(shape, device=self.info.device, dtype=torch.float16)
        static_in = static_in.contiguous(memory_format=torch.channels_last)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # warm-up on a side stream, as the CUDA graphs docs require
                self.model(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = self.model(static_in)
        return graph, static_in, static_out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        shape = tuple(images.shape)
        if shape not in self.graphs:
            self.graphs[shape] = self._capture(shape)
        graph, static_in, static_out = self.graphs[shape]
        static_in.copy_(images)
        graph.replay()
        return static_out.float()


def ort_session_options(threads: int | None = None, *, spin: bool = True) -> ort.SessionOptions:
    """Full graph optimization (QDQ and Conv fusions, NHWC/NCHWc layouts), sequential, `threads` intra-op threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a CNN is one chain: inter-op threads only contend
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        # busy-waiting workers save ~25% on a quiet 2-core CPU (yolov5n 320: 7.1 -> 5.2 ms) but keep their cores
        # after each run; with another process busy, spinning doubled latency (yolov5s: 27 -> 55 ms)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OrtBackend:
    """An ONNX Runtime session (CPU) behind the backend call.

    The ONNX file has a dynamic batch dimension; each batch size seen gets its own session with that dimension
    fixed (onnxruntime's free-dimension override), so the graph's shape arithmetic (Shape/Gather/Concat feeding
    every Reshape of the Detect head) is folded away: about 0.2 ms per call for yolov5n at 320 px on a 2-core CPU.
    """

    def __init__(self, path: Path, *, threads: int | None = None, spin: bool = False):
        # no spinning by default: idle workers busy-waiting after a run slowed the pre- and post-processing around
        # it 5-10x on a 2-core CPU (end to end yolov5n@320: 29 ms spinning vs 10 ms without)
        self.path = Path(path)
        self.threads, self.spin = threads, spin
        self.session = self._session()  # batch dimension left dynamic: the model's signature, and the fallback
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        self.batch_dim = model_input.shape[0] if isinstance(model_input.shape[0], str) else None
        self.sessions: dict[int, ort.InferenceSession] = {}  # batch size -> session with that batch fixed

    def _session(self, batch: int | None = None) -> ort.InferenceSession:
        options = ort_session_options(self.threads, spin=self.spin)
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

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] in 0..1 (any device) -> decoded predictions [B, N, 5+nc] on the same device."""
        batch = np.ascontiguousarray(images.detach().cpu().float().numpy())
        (predictions,) = self.session_for(len(batch)).run([self.output_name], {self.input_name: batch})
        return torch.from_numpy(predictions).to(images.device)
