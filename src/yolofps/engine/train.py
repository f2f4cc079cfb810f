"""The one training loop: train, fine-tune after pruning, distillation and QAT all run as `fit(job)`.

A `TrainingJob` names every part of a run: the model, the objective (`engine.objectives`: what varies between
train, distillation and QAT), the data, the train-like settings, the device, where checkpoints go and what tracks
it. `fit` resumes from `job.checkpoints` when an earlier run with the same `params_hash` was cut short
(`engine.resume`), trains, evaluates with the COCO protocol after every epoch, saves best and last (+ resume state),
rewrites the history CSV, logs to the tracker, and returns the best model evaluated once more.

The step is XLA-safe by construction: fixed shapes, no host sync inside it; losses are read off the device only
every `LOG_EVERY` steps. Distributed (torchrun or torch_xla.launch): every process runs this loop on its share of
each global batch; only rank 0 evaluates, and its metrics are broadcast so that every rank takes the same stop
decision; only rank 0 writes files and logs, and only it gets a result.
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from yolofps import device as dev
from yolofps.config import EvalConfig, TrainConfig
from yolofps.data.dataset import build_loader
from yolofps.engine import checkpoint, resume
from yolofps.engine.datasets import Data, evaluate
from yolofps.engine.evaluate import EvalResult
from yolofps.engine.objectives import Objective
from yolofps.engine.optim import ModelEMA, accumulation, build_optimizer, lr_factor, resolve_optimizer, warmup
from yolofps.engine.predict import Predictions, fitness
from yolofps.errors import ConfigError, YolofpsError

LOG_EVERY = 10  # steps between reads of the running losses (the loop's only host sync)


class TrainingDivergedError(YolofpsError):
    """The loss went non-finite: training stops before that epoch is saved, so the last checkpoint stays good."""


class Tracker(Protocol):
    """Where a job logs: an MLflow run (`registry.TrackingRun`) or `NullTracker`."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None: ...


class NullTracker:
    """Tracks nothing (the other ranks of a distributed run, library use without MLflow)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        return None


class CheckpointStore:
    """How a job writes and reads its best/last models: arch.json + safetensors + meta (+ resume state)."""

    persistent = True  # a rerun can resume from what it saved

    def save(self, folder: Path, model: nn.Module, meta: dict[str, Any], state: dict | None = None) -> None:
        checkpoint.save_model(folder, model, meta, state=state)

    def load(self, folder: Path) -> nn.Module:
        return checkpoint.load_model(folder)[0]


class MemoryStore(CheckpointStore):
    """Best and last kept in memory only: no files, no resume (QAT, whose fake-quantized model is not an artifact
    until exported; quick library and test runs)."""

    persistent = False

    def __init__(self) -> None:
        self.template: nn.Module | None = None
        self.weights: dict[str, dict[str, torch.Tensor]] = {}

    def save(self, folder: Path, model: nn.Module, meta: dict[str, Any], state: dict | None = None) -> None:
        self.template = model  # copied once, at load: a deepcopy per epoch costs more than the epoch
        self.weights[Path(folder).name] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def load(self, folder: Path) -> nn.Module:
        model = deepcopy(self.template)
        model.load_state_dict(self.weights[Path(folder).name])
        return model


@dataclass
class TrainingJob:
    """One training run with its parts named."""

    name: str  # train, prune-0.5, distill, qat: the log prefix and meta["job"]
    model: nn.Module
    objective: Objective
    data: Data
    settings: TrainConfig  # epochs, global batch, optimizer (auto is resolved by fit), loader, patience, time limit
    evaluation: EvalConfig
    info: dev.DeviceInfo
    checkpoints: Path  # best/ and last/ (+ resume state) after every epoch (names only with a MemoryStore)
    history_csv: Path | None = None  # one row per epoch (DVC plots)
    tracker: Tracker = field(default_factory=NullTracker)
    meta: dict[str, Any] = field(default_factory=dict)  # into every checkpoint; "params_hash" decides resuming
    seed: int = 0  # epoch e's batches are seeded seed + e, so a resumed run sees the same data order
    force_resume: bool = False
    validate: bool = True  # False: evaluate after the last epoch only (ultralytics val=False); best = last
    store: CheckpointStore = field(default_factory=CheckpointStore)


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


@dataclass
class JobResult:
    """The best model (eval mode, on the device), the loop state, and its final evaluation."""

    model: nn.Module
    state: FitState
    result: EvalResult
    predictions: Predictions


@dataclass
class _Run:
    """The live parts of a fit: settings with the optimizer resolved, modules, optimizer, counters."""

    settings: TrainConfig
    model: nn.Module  # the plain module (EMA source, what is saved)
    step_model: nn.Module  # what runs forward: DDP-wrapped and/or compiled
    learned: nn.Module | None  # the objective's own learned parts
    optimizer: torch.optim.Optimizer
    scaler: Any
    ema: ModelEMA | None
    state: FitState
    deadline: float | None

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema else self.model

    def parts(self) -> dict[str, nn.Module | None]:
        return {"model": self.model, "ema": self.ema.module if self.ema else None, "objective": self.learned}


@dataclass
class _EpochStats:
    losses: dict[str, float]
    seconds: float
    images: int  # all ranks
    out_of_time: bool


def fit(job: TrainingJob) -> JobResult | None:
    """Train `job.model` for `job.settings.epochs` (0: evaluate it as it is); rank 0 gets the best model's result."""
    job.meta = job.meta | {"job": job.name}
    if job.settings.epochs == 0:
        return _evaluate_untrained(job)
    run = _start(job)
    for epoch in range(run.state.epoch, run.settings.epochs):
        stats = _train_epoch(job, run, epoch)
        _check_finite(stats.losses, epoch, run.state)
        _end_epoch(job, run, epoch, stats)
        if run.state.stopped:
            break
    dev.barrier(job.info)  # rank 0's last checkpoint is on disk before any rank moves on
    if not job.info.is_main:
        return None
    best = dev.prepare_model(job.store.load(job.checkpoints / "best"), job.info).eval()
    result, predictions = evaluate(best, job.data, job.info, job.evaluation)
    return JobResult(best, run.state, result, predictions)


