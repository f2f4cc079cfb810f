"""The one training loop: train, fine-tune after pruning, distillation and QAT all run through `fit`.

What varies between them is the objective: a callable `(model, images, targets, mask) -> dict` whose
"loss" entry is optimized (other entries are logged). The step is XLA-safe by construction: fixed shapes,
no host sync inside it; losses are read off the device only every `LOG_EVERY` steps.

Distributed (torchrun or torch_xla.launch): every process runs this loop on its share of each global batch;
only rank 0 evaluates, and its metrics are broadcast so that every rank takes the same stop decision. The
epoch callback (checkpoints, history, MLflow) runs on rank 0 only.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from yolofps import device as dev
from yolofps.config import TrainConfig
from yolofps.errors import YolofpsError

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]


class Objective(Protocol):
    """A loss module: returns a dict with a scalar "loss" to optimize plus named parts to log."""

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor) -> dict[str, torch.Tensor]: ...


LOG_EVERY = 10  # steps between reads of the running losses (the loop's only host sync)


def resolve_optimizer(cfg: TrainConfig, *, num_images: int, num_classes: int) -> TrainConfig:
    """The config `fit` runs with: `optimizer: auto` replaced by the optimizer and lr it stands for."""
    o = cfg.optim
    optimizer, lr0, momentum, warmup_bias_lr = pick_optimizer(
        o.optimizer, lr0=o.lr0, momentum=o.momentum, warmup_bias_lr=o.warmup_bias_lr, num_images=num_images,
        batch=cfg.batch, nominal_batch=o.nominal_batch, epochs=cfg.epochs, num_classes=num_classes)
    resolved = dataclasses.replace(o, optimizer=optimizer, lr0=lr0, momentum=momentum, warmup_bias_lr=warmup_bias_lr)
    return dataclasses.replace(cfg, optim=resolved)


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Multiplier of lr0 for an epoch: linear or cosine decay from 1 to lrf (yolov5's schedules)."""
    lrf = cfg.optim.lrf
    if cfg.optim.cos_lr:
        return ((1 - math.cos(epoch * math.pi / cfg.epochs)) / 2) * (lrf - 1) + 1
    return (1 - epoch / cfg.epochs) * (1.0 - lrf) + lrf


class TrainingDivergedError(YolofpsError):
    """The loss went non-finite: training stops before that epoch is saved, so the last checkpoint stays good."""


@dataclass
class FitState:
    """Everything needed to resume: counters, best fitness and per-epoch history."""

    epoch: int = 0  # epochs completed
    best_fitness: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0
    ema_updates: int = 0
    optimizer_steps: int = 0
    stopped: str = ""  # why training ended before `epochs`: "" | "early_stop" | "time_limit"
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class EpochEnd:
    """Passed to the epoch callback: the record just appended to history, whether it is the new best,
    and a function producing the resume state (called only when the callback saves a checkpoint)."""

    record: dict[str, float]
    is_best: bool
    stop: bool
    resume_state: Callable[[], dict[str, Any]]


