"""`distill` stage: knowledge distillation from the trained baseline into a smaller student.

The default student is the baseline pruned at `distill.ratio` (the same deterministic pruning as the `prune`
stage), fine-tuned with detection + distillation loss for `distill.epochs`. The honest comparison is part of
the output: the same student fine-tuned the same number of epochs *without* KD is the prune stage's result,
so `metrics/distill.json` reports both and the difference. Writes `models/distill/` and `plots/distill.csv`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from yolofps import device as dev
from yolofps.config import Config, to_dict
from yolofps.engine import checkpoint, job
from yolofps.fileio import fresh_dir, write_json
from yolofps.lineage import lineage_tags
from yolofps.metric_names import MAP50_95, scoped
from yolofps.model.spec import preset
from yolofps.model.yolo import YOLOv5, build_model
from yolofps.optimize.distill import DistillationObjective
from yolofps.paths import Paths
from yolofps.registry import TrackingRun
from yolofps.stages import StageResult
from yolofps.stages.prune import finetune_config, prune_baseline, size_and_accuracy, variant_name
from yolofps.stages.train import detection_loss


def build_student(cfg: Config, teacher: YOLOv5, num_classes: int, imgsz: int) -> YOLOv5:
    """The teacher pruned as the prune stage prunes it (default), or a fresh preset."""
    if cfg.distill.student == "pruned":
        return prune_baseline(teacher, cfg.prune, cfg.distill.ratio, imgsz)
    return build_model(preset(cfg.distill.student, num_classes))


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Train the student with KD and compare it against the no-KD fine-tune of the same student."""
    d = cfg.distill
    info = dev.resolve(cfg.device, amp=cfg.train.amp)
    dev.seed_everything(cfg.seed)
    train = finetune_config(cfg.train, d.epochs)
    data = job.load_data(cfg, paths, train)
    teacher, teacher_meta = checkpoint.load_model(paths.models("train") / "best")
    student = build_student(cfg, teacher, len(data.names), train.imgsz)
    teacher = dev.prepare_model(teacher, info)
    objective = DistillationObjective(teacher, detection_loss(student.spec, cfg), weight=d.weight,
                                      temperature=d.temperature)
    meta = {"job": "distill", "names": teacher_meta["names"], "imgsz": train.imgsz, "model": "distill",
            "source": variant_name(d.ratio) if d.student == "pruned" else d.student,
            "activation": student.spec.activation,
            "params_hash": job.job_hash(cfg, train, {"distill": to_dict(d), "prune": to_dict(cfg.prune)})}
    tags = lineage_tags(paths.root, "distill", to_dict(d)) | {"student": meta["source"], "device": info.name}
    with TrackingRun(cfg.mlflow, run_name="distill", params={"distill": to_dict(d), "train": to_dict(train)},
                     tags=tags) as tracking:
        out = job.run_job(cfg, train, data, student, objective, info=info, checkpoints=paths.checkpoints("distill"),
                          history_csv=paths.plots / "distill.csv", tracking=tracking, meta=meta)
        metrics = size_and_accuracy(out.model, data, info, cfg) | comparison(paths, cfg, out.result.map50_95)
        out_dir = fresh_dir(paths.models("distill"))
        checkpoint.save_model(out_dir, out.model.cpu(), meta | {"metrics": metrics})
        metrics["size_mb"] = round((out_dir / checkpoint.WEIGHTS).stat().st_size / 2**20, 3)
        job.mark_finished(paths.checkpoints("distill"), {"metrics": metrics})
        write_json(paths.metrics("distill"), metrics)
        tracking.log_metrics(metrics, step=out.state.epoch)
        tracking.log_artifacts(out_dir, "model")
    print("distill: " + "  ".join(f"{k}={v}" for k, v in metrics.items()), flush=True)
    return StageResult(outputs={"model": out_dir, "metrics": paths.metrics("distill")}, metrics=metrics)


def comparison(paths: Paths, cfg: Config, map_kd: float) -> dict[str, Any]:
    """KD vs no-KD for the same student and budget (the prune stage's fine-tune), and vs the teacher."""
    prune_metrics = json.loads(paths.metrics("prune").read_text())
    name = variant_name(cfg.distill.ratio)
    out = {scoped("teacher", MAP50_95): prune_metrics[scoped("baseline", MAP50_95)]}
    fair = cfg.distill.student == "pruned" and cfg.distill.epochs == cfg.prune.finetune_epochs
    if fair:
        no_kd = prune_metrics[scoped(name, MAP50_95)]
        out |= {scoped("no_kd", MAP50_95): no_kd, scoped("kd_gain", MAP50_95): round(map_kd - no_kd, 5)}
    return out | {"comparison_is_fair": int(fair)}


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.distill`: the same as `yolofps distill`."""
    from yolofps import cli

    return cli.main(["distill", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
