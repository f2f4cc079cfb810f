"""Prefect tasks that drive DVC: the stage order from DVC's graph, one `dvc repro --single-item` per stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import networkx as nx
from prefect import get_run_logger, task

from yolofps.config import load_config, normalize_overrides
from yolofps.fileio import write_text


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message starts with the stage's own error lines."""


def stage_order(project_dir: Path) -> list[str]:
    """Stage names in an order DVC's graph allows (dependencies first, ties by name)."""
    from dvc.repo import Repo

    with Repo(str(project_dir)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        names = {stage: stage.name for stage in graph.nodes}
        ordered = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda stage: names[stage])
        return [names[stage] for stage in ordered]


def apply_overrides(params_path: Path, overrides: dict[str, Any]) -> None:
    """Write overrides into params.yaml as `dvc exp run -S` does, keeping comments; validated first."""
    from ruamel.yaml import YAML

    overrides = normalize_overrides(overrides)
    load_config(params_path, overrides)  # an unknown key or wrong type fails here, before anything is written
    yaml = YAML()  # round-trip mode preserves comments and key order
    doc = yaml.load(params_path.read_text())
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    from io import StringIO

    buffer = StringIO()
    yaml.dump(doc, buffer)
    write_text(params_path, buffer.getvalue())


def _dvc_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for DVC: this interpreter's scripts folder first, so stage commands find `yolofps`."""
    env = dict(os.environ) | extra
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@task(name="dvc-repro", task_run_name="dvc repro {stage}")
def run_stage(stage: str, project_dir: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one DVC stage (`dvc repro --single-item`), stream its output into the log, return its metrics.

    `env` adds variables for the stage (the pipeline run id and MLflow parent run that group one execution).
    """
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(command, cwd=project_dir, env=_dvc_env(env or {}), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info(line)
        code = process.wait()
    if code != 0:
        errors = [line for line in tail if "error" in line.lower()] or list(tail)[-5:]
        raise StageFailed(f"stage {stage!r} failed (exit {code}): " + " | ".join(errors))
    metrics_path = Path(project_dir) / "metrics" / f"{stage}.json"
    return json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