def _start(job: TrainingJob) -> _Run:
    """Resolve the optimizer, move everything to the device, and restore the resume point if there is one."""
    info, data = job.info, job.data
    settings = resolve_optimizer(job.settings, num_images=len(data.train_set), num_classes=len(data.names))
    job.meta = job.meta | {"optimizer": settings.optim.optimizer, "device": info.name,
                           "world_size": info.world_size}
    if settings.batch % info.world_size:
        raise ConfigError(f"train.batch {settings.batch} is the global batch: it must divide by the "
                          f"{info.world_size} processes")
    if info.is_main:
        print(f"{job.name}: {len(data.train_set)} images, {settings.epochs} epochs, {settings.optim.optimizer} "
              f"lr0={settings.optim.lr0} on {info.name} x {info.world_size}", flush=True)
    model = dev.prepare_model(job.model, info)
    if hasattr(job.objective, "to"):
        job.objective.to(info.device)
    learned = getattr(job.objective, "learned", None)
    step_model = dev.compile_model(dev.wrap_ddp(model, info, sync_bn=settings.distributed.sync_bn), info,
                                   settings.compile)
    optimizer = build_optimizer(model, settings, list(learned.parameters()) if learned is not None else [])
    ema = ModelEMA(model) if settings.optim.ema else None
    deadline = time.monotonic() + settings.time_limit_min * 60 if settings.time_limit_min > 0 else None
    run = _Run(settings, model, step_model, learned, optimizer, dev.grad_scaler(info), ema, FitState(), deadline)
    saved = resume.resume_point(job.checkpoints, job.meta.get("params_hash", ""), force=job.force_resume,
                                verbose=info.is_main) if job.store.persistent else None
    if saved is not None:
        resume.check_compatible(saved, model, job.checkpoints / "last")
        run.state = FitState(**resume.restore(saved, run.parts(), optimizer))
        if ema is not None:
            ema.updates = run.state.ema_updates
    return run


