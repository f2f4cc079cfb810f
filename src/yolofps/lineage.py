"""Lineage: git commit, params hash, DVC hashes and the pipeline run id, as one dict of tags."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import yaml

# Set by the Prefect flow (its flow-run id) so every stage of one execution shares it; a user may set it
# around `dvc repro` too. Unset, each stage run gets its own id.
PIPELINE_RUN_ENV = "YOLOFPS_PIPELINE_RUN_ID"
PARENT_RUN_ENV = "YOLOFPS_MLFLOW_PARENT_RUN_ID"
PREFECT_FLOW_RUN_ENV = "YOLOFPS_PREFECT_FLOW_RUN_ID"  # set by the Prefect flow only


def params_hash(section: Any) -> str:
    """Short, stable hash of a params section (plain data), for tags and model metadata."""
    blob = json.dumps(section, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def git_state(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the project checkout ('unknown' outside git)."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return result.stdout.strip() if result.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD") or "unknown"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def dvc_input_hashes(root: Path, stage: str) -> dict[str, str]:
    """DVC md5 of the data/model inputs of `stage`, as recorded in dvc.lock by the stages that produced them."""
    try:
        deps = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage].get("deps", [])
        locked = (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages", {})
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return {}
    produced = {out["path"]: out.get("md5", "") for entry in locked.values() for out in entry.get("outs", [])}
    return {f"dvc_md5:{dep}": produced[dep] for dep in deps if dep in produced}


def pipeline_run_id() -> str:
    """The id grouping the stages of one pipeline execution."""
    return os.environ.get(PIPELINE_RUN_ENV) or f"adhoc-{uuid.uuid4().hex[:12]}"


def lineage_tags(root: Path, stage: str, section: Any) -> dict[str, str]:
    """All lineage tags for a stage run."""
    tags = {"stage": stage, "pipeline_run_id": pipeline_run_id(), "params_hash": params_hash(section)}
    if os.environ.get(PREFECT_FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = os.environ[PREFECT_FLOW_RUN_ENV]
    tags |= git_state(root)
    tags |= dvc_input_hashes(root, stage)
    return tags
