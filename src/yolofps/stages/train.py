"""`train` stage: the YOLOv5 baseline (teacher) that every later stage optimizes and is measured against.

Reads `data/augmented/`, trains `train.model` from scratch with the one training loop, evaluates with
the COCO protocol after every epoch, and writes:
  models/train/{best,last}/   arch.json + weights.safetensors + meta.json
  checkpoints/train/last/     the same plus train_state.pt (persisted by DVC, so a rerun resumes)
  metrics/train.json          metrics/mAP50B, metrics/mAP50-95B, metrics/precisionB, metrics/recallB, ...
  plots/train.csv             one row per epoch (DVC plots)
  plots/train/                PR curve, confusion matrix, val images with predictions
and tracks the run in MLflow (params, per-epoch metrics, system metrics, artifacts).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import cv2

from yolofps import device as dev
from yolofps.config import Config, to_dict
from yolofps.data.dataset import LoaderSpec, YoloDataset, build_loader
from yolofps.engine import checkpoint, plots
from yolofps.engine.evaluate import confusion_matrix
from yolofps.engine.predict import Predictions, evaluate_model, fitness
from yolofps.engine.train import EpochEnd, FitState, LoopSpec, fit
from yolofps.fileio import fresh_dir, write_json
from yolofps.lineage import lineage_tags, params_hash
from yolofps.model.loss import YOLOv5Loss
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model, model_info
from yolofps.paths import Paths
from yolofps.registry import TrackingRun
from yolofps.stages import StageResult


class DetectionObjective:
    """The plain detection loss as a training objective (distillation wraps a teacher around the same call)."""

    def __init__(self, loss: YOLOv5Loss) -> None:
        self.loss = loss

    def __call__(self, model, images, targets, mask):
        return self.loss(model(images), targets, mask)


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Train, evaluate and save the baseline; resumes from checkpoints/train when a previous run was cut short."""
    train = cfg.train
    info = dev.resolve(cfg.device, amp=train.amp)
    dev.seed_everything(cfg.seed)
    data_yaml = paths.augmented_data / "data.yaml"
    loader_spec = loader_spec_from(cfg)
    extra = cfg.augment.transforms if train.online_transforms else ()
    train_set = YoloDataset(data_yaml, "train", loader_spec, train=True, extra_transforms=extra, seed=cfg.seed)
    val_set = YoloDataset(data_yaml, "val", loader_spec, train=False)
    names = train_set.names
    spec = preset(train.model, num_classes=len(names))
    model = build_model(spec)
    section_hash = params_hash({"seed": cfg.seed, "train": to_dict(train), "augment": to_dict(cfg.augment)})
    resume = _resume_state(paths, section_hash, force=train.resume)
    val_loader = build_loader(val_set, train.batch, shuffle=False, workers=0)

    def make_loader(epoch: int, mosaic: bool):
        train_set.set_mosaic(mosaic)
        return build_loader(train_set, train.batch, shuffle=True, workers=train.workers, seed=cfg.seed + epoch,
                            drop_last=len(train_set) > train.batch)

    def evaluate(eval_model) -> dict[str, float]:
        result, _ = evaluate_model(eval_model, val_loader, info, names, conf=train.conf, iou=train.iou,
                                   max_det=train.max_det)
        return result.metrics()

    meta = {"names": list(names), "imgsz": train.imgsz, "model": train.model, "params_hash": section_hash,
            "device": info.name}
    tags = lineage_tags(paths.root, "train", to_dict(train)) | {"model": train.model, "device": info.name}
    with TrackingRun(cfg.mlflow, run_name=f"train-{train.model}", params=to_dict(cfg), tags=tags) as tracking:
        on_epoch_end = _epoch_callback(paths, meta, tracking)
        best_model_last, state = fit(
            model, DetectionObjective(YOLOv5Loss(spec, image_size=train.imgsz, box=train.box, obj=train.obj,
                                                 cls=train.cls, anchor_t=train.anchor_t)),
            make_loader, evaluate, LoopSpec.from_config(train), info, resume=resume, on_epoch_end=on_epoch_end,
            fitness=fitness)
        metrics = _finish(paths, cfg, info, val_loader, names, state, meta, tracking)
    return StageResult(outputs={"best": paths.models("train") / "best", "last": paths.models("train") / "last",
                                "metrics": paths.metrics("train"), "plots": paths.plots / "train.csv"},
                       metrics=metrics)


def loader_spec_from(cfg: Config) -> LoaderSpec:
    """The loader's view of the `train` section."""
    t = cfg.train
    return LoaderSpec(image_size=t.imgsz, max_boxes=t.max_boxes, mosaic=t.mosaic, hsv_h=t.hsv_h, hsv_s=t.hsv_s,
                      hsv_v=t.hsv_v, translate=t.translate, scale=t.scale, fliplr=t.fliplr)