def _loader(job: TrainingJob, run: _Run, epoch: int):
    """This process's share of an epoch's batches, mosaic off for the last `close_mosaic` epochs."""
    s, info = run.settings, job.info
    job.data.train_set.set_mosaic(epoch < s.epochs - s.loader.close_mosaic)
    return build_loader(job.data.train_set, s.batch // info.world_size, shuffle=True, workers=s.workers,
                        seed=job.seed + epoch, drop_last=len(job.data.train_set) > s.batch, rank=info.rank,
                        world_size=info.world_size)


def _end_epoch(job: TrainingJob, run: _Run, epoch: int, stats: _EpochStats) -> None:
    """Evaluate, update the counters and the stop decision, then save and log (rank 0)."""
    info, state, s = job.info, run.state, run.settings
    validated = job.validate or epoch + 1 == s.epochs
    metrics = dev.broadcast_object(_metrics(job, run.eval_model) if info.is_main and validated else {}, info)
    record = {"epoch": epoch, **stats.losses, "images_per_s": stats.images / max(stats.seconds, 1e-9), **metrics,
              **{f"lr/pg{i}": g["lr"] for i, g in enumerate(run.optimizer.param_groups)}}
    if info.kind == "xla":
        record["xla_compiles"] = dev.xla_compile_count()  # should stop growing after the first epoch
    score = fitness(metrics)
    is_best = score > state.best_fitness or not validated
    if is_best:
        state.best_fitness, state.best_epoch, state.stale_epochs = score, epoch, 0
    else:
        state.stale_epochs += 1
    state.epoch, state.ema_updates = epoch + 1, run.ema.updates if run.ema else 0
    state.history.append(record)
    if state.stale_epochs >= s.patience:
        state.stopped = "early_stop"
        print(f"early stop: no improvement for {s.patience} epochs (best epoch {state.best_epoch})")
    if stats.out_of_time:
        state.stopped = "time_limit"
        print(f"time limit: stopping after {s.time_limit_min} min, in epoch {epoch + 1}/{s.epochs}")
    if info.is_main:
        _save_epoch(job, run, record, is_best)


def _metrics(job: TrainingJob, model: nn.Module) -> dict[str, float]:
    return evaluate(model, job.data, job.info, job.evaluation)[0].metrics()


def _save_epoch(job: TrainingJob, run: _Run, record: dict[str, float], is_best: bool) -> None:
    """Save best (first) and last with the resume state, rewrite the history CSV, log the epoch."""
    meta = job.meta | {"epoch": run.state.epoch, "metrics": record, "finished": False}
    if is_best:  # best before last: a kill between them must not leave a resume point without its best
        job.store.save(job.checkpoints / "best", run.eval_model, meta)
    state = None
    if job.store.persistent:
        fit_state = {k: getattr(run.state, k) for k in FitState.__dataclass_fields__}
        state = resume.training_state(run.parts(), run.optimizer.state_dict(), fit_state)
    job.store.save(job.checkpoints / "last", run.eval_model, meta, state)
    if job.history_csv is not None:
        write_history(job.history_csv, run.state.history)
    job.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=run.state.epoch)
    line = "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in record.items() if k != "epoch")
    print(f"{job.name}: epoch {run.state.epoch}: {line}", flush=True)


