"""Shared fixtures: a throwaway copy of the project in a real git + DVC repo, one Prefect harness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from helpers import make_project  # noqa: E402


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's pipeline files in a fresh git + DVC repo, with tiny params."""
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