def _resume_state(paths: Paths, section_hash: str, *, force: bool) -> dict[str, Any] | None:
    """Resume when asked, or when the last run with the same params stopped before its last epoch."""
    last = paths.checkpoints("train") / "last"
    if not (last / checkpoint.STATE).is_file():
        return None
    _, meta = checkpoint.load_model(last)  # a damaged checkpoint fails here with a named error
    state = checkpoint.load_state(last)
    unfinished = not meta.get("finished", False)
    if force or (unfinished and meta.get("params_hash") == section_hash):
        print(f"train: resuming from {last} after epoch {state['fit']['epoch']}")
        return state
    return None


def _epoch_callback(paths: Paths, meta: dict[str, Any], tracking: TrackingRun):
    """Per epoch: save last (+ resume state) and best, append the CSV row, log metrics to MLflow."""
    ckpt = paths.checkpoints("train")

    def on_epoch_end(model, state: FitState, end: EpochEnd) -> None:
        epoch_meta = meta | {"epoch": state.epoch, "metrics": end.record, "finished": False}
        checkpoint.save_model(ckpt / "last", model, epoch_meta, state=end.resume_state())
        if end.is_best:
            checkpoint.save_model(ckpt / "best", model, epoch_meta)
        _write_history(paths.plots / "train.csv", state.history)
        tracking.log_metrics({k: v for k, v in end.record.items() if k != "epoch"}, step=state.epoch)
        line = "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in end.record.items() if k != "epoch")
        print(f"train: epoch {state.epoch}: {line}", flush=True)

    return on_epoch_end


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


def _finish(paths: Paths, cfg: Config, info, val_loader, names, state: FitState, meta: dict[str, Any],
            tracking: TrackingRun) -> dict[str, Any]:
    """Final evaluation of the best model; publish models, metrics, plots and MLflow artifacts."""
    ckpt, out = paths.checkpoints("train"), fresh_dir(paths.models("train"))
    best, _ = checkpoint.load_model(ckpt / "best")
    best = dev.prepare_model(best, info)
    result, preds = evaluate_model(best, val_loader, info, names, conf=cfg.train.conf, iou=cfg.train.iou,
                                   max_det=cfg.train.max_det)
    size = model_info(best.cpu(), cfg.train.imgsz)
    metrics = result.metrics() | {
        "best_epoch": state.best_epoch + 1, "epochs_run": state.epoch, "params": size["params"],
        "gflops": round(size["gflops"], 3), "fitness": round(fitness(result.metrics()), 5),
        "images_per_s": round(state.history[-1]["images_per_s"], 2),
    } | {f"ap50_95/{name}": round(ap, 5) for name, ap in result.per_class_ap.items()}
    final_meta = meta | {"metrics": metrics, "finished": True, "epoch": state.epoch}
    for name in ("best", "last"):
        model, _ = checkpoint.load_model(ckpt / name)
        checkpoint.save_model(out / name, model, final_meta | {"weights": name})
    _mark_finished(ckpt / "last", final_meta)
    write_json(paths.metrics("train"), metrics)
    plot_dir = fresh_dir(paths.plots / "train")
    _write_plots(plot_dir, result, preds, names, cfg.train.sample_images)
    tracking.log_metrics(result.metrics(), step=state.epoch)
    tracking.set_tags({"best_epoch": str(state.best_epoch + 1)})
    for artifact in (paths.plots / "train.csv", plot_dir, paths.metrics("train")):
        tracking.log_artifacts(artifact, "results" if artifact.is_file() else "plots")
    tracking.log_artifacts(out, "model")
    return metrics


def _mark_finished(folder: Path, meta: dict[str, Any]) -> None:
    """Record in the checkpoint that its run completed (a rerun then starts over unless resume is forced)."""
    write_json(folder / checkpoint.META, meta)


def _write_plots(folder: Path, result, preds: Predictions, names, sample_images: int) -> None:
    if result.pr_curve is not None:
        plots.plot_pr_curve(result.pr_curve, result.recall_thresholds, names, folder / "pr_curve.png")
    matrix = confusion_matrix(preds.detections, preds.ground_truth, len(names))
    plots.plot_confusion_matrix(matrix, names, folder / "confusion_matrix.png")
    images = [cv2.imread(path) for path in preds.paths[:sample_images]]
    plots.save_prediction_grid(images, preds.detections[:sample_images], names, folder / "val_predictions.png",
                               max_images=sample_images)


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.train`: the same as `yolofps train`."""
    from yolofps import cli

    return cli.main(["train", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
