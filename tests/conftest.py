"""Shared fixtures: a throwaway copy of the project in a real git + DVC repo, one Prefect harness."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from helpers import PROJECT_ROOT, TINY_PARAMS, run_cmd  # noqa: E402


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's pipeline files in a fresh git + DVC repo, with tiny params."""
    from tasks.dvc import apply_overrides

    root = tmp_path / "project"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    shutil.copytree(PROJECT_ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run_cmd(["git", "init", "-q"], root)
    run_cmd([sys.executable, "-m", "dvc", "init", "-q"], root)
    run_cmd([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], root)
    apply_overrides(root / "params.yaml", TINY_PARAMS)
    return root


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
