"""The only module that knows cpu | cuda | xla: device resolution, precision, compile, distribution, sync.

Everything else asks this module; `torch_xla` is imported lazily so the CPU/CUDA install never needs it, and a
later backend swap (TorchTPU) is a change here only. Distribution: torchrun (`torch.distributed.run`) starts one
process per device and sets RANK/WORLD_SIZE/LOCAL_RANK; `resolve` reads them and joins the process group
(nccl on CUDA, gloo on CPU). On XLA, `torch_xla.launch` starts the processes and the XLA runtime knows the ranks.
The rank lives in `DeviceInfo`, never in a global.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from yolofps.errors import ConfigError


@dataclass(frozen=True)
class DeviceInfo:
    """Where training runs and with which precision."""

    kind: str  # cpu | cuda | xla
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None when running in fp32
    rank: int = 0  # global rank of this process
    world_size: int = 1  # processes training together (torchrun or torch_xla.launch)

    @property
    def name(self) -> str:
        if self.kind == "cuda":
            return torch.cuda.get_device_name(self.device)
        return self.kind

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, checkpoints, writes metrics and talks to MLflow."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve(requested: str = "auto", *, amp: bool = True) -> DeviceInfo:
    """`auto` picks cuda when available, else cpu; `xla` needs torch-xla (the `tpu` extra).

    Under torchrun (WORLD_SIZE > 1 in the environment) this also joins the process group.
    """
    kind = requested
    if requested == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "xla":
        return _resolve_xla(amp)
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or xla, got {requested!r}")
    rank, world_size, local_rank = _torchrun_ranks()
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but torch.cuda.is_available() is False (CPU build of torch?)")
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once
        torch.cuda.set_device(local_rank)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        info = DeviceInfo("cuda", torch.device("cuda", local_rank), dtype if amp else None, rank, world_size)
    else:
        info = DeviceInfo("cpu", torch.device("cpu"), None, rank, world_size)  # CPU autocast: slower convs here
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if kind == "cuda" else "gloo")
    return info


def _resolve_xla(amp: bool) -> DeviceInfo:
    try:
        import torch_xla  # lazy: only the tpu extra installs it
        import torch_xla.runtime as xr
    except ImportError as err:
        raise ConfigError(f"device: xla requested but torch_xla cannot be imported ({err}); "
                          "install the tpu extra in its own environment (make install-xla)") from None
    # bf16 needs no grad scaler; XLA (TPU and CPU alike) runs it natively
    return DeviceInfo("xla", torch_xla.device(), torch.bfloat16 if amp else None, xr.global_ordinal(),
                      xr.world_size())


def _torchrun_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables torchrun sets; (0, 1, 0) outside it."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def autocast(info: DeviceInfo) -> AbstractContextManager:
    """The precision context for forward passes: autocast on accelerators, nothing on CPU."""
    if info.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=info.device.type, dtype=info.amp_dtype)


def grad_scaler(info: DeviceInfo) -> torch.amp.GradScaler:
    """A grad scaler that is active only for CUDA fp16 (bf16 needs none)."""
    return torch.amp.GradScaler("cuda", enabled=info.kind == "cuda" and info.amp_dtype == torch.float16)


def autocast_dtype_name(info: DeviceInfo) -> str:
    """The forward precision as a word for logs and metadata: fp32, fp16 or bf16."""
    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[info.amp_dtype]


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


def device_loader(loader: Iterable, info: DeviceInfo) -> Iterable:
    """On XLA, a loader that prefetches batches to the device in a background thread; elsewhere the loader."""
    if info.kind != "xla":
        return loader
    import torch_xla.distributed.parallel_loader as pl

    return pl.MpDeviceLoader(loader, info.device)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, info: DeviceInfo) -> None:
    """Step the optimizer; on XLA `xm.optimizer_step` first all-reduces gradients across replicas (cores)."""
    if info.kind == "xla":
        import torch_xla.core.xla_model as xm

        xm.optimizer_step(optimizer)  # the step graph is cut by mark_step at the end of the train step
        return
    scaler.step(optimizer)
    scaler.update()


def host_model(model: torch.nn.Module, info: DeviceInfo) -> tuple[torch.nn.Module, DeviceInfo]:
    """The model and device for evaluation: on XLA a CPU copy (NMS has data-dependent shapes), else as is."""
    if info.kind != "xla":
        return model, info
    from copy import deepcopy

    return deepcopy(model).cpu(), DeviceInfo("cpu", torch.device("cpu"), None, info.rank, info.world_size)


def xla_compile_count() -> int:
    """How many graphs XLA has compiled in this process (0 without torch_xla): flat after warm-up."""
    try:
        import torch_xla.debug.metrics as met
    except ImportError:
        return 0
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def compile_model(model: torch.nn.Module, info: DeviceInfo, enabled: bool) -> torch.nn.Module:
    """`torch.compile` on CPU/CUDA when asked; XLA already compiles whole steps, so it is left as is there."""
    if not enabled or info.kind == "xla":
        return model
    return torch.compile(model)


# --- distribution -------------------------------------------------------------------------------------------


def wrap_ddp(model: torch.nn.Module, info: DeviceInfo, *, sync_bn: bool) -> torch.nn.Module:
    """DistributedDataParallel under torchrun; XLA reduces gradients in `optimizer_step` instead.

    SyncBatchNorm only runs on GPUs in torch, so `sync_bn` applies on CUDA and is ignored (with a note) on CPU.
    """
    if not info.distributed or info.kind == "xla":
        return model
    if sync_bn and info.kind == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_bn and info.is_main:
        print("train.distributed.sync_bn: SyncBatchNorm needs CUDA; BatchNorm statistics stay per process on CPU",
              flush=True)
    device_ids = [info.device.index] if info.kind == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def barrier(info: DeviceInfo) -> None:
    """Wait until every process reaches this point (no-op in a single process)."""
    if not info.distributed:
        return
    if info.kind == "xla":
        import torch_xla.core.xla_model as xm

        xm.rendezvous("yolofps-barrier")
    else:
        torch.distributed.barrier()


def all_reduce_mean(values: torch.Tensor, info: DeviceInfo) -> torch.Tensor:
    """The mean of a tensor over all processes (for logged losses: every rank saw different images)."""
    if not info.distributed:
        return values
    if info.kind == "xla":
        import torch_xla.core.xla_model as xm

        return xm.all_reduce(xm.REDUCE_SUM, values) / info.world_size
    values = values.clone()
    torch.distributed.all_reduce(values)
    return values / info.world_size


def broadcast_object(obj: Any, info: DeviceInfo) -> Any:
    """Rank 0's value of a picklable object on every rank (evaluation runs on rank 0 only)."""
    if not info.distributed:
        return obj
    if info.kind == "xla":
        import torch_xla.core.xla_model as xm

        return xm.mesh_reduce("yolofps-broadcast", obj, lambda values: values[0])
    box = [obj if info.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DeviceInfo) -> None:
    """Leave the process group at the end of a torchrun worker."""
    if info.distributed and info.kind != "xla" and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def inside_launcher() -> bool:
    """True in a process that torchrun started (it sets TORCHELASTIC_RUN_ID and WORLD_SIZE)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def torchrun_command(module_args: Sequence[str], *, nproc_per_node: int, nnodes: int, rdzv_endpoint: str,
                     rdzv_id: str) -> list[str]:
    """`python -m torch.distributed.run ... -m <module_args>`: PyTorch's elastic launcher, as torchrun users know it.

    One node: `--standalone` (a local rendezvous on a free port). Several: the c10d rendezvous at `rdzv_endpoint`
    (host:port of any one node), the same `rdzv_id` on every node; ranks are assigned by the rendezvous.
    """
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}",
               f"--nnodes={nnodes}"]
    if nnodes == 1:
        command.append("--standalone")
    else:
        command += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    return command + ["-m", *module_args]


def xla_launch(fn: Callable[..., Any], args: tuple) -> None:
    """One process per local XLA device (all TPU cores of the host) running `fn(*args)`."""
    import torch_xla

    torch_xla.launch(fn, args=args)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; deterministic algorithms where they exist."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
