"""OpenVINO backend (CPU): fp32, bf16 where the CPU has it natively, and INT8 IR from NNCF.

The model (an ONNX file, or IR `.xml` + `.bin`) is read once; each batch size gets its own compiled model with
static shapes (`reshape`), like the ONNX Runtime backend's fixed batch. The precision is always set explicitly:
on CPUs with AMX the plugin's default inference precision is bf16, so an unlabelled "fp32" row would not be one.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the layers NNCF kept float run in f32
IR_NAME = "model.xml"  # an OpenVINO model folder holds model.xml + model.bin


@lru_cache(maxsize=1)
def core() -> Any:
    """The process's OpenVINO Core (it loads the CPU plugin once)."""
    import openvino as ov

    return ov.Core()


def capabilities() -> set[str]:
    """What the CPU plugin runs natively here: FP32, BF16 (AVX512-BF16/AMX), INT8, ... (OPTIMIZATION_CAPABILITIES)."""
    return set(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def unavailable(dtype: str) -> str | None:
    """Why `dtype` cannot run natively on this CPU (None when it can); bf16 is emulated, and slow, without BF16."""
    if dtype == "bf16" and "BF16" not in capabilities():
        return f"needs native bf16 (AVX512-BF16 or AMX); this CPU's OpenVINO capabilities are {sorted(capabilities())}"
    return None


def model_file(artifact: Path) -> Path:
    """The file OpenVINO reads: an ONNX file, an IR .xml, or the model.xml inside an IR folder."""
    artifact = Path(artifact)
    return artifact / IR_NAME if artifact.is_dir() else artifact


def read_model(artifact: Path) -> Any:
    """The ov.Model of an ONNX file or an IR (a missing file is a FileNotFoundError naming it)."""
    path = model_file(artifact)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no OpenVINO model (an .onnx file, or an IR folder with {IR_NAME})")
    return core().read_model(str(path))


def save_ir(model: Any, folder: Path) -> Path:
    """Write an ov.Model as IR (folder/model.xml + model.bin), weights as they are (no fp16 compression)."""
    import openvino as ov

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(folder / IR_NAME), compress_to_fp16=False)
    return folder


def compile_config(dtype: str, threads: int) -> dict[str, str]:
    """The CPU plugin settings of one row: precision, latency hint, threads (0 = the plugin's choice)."""
    config = {"INFERENCE_PRECISION_HINT": PRECISIONS[dtype], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


class OpenVinoBackend:
    """A compiled OpenVINO model per batch size behind the backend call (CPU)."""

    def __init__(self, artifact: Path | None, *, dtype: str = "fp32", threads: int = 0, compiled: Any = None):
        if dtype not in PRECISIONS:
            raise ValueError(f"OpenVINO dtype must be one of {sorted(PRECISIONS)}, got {dtype!r}")
        self.artifact, self.dtype, self.threads = artifact, dtype, threads
        self.model = read_model(artifact) if artifact is not None else None
        self.requests: dict[int, Any] = {}  # batch size -> infer request of the model compiled for it
        self.fixed = compiled.create_infer_request() if compiled is not None else None  # NNCF's compiled model

    @classmethod
    def from_compiled(cls, compiled: Any) -> OpenVinoBackend:
        """Around a model someone else compiled (NNCF's validation function hands one over)."""
        return cls(None, compiled=compiled)

    def _request(self, images: np.ndarray) -> Any:
        if self.fixed is not None:
            return self.fixed
        batch = len(images)
        if batch not in self.requests:
            model = self.model.clone()
            model.reshape({model.input(0): list(images.shape)})  # static shapes: shape ops fold away
            compiled = core().compile_model(model, "CPU", compile_config(self.dtype, self.threads))
            self.requests[batch] = compiled.create_infer_request()
        return self.requests[batch]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] in 0..1 (any device) -> decoded predictions [B, N, 5+nc] on the same device."""
        batch = np.ascontiguousarray(images.detach().cpu().float().numpy())
        request = self._request(batch)
        request.infer({0: batch}, share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy()).to(images.device)
