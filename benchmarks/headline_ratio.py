"""The bench stage's headline ratio measured again, alone: the selected variant against the reference row.

    python benchmarks/headline_ratio.py [--runs 300]

Rebuilds three rows of `metrics/bench.json` (the selected variant, the unpruned model's fastest float row that
its `speedup_vs_reference_b1` is measured against, and the torch fp32 eager baseline) and times them end to end at
batch 1 on the val images, interleaved, with nothing else in the run: a second figure for the ratio the bench
stage reports from one run among all its variants.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from yolofps.bench import measure, report
from yolofps.bench.environment import write_result
from yolofps.bench.remeasure import row_pipeline
from yolofps.bench.rows import BenchRow
from yolofps.data import formats
from yolofps.paths import Paths
from yolofps.runtime import Deployment

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--project-dir", default=str(PROJECT_ROOT))
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "headline_ratio.json"))
    args = parser.parse_args(argv)
    root = Path(args.project_dir)
    bench = json.loads((root / "metrics" / "bench.json").read_text())
    rows = {r["name"]: r for r in bench["variants"]}
    reference = report.reference_row([BenchRow.from_json(r) for r in bench["variants"]])
    names = {"selected": bench["selected"]["name"], "reference": reference.name, "baseline": "train/eager-fp32"}
    deployment = Deployment(**bench["environment"]["deployment"])
    pipelines = {label: row_pipeline(root, rows[name], deployment) for label, name in names.items()}
    images = formats.list_images(Paths(root).augmented_data / "images" / "val")
    timings, failures = measure.time_interleaved(pipelines, measure.batches_of(images, 1), warmup=10, runs=args.runs)
    p50 = {label: t.latency() for label, t in timings.items()}
    out = [{"row": label, "variant": names[label], "latency_ms_b1": p50.get(label), "error": failures.get(label),
            "bench_stage_p50_ms": rows[names[label]]["latency_ms_b1"]["p50"]} for label in names]
    ratio = round(p50["reference"]["p50"] / p50["selected"]["p50"], 3)
    print(f"{'row':<10} {'variant':<32} {'p50 ms':>7} {'pre':>5} {'model':>6} {'post':>5} {'bench stage':>11}")
    for r in out:
        lat = r["latency_ms_b1"] or {}
        print(f"{r['row']:<10} {r['variant']:<32} {lat.get('p50', '-'):>7} {lat.get('pre', '-'):>5} "
              f"{lat.get('model', '-'):>6} {lat.get('post', '-'):>5} {r['bench_stage_p50_ms']:>11}")
    print(f"selected vs reference: {ratio}x here; {rows[names['selected']]['speedup_vs_reference_b1']}x in the bench")
    settings = {"runs": args.runs, "batch": 1, "images": len(images), "deployment": bench["environment"]["deployment"]}
    write_result(args.out, "headline_ratio", settings, out, speedup_vs_reference_b1=ratio,
                 bench_stage_speedup_vs_reference_b1=rows[names["selected"]]["speedup_vs_reference_b1"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
