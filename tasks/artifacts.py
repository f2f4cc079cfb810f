"""Prefect artifacts of a pipeline run: the benchmark table, links into MLflow, and the stage durations.

Image artifacts need public URLs, so the Pareto plot is reached through the MLflow run link instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

LOCAL_UI = "http://127.0.0.1:5000"  # `yolofps ui` serves a sqlite:/// store here


def ui_base(tracking_uri: str) -> str:
    """The MLflow UI address for a tracking URI: the server itself, or where `yolofps ui` serves a local store."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI


def stage_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage: ran or skipped by DVC, and its wall time."""
    return [{"stage": r["stage"], "status": "ran" if r["ran"] else "skipped (unchanged)", "seconds": r["seconds"]}
            for r in runs]


def bench_markdown(project_dir: Path) -> str | None:
    """The bench stage's table with the selected variant and why, or None before the bench stage has run."""
    table, metrics = project_dir / "reports" / "bench" / "bench.md", project_dir / "metrics" / "bench.json"
    if not (table.is_file() and metrics.is_file()):
        return None
    selected = json.loads(metrics.read_text())["selected"]
    return f"**Selected: `{selected['name']}`**: {selected['reason']}\n\n{table.read_text()}"


def publish(project_dir: Path, runs: list[dict[str, Any]], tracking_uri: str, parent_run: str | None) -> None:
    """Create the run's artifacts: stage durations, benchmark table, and MLflow links (when tracking worked)."""
    create_table_artifact(stage_table(runs), key="stage-durations",
                          description="Each DVC stage of this run: ran or skipped as unchanged, wall seconds")
    markdown = bench_markdown(project_dir)
    if markdown:
        create_markdown_artifact(markdown, key="benchmark", description="End-to-end benchmark of every variant")
    base = ui_base(tracking_uri)
    if parent_run:
        create_link_artifact(f"{base}/#/runs/{parent_run}", link_text="MLflow pipeline run", key="mlflow-run",
                             description=f"The pipeline's parent run (stage runs nested under it); UI at {base}")
    receipt = project_dir / "reports" / "registered_model.json"
    if receipt.is_file():
        registered = json.loads(receipt.read_text())
        name, version = registered["model_name"], registered["version"]
        create_link_artifact(f"{base}/#/models/{name}/versions/{version}", link_text=f"{name} v{version}",
                             key="registered-model", description=f"{registered['variant']}, {registered['alias_uri']}")
