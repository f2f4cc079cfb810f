"""Injected faults against the real pipeline: `kill -9` mid-training, damaged artifacts, the tracking server
dying mid-run, DVC's lock held by a second run, a DVC remote missing or unwritable.

Each test works in its own copy of one tiny git + DVC project whose data and augment stages ran once (real
`dvc repro`, real `yolofps` processes, a real `mlflow server`); nothing stands in for them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import make_project, run_cmd, start_mlflow_server, tool_env

pytestmark = pytest.mark.slow
EPOCHS = 3  # enough epochs that a kill after the first checkpoint lands mid-run
MAP_KEYS = ("metrics/mAP50B", "metrics/mAP50-95B", "metrics/precisionB", "metrics/recallB")


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "dvc", *args], project, check=check)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The tiny project with data + augment reproduced by DVC and train.epochs raised to EPOCHS."""
    from tasks.dvc import apply_overrides

    root = make_project(tmp_path_factory.mktemp("faults") / "project")
    apply_overrides(root / "params.yaml", {"train.epochs": EPOCHS})
    dvc(root, "repro", "augment")
    return root


def copy_of(prepared: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared project (its DVC cache and dvc.lock included)."""
    return Path(shutil.copytree(prepared, tmp_path / "project", symlinks=True))


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> Path:
    """The same project trained without interruption: the figures a resumed run must reproduce."""
    root = copy_of(prepared, tmp_path_factory.mktemp("reference"))
    dvc(root, "repro", "train")
    return root


def wait_for_checkpoint(project: Path, process: subprocess.Popen, epoch: int, timeout: float = 300) -> dict:
    """Block until checkpoints/train/last holds at least `epoch` finished epochs; returns its meta.json."""
    meta_path = project / "checkpoints" / "train" / "last" / "meta.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())  # written by rename: never half a file
            if meta["epoch"] >= epoch:
                return meta
        assert process.poll() is None, f"training ended before epoch {epoch}: {process.communicate()}"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint for epoch {epoch} within {timeout} s")


def train_process(dvc_process: subprocess.Popen) -> psutil.Process:
    """The `yolofps train` process DVC started (its child), found by command line."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(dvc_process.pid).children(recursive=True):
            if "train" in child.cmdline() and any("yolofps" in part for part in child.cmdline()):
                return child
        time.sleep(0.1)
    raise AssertionError("dvc repro started no `yolofps train`")


def digest(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under `paths`: what must not change when a later step fails."""
    files = sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def history(project: Path) -> list[dict[str, str]]:
    with (project / "plots" / "train.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_kill_9_mid_training_then_rerun_resumes_and_matches_an_uninterrupted_run(prepared, reference, tmp_path):
    project = copy_of(prepared, tmp_path)
    repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=project, env=tool_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = train_process(repro)
    meta = wait_for_checkpoint(project, repro, epoch=1)
    os.kill(worker.pid, signal.SIGKILL)  # by PID: the training process, mid-way through the next epoch
    output, _ = repro.communicate(timeout=120)
    assert repro.returncode != 0 and "ERROR" in output
    killed = json.loads((project / "checkpoints" / "train" / "last" / "meta.json").read_text())
    assert 1 <= killed["epoch"] < EPOCHS and killed["finished"] is False and meta["epoch"] <= killed["epoch"]
    assert (project / "checkpoints" / "train" / "best").is_dir() or \
        (project / "checkpoints" / "train" / ".best.old").is_dir()  # best is saved before the resume point
    assert not (project / "metrics" / "train.json").exists()  # an unfinished run publishes no metrics

    rerun = dvc(project, "repro", "train").stdout
    assert f"resuming from checkpoints/train/last after epoch {killed['epoch']}" in rerun
    assert f"train: epoch {killed['epoch']}:" not in rerun  # finished epochs are not trained again
    assert json.loads(dvc(project, "status", "--json", "train").stdout) == {}  # dvc.lock records the resumed run

    resumed = json.loads((project / "metrics" / "train.json").read_text())
    uninterrupted = json.loads((reference / "metrics" / "train.json").read_text())
    assert resumed["epochs_run"] == uninterrupted["epochs_run"] == EPOCHS
    for key in MAP_KEYS:  # same seed, same data order per epoch, restored RNG and optimizer: the same run
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=0.02), key
    for got, want in zip(history(project), history(reference)):
        assert float(got["train/loss"]) == pytest.approx(float(want["train/loss"]), rel=0.02)
    assert not [p.name for p in (project / "checkpoints" / "train").iterdir() if p.name.startswith(".")]


def test_damaged_checkpoints_and_models_are_named_errors_at_the_cli(reference, tmp_path):
    project = Path(shutil.copytree(reference, tmp_path / "project", symlinks=True))
    last = project / "checkpoints" / "train" / "last"
    weights = last / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])  # a truncated file (a full disk, a bad copy)
    result = run_cmd(["yolofps", "train", "-S", "train.resume=true"], project, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "checkpoints/train/last/weights.safetensors" in result.stderr and "rm -r" in result.stderr

    (project / "models" / "train" / "best" / "arch.json").write_text('{"name": "yolov5tiny", "layers": [')
    before = digest([project / "metrics", project / "models" / "train"])
    result = run_cmd(["yolofps", "prune"], project, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "models/train/best/arch.json" in result.stderr and "dvc repro --force" in result.stderr
    assert digest([project / "metrics", project / "models" / "train"]) == before  # nothing else touched

    # a checkpoint of another architecture, forced: named, not a tensor-shape traceback
    shutil.rmtree(last)
    shutil.copytree(reference / "checkpoints" / "train" / "last", last)
    result = run_cmd(["yolofps", "train", "-S", "train.resume=true", "-S", "train.model=n"], project, check=False)
    assert result.returncode == 2 and "different architecture" in result.stderr and "Traceback" not in result.stderr


def test_tracking_server_dies_mid_training_and_training_finishes(prepared, tmp_path):
    from tasks.dvc import apply_overrides

    project = copy_of(prepared, tmp_path)
    server, uri = start_mlflow_server(tmp_path)
    try:
        apply_overrides(project / "params.yaml", {"mlflow.tracking_uri": uri})
        train = subprocess.Popen(["yolofps", "train"], cwd=project, env=tool_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        wait_for_checkpoint(project, train, epoch=1)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers vanish mid-run
        server.wait(timeout=30)
    start = time.monotonic()
    _, stderr = train.communicate(timeout=300)
    assert train.returncode == 0, stderr[-3000:]
    assert "tracking is off for the rest of this run" in stderr
    assert stderr.count("tracking is off") == 1  # one warning, not one stall per epoch
    assert time.monotonic() - start < 120
    metrics = json.loads((project / "metrics" / "train.json").read_text())
    assert metrics["epochs_run"] == EPOCHS and all(key in metrics for key in MAP_KEYS)
    assert len(history(project)) == EPOCHS
    for name in ("best", "last"):
        assert (project / "models" / "train" / name / "weights.safetensors").stat().st_size > 1000


def test_a_second_pipeline_run_on_the_workspace_fails_clearly_on_dvcs_lock(prepared, tmp_path):
    project = copy_of(prepared, tmp_path)
    first = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=project, env=tool_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    train_process(first)  # DVC holds its locks while the stage command runs
    for second in (["repro"], ["--wait-for-lock", "repro", "train"]):
        blocked = dvc(project, *second, check=False)
        # the stage's outputs are write-locked (.dvc/tmp/rwlock); --wait-for-lock waits only for the repo lock
        assert blocked.returncode != 0, blocked.stdout
        assert "is busy, it is being blocked by" in blocked.stderr and f"(PID {first.pid}): " in blocked.stderr
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output  # the first run never noticed the second
    assert json.loads(dvc(project, "status", "--json", "train").stdout) == {}  # dvc.lock matches the outputs
    lock = (project / "dvc.lock").read_text()
    assert lock.count("\n  train:\n") == 1 and "checkpoints/train" in lock
    again = dvc(project, "repro", "train").stdout  # rerun once the first is done: nothing left to do
    assert "Running stage 'train'" not in again


def test_dvc_push_and_pull_with_a_missing_or_unwritable_remote_fail_clearly_and_keep_outputs(reference, tmp_path):
    project = Path(shutil.copytree(reference, tmp_path / "project", symlinks=True))
    outputs = [project / "data", project / "models", project / "metrics", project / "dvc.lock"]
    before, status = digest(outputs), dvc(project, "status", "--json").stdout

    unconfigured = dvc(project, "push", check=False)
    assert unconfigured.returncode != 0 and "no remote specified" in unconfigured.stderr

    (tmp_path / "blocker").write_text("a file where the remote folder should be")
    dvc(project, "remote", "add", "-d", "store", str(tmp_path / "blocker" / "store"))
    unwritable = dvc(project, "push", check=False)
    # DVC calls it "unexpected error", but it names the errno and the path it could not write
    assert unwritable.returncode != 0 and "Not a directory" in unwritable.stderr
    assert str(tmp_path / "blocker" / "store") in unwritable.stderr

    dvc(project, "remote", "add", "-f", "-d", "store", str(tmp_path / "never-created"))
    shutil.move(project / ".dvc" / "cache", tmp_path / "cache-away")  # force a real download
    missing = dvc(project, "pull", check=False)
    assert missing.returncode != 0 and "failed to pull" in missing.stderr.lower()
    shutil.move(tmp_path / "cache-away", project / ".dvc" / "cache")

    assert digest(outputs) == before  # a failed push or pull never touches the workspace
    assert dvc(project, "status", "--json").stdout == status
