"""Distillation vs its no-KD control, same student, same epochs, same data: on the demo's synthetic set or on real
photographs that scikit-image ships.

    python benchmarks/kd_vs_nokd.py --data photos|synthetic [--project DIR] [--kd 1.0:0.0,0.5:0.5]
                                    [--epochs 30 --finetune 20 --imgsz 160] [--no-save]

`--data photos` builds the coins + galaxies set (`yolofps.data.photos`: tiles of `coins.png` and
`hubble_deep_field.jpg`, labels from classical segmentation, train and val from disjoint parts of each photograph);
`--data synthetic` uses the demo's generator (params.yaml's data section). Then it runs the pipeline's own stages in
this process: data -> augment -> train (yolov5n from scratch) -> prune (the pruned
student fine-tuned without KD = the no-KD control, and the unpruned equal-budget control) -> distill, once per
`--kd feature_weight:logit_weight` setting (same student, same epochs, same data; only the objective differs).
Prints a table and writes benchmarks/results/kd_vs_nokd_<data>.json with the environment stamped on it.
Target (issue 17): KD beats no-KD by >= 1.0 mAP50-95 point.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from yolofps.bench.environment import write_result
from yolofps.config import load_config
from yolofps.data.photos import build_photo_dataset
from yolofps.metric_names import MAP50_95, scoped
from yolofps.paths import Paths
from yolofps.stages import augment, data, distill, prune, train

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.01  # mAP50-95 (1.0 point)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("photos", "synthetic"), required=True)
    parser.add_argument("--project", type=Path, help="project folder to build in (default: a temporary one)")
    parser.add_argument("--kd", default="1.0:0.0:baseline",
                        help="feature_weight:logit_weight:teacher settings, comma-separated")
    parser.add_argument("--epochs", type=int, default=30, help="baseline epochs (train.epochs)")
    parser.add_argument("--finetune", type=int, default=20, help="prune.finetune_epochs = distill.epochs")
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace) -> dict:
    """The demo's params with this data set and budget."""
    source = {"data.source": "photos/data.yaml"} if args.data == "photos" else {"data.image_size": args.imgsz}
    return source | {"seed": args.seed, "train.imgsz": args.imgsz,
            "train.epochs": args.epochs, "prune.finetune_epochs": args.finetune, "distill.epochs": args.finetune,
            "mlflow.system_metrics": False, "train.workers": 0}


def run_pipeline(root: Path, args: argparse.Namespace) -> list[dict]:
    """Build the set, run data..prune once and distill once per KD setting; a row per setting."""
    shutil.copy(PROJECT_ROOT / "params.yaml", root / "params.yaml")
    if args.data == "photos":
        build_photo_dataset(root / "photos", image_size=args.imgsz, seed=args.seed)
    paths, base = Paths(root), overrides(args)
    cfg = load_config(root / "params.yaml", base)
    seconds = {}
    for stage in (data, augment, train, prune):
        start = time.perf_counter()
        stage.run(cfg, paths)
        seconds[stage.__name__.rsplit(".", 1)[-1]] = round(time.perf_counter() - start, 1)
    pruned = json.loads(paths.metrics("prune").read_text())
    rows = []
    for setting in args.kd.split(","):
        feature, logit, teacher = setting.split(":")
        start = time.perf_counter()
        kd = distill.run(load_config(root / "params.yaml", base | {
            "distill.feature_weight": float(feature), "distill.logit_weight": float(logit),
            "distill.teacher": teacher}), paths).metrics
        rows.append({"feature_weight": float(feature), "logit_weight": float(logit), "teacher_name": teacher,
                     "kd": kd[MAP50_95],
                     "no_kd": kd[scoped("no_kd", MAP50_95)], "gain": kd[scoped("kd_gain", MAP50_95)],
                     "teacher": kd[scoped("teacher", MAP50_95)],
                     "control": pruned[scoped("control", MAP50_95)],
                     "baseline": pruned[scoped("baseline", MAP50_95)],
                     "meets_target": kd[scoped("kd_gain", MAP50_95)] >= TARGET,
                     "distill_s": round(time.perf_counter() - start, 1)})
    rows[0]["stage_seconds"] = seconds
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="yolofps-kd-photos-") as tmp:
        root = args.project or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows = run_pipeline(root, args)
    what = "real photographs (coins + galaxies)" if args.data == "photos" else "the demo's synthetic shapes"
    print(f"\nKD vs no-KD on {what}, yolov5n @ {args.imgsz}, baseline {args.epochs} "
          f"epochs, student = baseline pruned 0.5, {args.finetune} fine-tune epochs (mAP50-95)")
    print("| teacher | feature_w | logit_w | teacher mAP | baseline | control | no-KD | KD | gain | >= +1.0 pt |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['teacher_name']} | {r['feature_weight']} | {r['logit_weight']} | {r['teacher']:.4f} | "
              f"{r['baseline']:.4f} | {r['control']:.4f} | "
              f"{r['no_kd']:.4f} | {r['kd']:.4f} | {r['gain'] * 100:+.2f} pt | {r['meets_target']} |")
    if not args.no_save:
        settings = overrides(args) | {"kd": args.kd, "params": yaml.safe_load((PROJECT_ROOT / "params.yaml")
                                                                              .read_text())["distill"]}
        write_result(PROJECT_ROOT / "benchmarks" / "results" / f"kd_vs_nokd_{args.data}.json", "kd_vs_nokd",
                     settings | {"data": args.data}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
