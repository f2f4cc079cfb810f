"""`prune` stage: structured channel pruning of the baseline at each `prune.ratios`, then fine-tuning.

A pruned model is a new ArchSpec with fewer channels (torch-pruning DepGraph keeps residual and concat
paths consistent), so it saves and loads like any model and runs faster without sparse kernels. Writes
`models/prune/prune-<ratio>/` (best fine-tuned weights), `metrics/prune.json` (params, GFLOPs and mAP before
pruning, right after it (`before_finetune/`), and after fine-tuning, per ratio) and `plots/prune/prune-<ratio>.csv`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from yolofps import device as dev
from yolofps.config import Config, PruneConfig, TrainConfig, to_dict
from yolofps.engine import checkpoint, job
from yolofps.fileio import fresh_dir, write_json
from yolofps.lineage import lineage_tags
from yolofps.metric_names import MAP50, MAP50_95, scoped
from yolofps.model.yolo import YOLOv5, model_info
from yolofps.optimize.prune import prune_model
from yolofps.paths import Paths
from yolofps.registry import TrackingRun
from yolofps.stages import StageResult
from yolofps.stages.train import DetectionObjective, detection_loss


def variant_name(ratio: float) -> str:
    """`prune-0.3`: the name a pruned model goes by in metrics, folders and the benchmark table."""
    return f"prune-{ratio:g}"


def prune_baseline(baseline: YOLOv5, p: PruneConfig, ratio: float, imgsz: int) -> YOLOv5:
    """The baseline pruned at `ratio` as the `prune` section says (the distill stage's student is made the same way)."""
    activation = None if p.activation == "keep" else p.activation
    return prune_model(baseline.cpu(), ratio=ratio, image_size=imgsz, importance=p.importance, round_to=p.round_to,
                       iterative_steps=p.iterative_steps, activation=activation)


def finetune_config(train: TrainConfig, epochs: int) -> TrainConfig:
    """The train hyperparameters for a short fine-tune: fewer epochs, warm-up and mosaic closing scaled down."""
    optim = dataclasses.replace(train.optim, warmup_epochs=min(train.optim.warmup_epochs, 1.0))
    loader = dataclasses.replace(train.loader, close_mosaic=min(train.loader.close_mosaic, epochs // 2))
    return dataclasses.replace(train, epochs=epochs, resume=False, optim=optim, loader=loader)


def size_and_accuracy(model: YOLOv5, data: job.Data, info: dev.DeviceInfo, cfg: Config) -> dict[str, float]:
    """Params, GFLOPs at train.imgsz, mAP50-95 and mAP50 (eval settings) of a model as it is now."""
    size = model_info(model.cpu(), cfg.train.imgsz)
    result, _ = job.evaluate(dev.prepare_model(model, info).eval(), data, info, cfg.eval)
    return {"params": size["params"], "gflops": round(size["gflops"], 4)} | result.accuracy()


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Prune the baseline at every ratio and fine-tune each through the training loop."""
    info = dev.resolve(cfg.device, amp=cfg.train.amp)
    dev.seed_everything(cfg.seed)
    finetune = finetune_config(cfg.train, cfg.prune.finetune_epochs)
    data = job.load_data(cfg, paths, finetune)
    baseline, base_meta = checkpoint.load_model(paths.models("train") / "best")
    metrics: dict[str, Any] = {f"baseline/{k}": v for k, v in size_and_accuracy(baseline, data, info, cfg).items()}
    out_dir = fresh_dir(paths.models("prune"))
    for ratio in cfg.prune.ratios:
        name = variant_name(ratio)
        metrics |= {f"{name}/{k}": v for k, v in prune_one(cfg, paths, data, info, finetune, baseline, base_meta,
                                                             ratio).items()}
        print(f"prune: {name}: " + "  ".join(f"{k.split('/')[-1]}={v}" for k, v in metrics.items()
                                             if k.startswith(name)), flush=True)
    write_json(paths.metrics("prune"), metrics)
    return StageResult(outputs={"models": out_dir, "metrics": paths.metrics("prune")}, metrics=metrics)


def prune_one(cfg: Config, paths: Paths, data: job.Data, info: dev.DeviceInfo, finetune: TrainConfig,
              baseline: YOLOv5, base_meta: dict[str, Any], ratio: float) -> dict[str, Any]:
    """Prune at one ratio, measure, fine-tune, publish `models/prune/<name>`; returns that variant's metrics."""
    p = cfg.prune
    name = variant_name(ratio)
    pruned = prune_baseline(baseline, p, ratio, finetune.imgsz)
    after_pruning = size_and_accuracy(pruned, data, info, cfg)
    meta = {"job": name, "names": base_meta["names"], "imgsz": finetune.imgsz, "model": name, "source": "train",
            "prune_ratio": ratio, "activation": pruned.spec.activation,
            "params_hash": job.job_hash(cfg, finetune, {"prune": to_dict(p), "ratio": ratio})}
    tags = lineage_tags(paths.root, "prune", to_dict(p)) | {"variant": name, "device": info.name}
    with TrackingRun(cfg.mlflow, run_name=name, params={"prune": to_dict(p), "ratio": ratio,
                                                        "train": to_dict(finetune)}, tags=tags) as tracking:
        out = job.run_job(cfg, finetune, data, pruned, DetectionObjective(detection_loss(pruned.spec, cfg)),
                          info=info, checkpoints=paths.checkpoints("prune") / name,
                          history_csv=paths.plots / "prune" / f"{name}.csv", tracking=tracking, meta=meta)
        variant = {"params": after_pruning["params"], "gflops": after_pruning["gflops"],
                   **{scoped("before_finetune", k): after_pruning[k] for k in (MAP50_95, MAP50)},
                   **out.result.accuracy(), "size_mb": 0.0}
        checkpoint.save_model(paths.models("prune") / name, out.model.cpu(), meta | {"metrics": variant})
        variant["size_mb"] = round((paths.models("prune") / name / checkpoint.WEIGHTS).stat().st_size / 2**20, 3)
        job.mark_finished(paths.checkpoints("prune") / name, {"metrics": variant})
        tracking.log_metrics(variant, step=out.state.epoch)
        tracking.log_artifacts(paths.models("prune") / name, "model")
    return variant


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.prune`: the same as `yolofps prune`."""
    from yolofps import cli

    return cli.main(["prune", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
