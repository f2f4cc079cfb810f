"""`train` stage: the YOLOv5 baseline (teacher) that every later stage optimizes and is measured against.

Reads `data/augmented/`, trains `train.model` from scratch (or from `train.weights`: an official yolov5 `.pt`,
imported without unpickling code, or a yolofps model folder) with the one training loop, evaluates with the COCO
protocol after every epoch, and writes:
  models/train/{best,last}/   arch.json + weights.safetensors + meta.json
  checkpoints/train/last/     the same plus train_state.pt (persisted by DVC, so a rerun resumes)
  metrics/train.json          metrics/mAP50B, metrics/mAP50-95B, metrics/precisionB, metrics/recallB, ...
  plots/train.csv             one row per epoch (DVC plots)
  plots/train/                PR curve, confusion matrix, val images with predictions
and tracks the run in MLflow (params, per-epoch metrics, system metrics, artifacts).

With `train.epochs: 0` and `train.weights`, the imported model is evaluated and published as the baseline untrained,
so prune, distill, quantize, bench and register run on the user's own model.

With `train.distributed.nproc_per_node * nnodes > 1` the stage relaunches itself through torchrun, one process per
device; rank 0 alone writes the files above and the one MLflow run. On `device: xla` it uses torch_xla.launch.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from yolofps import device as dev
from yolofps.config import Config, TrainConfig, to_dict
from yolofps.data import formats
from yolofps.engine import checkpoint, plots
from yolofps.engine.datasets import load_data
from yolofps.engine.evaluate import EvalResult, confusion_matrix
from yolofps.engine.objectives import DetectionObjective, detection_loss
from yolofps.engine.predict import Predictions
from yolofps.engine.publish import publish, training_metrics
from yolofps.engine.resume import job_hash
from yolofps.engine.train import TrainingJob, fit
from yolofps.errors import ConfigError, YolofpsError
from yolofps.fileio import content_sha256, fresh_dir, write_json
from yolofps.lineage import lineage_tags
from yolofps.model.spec import preset
from yolofps.model.yolo import YOLOv5, build_model
from yolofps.paths import Paths
from yolofps.registry import TrackingRun
from yolofps.stages import StageResult


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Train, evaluate and save the baseline; resumes from checkpoints/train when a previous run was cut short."""
    processes = cfg.train.distributed.processes
    if processes > 1 and cfg.device == "xla":
        dev.xla_launch(_xla_worker, (cfg, paths))
        return _result(paths, read_metrics(paths))
    if processes > 1 and not dev.inside_launcher():
        return launch(cfg, paths)
    return _run_here(cfg, paths)


def _run_here(cfg: Config, paths: Paths) -> StageResult:
    """Train in this process (alone, or as one rank of torchrun / torch_xla.launch)."""
    info = dev.resolve(cfg.device, amp=cfg.train.amp)
    try:
        return _train(cfg, paths, info)
    finally:
        dev.shutdown(info)


def launch(cfg: Config, paths: Paths) -> StageResult:
    """Run this stage under torchrun with the same config (written to a temporary params file)."""
    t = cfg.train.distributed
    with tempfile.TemporaryDirectory(prefix="yolofps-launch-") as folder:
        params = Path(folder) / "params.yaml"
        params.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        command = dev.torchrun_command(["yolofps.cli", "train", "--params", str(params)],
                                       nproc_per_node=t.nproc_per_node, nnodes=t.nnodes,
                                       rdzv_endpoint=t.rdzv_endpoint, rdzv_id=t.rdzv_id)
        print("train: launching " + " ".join(command), flush=True)
        code = subprocess.call(command, cwd=paths.root)
    if code != 0:
        raise YolofpsError(f"train: torchrun exited with {code}; the log above shows each rank's error")
    return _result(paths, read_metrics(paths))


def _xla_worker(index: int, cfg: Config, paths: Paths) -> None:
    """One process per XLA core (torch_xla.launch passes the process index first)."""
    _run_here(cfg, paths)


def read_metrics(paths: Paths) -> dict[str, Any]:
    """metrics/train.json as written by rank 0."""
    import json

    return json.loads(paths.metrics("train").read_text())


def _result(paths: Paths, metrics: dict[str, Any]) -> StageResult:
    return StageResult(outputs={"best": paths.models("train") / "best", "last": paths.models("train") / "last",
                                "metrics": paths.metrics("train"), "plots": paths.plots / "train.csv"},
                       metrics=metrics)