class ModelEMA:
    """Exponential moving average of weights with yolov5's warm-up ramp (decay grows with updates)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        self.module = deepcopy(model).eval()
        self.decay, self.tau, self.updates = decay, tau, updates
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        model_state = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(model_state[name].detach(), alpha=1 - d)


def pick_optimizer(name: str, *, lr0: float, momentum: float, warmup_bias_lr: float, num_images: int,
                   batch: int, nominal_batch: int, epochs: int, num_classes: int) -> tuple[str, float, float, float]:
    """ultralytics' `optimizer: auto`: AdamW with a class-count lr for short runs (<= 10k iterations), else SGD.

    Returns (optimizer, lr0, momentum, warmup_bias_lr); explicit names pass through unchanged.
    """
    if name != "auto":
        return name, lr0, momentum, warmup_bias_lr
    iterations = math.ceil(num_images / max(batch, nominal_batch)) * epochs
    if iterations > 10_000:
        return "SGD", 0.01, 0.9, warmup_bias_lr
    return "AdamW", round(0.002 * 5 / (4 + num_classes), 6), 0.9, 0.0  # bias lr above 0.01 destabilizes Adam


def build_optimizer(model: nn.Module, spec: TrainConfig) -> torch.optim.Optimizer:
    """SGD (nesterov) or AdamW with yolov5's three groups: pg0 conv weights (decayed), pg1 norm weights, pg2 biases."""
    o = spec.optim
    if o.optimizer == "auto":
        raise ValueError("build_optimizer: resolve `optimizer: auto` first (resolve_optimizer)")
    decayed, norm_weights, biases = [], [], []
    for module in model.modules():
        if hasattr(module, "bias") and isinstance(module.bias, nn.Parameter):
            biases.append(module.bias)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            norm_weights.append(module.weight)
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):
            decayed.append(module.weight)
    accumulate = max(round(o.nominal_batch / spec.batch), 1)
    weight_decay = o.weight_decay * spec.batch * accumulate / o.nominal_batch  # scaled like yolov5
    if o.optimizer == "AdamW":
        optimizer = torch.optim.AdamW(decayed, lr=o.lr0, betas=(o.momentum, 0.999), weight_decay=weight_decay)
    else:
        optimizer = torch.optim.SGD(decayed, lr=o.lr0, momentum=o.momentum, nesterov=True,
                                    weight_decay=weight_decay)
    optimizer.add_param_group({"params": norm_weights, "weight_decay": 0.0})
    optimizer.add_param_group({"params": biases, "weight_decay": 0.0})
    return optimizer


def _warmup(optimizer: torch.optim.Optimizer, spec: TrainConfig, step: int, warmup_steps: int, epoch: int) -> None:
    """Linear warm-up: biases from warmup_bias_lr down, others from 0 up; momentum (Adam: beta1) ramps up."""
    o = spec.optim
    target = o.lr0 * lr_factor(spec, epoch)
    momentum = float(np.interp(step, [0, warmup_steps], [o.warmup_momentum, o.momentum]))
    for index, group in enumerate(optimizer.param_groups):
        start = o.warmup_bias_lr if index == 2 else 0.0
        group["lr"] = float(np.interp(step, [0, warmup_steps], [start, target]))
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        else:
            group["momentum"] = momentum


