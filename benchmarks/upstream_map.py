"""mAP of an upstream-trained yolov5 checkpoint: upstream's val.py against yolofps's evaluation of the imported model.

    python benchmarks/upstream_map.py --weights best.pt --upstream-python /work/venvs/yolov5/bin/python \
        [--data data/augmented/data.yaml] [--imgsz 320]

The checkpoint behind benchmarks/results/upstream_map.json came from upstream's own training, in the venv that
tests/fixtures/yolov5/make_golden.py describes, on a copy of data/augmented with an absolute-path data.yaml:

    python -m yolov5.train --cfg yolov5n.yaml --weights '' --img 320 --batch 16 --epochs 40 --workers 0 \
        --device cpu --optimizer AdamW --hyp hyp.adamw.yaml --data data.yaml --noplots
    # hyp.adamw.yaml: upstream's hyp.scratch-low.yaml with lr0: 0.001 (25 min on 2 cores)

Upstream runs in its own venv (the `yolov5` PyPI package, 7.0.x; never a yolofps dependency): `python -m
yolov5.val` on the data set's val split at conf 0.001, IoU 0.6; its printed `all` row is parsed. yolofps imports the
same file (`model.upstream`, no pickled code runs) and evaluates it with the pipeline's own COCO evaluation
(faster-coco-eval) on the same images at the same settings. Target (issue 16): mAP50-95 within 0.02.

Both run NMS as val.py does (`multi_label=True`: a box is kept once for every class whose score passes conf 0.001;
yolofps's `Deployment.evaluation`). What differs: upstream letterboxes rectangular batches (`rect=True`, pad 0.5)
where yolofps uses one square letterbox per image, and upstream interpolates AP with `np.interp` + `trapz` over 101
recall points where COCO takes the precision envelope at 101 recall thresholds. A third row shows what the
deployed single-label NMS would give instead.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from yolofps import device as dev
from yolofps.bench.environment import write_result
from yolofps.config import load_config
from yolofps.data.dataset import YoloDataset, build_loader
from yolofps.engine.predict import evaluate_pipeline
from yolofps.model.upstream import ImportedCheckpoint, import_checkpoint
from yolofps.runtime import Deployment, eval_pipeline

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# the `all` row of upstream's table: Class Images Instances P R mAP50 mAP50-95
ALL_ROW = re.compile(r"^\s*all\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", re.MULTILINE)


def upstream_val(python: str, weights: Path, data_yaml: Path, imgsz: int) -> dict:
    """Run upstream's val.py in its venv on an absolute-path copy of the data.yaml; its `all` row as numbers."""
    spec = yaml.safe_load(data_yaml.read_text())
    spec["path"] = str((data_yaml.parent / spec.get("path", ".")).resolve())  # upstream resolves against its root
    with tempfile.TemporaryDirectory(prefix="yolofps-upstream-") as folder:
        absolute = Path(folder) / "data.yaml"
        absolute.write_text(yaml.safe_dump(spec))
        command = [python, "-m", "yolov5.val", "--weights", str(weights), "--data", str(absolute), "--img",
                   str(imgsz), "--batch", "16", "--conf", "0.001", "--iou", "0.6", "--task", "val", "--device", "cpu",
                   "--project", folder, "--name", "val"]
        env = os.environ | {"YOLO_OFFLINE": "1", "WANDB_MODE": "disabled", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    printed = done.stdout + done.stderr
    match = ALL_ROW.search(printed)
    if done.returncode or not match:
        raise SystemExit(f"upstream val.py failed (exit {done.returncode}):\n{printed[-3000:]}")
    images, instances, p, r, map50, map50_95 = match.groups()
    return {"command": " ".join(command[1:]), "images": int(images), "instances": int(instances),
            "metrics/precisionB": float(p), "metrics/recallB": float(r), "metrics/mAP50B": float(map50),
            "metrics/mAP50-95B": float(map50_95), "table": printed[match.start() - 200: match.end()].strip()}


def yolofps_val(imported: ImportedCheckpoint, data_yaml: Path, imgsz: int, *, multi_label: bool) -> dict:
    """The imported model through yolofps's evaluation (square letterbox, faster-coco-eval), ultralytics settings;
    `multi_label` as yolofps measures mAP (and val.py does), or single-label as it deploys."""
    dataset = YoloDataset(data_yaml, "val", imgsz, load_config(PROJECT_ROOT / "params.yaml").train.loader,
                          train=False)
    info = dev.resolve("cpu", amp=False)
    settings = Deployment(imgsz, conf=0.001, iou=0.6, max_det=300, multi_label=multi_label)
    result, _ = evaluate_pipeline(eval_pipeline(imported.model, info, settings),
                                  build_loader(dataset, 16, shuffle=False, workers=0), dataset.names)
    return {"images": result.num_images, "instances": result.num_gt,
            **{k: round(v, 5) for k, v in result.metrics().items()}, "multi_label": multi_label,
            "imported": {k: imported.source[k] for k in ("upstream_class", "weights_from", "epoch", "dtype")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, type=Path, help="a checkpoint upstream's train.py wrote")
    parser.add_argument("--upstream-python", required=True, help="python of a venv with the yolov5 package")
    parser.add_argument("--data", type=Path, default=PROJECT_ROOT / "data" / "augmented" / "data.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "upstream_map.json"))
    args = parser.parse_args(argv)
    theirs = upstream_val(args.upstream_python, args.weights, args.data, args.imgsz)
    imported = import_checkpoint(args.weights)
    ours = yolofps_val(imported, args.data, args.imgsz, multi_label=True)
    single = yolofps_val(imported, args.data, args.imgsz, multi_label=False)
    difference = round(ours["metrics/mAP50-95B"] - theirs["metrics/mAP50-95B"], 5)
    single_difference = round(single["metrics/mAP50-95B"] - theirs["metrics/mAP50-95B"], 5)
    print(theirs["table"])
    for name, row in (("upstream val.py", theirs), ("yolofps (imported)", ours), ("yolofps, single-label", single)):
        print(f"{name:<22} images {row['images']:>4}  instances {row['instances']:>5}  "
              + "  ".join(f"{k.split('/')[1]} {row[k]:.4f}" for k in ("metrics/precisionB", "metrics/recallB",
                                                                     "metrics/mAP50B", "metrics/mAP50-95B")))
    print(f"mAP50-95 yolofps - upstream: {difference:+.4f} (target: within 0.02); with the deployed single-label NMS: "
          f"{single_difference:+.4f}")
    settings = {"weights": str(args.weights), "data": str(args.data), "imgsz": args.imgsz, "conf": 0.001, "iou": 0.6,
                "max_det": 300}
    rows = [{"row": "upstream val.py"} | theirs, {"row": "yolofps"} | ours,
            {"row": "yolofps with the deployed single-label NMS"} | single]
    write_result(args.out, "upstream_map", settings, rows, map50_95_difference=difference,
                 map50_95_difference_single_label=single_difference)
    return 0 if abs(difference) <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
