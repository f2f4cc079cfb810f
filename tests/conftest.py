"""Shared fixtures: a throwaway copy of the project in a real git + DVC repo, one Prefect harness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from helpers import make_project  # noqa: E402


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh tiny project for one test."""
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """The session's ONE tiny pipeline (helpers.SHARED_PARAMS), reproduced by real `dvc repro` stage by stage.

    Read-only: a test that changes files, params or the MLflow store works on `helpers.copy_run(shared_run, tmp)`.
    Users: test_stage_outs (per-stage writes), test_register (a copy, its own MLflow store), test_pipeline,
    test_train_stage, test_faults (copies with train.epochs raised: only train reruns), test_flows (a copy),
    test_experiments (copies committed to git).

    Not shared, on purpose:
    - test_flows' first flow run reruns every stage itself (an override of data.num_train): it must observe the
      flow running, registering and pushing them; the stages cost the same as a fresh project's would.
    - test_stage_outs' faulty-bench test and test_faults' trainings rerun one stage in a copy: what they check is
      how that run fails or resumes.
    - test_pipeline's imported-checkpoint test reruns train..register in a copy (train.weights, train.epochs 0).
    """
    from helpers import build_shared_run

    return build_shared_run(tmp_path_factory.mktemp("shared") / "project")