def fit(model: nn.Module, objective: Objective, make_loader: Callable[[int, bool], Iterable[Batch]],
        evaluate: Callable[[nn.Module], dict[str, float]], spec: TrainConfig, info: dev.DeviceInfo, *,
        resume: dict[str, Any] | None = None, on_epoch_end: Callable[[nn.Module, FitState, EpochEnd], None],
        fitness: Callable[[dict[str, float]], float]) -> tuple[nn.Module, FitState]:
    """Train `model` for `spec.epochs`; returns the EMA (or raw) model to evaluate/export and the state.

    `spec` is a train-like config whose optimizer is resolved (see `resolve_optimizer`).

    `make_loader(epoch, mosaic)` gives that epoch's batches (this process's share of them when distributed;
    seeded by epoch, so a resumed run sees the same data order). `evaluate(model)` returns metrics;
    `fitness(metrics)` ranks epochs. `on_epoch_end` saves checkpoints and logs; it runs after every epoch, on
    rank 0, with the model to save. With `spec.time_limit_min` the loop stops after the step that crosses it,
    then evaluates and calls `on_epoch_end` as after a full epoch (`state.stopped == "time_limit"`).
    """
    model = dev.prepare_model(model, info)
    step_model = dev.compile_model(dev.wrap_ddp(model, info, sync_bn=spec.distributed.sync_bn), info, spec.compile)
    optimizer = build_optimizer(model, spec)
    ema = ModelEMA(model) if spec.optim.ema else None
    state = FitState()
    if resume is not None:
        state = _restore(resume, model, optimizer, ema)
    scaler = dev.grad_scaler(info)
    deadline = time.monotonic() + spec.time_limit_min * 60 if spec.time_limit_min > 0 else None
    for epoch in range(state.epoch, spec.epochs):
        mosaic = epoch < spec.epochs - spec.loader.close_mosaic
        losses, seconds, images_seen, out_of_time = _train_epoch(
            step_model, model, objective, make_loader(epoch, mosaic), optimizer, scaler, ema, spec, info, state,
            epoch, deadline)
        _check_finite(losses, epoch, state)
        eval_model = ema.module if ema else model
        metrics = dev.broadcast_object(evaluate(eval_model) if info.is_main else None, info)
        record = {"epoch": epoch, **losses, "images_per_s": images_seen / max(seconds, 1e-9), **metrics,
                  **{f"lr/pg{i}": g["lr"] for i, g in enumerate(optimizer.param_groups)}}
        if info.kind == "xla":
            record["xla_compiles"] = dev.xla_compile_count()  # should stop growing after the first epoch
        score = fitness(metrics)
        is_best = score > state.best_fitness
        if is_best:
            state.best_fitness, state.best_epoch, state.stale_epochs = score, epoch, 0
        else:
            state.stale_epochs += 1
        state.epoch = epoch + 1
        state.ema_updates = ema.updates if ema else 0
        state.history.append(record)
        if state.stale_epochs >= spec.patience:
            state.stopped = "early_stop"
            print(f"early stop: no improvement for {spec.patience} epochs (best epoch {state.best_epoch})")
        if out_of_time:
            state.stopped = "time_limit"
            print(f"time limit: stopping after {spec.time_limit_min} min, in epoch {epoch + 1}/{spec.epochs}")
        snapshot = lambda: training_state(model, optimizer.state_dict(), ema.module if ema else None, state)  # noqa: E731
        if info.is_main:
            on_epoch_end(eval_model, state, EpochEnd(record, is_best, bool(state.stopped), snapshot))
        if state.stopped:
            break
    dev.barrier(info)  # rank 0's last checkpoint is on disk before any rank moves on
    return (ema.module if ema else model), state


def _check_finite(losses: dict[str, float], epoch: int, state: FitState) -> None:
    """Stop before a diverged epoch is evaluated or saved (the losses are all-reduced: every rank stops here)."""
    if not all(math.isfinite(v) for v in losses.values()):
        raise TrainingDivergedError(
            f"training diverged in epoch {epoch + 1}: mean losses {losses} are not finite; the last good "
            f"checkpoint (epoch {state.epoch}) is kept, nothing of this epoch is saved. Lower train.optim.lr0 or "
            "train.optim.warmup_bias_lr, or keep train.optim.grad_clip > 0")


def _time_is_up(deadline: float | None, info: dev.DeviceInfo, i: int) -> bool:
    """Past the deadline? Distributed ranks agree by an all-reduce every LOG_EVERY steps (else they would hang)."""
    if deadline is None:
        return False
    if not info.distributed:
        return time.monotonic() > deadline
    if i % LOG_EVERY:
        return False
    late = torch.tensor([float(time.monotonic() > deadline)], device=info.device)
    return bool(dev.all_reduce_mean(late, info).item() > 0)  # any rank late: all stop


