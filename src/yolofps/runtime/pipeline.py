"""The one image -> detections path: pre-process -> backend -> post-process, with the timing hooks the bench needs.

Evaluation (mAP), the bench stage (FPS), quantize (scoring), the registered pyfunc, the re-bench flow and the
scripts under benchmarks/ all run models through `Pipeline`, so a variant's mAP and its FPS come from the same code.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from yolofps import device as dev
from yolofps.runtime import host
from yolofps.runtime.backends import DTYPES, CudaGraphBackend, OrtBackend, TorchBackend
from yolofps.runtime.host import Deployment, Image, Letterboxed

Backend = Callable[[torch.Tensor], torch.Tensor]  # float [B, 3, S, S] in 0..1 -> decoded [B, N, 5+nc] float32
RUNTIMES = ("torch", "xla", "onnxruntime", "openvino")


@dataclass(frozen=True)
class Execution:
    """How a model runs: the runtime, the torch execution mode, the dtype and the runtime's intra-op threads."""

    runtime: str = "torch"  # torch | xla | onnxruntime | openvino
    mode: str = "eager"  # eager | channels_last | trace | compile | cudagraph (torch); eager elsewhere
    dtype: str = "fp32"  # fp32 | fp16 | bf16 | int8
    threads: int = 0  # onnxruntime / OpenVINO intra-op threads; 0 = the process's thread setting

    @property
    def suffix(self) -> str:
        """`trace-fp32`, `onnxruntime-1t-fp32`, `openvino-bf16`: the part of a bench row name after the model."""
        name = self.runtime if self.runtime not in ("torch", "xla") else self.mode
        return f"{name}{f'-{self.threads}t' if self.threads else ''}-{self.dtype}"


@dataclass
class Pipeline:
    """pre (images -> float input on the device) -> backend -> post (NMS, boxes in original pixels)."""

    backend: Backend
    deployment: Deployment
    info: dev.DeviceInfo

    def with_deployment(self, deployment: Deployment) -> Pipeline:
        """The same backend with other NMS settings (evaluation uses conf 0.001, deployment 0.25)."""
        return dataclasses.replace(self, deployment=deployment)

    def preprocess(self, images: Sequence[Image]) -> tuple[torch.Tensor, list[Letterboxed]]:
        return host.preprocess(images, self.deployment.imgsz, self.info)

    def infer(self, inputs: torch.Tensor, metas: Sequence[Letterboxed]) -> list[np.ndarray]:
        """Backend + post-process on letterboxed input (the evaluation loader's batches, or `preprocess`'s)."""
        with torch.inference_mode():
            return host.postprocess(self.backend(inputs), metas, self.deployment)

    def detect(self, images: Sequence[Image]) -> list[np.ndarray]:
        """Per image [k, 6] (x1, y1, x2, y2, score, class) in its own pixels; arrays are uint8 RGB HWC."""
        return self.infer(*self.preprocess(images))

    def timed(self, images: Sequence[Image]) -> tuple[list[np.ndarray], tuple[float, float, float]]:
        """`detect`, and its (pre, model, post) milliseconds: each phase ends with a device synchronization."""
        with torch.inference_mode():
            start = time.perf_counter()
            inputs, metas = self.preprocess(images)
            dev.synchronize(self.info)
            loaded = time.perf_counter()
            predictions = self.backend(inputs)
            dev.synchronize(self.info)
            inferred = time.perf_counter()
            detections = host.postprocess(predictions, metas, self.deployment)  # ends on the host: no sync needed
            done = time.perf_counter()
        return detections, ((loaded - start) * 1000, (inferred - loaded) * 1000, (done - inferred) * 1000)


def _compile_every_variant() -> None:
    """Dynamo keys its cache on the code object (YOLOv5.forward), shared by every model of the benchmark: with the
    default limit of 8 graphs, the later models silently fell back to eager while labelled `compile`. Allow enough
    graphs, and make hitting the limit an error (a failed row) instead of a silent fallback."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    dynamo_config.fail_on_recompile_limit_hit = True


def torch_backend(model: torch.nn.Module, execution: Execution, info: dev.DeviceInfo, imgsz: int) -> Backend:
    """A copy of the eval-mode `model` in the execution's dtype, memory format and mode, on the device."""
    dtype = DTYPES[execution.dtype]
    net = copy.deepcopy(model).eval().to(info.device).to(dtype)
    channels_last = execution.mode in ("channels_last", "cudagraph") or info.kind == "cuda"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if execution.mode == "trace":
        example = torch.zeros(1, 3, imgsz, imgsz, device=info.device, dtype=dtype)
        with torch.no_grad():
            net = torch.jit.freeze(torch.jit.trace(net, example, check_trace=False))
    elif execution.mode == "compile":
        _compile_every_variant()
        net = torch.compile(net)
    elif execution.mode == "cudagraph":
        if info.kind != "cuda":
            raise ValueError(f"the cudagraph mode needs CUDA (device is {info.kind})")
        return TorchBackend(CudaGraphBackend(net, info), torch.float16, channels_last=True)
    return TorchBackend(net, dtype, channels_last=channels_last, to_host=info.kind == "xla")


def build_pipeline(execution: Execution, deployment: Deployment, info: dev.DeviceInfo, *,
                   model: torch.nn.Module | None = None, artifact: Path | None = None) -> Pipeline:
    """A pipeline for `execution`: a torch `model` (eval mode) for torch/xla, an `artifact` file for the others.

    ONNX Runtime takes an .onnx file; OpenVINO an .onnx file or an IR folder. Both run on the CPU, whatever `info`.
    """
    if execution.runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {execution.runtime!r}; choose from {list(RUNTIMES)}")
    if execution.runtime in ("onnxruntime", "openvino"):
        if artifact is None:
            raise ValueError(f"the {execution.runtime} runtime needs a model file")
        cpu = dev.resolve("cpu", amp=False)
        threads = execution.threads or torch.get_num_threads()  # 0: the process's setting (bench.threads)
        if execution.runtime == "onnxruntime":
            return Pipeline(OrtBackend(artifact, threads=threads), deployment, cpu)
        from yolofps.runtime.openvino import OpenVinoBackend  # imported on use: openvino loads its plugins

        return Pipeline(OpenVinoBackend(artifact, dtype=execution.dtype, threads=threads), deployment, cpu)
    if model is None:
        raise ValueError(f"the {execution.runtime} runtime needs a torch model")
    return Pipeline(torch_backend(model, execution, info, deployment.imgsz), deployment, info)


def eval_pipeline(model: torch.nn.Module, info: dev.DeviceInfo, deployment: Deployment) -> Pipeline:
    """The training model as it is (no copy, the device's autocast) behind the pipeline: per-epoch evaluation."""
    return Pipeline(TorchBackend(model, amp=info), deployment, info)

