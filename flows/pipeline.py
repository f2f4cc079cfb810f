"""The yolofps pipeline as a Prefect flow: every DVC stage as one task, in DVC's graph order.

    python -m flows.pipeline                      # ephemeral local Prefect server
    python -m flows.pipeline -S data.num_train=100 --push --promote gates

Overrides are written into params.yaml first, as `dvc exp run -S` does, so the flow and a laptop
`dvc repro` leave the same dvc.lock. Around the stages the flow adds what DVC lacks: `dvc pull` / `dvc push`
with retries, a `gpu` concurrency slot for accelerator stages, artifacts, and the MLflow parent run that
carries the flow-run id and the overrides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.promote import promote as promote_flow
from tasks.artifacts import publish
from tasks.dvc import (
    accelerator_stages,
    apply_overrides,
    default_remote,
    dvc_pull,
    dvc_push,
    io_retries,
    missing_outputs,
    run_stage,
    stage_order,
)
from tasks.slots import ensure_gpu_limit, gpu_slot, needs_gpu, workspace_slot
from yolofps.config import load_config
from yolofps.lineage import PARENT_RUN_ENV, PIPELINE_RUN_ENV, PREFECT_FLOW_RUN_ENV
from yolofps.registry import pipeline_parent_run

PROMOTE_POLICIES = ("never", "gates")


@flow(name="yolofps-pipeline", log_prints=True)
def pipeline(overrides: dict[str, Any] | None = None, pull: bool | None = None, push: bool = False,
             promote: str = "never", project_dir: str = ".") -> dict[str, dict[str, Any]]:
    """Run all DVC stages in graph order (DVC skips unchanged ones); return what each stage did.

    pull: fetch outputs from the default DVC remote first (None: when one is configured and outputs are missing).
    push: upload outputs to the default remote at the end. promote: "gates" runs the promotion gates after
    registering and moves @champion when they pass.
    """
    if promote not in PROMOTE_POLICIES:
        raise ValueError(f"promote must be one of {PROMOTE_POLICIES}, got {promote!r}")
    root = Path(project_dir).resolve()
    with workspace_slot(root):  # a second run on this folder waits here: DVC runs one repro per workspace
        return _run(root, overrides or {}, pull, push, promote)


def _run(root: Path, overrides: dict[str, Any], pull: bool | None, push: bool, promote: str
         ) -> dict[str, dict[str, Any]]:
    """The pipeline body, inside the workspace slot."""
    logger = get_run_logger()
    if overrides:
        apply_overrides(root / "params.yaml", overrides)
        logger.info("params overrides applied: %s", overrides)
    cfg = load_config(root / "params.yaml")
    retrying = io_retries(cfg.prefect)
    if pull or (pull is None and default_remote(str(root)) and missing_outputs(str(root))):
        dvc_pull.with_options(**retrying)(str(root))
    order = stage_order(root)
    logger.info("stage order from dvc.yaml: %s", " -> ".join(order))
    on_gpu = needs_gpu(cfg.device)
    if on_gpu:
        ensure_gpu_limit(cfg.prefect.gpu_slots)
    accelerated = accelerator_stages(root)
    run_id = str(flow_run.id or "local")
    tags = {"pipeline_run_id": run_id, "prefect_flow_run_id": run_id, "overrides": str(overrides)}
    runs = []
    with pipeline_parent_run(cfg.mlflow, root, name=f"pipeline-{flow_run.name or run_id[:8]}", tags=tags,
                             params={f"override.{k}": v for k, v in overrides.items()}) as parent:
        env = {PIPELINE_RUN_ENV: run_id, PREFECT_FLOW_RUN_ENV: run_id} | ({PARENT_RUN_ENV: parent} if parent else {})
        try:
            for stage in order:
                with gpu_slot(on_gpu and stage in accelerated):
                    runs.append(run_stage.with_options(**retrying)(stage, str(root), env))
        finally:
            publish(root, runs, cfg.mlflow.tracking_uri, parent)  # what finished is shown even when a stage failed
    if promote == "gates":
        promotion = promote_flow(project_dir=str(root))
        logger.info("promotion: %s", "moved @champion" if promotion["moved"] else "@champion unchanged")
    if push:  # last: a failed push fails the run but never the outputs the stages produced
        dvc_push.with_options(**retrying)(str(root))
    return {r["stage"]: r for r in runs}


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m flows.pipeline [-S key=value ...] [--pull|--no-pull] [--push] [--promote gates]`."""
    from yolofps.config import parse_override
    from yolofps.errors import YolofpsError

    parser = argparse.ArgumentParser(description="Run the yolofps pipeline as a Prefect flow.")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--pull", action=argparse.BooleanOptionalAction, default=None,
                        help="dvc pull first (default: when a remote is configured and outputs are missing)")
    parser.add_argument("--push", action="store_true", help="dvc push to the default remote at the end")
    parser.add_argument("--promote", choices=PROMOTE_POLICIES, default="never")
    parser.add_argument("--project-dir", default=".")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(text) for text in args.overrides)
        pipeline(overrides=overrides or None, pull=args.pull, push=args.push, promote=args.promote,
                 project_dir=args.project_dir)
    except YolofpsError as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
