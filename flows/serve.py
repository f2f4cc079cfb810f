"""Serve the pipeline deployment on this machine: the nightly schedule from `prefect.cron` in params.yaml.

    prefect server start                                   # once, in its own terminal (schedules need a server)
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve
    python -m flows.serve --cron "0 2 * * *" --project-dir /srv/yolofps

The deployment is `yolofps-pipeline/nightly`: one run at a time (a run that comes due while one is running is
enqueued, not dropped), schedules keep running when this process stops (`pause_on_shutdown=False`). The same
deployment for a work pool on other machines is in prefect.yaml (`prefect deploy --name nightly`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron

from flows.pipeline import pipeline
from tasks.slots import ensure_gpu_limit
from yolofps.config import load_config

DEPLOYMENT = "nightly"
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def serve(project_dir: str = ".", cron: str | None = None, name: str = DEPLOYMENT, push: bool = False,
          promote: str = "never") -> None:
    """Create (or update) the deployment and run its runner in this process until stopped."""
    root = Path(project_dir).resolve()
    cfg = load_config(root / "params.yaml")
    ensure_gpu_limit(cfg.prefect.gpu_slots)  # setup: accelerator stages hold a slot of it
    pipeline.serve(name=name, schedules=[Cron(cron or cfg.prefect.cron, timezone=cfg.prefect.timezone)],
                   global_limit=ONE_AT_A_TIME, pause_on_shutdown=False, tags=["yolofps"],
                   parameters={"project_dir": str(root), "push": push, "promote": promote},
                   description="Nightly yolofps run: dvc stages in graph order, benchmark, register @challenger.")


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m flows.serve [--cron EXPR] [--project-dir DIR] [--push] [--promote gates]`."""
    parser = argparse.ArgumentParser(description="Serve the yolofps pipeline deployment with its cron schedule.")
    parser.add_argument("--cron", help="cron expression (default: prefect.cron in params.yaml)")
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--name", default=DEPLOYMENT, help="deployment name (default: nightly)")
    parser.add_argument("--push", action="store_true", help="scheduled runs push outputs to the DVC remote")
    parser.add_argument("--promote", choices=["never", "gates"], default="never")
    args = parser.parse_args(argv)
    serve(args.project_dir, args.cron, args.name, args.push, args.promote)
    return 0


if __name__ == "__main__":
    sys.exit(main())
