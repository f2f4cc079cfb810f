"""The variants a benchmark runs: every model the pipeline produced × every execution mode that applies on the device.

A model is a torch checkpoint folder (train, prune-<r>, distill) or an ONNX file (the quantize stage's INT8).
A mode turns a model into a detector callable — eager, channels_last, TorchScript trace, torch.compile,
onnxruntime (CPU), fp16/bf16 and CUDA graphs (CUDA only). Building a mode may fail (a tracer or compiler error on
this device); the caller records that as a failed row instead of crashing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from yolofps import device as dev
from yolofps.model.yolo import YOLOv5
from yolofps.optimize.export import OrtDetector, export_onnx

CUDA_ONLY = ("fp16", "bf16", "cudagraph")


@dataclass(frozen=True)
class Variant:
    """One row of the benchmark: which model, run how."""

    model: str  # artifact name: train, prune-0.5, distill, quantize
    runtime: str  # torch | onnxruntime | xla
    mode: str  # eager | channels_last | trace | compile | cudagraph
    dtype: str  # fp32 | fp16 | bf16 | int8
    device: str  # cpu | cuda | xla
    threads: int = 0  # onnxruntime intra-op threads; 0 = the benchmark's thread setting

    @property
    def name(self) -> str:
        """`prune-0.5/trace-fp32`, `train/onnxruntime-fp32`, `prune-0.5/onnxruntime-1t-fp32` (1 intra-op thread)."""
        suffix = self.runtime if self.runtime != "torch" else self.mode
        if self.threads:
            suffix += f"-{self.threads}t"
        return f"{self.model}/{suffix}-{self.dtype}"


def onnx_variants(model_name: str, dtype: str, ort_threads: tuple[int, ...]) -> list[Variant]:
    """One onnxruntime row per intra-op thread setting of bench.ort_threads."""
    return [Variant(model_name, "onnxruntime", "eager", dtype, "cpu", threads) for threads in ort_threads]


def plan(model_name: str, modes: tuple[str, ...], info: dev.DeviceInfo, ort_threads: tuple[int, ...] = (0,)
         ) -> tuple[list[Variant], list[dict[str, str]]]:
    """The variants of one torch model on this device, and the modes skipped here (with the reason)."""
    variants, skipped = [], []
    torch_runtime = "xla" if info.kind == "xla" else "torch"
    for mode in modes:
        if mode in CUDA_ONLY and info.kind != "cuda":
            skipped.append({"model": model_name, "mode": mode, "reason": f"needs CUDA (device is {info.kind})"})
        elif mode == "onnxruntime":
            variants += onnx_variants(model_name, "fp32", ort_threads)
        elif mode in ("fp16", "bf16"):
            variants.append(Variant(model_name, "torch", "channels_last", mode, info.kind))
        elif mode == "cudagraph":
            variants.append(Variant(model_name, "torch", "cudagraph", "fp16", info.kind))
        elif info.kind == "xla" and mode != "eager":
            skipped.append({"model": model_name, "mode": mode, "reason": "on XLA the graph is compiled by XLA itself"})
        else:
            variants.append(Variant(model_name, torch_runtime, mode, "fp32", info.kind))
    return variants, skipped


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchDetector(torch.nn.Module):
    """A torch model behind the detector call: float32 images in 0..1 -> float32 decoded predictions.

    Casts the input to the model's dtype and memory format, so every variant takes the same images. On XLA the
    predictions come back to the host: NMS has data-dependent shapes and runs there.
    """

    def __init__(self, model: Callable, dtype: torch.dtype, channels_last: bool, *, to_host: bool = False) -> None:
        super().__init__()
        self.model, self.dtype, self.channels_last, self.to_host = model, dtype, channels_last, to_host

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.dtype)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        predictions = self.model(images).float()
        return predictions.cpu() if self.to_host else predictions

    def eval(self) -> TorchDetector:  # a traced or compiled model may not be an nn.Module child
        return self


class CudaGraphDetector:
    """fp16 model replayed from a captured CUDA graph (static input and output buffers, one per batch size)."""

    def __init__(self, model: torch.nn.Module, info: dev.DeviceInfo) -> None:
        self.model, self.info = model, info
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def eval(self) -> CudaGraphDetector:
        return self

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


def _compile_every_variant() -> None:
    """Dynamo keys its cache on the code object (YOLOv5.forward), shared by every model of the benchmark: with the
    default limit of 8 graphs, the later models silently fell back to eager while labelled `compile`. Allow enough
    graphs, and make hitting the limit an error (a failed row) instead of a silent fallback."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    dynamo_config.fail_on_recompile_limit_hit = True


def build(variant: Variant, model: YOLOv5 | None, info: dev.DeviceInfo, imgsz: int, *, onnx_path: Path | None,
          threads: int | None) -> Any:
    """A detector callable for `variant`: `model` is the eval-mode torch model (None for an ONNX-only model)."""
    if variant.runtime == "onnxruntime":
        if onnx_path is None or not onnx_path.is_file():
            if model is None:
                raise FileNotFoundError(f"no ONNX file for {variant.name}")
            onnx_path = export_onnx(model, onnx_path, imgsz)
        # no spinning: idle onnxruntime workers busy-waiting after a run slowed the pre- and post-processing
        # around it 5-10x on a 2-core CPU (end to end yolov5n@320: 29 ms spinning vs 10 ms without)
        return OrtDetector(onnx_path, threads=variant.threads or threads, spin=False)
    assert model is not None, variant
    net = copy.deepcopy(model).eval().to(info.device).to(_DTYPES[variant.dtype])
    channels_last = variant.mode in ("channels_last", "cudagraph") or info.kind == "cuda"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    example = torch.zeros(1, 3, imgsz, imgsz, device=info.device, dtype=_DTYPES[variant.dtype])
    if variant.mode == "trace":
        with torch.no_grad():
            net = torch.jit.freeze(torch.jit.trace(net, example, check_trace=False))
    elif variant.mode == "compile":
        _compile_every_variant()
        net = torch.compile(net)
    elif variant.mode == "cudagraph":
        return TorchDetector(CudaGraphDetector(net, info), torch.float16, channels_last=True)
    return TorchDetector(net, _DTYPES[variant.dtype], channels_last, to_host=info.kind == "xla")
