"""`prune` stage: structured channel pruning of the baseline at each `prune.ratios`, then fine-tuning; and the
equal-budget control: the unpruned baseline fine-tuned the same way.

A pruned model is a new ArchSpec with fewer channels (torch-pruning DepGraph keeps residual and concat
paths consistent), so it saves and loads like any model and runs faster without sparse kernels. Each pruned model
gets `train.epochs + prune.finetune_epochs` of training in all; so does the control (`control`: the baseline
trained on for `prune.finetune_epochs` with the same fine-tune settings, nothing removed). The bench judges every
variant's accuracy against the control, so "faster and as accurate" never hides "trained longer".

Writes `models/prune/prune-<ratio>/` and `models/prune/control/` (best fine-tuned weights), `metrics/prune.json`
(params, GFLOPs and mAP of the baseline, of each pruned model right after pruning (`before_finetune/`) and after
fine-tuning, and of the control) and `plots/prune/<name>.csv`.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from yolofps import device as dev
from yolofps.config import Config, TrainConfig, to_dict
from yolofps.engine import checkpoint
from yolofps.engine.datasets import load_data
from yolofps.engine.objectives import DetectionObjective, detection_loss
from yolofps.engine.publish import publish, size_and_accuracy
from yolofps.engine.resume import job_hash
from yolofps.engine.train import TrainingJob, fit
from yolofps.fileio import fresh_dir, write_json
from yolofps.lineage import lineage_tags
from yolofps.metric_names import MAP50, MAP50_95, scoped
from yolofps.model.yolo import YOLOv5
from yolofps.optimize.prune import prune_as_configured, variant_name
from yolofps.paths import CONTROL, Paths
from yolofps.registry import TrackingRun
from yolofps.stages import StageResult


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Fine-tune the control, prune the baseline at every ratio and fine-tune each through the training loop."""
    info = dev.resolve(cfg.device, amp=cfg.train.amp)
    dev.seed_everything(cfg.seed)
    finetune = cfg.train.finetune(cfg.prune.finetune_epochs)
    data = load_data(cfg, paths, finetune)
    baseline, base_meta = checkpoint.load_model(paths.models("train") / "best")
    accuracy = size_and_accuracy(baseline, data, info, cfg.eval, finetune.imgsz)
    metrics: dict[str, Any] = {f"baseline/{k}": v for k, v in accuracy.items()}
    fresh_dir(paths.models("prune"))
    for ratio in (None, *cfg.prune.ratios):
        name = CONTROL if ratio is None else variant_name(ratio)
        model = (copy.deepcopy(baseline) if ratio is None
                 else prune_as_configured(baseline, cfg.prune, ratio, finetune.imgsz))
        before = accuracy if ratio is None else size_and_accuracy(model, data, info, cfg.eval, finetune.imgsz)
        variant = finetune_one(cfg, paths, TrainingJob(
            name, model, DetectionObjective(detection_loss(model.spec, finetune.loss, finetune.imgsz)), data,
            finetune, cfg.eval, info, paths.checkpoints("prune") / name, paths.plots / "prune" / f"{name}.csv",
            meta=_meta(cfg, finetune, base_meta, model, ratio), seed=cfg.seed))
        variant = {"params": before["params"], "gflops": before["gflops"]} | variant
        if ratio is not None:
            variant |= {scoped("before_finetune", k): before[k] for k in (MAP50_95, MAP50)}
        metrics |= {f"{name}/{k}": v for k, v in variant.items()}
        print(f"prune: {name}: " + "  ".join(f"{k}={v}" for k, v in variant.items()), flush=True)
    write_json(paths.metrics("prune"), metrics)
    return StageResult(outputs={"models": paths.models("prune"), "metrics": paths.metrics("prune")}, metrics=metrics)


def _meta(cfg: Config, finetune: TrainConfig, base_meta: dict[str, Any], model: YOLOv5,
          ratio: float | None) -> dict[str, Any]:
    name = CONTROL if ratio is None else variant_name(ratio)
    meta = {"names": base_meta["names"], "imgsz": finetune.imgsz, "model": name, "source": "train",
            "activation": model.spec.activation, "training_epochs": cfg.train.epochs + finetune.epochs,
            "params_hash": job_hash(cfg, finetune, {"prune": to_dict(cfg.prune), "ratio": ratio})}
    return meta | ({"prune_ratio": ratio} if ratio is not None else {"equal_budget_control": True})


def finetune_one(cfg: Config, paths: Paths, job: TrainingJob) -> dict[str, Any]:
    """Fine-tune one model in its own MLflow run and publish `models/prune/<name>`; returns its metrics."""
    ratio = job.meta.get("prune_ratio")
    tags = lineage_tags(paths.root, "prune", to_dict(cfg.prune)) | {"variant": job.name, "device": job.info.name}
    with TrackingRun(cfg.mlflow, run_name=job.name, params={"prune": to_dict(cfg.prune), "ratio": ratio or 0.0,
                                                            "train": to_dict(job.settings)}, tags=tags) as tracking:
        job.tracker = tracking
        out = fit(job)
        return publish(job, out, paths.models("prune") / job.name, out.result.accuracy())


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.prune`: the same as `yolofps prune`."""
    from yolofps import cli

    return cli.main(["prune", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
