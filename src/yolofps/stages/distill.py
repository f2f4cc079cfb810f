"""`distill` stage: knowledge distillation from a teacher into a smaller student, judged against its no-KD control.

- Teacher (`distill.teacher`): `baseline` (the trained model), `control` (the baseline trained on for the fine-tune
  epochs by the prune stage: a better-trained copy at no extra cost), a preset (`s`, `m`, ...) trained here from
  scratch for `distill.teacher_epochs` with the train settings (reused while its params are unchanged), or a folder
  (`models/...`, `weights/...`, or an official yolov5 `.pt` under weights/, imported safely).
- Student (`distill.student`): `pruned` (the baseline pruned at `distill.ratio`, exactly as the prune stage prunes
  it) or a fresh preset.
- Objective (`engine.objectives.DistillationObjective`): the detection loss + channel-wise distillation of the neck
  outputs P3-P5 through learned 1x1 adapters (`distill.feature_weight`) + logit distillation (`distill.logit_weight`),
  each term scaled to the detection loss at the first step.

The honest comparison is part of the output: the same student fine-tuned the same number of epochs *without* KD is
the prune stage's result, so `metrics/distill.json` reports both, the gain (`kd_gain/...`) and `kd_helped` (1 when
the gain is positive), plus the equal-budget control and the teacher. Writes `models/distill/`,
`plots/distill.csv` (and `plots/distill-teacher.csv` for a teacher trained here).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from yolofps import device as dev
from yolofps.config import Config, to_dict
from yolofps.engine import checkpoint, resume
from yolofps.engine.datasets import Data, load_data
from yolofps.engine.objectives import DetectionObjective, DistillationObjective, detection_loss
from yolofps.engine.publish import publish, size_and_accuracy
from yolofps.engine.resume import job_hash
from yolofps.engine.train import TrainingJob, fit
from yolofps.errors import ConfigError
from yolofps.fileio import fresh_dir, write_json
from yolofps.lineage import lineage_tags
from yolofps.metric_names import MAP50_95, scoped
from yolofps.model.spec import PRESETS, preset
from yolofps.model.yolo import YOLOv5, build_model
from yolofps.optimize.prune import prune_as_configured, variant_name
from yolofps.paths import CONTROL, Paths
from yolofps.registry import TrackingRun
from yolofps.stages import StageResult


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Train the student with KD and compare it against the no-KD fine-tune of the same student."""
    d = cfg.distill
    info = dev.resolve(cfg.device, amp=cfg.train.amp)
    dev.seed_everything(cfg.seed)
    train = cfg.train.finetune(d.epochs)
    data = load_data(cfg, paths, train)
    baseline, base_meta = checkpoint.load_model(paths.models("train") / "best")
    teacher = load_teacher(cfg, paths, data, info, baseline)
    student = build_student(cfg, baseline, len(data.names), train.imgsz)
    objective = DistillationObjective(teacher, student, detection_loss(student.spec, train.loss, train.imgsz),
                                      feature_weight=d.feature_weight, logit_weight=d.logit_weight,
                                      temperature=d.temperature)
    meta = {"names": base_meta["names"], "imgsz": train.imgsz, "model": "distill", "teacher": d.teacher,
            "source": variant_name(d.ratio) if d.student == "pruned" else d.student,
            "activation": student.spec.activation, "training_epochs": cfg.train.epochs + d.epochs,
            "params_hash": job_hash(cfg, train, {"distill": to_dict(d), "prune": to_dict(cfg.prune)})}
    tags = lineage_tags(paths.root, "distill", to_dict(d)) | {"student": meta["source"], "teacher": d.teacher,
                                                              "device": info.name}
    with TrackingRun(cfg.mlflow, run_name="distill", params={"distill": to_dict(d), "train": to_dict(train)},
                     tags=tags) as tracking:
        job = TrainingJob("distill", student, objective, data, train, cfg.eval, info,
                          paths.checkpoints("distill") / "student", paths.plots / "distill.csv", tracking, meta,
                          seed=cfg.seed)
        out = fit(job)
        metrics = size_and_accuracy(out.model, data, info, cfg.eval, train.imgsz)
        metrics |= comparison(paths, cfg, out.result.map50_95) | {
            scoped("teacher", MAP50_95): size_and_accuracy(teacher, data, info, cfg.eval, train.imgsz)[MAP50_95]}
        metrics = publish(job, out, fresh_dir(paths.models("distill")), metrics)
        write_json(paths.metrics("distill"), metrics)
    print("distill: " + "  ".join(f"{k}={v}" for k, v in metrics.items()), flush=True)
    return StageResult(outputs={"model": paths.models("distill"), "metrics": paths.metrics("distill")},
                       metrics=metrics)