def _train(cfg: Config, paths: Paths, info: dev.DeviceInfo) -> StageResult:
    """This process's part of training: everything on rank 0, only the training loop on the others."""
    train = cfg.train
    dev.seed_everything(cfg.seed)
    data = load_data(cfg, paths, train)
    model, start = initial_model(paths, train, data.names)
    meta = {"names": list(data.names), "imgsz": train.imgsz, "model": train.model,
            "params_hash": job_hash(cfg, train, start.get("start_weights_sha256"))} | start
    job = TrainingJob("train", model, DetectionObjective(detection_loss(model.spec, train.loss, train.imgsz)), data,
                      train, cfg.eval, info, paths.checkpoints("train"), paths.plots / "train.csv", meta=meta,
                      seed=cfg.seed, force_resume=train.resume)
    if not info.is_main:  # no MLflow run, no files: rank 0 writes them
        fit(job)
        return StageResult(outputs={}, metrics={})
    tags = lineage_tags(paths.root, "train", to_dict(train)) | {"model": train.model, "device": info.name,
                                                                 "world_size": str(info.world_size)}
    tags |= {k: str(v) for k, v in start.items() if k in ("start_weights", "start_weights_sha256")}
    with TrackingRun(cfg.mlflow, run_name=f"train-{train.model}", params=to_dict(cfg), tags=tags) as tracking:
        job.tracker = tracking
        out = fit(job)
        models = fresh_dir(paths.models("train"))
        metrics = publish(job, out, models / "best", training_metrics(out, train.imgsz), "model/best")
        last, last_meta = checkpoint.load_model(job.checkpoints / "last")
        checkpoint.save_model(models / "last", last, last_meta | {"finished": True, "weights": "last"})
        write_json(paths.metrics("train"), metrics)
        plot_dir = fresh_dir(paths.plots / "train")
        write_plots(plot_dir, out.result, out.predictions, data.names, cfg.eval.sample_images)
        for artifact, folder in ((paths.plots / "train.csv", "results"), (paths.metrics("train"), "results"),
                                 (plot_dir, "plots"), (models / "last", "model/last")):
            tracking.log_artifacts(artifact, folder)
    return _result(paths, metrics)


def initial_model(paths: Paths, train: TrainConfig, names: Sequence[str]) -> tuple[YOLOv5, dict[str, Any]]:
    """`train.model` from scratch, or the model in `train.weights` with what to record about it.

    Same class count: fine-tuned as it is. Another class count: backbone and neck kept, the Detect convs
    re-initialized for the data's classes (one warning). The data set's class names are the model's from here on.
    """
    if not train.weights:
        return build_model(preset(train.model, num_classes=len(names))), {}
    path = paths.root / train.weights
    if not path.exists():
        raise ConfigError(f"train.weights: {train.weights} does not exist (put the checkpoint under "
                          f"{paths.weights}/ or run `yolofps import`)")
    model, meta = checkpoint.load_weights(path)
    start = {"start_weights": train.weights, "start_weights_sha256": content_sha256(path),
             "start_weights_names": list(meta.get("names", []))}
    if model.spec.num_classes == len(names):
        return model, start
    if train.epochs == 0:
        raise ConfigError(f"train.weights: {train.weights} predicts {model.spec.num_classes} classes, the data set "
                          f"has {len(names)}; train.epochs: 0 keeps the model as it is, so they must match "
                          "(set train.epochs >= 1 to re-initialize its Detect head and fine-tune)")
    fresh = build_model(dataclasses.replace(model.spec, num_classes=len(names)))
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("model.24.m.")}
    fresh.load_state_dict(kept, strict=False)
    warnings.warn(f"train.weights: {train.weights} has {model.spec.num_classes} classes, the data set "
                  f"{len(names)}: backbone and neck kept, the Detect convs re-initialized", stacklevel=2)
    return fresh, start | {"detect_reinitialized": True}


def write_plots(folder: Path, result: EvalResult, preds: Predictions, names, sample_images: int) -> None:
    """PR curve, confusion matrix and a grid of val images with their predictions."""
    if result.pr_curve is not None:
        plots.plot_pr_curve(result.pr_curve, result.recall_thresholds, names, folder / "pr_curve.png")
    matrix = confusion_matrix(preds.detections, preds.ground_truth, len(names))
    plots.plot_confusion_matrix(matrix, names, folder / "confusion_matrix.png")
    images = [formats.decode_image(path) for path in preds.paths[:sample_images]]
    plots.save_prediction_grid(images, preds.detections[:sample_images], names, folder / "val_predictions.png",
                               max_images=sample_images)


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.train`: the same as `yolofps train`."""
    from yolofps import cli

    return cli.main(["train", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
