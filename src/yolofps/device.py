"""The only module that knows cpu | cuda | xla: device resolution, precision context, grad scaler, sync.

Everything else asks this module; `torch_xla` is imported lazily so the CPU/CUDA install never needs it.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import ContextManager

import numpy as np
import torch

from yolofps.errors import ConfigError


@dataclass(frozen=True)
class DeviceInfo:
    """Where training runs and with which precision."""

    kind: str  # cpu | cuda | xla
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None when running in fp32

    @property
    def name(self) -> str:
        if self.kind == "cuda":
            return torch.cuda.get_device_name(self.device)
        return self.kind


def resolve(requested: str = "auto", *, amp: bool = True) -> DeviceInfo:
    """`auto` picks cuda when available, else cpu; `xla` needs torch-xla (the `tpu` extra)."""
    kind = requested
    if requested == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but torch.cuda.is_available() is False (CPU build of torch?)")
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return DeviceInfo("cuda", torch.device("cuda"), dtype if amp else None)
    if kind == "xla":
        try:
            import torch_xla  # noqa: F401  (lazy: only the tpu extra installs it)
        except ImportError as err:
            raise ConfigError(f"device: xla requested but torch_xla cannot be imported ({err})") from None
        return DeviceInfo("xla", torch_xla.device(), torch.bfloat16 if amp else None)
    if kind != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda or xla, got {requested!r}")
    return DeviceInfo("cpu", torch.device("cpu"), None)  # CPU autocast is slower than fp32 for convs here


def autocast(info: DeviceInfo) -> ContextManager:
    """The precision context for forward passes: autocast on accelerators, nothing on CPU."""
    if info.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=info.device.type, dtype=info.amp_dtype)


def grad_scaler(info: DeviceInfo) -> torch.amp.GradScaler:
    """A grad scaler that is active only for CUDA fp16 (bf16 needs none)."""
    return torch.amp.GradScaler("cuda", enabled=info.kind == "cuda" and info.amp_dtype == torch.float16)


def prepare_model(model: torch.nn.Module, info: DeviceInfo) -> torch.nn.Module:
    """Move a model to the device; channels_last on CUDA (faster convolutions on tensor cores)."""
    model = model.to(info.device)
    if info.kind == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(images: torch.Tensor, info: DeviceInfo) -> torch.Tensor:
    """uint8 [B, 3, H, W] batch -> float in 0..1 on the device (non_blocking with pinned memory)."""
    images = images.to(info.device, non_blocking=True).float().div_(255)
    if info.kind == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def pin_memory() -> bool:
    """Pinned host memory speeds up host->GPU copies; it only exists with CUDA."""
    return torch.cuda.is_available()


def synchronize(info: DeviceInfo) -> None:
    """Wait for queued device work (for honest timing)."""
    if info.kind == "cuda":
        torch.cuda.synchronize(info.device)
    elif info.kind == "xla":
        import torch_xla

        torch_xla.sync()


def mark_step(info: DeviceInfo) -> None:
    """End of a train step: on XLA this cuts and dispatches the traced graph; elsewhere nothing."""
    if info.kind == "xla":
        import torch_xla

        torch_xla.sync()


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; deterministic algorithms where they exist."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
