"""The Prefect tasks of tasks/dvc.py called through `.fn()`: real DVC on copies of the session's tiny pipeline,
without a flow run or a Prefect server (cheaper than tests/test_flows.py; the flows there cover retries)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from prefect.logging import disable_run_logger

from helpers import copy_run, run_cmd
from tasks.dvc import StageFailed, apply_overrides, dvc_pull, dvc_push, run_stage

pytestmark = pytest.mark.slow


@pytest.fixture
def project(shared_run, tmp_path):
    return copy_run(shared_run, tmp_path / "project")


def test_an_unchanged_stage_is_skipped_and_reports_its_metrics(project):
    with disable_run_logger():
        result = run_stage.fn("augment", str(project))
    assert result["stage"] == "augment" and result["ran"] is False
    assert result["metrics"] == json.loads((project / "metrics" / "augment.json").read_text())


def test_a_changed_stage_runs_and_reports_the_new_metrics(project):
    apply_overrides(project / "params.yaml", {"data.num_train": 6})
    with disable_run_logger():
        result = run_stage.fn("data", str(project))
    assert result["ran"] is True and result["metrics"]["train_images"] == 6
    assert json.loads(run_cmd([sys.executable, "-m", "dvc", "status", "--json", "data"], project).stdout) == {}


def test_a_busy_dvc_lock_is_a_transient_failure_and_a_stage_error_is_not(project):
    from dvc.lock import make_lock

    lock = make_lock(str(project / ".dvc" / "tmp" / "lock"), tmp_dir=str(project / ".dvc" / "tmp"))
    lock.lock()
    try:
        with disable_run_logger(), pytest.raises(StageFailed, match="transient") as busy:
            run_stage.fn("data", str(project))
    finally:
        lock.unlock()
    assert busy.value.transient
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("copies: 0", "copies: -3"))
    with disable_run_logger(), pytest.raises(StageFailed, match="augment.copies must be >= 0") as bad:
        run_stage.fn("augment", str(project))
    assert not bad.value.transient  # retrying cannot fix a bad value


def test_push_then_pull_restores_deleted_outputs(project, tmp_path):
    run_cmd([sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote")], project)
    with disable_run_logger():
        pushed = dvc_push.fn(str(project))
        assert pushed["remote"] == "storage" and any((tmp_path / "remote").rglob("*"))
        weights = project / "models" / "train" / "best" / "weights.safetensors"
        before = weights.read_bytes()
        for gone in ("models", ".dvc/cache"):
            shutil.rmtree(project / gone)
        dvc_pull.fn(str(project))
    assert weights.read_bytes() == before
