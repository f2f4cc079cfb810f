"""The yolofps pipeline as a Prefect flow: every DVC stage as one task, in DVC's graph order.

    python -m flows.pipeline                      # ephemeral local Prefect server
    python -m flows.pipeline -S data.num_train=100

Overrides are written into params.yaml first, as `dvc exp run -S` does, so the flow and a laptop
`dvc repro` leave the same dvc.lock.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks.dvc import apply_overrides, run_stage, stage_order
from yolofps.config import load_config
from yolofps.lineage import PARENT_RUN_ENV, PIPELINE_RUN_ENV, PREFECT_FLOW_RUN_ENV
from yolofps.registry import pipeline_parent_run


@flow(name="yolofps-pipeline", log_prints=True)
def pipeline(overrides: dict[str, Any] | None = None, project_dir: str = ".") -> dict[str, dict[str, Any]]:
    """Run all DVC stages in graph order (unchanged ones are skipped by DVC); return each stage's metrics."""
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    if overrides:
        apply_overrides(root / "params.yaml", overrides)
        logger.info("params overrides applied: %s", overrides)
    order = stage_order(root)
    logger.info("stage order from dvc.yaml: %s", " -> ".join(order))
    run_id = str(flow_run.id or "local")
    cfg = load_config(root / "params.yaml")
    tags = {"pipeline_run_id": run_id, "prefect_flow_run_id": run_id, "overrides": str(overrides or {})}
    with pipeline_parent_run(cfg.mlflow, root, name=f"pipeline-{flow_run.name or run_id[:8]}", tags=tags) as parent:
        env = {PIPELINE_RUN_ENV: run_id, PREFECT_FLOW_RUN_ENV: run_id} | ({PARENT_RUN_ENV: parent} if parent else {})
        return {stage: run_stage(stage, str(root), env) for stage in order}


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m flows.pipeline [-S key=value ...] [--project-dir DIR]`."""
    from yolofps.config import parse_override
    from yolofps.errors import YolofpsError

    parser = argparse.ArgumentParser(description="Run the yolofps pipeline as a Prefect flow.")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--project-dir", default=".")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(text) for text in args.overrides)
        pipeline(overrides=overrides or None, project_dir=args.project_dir)
    except YolofpsError as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
