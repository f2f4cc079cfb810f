"""A training job: loaders + the one loop + per-epoch checkpoints/history/tracking + final evaluation.

`train` runs one from scratch; `prune` fine-tunes each pruned model and `distill` trains a student through
the same job, so resume, evaluation, checkpoints and MLflow logging behave identically everywhere.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolofps import device as dev
from yolofps.config import Config, EvalConfig, TrainConfig, to_dict
from yolofps.data.dataset import YoloDataset, build_loader
from yolofps.engine import checkpoint
from yolofps.engine.evaluate import EvalResult
from yolofps.engine.predict import Predictions, evaluate_model, evaluate_pipeline, fitness
from yolofps.engine.train import EpochEnd, FitState, Objective, fit, resolve_optimizer
from yolofps.errors import ConfigError
from yolofps.fileio import write_json
from yolofps.lineage import params_hash
from yolofps.model.yolo import YOLOv5
from yolofps.paths import Paths
from yolofps.registry import TrackingRun
from yolofps.runtime import Deployment, Pipeline


@dataclass
class Data:
    """Train and val datasets plus the val loader of one job."""

    train_set: YoloDataset
    val_loader: Any
    names: tuple[str, ...]


@dataclass
class JobResult:
    """The best model (eval mode, on the device), the loop state, and its final evaluation."""

    model: YOLOv5
    state: FitState
    result: EvalResult
    predictions: Predictions


def load_data(cfg: Config, paths: Paths, train: TrainConfig) -> Data:
    """Datasets for training on the augmented data set and evaluating on its val split."""
    data_yaml = paths.augmented_data / "data.yaml"
    extra = cfg.augment.transforms if train.loader.online_transforms else ()
    train_set = YoloDataset(data_yaml, "train", train.imgsz, train.loader, train=True, extra_transforms=extra,
                            seed=cfg.seed)
    val_set = YoloDataset(data_yaml, "val", train.imgsz, train.loader, train=False)
    return Data(train_set, build_loader(val_set, train.batch, shuffle=False, workers=0), train_set.names)


def evaluate(model, data: Data, info: dev.DeviceInfo, settings: EvalConfig) -> tuple[EvalResult, Predictions]:
    """COCO evaluation with the `eval` section's settings (on the host when training on XLA)."""
    model, info = dev.host_model(model, info)
    return evaluate_model(model, data.val_loader, info, data.names, conf=settings.conf, iou=settings.iou,
                          max_det=settings.max_det)


def evaluate_variant(pipeline: Pipeline, data: Data, evaluation: EvalConfig) -> tuple[EvalResult, Predictions]:
    """COCO evaluation of any runtime pipeline (a bench row, a quantized model) at the `eval` section's settings."""
    settings = Deployment.evaluation(pipeline.deployment.imgsz, evaluation.conf, evaluation.iou, evaluation.max_det)
    return evaluate_pipeline(pipeline.with_deployment(settings), data.val_loader, data.names)


def job_hash(cfg: Config, train: TrainConfig, extra: Any = None) -> str:
    """What must match for an interrupted job to be resumed automatically.

    A starting checkpoint (`train.weights`) counts by its content, passed in `extra` by the train stage, not by its
    path: the same file under another name resumes, another file at the same name does not."""
    settings = {k: v for k, v in to_dict(train).items() if k != "weights"}
    return params_hash({"seed": cfg.seed, "train": settings, "eval": to_dict(cfg.eval), "augment": to_dict(cfg.augment),
                        "extra": extra})


def run_job(cfg: Config, train: TrainConfig, data: Data, model: YOLOv5, objective: Objective, *,
            info: dev.DeviceInfo, checkpoints: Path, history_csv: Path, tracking: TrackingRun,
            meta: dict[str, Any], force_resume: bool = False) -> JobResult | None:
    """Train `model` with `objective`; resumes from `checkpoints/last` when a matching run was cut short.

    Distributed, only rank 0 gets a result; the other ranks return None once training is over.
    """
    loop = resolve_optimizer(train, num_images=len(data.train_set), num_classes=len(data.names))
    meta = meta | {"optimizer": loop.optim.optimizer, "device": info.name, "world_size": info.world_size}
    if info.is_main:
        print(f"{meta.get('job', 'train')}: {len(data.train_set)} images, {loop.epochs} epochs, "
              f"{loop.optim.optimizer} lr0={loop.optim.lr0} on {info.name} x {info.world_size}", flush=True)
    if train.batch % info.world_size:
        raise ConfigError(f"train.batch {train.batch} is the global batch: it must divide by the "
                          f"{info.world_size} processes")
    per_process = train.batch // info.world_size

    def make_loader(epoch: int, mosaic: bool):
        data.train_set.set_mosaic(mosaic)
        return build_loader(data.train_set, per_process, shuffle=True, workers=train.workers,
                            seed=cfg.seed + epoch, drop_last=len(data.train_set) > train.batch, rank=info.rank,
                            world_size=info.world_size)

    resume = resume_state(checkpoints, meta["params_hash"], force=force_resume, verbose=info.is_main)
    if resume is not None:
        check_compatible(resume, model, checkpoints / "last")
    best, state = fit(model, objective, make_loader, lambda m: evaluate(m, data, info, cfg.eval)[0].metrics(), loop,
                      info, resume=resume, on_epoch_end=epoch_callback(checkpoints, history_csv, meta, tracking),
                      fitness=fitness)
    if not info.is_main:
        return None
    best_model, _ = checkpoint.load_model(checkpoints / "best")
    best_model = dev.prepare_model(best_model, info).eval()
    result, predictions = evaluate(best_model, data, info, cfg.eval)
    return JobResult(best_model, state, result, predictions)


