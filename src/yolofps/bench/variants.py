"""The variants a benchmark runs: every model the pipeline produced × every execution that applies on the device.

A model is a torch checkpoint folder (train, prune-<r>, distill) or a quantized file (the quantize stage's ONNX
Runtime INT8 model and OpenVINO INT8 IR). An execution (`runtime.Execution`) says how it runs: eager,
channels_last, TorchScript trace, torch.compile, fp16/bf16 and CUDA graphs (CUDA only) in torch; ONNX Runtime;
OpenVINO fp32 and bf16 (bf16 only where the CPU has it natively). Building one may fail (a tracer or compiler
error on this device); the caller records that as a failed row instead of crashing.
"""

from __future__ import annotations

from dataclasses import dataclass

from yolofps import device as dev
from yolofps.runtime import Execution

CUDA_ONLY = ("fp16", "bf16", "cudagraph")
CPU_RUNTIMES = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class Variant:
    """One row of the benchmark: which model, run how, where."""

    model: str  # artifact name: train, prune-0.5, distill, quantize
    execution: Execution
    device: str  # cpu | cuda | xla

    @property
    def name(self) -> str:
        """`prune-0.5/trace-fp32`, `train/onnxruntime-fp32`, `prune-0.5/openvino-1t-bf16` (1 intra-op thread)."""
        return f"{self.model}/{self.execution.suffix}"


def runtime_variants(model_name: str, runtime: str, dtypes: tuple[str, ...], threads: tuple[int, ...]
                     ) -> tuple[list[Variant], list[dict[str, str]]]:
    """One ONNX Runtime or OpenVINO row per dtype and per intra-op thread setting of bench.runtime_threads.

    OpenVINO bf16 where this CPU lacks native bf16 is skipped with the reason (emulated bf16 is slower than fp32).
    """
    variants, skipped = [], []
    for dtype in dtypes:
        reason = None
        if runtime == "openvino":
            from yolofps.runtime.openvino import unavailable

            reason = unavailable(dtype)
        if reason:
            skipped.append({"model": model_name, "mode": f"{runtime}-{dtype}", "reason": reason})
            continue
        variants += [Variant(model_name, Execution(runtime, "eager", dtype, t), "cpu") for t in threads]
    return variants, skipped


def plan(model_name: str, modes: tuple[str, ...], info: dev.DeviceInfo, runtime_threads: tuple[int, ...] = (0,)
         ) -> tuple[list[Variant], list[dict[str, str]]]:
    """The variants of one torch model on this device, and the modes skipped here (with the reason)."""
    variants, skipped = [], []
    torch_runtime = "xla" if info.kind == "xla" else "torch"
    for mode in modes:
        if mode in CUDA_ONLY and info.kind != "cuda":
            skipped.append({"model": model_name, "mode": mode, "reason": f"needs CUDA (device is {info.kind})"})
        elif mode in CPU_RUNTIMES:
            dtypes = ("fp32", "bf16") if mode == "openvino" else ("fp32",)
            found, missing = runtime_variants(model_name, mode, dtypes, runtime_threads)
            variants, skipped = variants + found, skipped + missing
        elif mode in ("fp16", "bf16"):
            variants.append(Variant(model_name, Execution("torch", "channels_last", mode), info.kind))
        elif mode == "cudagraph":
            variants.append(Variant(model_name, Execution("torch", "cudagraph", "fp16"), info.kind))
        elif info.kind == "xla" and mode != "eager":
            skipped.append({"model": model_name, "mode": mode, "reason": "on XLA the graph is compiled by XLA itself"})
        else:
            variants.append(Variant(model_name, Execution(torch_runtime, mode, "fp32"), info.kind))
    return variants, skipped
