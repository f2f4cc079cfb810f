"""The re-benchmark flow: time registered versions side by side on this machine and tag them with the figures.

    python -m flows.bench                         # @champion and @challenger, on whatever device this is
    python -m flows.bench --alias champion --runs 100

A version's `fps_b1` tag is only comparable on the device it was measured on (the promotion gate refuses to
compare FPS across devices). Run this flow where the model will serve (a GPU box, a production CPU) before
`flows.promote`: both versions then carry figures from one device, measured in one interleaved run, and the
benchmark store (bench.store) holds them as one `rebench` run, which the promotion FPS gate prefers to the tags.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from tasks.dvc import io_retries
from tasks.registry import remeasure_versions
from yolofps.config import load_config


@flow(name="yolofps-bench", log_prints=True)
def bench(aliases: list[str] | None = None, runs: int | None = None, project_dir: str = ".") -> dict[str, Any]:
    """Re-measure the aliased versions (default champion + challenger) end to end at batch 1 on this device."""
    root = Path(project_dir).resolve()
    cfg = load_config(root / "params.yaml")
    aliases = aliases or ["champion", "challenger"]
    results = remeasure_versions.with_options(**io_retries(cfg.prefect))(str(root), aliases,
                                                                         runs=runs or cfg.bench.runs)
    table = [{"alias": alias, "version": r.get("version"), "fps_b1": r.get("fps_b1"),
              "p50_ms": (r.get("latency_ms_b1") or {}).get("p50"), "device": r.get("bench_device_name"),
              "note": r.get("error") or r.get("skipped", "")} for alias, r in results.items()]
    recorded = next((r["history"] for r in results.values() if "history" in r), "nothing measured")
    create_table_artifact(table, key="rebench", description=f"Registered versions re-measured side by side; "
                          f"benchmark store: {recorded}")
    print(json.dumps(table, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m flows.bench [--alias A ...] [--runs N] [--project-dir DIR]`."""
    parser = argparse.ArgumentParser(description="Re-measure registered versions on this device.")
    parser.add_argument("--alias", dest="aliases", action="append", help="alias to measure (repeatable)")
    parser.add_argument("--runs", type=int, help="timed runs per version (default: bench.runs)")
    parser.add_argument("--project-dir", default=".")
    args = parser.parse_args(argv)
    results = bench(aliases=args.aliases, runs=args.runs, project_dir=args.project_dir)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