def evaluate_as_baseline(model: YOLOv5, data: Data, info: dev.DeviceInfo, settings: EvalConfig, *, checkpoints: Path,
                         history_csv: Path, meta: dict[str, Any]) -> JobResult:
    """`train.epochs: 0`: the model as it is, evaluated and saved where a training job leaves its best and last."""
    model = dev.prepare_model(model, info).eval()
    result, predictions = evaluate(model, data, info, settings)
    record = {"epoch": 0} | result.metrics()
    for name in ("best", "last"):
        checkpoint.save_model(checkpoints / name, model, meta | {"epoch": 0, "metrics": record, "finished": True})
    write_history(history_csv, [record])
    print(f"{meta.get('job', 'train')}: train.epochs is 0: evaluated {meta.get('start_weights')} as it is: "
          + "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in result.metrics().items()), flush=True)
    state = FitState(best_fitness=fitness(result.metrics()), best_epoch=-1, stopped="not_trained",
                     history=[record])
    return JobResult(model, state, result, predictions)


def resume_state(checkpoints: Path, section_hash: str, *, force: bool, verbose: bool = True) -> dict[str, Any] | None:
    """Resume when forced, or when the last run with the same params stopped before its last epoch."""
    checkpoint.recover(checkpoints / "best")  # undo a kill between the two renames of a save
    last = checkpoint.recover(checkpoints / "last")
    if not (last / checkpoint.STATE).is_file():
        return None
    # never resume from (nor silently discard) a damaged checkpoint: the error names the file and the way out
    hint = f"delete {last} to start this stage over from epoch 0 (rm -r {last}), or restore it from a backup"
    _, meta = checkpoint.load_model(last, hint=hint)
    state = checkpoint.load_state(last, hint=hint)
    if force or (not meta.get("finished", False) and meta.get("params_hash") == section_hash):
        if verbose:
            print(f"resuming from {last} after epoch {state['fit']['epoch']}", flush=True)
        return state
    return None


def check_compatible(state: dict[str, Any], model: YOLOv5, last: Path) -> None:
    """A forced resume into a different architecture is a named error, not a tensor-shape traceback."""
    saved = state.get("model") or {}
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    found = {name: tuple(getattr(value, "shape", ())) for name, value in saved.items()}
    if found != expected:
        differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise checkpoint.CheckpointError(
            f"{last / checkpoint.STATE}: saved for a different architecture than this run's model ({len(differ)} "
            f"tensors differ, e.g. {differ[0]}); rerun without -S train.resume=true to start over, or restore the "
            "params the checkpoint was trained with")


def epoch_callback(checkpoints: Path, history_csv: Path, meta: dict[str, Any],
                   tracking: TrackingRun) -> Callable[[Any, FitState, EpochEnd], None]:
    """Per epoch: save last (+ resume state) and best, rewrite the history CSV, log metrics to MLflow."""
    name = meta.get("job", "train")

    def on_epoch_end(model, state: FitState, end: EpochEnd) -> None:
        epoch_meta = meta | {"epoch": state.epoch, "metrics": end.record, "finished": False}
        if end.is_best:  # best before last: a kill between them must not leave a resume point without its best
            checkpoint.save_model(checkpoints / "best", model, epoch_meta)
        checkpoint.save_model(checkpoints / "last", model, epoch_meta, state=end.resume_state())
        write_history(history_csv, state.history)
        tracking.log_metrics({k: v for k, v in end.record.items() if k != "epoch"}, step=state.epoch)
        line = "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in end.record.items() if k != "epoch")
        print(f"{name}: epoch {state.epoch}: {line}", flush=True)

    return on_epoch_end


def mark_finished(checkpoints: Path, meta: dict[str, Any]) -> None:
    """Record that the job completed, so a later rerun starts over instead of resuming."""
    path = checkpoints / "last" / checkpoint.META
    write_json(path, json.loads(path.read_text()) | meta | {"finished": True})


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Per-epoch records as CSV (DVC plots), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)