def _evaluate_untrained(job: TrainingJob) -> JobResult:
    """`epochs: 0`: the model as it is, evaluated and saved where a training job leaves its best and last."""
    model = dev.prepare_model(job.model, job.info).eval()
    result, predictions = evaluate(model, job.data, job.info, job.evaluation)
    record = {"epoch": 0} | result.metrics()
    for name in ("best", "last"):
        job.store.save(job.checkpoints / name, model, job.meta | {"epoch": 0, "metrics": record, "finished": True})
    if job.history_csv is not None:
        write_history(job.history_csv, [record])
    print(f"{job.name}: epochs is 0: evaluated {job.meta.get('start_weights', 'the model')} as it is: "
          + "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in result.metrics().items()), flush=True)
    state = FitState(best_fitness=fitness(result.metrics()), best_epoch=-1, stopped="not_trained", history=[record])
    return JobResult(model, state, result, predictions)


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


def _train_epoch(job: TrainingJob, run: _Run, epoch: int) -> _EpochStats:
    """One pass over this epoch's batches: forward through the objective, backward, step every `accumulate`."""
    info, s, o = job.info, run.settings, run.settings.optim
    loader = _loader(job, run, epoch)
    run.model.train()
    num_batches = len(loader)
    warmup_steps = max(round(o.warmup_epochs * num_batches), 100) if o.warmup_epochs > 0 else 0
    accumulate = accumulation(s)
    for group in run.optimizer.param_groups:
        group["lr"] = o.lr0 * lr_factor(s, epoch)
    totals: dict[str, torch.Tensor] = {}
    images_seen, start, last_step, out_of_time, steps = 0, time.perf_counter(), -1, False, 0
    bar = tqdm(dev.device_loader(loader, info), total=num_batches, desc=f"epoch {epoch + 1}/{s.epochs}",
               disable=None if info.is_main else True, leave=False)
    run.optimizer.zero_grad(set_to_none=True)
    cut = 0  # boxes of 4-image mosaics beyond max_boxes (a single image never exceeds it: the dataset checks)
    for i, (images, targets, mask, metas) in enumerate(bar):
        cut += sum(meta["truncated"] for meta in metas)
        step = i + num_batches * epoch
        if step < warmup_steps:
            accumulate = max(1, round(np.interp(step, [0, warmup_steps], [1, o.nominal_batch / s.batch])))
            warmup(run.optimizer, s, step, warmup_steps, epoch)
        parts = _forward_backward(job, run, images, targets, mask)
        if i - last_step >= accumulate or i + 1 == num_batches:
            last_step = i
            _optimizer_step(run, info)
        for name, value in parts.items():
            totals[name] = totals.get(name, 0) + value.detach()  # stays on the device, inside the XLA step graph
        dev.mark_step(info)
        images_seen += images.shape[0] * info.world_size
        steps = i + 1
        if i % LOG_EVERY == 0 and info.is_main:  # the only host sync in the loop
            bar.set_postfix({k: f"{v.item() / (i + 1):.4f}" for k, v in totals.items() if k != "loss"})
        if _time_is_up(run.deadline, info, i):
            out_of_time = True
            break
    dev.synchronize(info)
    seconds = time.perf_counter() - start
    if cut and info.is_main:
        warnings.warn(f"epoch {epoch + 1}: {cut} mosaic box(es) beyond train.loader.max_boxes="
                      f"{s.loader.max_boxes} were left out of the loss; raise train.loader.max_boxes to keep them",
                      stacklevel=2)
    means = {f"train/{name}_loss" if name != "loss" else "train/loss":
             float(dev.all_reduce_mean(v, info)) / max(steps, 1) for name, v in totals.items()}
    return _EpochStats(means, seconds, images_seen, out_of_time)


def _forward_backward(job: TrainingJob, run: _Run, images, targets, mask) -> dict[str, torch.Tensor]:
    info = job.info
    images = dev.to_device(images, info)  # [B, 3, S, S] float 0..1
    targets, mask = targets.to(info.device, non_blocking=True), mask.to(info.device, non_blocking=True)
    with dev.autocast(info):
        parts = job.objective(run.step_model, images, targets, mask)
    # the loss is scaled by the per-process batch (yolov5) and DDP averages gradients over processes:
    # times world_size gives the gradient of one process running the whole global batch
    parts["loss"] = parts["loss"] * info.world_size
    run.scaler.scale(parts["loss"]).backward()
    return parts


def _optimizer_step(run: _Run, info: dev.DeviceInfo) -> None:
    run.scaler.unscale_(run.optimizer)
    if run.settings.optim.grad_clip > 0:
        params = list(run.model.parameters()) + (list(run.learned.parameters()) if run.learned is not None else [])
        torch.nn.utils.clip_grad_norm_(params, max_norm=run.settings.optim.grad_clip)
    dev.optimizer_step(run.optimizer, run.scaler, info)
    run.optimizer.zero_grad(set_to_none=True)
    run.state.optimizer_steps += 1
    if run.ema:
        run.ema.update(run.model)


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Per-epoch records as CSV (DVC plots), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        fields = list(dict.fromkeys(key for record in history for key in record))  # validate=False: metrics at the end
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)
