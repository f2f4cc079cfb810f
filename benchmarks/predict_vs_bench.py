"""`yolofps predict`'s per-image times against the bench's own measurement of the same variant, side by side.

    python benchmarks/predict_vs_bench.py [--project DIR] [--variant selected] [--rounds 10] [--no-save]

On a project that has run the pipeline (metrics/bench.json, the val images): opens the variant the way `yolofps
predict --model VARIANT` does (serving.sources.open_model) and runs predict's loop over the val folder (annotated
images and detections written to a temporary folder, as a user's run writes them); rebuilds the bench stage's
pipeline for the same row (bench.remeasure.row_pipeline) and times it the way the bench stage does
(bench.measure.time_interleaved, batch 1, the project's bench.warmup). The two alternate, round by round, in one
process, so both see the same machine. Target (issue 19): predict's per-image pre / model / post and their sum
within 10 % of the bench's, on the medians (the bench reports medians) and on the means predict prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from yolofps.bench import measure
from yolofps.bench.environment import write_result
from yolofps.bench.remeasure import row_pipeline
from yolofps.config import load_config
from yolofps.data import formats
from yolofps.paths import Paths
from yolofps.runtime import Deployment
from yolofps.serving import predict, sources

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PHASES = ("pre", "model", "post", "total")
TOLERANCE = 0.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".", help="a project that has run the pipeline (default: .)")
    parser.add_argument("--variant", default=sources.SELECTED, help="a metrics/bench.json row (default: selected)")
    parser.add_argument("--rounds", type=int, default=10, help="passes over the val folder, each side (default 10)")
    parser.add_argument("--no-save", action="store_true", help="predict without annotated images")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "predict_vs_bench.json"))
    return parser.parse_args(argv)


def phases(timings: measure.Timings) -> dict[str, dict[str, float]]:
    """Mean and median ms per image of each phase and of their sum."""
    values = {"pre": timings.pre, "model": timings.model, "post": timings.post, "total": timings.total}
    return {name: {"mean": round(float(np.mean(v)), 3), "median": round(float(np.median(v)), 3)}
            for name, v in values.items()}


def measure_both(root: Path, variant: str, rounds: int, save: bool) -> tuple[measure.Timings, measure.Timings, str]:
    """Predict's per-image timings and the bench's, `rounds` alternating passes over the val images each."""
    bench = json.loads(Paths(root).metrics("bench").read_text())
    opened = sources.open_model(variant, root / "params.yaml")  # sets the bench's torch threads, as predict does
    row = sources.bench_row(bench, variant)
    name = row["name"]
    pipeline = row_pipeline(root, row, Deployment(**bench["environment"]["deployment"]))
    val = Paths(root).augmented_data / "images" / "val"
    images = formats.list_images(val)
    warmup = load_config(root / "params.yaml").bench.warmup
    predicted, benched = measure.Timings(), measure.Timings()
    with tempfile.TemporaryDirectory(prefix="predict-vs-bench-") as scratch:
        for number in range(rounds):
            job = predict.PredictJob(str(val), Path(scratch) / str(number), save=save, progress=False)
            run_predict = partial(predict.predict, opened.detector, job, description=opened.description)
            run_bench = partial(measure.time_interleaved, {name: pipeline}, measure.batches_of(images, 1),
                                warmup=warmup, runs=len(images))
            if number % 2:  # alternate which side goes first, so neither always follows the other
                timed, failures = run_bench()
                result = run_predict()
            else:
                result = run_predict()
                timed, failures = run_bench()
            if failures or result.skipped:
                raise SystemExit(f"timing failed: {failures or result.skipped}")
            for mine, theirs in ((predicted, result.timings), (benched, timed[name])):
                mine.pre += theirs.pre
                mine.model += theirs.model
                mine.post += theirs.post
    return predicted, benched, name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.project).resolve()
    predicted, benched, name = measure_both(root, args.variant, args.rounds, save=not args.no_save)
    ours, theirs = phases(predicted), phases(benched)
    stage = json.loads(Paths(root).metrics("bench").read_text())
    recorded = next(v for v in stage["variants"] if v["name"] == name)["latency_ms_b1"]
    rows = []
    for phase in PHASES:
        ratio = {k: round(ours[phase][k] / theirs[phase][k], 3) for k in ("median", "mean")}
        rows.append({"phase": phase, "predict": ours[phase], "bench": theirs[phase], "ratio": ratio,
                     "bench_stage_median": recorded["p50" if phase == "total" else phase]})
    print(f"{name}: {len(predicted.pre)} images each side, batch 1, ms per image (predict / bench measured in this "
          f"run; the bench stage's figure from metrics/bench.json for reference)")
    print(f"  {'phase':<6} {'predict p50':>11} {'bench p50':>9} {'ratio':>6} {'predict mean':>12} {'bench mean':>10} "
          f"{'ratio':>6} {'bench.json':>10}")
    for r in rows:
        print(f"  {r['phase']:<6} {r['predict']['median']:>11} {r['bench']['median']:>9} {r['ratio']['median']:>6} "
              f"{r['predict']['mean']:>12} {r['bench']['mean']:>10} {r['ratio']['mean']:>6} "
              f"{r['bench_stage_median']:>10}")
    within = all(abs(r["ratio"][k] - 1) <= TOLERANCE for r in rows for k in ("median", "mean"))
    print(f"  target: every ratio within {TOLERANCE:.0%}: {'met' if within else 'NOT met'}")
    settings = {"project": str(root), "variant": name, "rounds": args.rounds, "images": len(predicted.pre),
                "batch": 1, "imgsz": stage["environment"]["imgsz"], "save": not args.no_save,
                "deployment": stage["environment"]["deployment"],
                "bench_environment": {k: stage["environment"].get(k) for k in ("cpu", "cpu_flags", "threads",
                                                                                 "time_utc")}}
    write_result(args.out, "predict_vs_bench", settings, rows, target=f"within {TOLERANCE:.0%}", met=within)
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
