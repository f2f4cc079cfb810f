"""Prefect tasks around the MLflow registry: promotion through the gates and re-measuring registered versions.

The logic lives in `yolofps.registry` and `yolofps.bench.remeasure`; these tasks only add retries on an
unreachable tracking server (after the registry's own short retries) and return small dicts.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.dvc import retry_transient
from yolofps.config import Config, load_config


def project_config(project_dir: str) -> Config:
    """The project's params, with a relative `sqlite:///` tracking URI made absolute (the flow's cwd may differ)."""
    import dataclasses

    from yolofps.registry import resolve_tracking_uri

    root = Path(project_dir).resolve()
    cfg = load_config(root / "params.yaml")
    tracking = resolve_tracking_uri(cfg.mlflow.tracking_uri, root)
    return dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=tracking))


@task(name="promote", task_run_name="promote {alias}", retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def promote_version(project_dir: str, alias: str = "challenger", version: int | None = None, *, force: bool = False,
                    reason: str = "", dry_run: bool = False) -> dict[str, Any]:
    """Run the promotion gates for a version against @champion; move @champion when they pass (or forced)."""
    from yolofps.history import same_run_fps
    from yolofps.registry import Judge, PromotionRequest, promote

    cfg = project_config(project_dir)
    r = cfg.register
    judge = Judge(r.gates, same_run_fps(cfg.bench.store, Path(project_dir).resolve()))  # FPS from one measuring run
    request = PromotionRequest(version=version, alias=alias if version is None else "", dry_run=dry_run, force=force,
                               reason=reason or "Prefect promote flow", user=f"prefect ({getpass.getuser()})")
    result = promote(cfg.mlflow, r.model_name, judge, request, retries=r.retries, backoff_s=r.backoff_s)
    get_run_logger().info("\n%s", result.table())
    return {"model_name": result.model_name, "candidate": result.candidate, "champion": result.champion,
            "moved": result.moved, "forced": result.forced, "table": result.table(),
            "gates": [{"gate": g.name, "passed": g.passed, "detail": g.detail} for g in result.gates]}


@task(name="remeasure", task_run_name="re-measure {aliases} on this device", retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def remeasure_versions(project_dir: str, aliases: list[str], *, runs: int) -> dict[str, dict]:
    """Load each aliased version from the registry, time them side by side here, tag them with the figures."""
    from yolofps.bench.remeasure import remeasure_registered

    cfg = project_config(project_dir)
    results = remeasure_registered(cfg, aliases, Path(project_dir), runs=runs)
    skipped = [alias for alias, r in results.items() if "skipped" in r]
    if skipped:
        get_run_logger().warning("no version under %s; measured the others", skipped)
    return results
