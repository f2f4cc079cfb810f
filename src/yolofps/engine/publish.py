"""After a training job: what a stage publishes, written once (save, size, mark finished, log).

`publish` saves the job's best model as a stage's model folder with its final metadata and metrics, adds its size,
marks the job's checkpoints finished (a rerun starts over instead of resuming) and logs the metrics and the folder to
the job's tracker. `training_metrics` and `size_and_accuracy` are the flat numbers stages report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from yolofps import device as dev
from yolofps.config import EvalConfig
from yolofps.engine import checkpoint, resume
from yolofps.engine.datasets import Data, evaluate
from yolofps.engine.predict import fitness
from yolofps.engine.train import JobResult, TrainingJob
from yolofps.model.yolo import model_info


def publish(job: TrainingJob, out: JobResult, folder: Path, metrics: dict[str, Any],
            artifact_path: str = "model") -> dict[str, Any]:
    """Save `out.model` to `folder` (meta: the job's + metrics), size it, mark the job finished, log; the metrics."""
    meta = job.meta | {"metrics": metrics}
    checkpoint.save_model(folder, out.model.cpu(), meta | {"finished": True, "weights": "best"})
    metrics = metrics | {"size_mb": round((folder / checkpoint.WEIGHTS).stat().st_size / 2**20, 3)}
    resume.mark_finished(job.checkpoints, {"metrics": metrics})
    job.tracker.log_metrics(metrics, step=out.state.epoch)
    job.tracker.log_artifacts(folder, artifact_path)
    return metrics


def training_metrics(out: JobResult, imgsz: int) -> dict[str, Any]:
    """Flat metrics of a finished job: the four ultralytics keys, size, speed, epochs and per-class AP."""
    size = model_info(out.model.cpu(), imgsz)
    metrics = out.result.metrics() | {
        "best_epoch": out.state.best_epoch + 1, "epochs_run": out.state.epoch, "params": size["params"],
        "gflops": round(size["gflops"], 3), "fitness": round(fitness(out.result.metrics()), 5),
        "images_per_s": round(out.state.history[-1].get("images_per_s", 0.0), 2),
        "stopped": out.state.stopped or "completed",  # completed | early_stop | time_limit | not_trained
    }
    return metrics | {f"ap50_95/{name}": round(ap, 5) for name, ap in out.result.per_class_ap.items()}


def size_and_accuracy(model: nn.Module, data: Data, info: dev.DeviceInfo, evaluation: EvalConfig,
                      imgsz: int) -> dict[str, float]:
    """Params, GFLOPs at `imgsz`, mAP50-95 and mAP50 (eval settings) of a model as it is now."""
    size = model_info(model.cpu(), imgsz)
    result, _ = evaluate(dev.prepare_model(model, info).eval(), data, info, evaluation)
    return {"params": size["params"], "gflops": round(size["gflops"], 4)} | result.accuracy()