def build_student(cfg: Config, baseline: YOLOv5, num_classes: int, imgsz: int) -> YOLOv5:
    """The baseline pruned as the prune stage prunes it (default), or a fresh preset."""
    if cfg.distill.student == "pruned":
        return prune_as_configured(baseline, cfg.prune, cfg.distill.ratio, imgsz)
    return build_model(preset(cfg.distill.student, num_classes))


def load_teacher(cfg: Config, paths: Paths, data: Data, info: dev.DeviceInfo, baseline: YOLOv5) -> YOLOv5:
    """`distill.teacher`: the baseline, a preset trained here (or its finished earlier run), or a model folder."""
    name = cfg.distill.teacher
    if name == "baseline":
        return checkpoint.load_model(paths.models("train") / "best")[0]
    if name == CONTROL:  # the baseline trained on by the prune stage: the same model, better trained, at no cost
        return checkpoint.load_model(paths.model_folder(CONTROL))[0]
    if name in PRESETS:
        return train_teacher(cfg, paths, data, info)
    path = paths.root / name
    if not path.exists():
        raise ConfigError(f"distill.teacher: {name} is not baseline, control, a preset ({', '.join(PRESETS)}) or an "
                          "existing model folder / yolov5 .pt")
    teacher = checkpoint.load_model(path)[0] if path.is_dir() else checkpoint.load_weights(path)[0]
    if teacher.spec.num_classes != baseline.spec.num_classes:
        raise ConfigError(f"distill.teacher: {name} predicts {teacher.spec.num_classes} classes, the data set has "
                          f"{baseline.spec.num_classes}; fine-tune it on this data first (train.weights: {name})")
    return teacher


def train_teacher(cfg: Config, paths: Paths, data: Data, info: dev.DeviceInfo) -> YOLOv5:
    """A preset teacher trained from scratch with the train settings for `distill.teacher_epochs` (once per params)."""
    d = cfg.distill
    settings = dataclasses.replace(cfg.train, model=d.teacher, weights="", epochs=d.teacher_epochs, resume=False)
    folder = paths.checkpoints("distill") / "teacher"
    meta = {"names": list(data.names), "imgsz": settings.imgsz, "model": d.teacher,
            "params_hash": job_hash(cfg, settings, {"teacher": d.teacher})}
    if finished_with(folder, meta["params_hash"]):
        print(f"distill: teacher {d.teacher}: reusing {folder / 'best'} (finished with the same params)", flush=True)
        return checkpoint.load_model(folder / "best")[0]
    model = build_model(preset(d.teacher, len(data.names)))
    job = TrainingJob("teacher", model, DetectionObjective(detection_loss(model.spec, settings.loss, settings.imgsz)),
                      data, settings, cfg.eval, info, folder, paths.plots / "distill-teacher.csv", meta=meta,
                      seed=cfg.seed)
    out = fit(job)
    resume.mark_finished(folder, {"metrics": out.result.accuracy()})
    return checkpoint.load_model(folder / "best")[0]


def finished_with(checkpoints: Path, params_hash: str) -> bool:
    """Did a job with this params hash run to the end in `checkpoints`?"""
    meta = checkpoints / "last" / checkpoint.META
    if not meta.is_file():
        return False
    saved = json.loads(meta.read_text())
    return bool(saved.get("finished")) and saved.get("params_hash") == params_hash


def comparison(paths: Paths, cfg: Config, map_kd: float) -> dict[str, Any]:
    """KD vs no-KD for the same student and budget (the prune stage's fine-tune), and vs the equal-budget control."""
    prune_metrics = json.loads(paths.metrics("prune").read_text())
    out: dict[str, Any] = {scoped("baseline", MAP50_95): prune_metrics[scoped("baseline", MAP50_95)]}
    if scoped(CONTROL, MAP50_95) in prune_metrics:
        out[scoped(CONTROL, MAP50_95)] = prune_metrics[scoped(CONTROL, MAP50_95)]
    fair = cfg.distill.student == "pruned" and cfg.distill.epochs == cfg.prune.finetune_epochs
    if fair:
        no_kd = prune_metrics[scoped(variant_name(cfg.distill.ratio), MAP50_95)]
        gain = round(map_kd - no_kd, 5)
        verdict = "helped" if gain > 0 else "did not help"
        out |= {scoped("no_kd", MAP50_95): no_kd, scoped("kd_gain", MAP50_95): gain, "kd_helped": int(gain > 0),
                "kd_verdict": f"KD {verdict} on this data: {gain * 100:+.2f} mAP50-95 points against the same "
                              f"student fine-tuned {cfg.distill.epochs} epochs without KD"}
    return out | {"comparison_is_fair": int(fair)}


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.distill`: the same as `yolofps distill`."""
    from yolofps import cli

    return cli.main(["distill", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
