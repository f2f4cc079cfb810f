"""The registered model against the bench stage's own pipeline: same detections, same speed, side by side.

    python benchmarks/registered_model.py [--alias challenger] [--runs 100]

Loads `models:/<register.model_name>@<alias>` the way a caller does (mlflow.pyfunc.load_model, then the pyfunc's
detector) and rebuilds the bench stage's pipeline for the same variant from `metrics/bench.json` (its runtime,
mode, dtype, threads and artifact). Both run end to end at batch 1 (decode, letterbox, model, NMS at the bench's
deployment settings) on the val images, timed in interleaved blocks. Targets (issue 15): detection agreement
>= 0.99 and the registered p50 within 10 % of the bench pipeline's p50 in this run, and of the bench stage's figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from yolofps import registry
from yolofps.bench import measure
from yolofps.bench.environment import write_result
from yolofps.bench.remeasure import row_pipeline
from yolofps.config import load_config
from yolofps.data import formats
from yolofps.paths import Paths
from yolofps.runtime import Deployment

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alias", default="challenger")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--project-dir", default=str(PROJECT_ROOT))
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "registered_model.json"))
    args = parser.parse_args(argv)
    root = Path(args.project_dir)
    cfg = load_config(root / "params.yaml")
    bench = json.loads((root / "metrics" / "bench.json").read_text())
    version, tags, detector = registry.load_detector(cfg.mlflow, cfg.register.model_name, args.alias)
    row = next(v for v in bench["variants"] if v["name"] == tags["variant"])
    deployment = Deployment(**bench["environment"]["deployment"])
    pipelines = {"registered": detector.pipeline, "bench": row_pipeline(root, row, deployment)}
    images = formats.list_images(Paths(root).augmented_data / "images" / "val")
    agreement = measure.agreement(pipelines["bench"].detect(images), pipelines["registered"].detect(images))
    timings, failures = measure.time_interleaved(pipelines, measure.batches_of(images, 1), warmup=10, runs=args.runs)
    p50 = {name: t.latency()["p50"] for name, t in timings.items()}
    rows = [{"row": name, "p50_ms": p50.get(name), "latency_ms_b1": timings[name].latency() if name in timings
             else None, "error": failures.get(name)} for name in pipelines]
    rows.append({"row": "bench stage (metrics/bench.json)", "p50_ms": row["latency_ms_b1"]["p50"]})
    ratio = round(p50["registered"] / p50["bench"], 3) if len(p50) == 2 else None
    stage_ratio = round(p50["registered"] / row["latency_ms_b1"]["p50"], 3) if "registered" in p50 else None
    print(f"{args.alias} = v{version} ({row['name']}): agreement with the bench pipeline {agreement:.4f}")
    for r in rows:
        print(f"  {r['row']:<34} p50 {r['p50_ms']} ms")
    print(f"  registered / bench pipeline (this run): {ratio}; registered / bench stage figure: {stage_ratio}")
    settings = {"alias": args.alias, "version": version, "variant": row["name"], "runs": args.runs, "batch": 1,
                "images": len(images), "deployment": bench["environment"]["deployment"],
                "bench_environment": {k: bench["environment"].get(k) for k in ("cpu", "cpu_flags", "time_utc")}}
    write_result(args.out, "registered_model", settings, rows, agreement=round(agreement, 4),
                 registered_over_bench_pipeline=ratio, registered_over_bench_stage=stage_ratio)
    return 0 if agreement >= 0.99 and ratio is not None and abs(ratio - 1) <= 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