def _train_epoch(step_model, model, objective, loader, optimizer, scaler, ema, spec: TrainConfig,
                 info: dev.DeviceInfo, state: FitState, epoch: int,
                 deadline: float | None) -> tuple[dict[str, float], float, int, bool]:
    """One pass over the loader; returns mean losses, seconds, images seen (all ranks) and whether time ran out.

    `step_model` is what runs forward (DDP-wrapped and/or compiled); `model` is the plain module (EMA source).
    """
    model.train()
    num_batches = len(loader)
    o = spec.optim
    warmup_steps = max(round(o.warmup_epochs * num_batches), 100) if o.warmup_epochs > 0 else 0
    accumulate = max(round(o.nominal_batch / spec.batch), 1)
    for group in optimizer.param_groups:
        group["lr"] = o.lr0 * lr_factor(spec, epoch)
    totals: dict[str, torch.Tensor] = {}
    images_seen, start, last_step, out_of_time, steps = 0, time.perf_counter(), -1, False, 0
    bar = tqdm(dev.device_loader(loader, info), total=num_batches, desc=f"epoch {epoch + 1}/{spec.epochs}",
               disable=None if info.is_main else True, leave=False)
    optimizer.zero_grad(set_to_none=True)
    cut = 0  # boxes of 4-image mosaics beyond max_boxes (a single image never exceeds it: the dataset checks)
    for i, (images, targets, mask, metas) in enumerate(bar):
        cut += sum(meta["truncated"] for meta in metas)
        step = i + num_batches * epoch
        if step < warmup_steps:
            accumulate = max(1, round(np.interp(step, [0, warmup_steps], [1, o.nominal_batch / spec.batch])))
            _warmup(optimizer, spec, step, warmup_steps, epoch)
        images = dev.to_device(images, info)  # [B, 3, S, S] float 0..1
        targets, mask = targets.to(info.device, non_blocking=True), mask.to(info.device, non_blocking=True)
        with dev.autocast(info):
            parts = objective(step_model, images, targets, mask)
        # the loss is scaled by the per-process batch (yolov5) and DDP averages gradients over processes:
        # times world_size gives the gradient of one process running the whole global batch
        parts["loss"] = parts["loss"] * info.world_size
        scaler.scale(parts["loss"]).backward()
        if i - last_step >= accumulate or i + 1 == num_batches:
            last_step = i
            _optimizer_step(model, optimizer, scaler, spec, info)
            state.optimizer_steps += 1
            if ema:
                ema.update(model)
        for name, value in parts.items():
            totals[name] = totals.get(name, 0) + value.detach()  # stays on the device, inside the XLA step graph
        dev.mark_step(info)
        images_seen += images.shape[0] * info.world_size
        steps = i + 1
        if i % LOG_EVERY == 0 and info.is_main:  # the only host sync in the loop
            bar.set_postfix({k: f"{v.item() / (i + 1):.4f}" for k, v in totals.items() if k != "loss"})
        if _time_is_up(deadline, info, i):
            out_of_time = True
            break
    dev.synchronize(info)
    seconds = time.perf_counter() - start
    if cut and info.is_main:
        warnings.warn(f"epoch {epoch + 1}: {cut} mosaic box(es) beyond train.loader.max_boxes="
                      f"{spec.loader.max_boxes} were left out of the loss; raise train.loader.max_boxes to keep them",
                      stacklevel=2)
    means = {f"train/{name}_loss" if name != "loss" else "train/loss":
             float(dev.all_reduce_mean(v, info)) / max(steps, 1) for name, v in totals.items()}
    return means, seconds, images_seen, out_of_time


def _optimizer_step(model: nn.Module, optimizer, scaler, spec: TrainConfig, info: dev.DeviceInfo) -> None:
    scaler.unscale_(optimizer)
    if spec.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=spec.optim.grad_clip)
    dev.optimizer_step(optimizer, scaler, info)
    optimizer.zero_grad(set_to_none=True)


def training_state(model: nn.Module, optimizer_state: dict | None, ema: nn.Module | None, state: FitState) -> dict:
    """Resume state as plain tensors/numbers (loadable with weights_only=True)."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()} if ema is not None else None,
        "optimizer": _to_cpu(optimizer_state),
        "fit": {k: getattr(state, k) for k in FitState.__dataclass_fields__},
        "torch_rng": torch.get_rng_state(),
    }


def _to_cpu(value: Any) -> Any:
    """Optimizer state with every tensor on the host (XLA tensors cannot be saved as they are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _restore(saved: dict[str, Any], model: nn.Module, optimizer, ema: ModelEMA | None) -> FitState:
    model.load_state_dict(saved["model"])
    if saved.get("optimizer"):
        optimizer.load_state_dict(saved["optimizer"])
    state = FitState(**saved["fit"])
    if ema is not None:
        ema.module.load_state_dict(saved["ema"] if saved.get("ema") is not None else saved["model"])
        ema.updates = state.ema_updates
    if saved.get("torch_rng") is not None:
        torch.set_rng_state(saved["torch_rng"])
    return state
