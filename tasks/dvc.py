"""Prefect tasks that drive DVC: the stage order from DVC's graph, one `dvc repro --single-item` per stage,
and `dvc pull` / `dvc push` against the configured remote.

Whether a stage ran and whether outputs are missing are DVC's answers (`Repo.status`, what `dvc status --json`
prints), never read from the text DVC and the stages print: a stage prints what it likes, DVC rewords its messages.

Retries are for I/O only. A stage is retried when its failure is transient (DVC's workspace lock held by another
DVC process, or a stage that exited with EX_TEMPFAIL because a service was down), never for its own errors:
training twice on a bug only doubles the wait for the same message.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff

from yolofps.config import PrefectConfig, load_config, normalize_overrides
from yolofps.errors import EXIT_TEMPFAIL
from yolofps.fileio import write_text

LOCK_BUSY = "Unable to acquire lock"  # DVC's message when another DVC process holds the workspace
# `dvc pull/push` answers that no retry changes: no remote, a remote path that is not a folder, no permission
PERMANENT_TRANSFER_ERRORS = ("no remote specified", "Not a directory", "Permission denied", "config file error")
# `dvc status` states of a stage output that `dvc pull` can restore: gone from the workspace, or from the cache
PULLABLE = ("deleted", "not in cache")
ALWAYS_CHANGED = "always changed"  # DVC's status entry for a stage with `always_changed: true` (or no deps)


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message starts with the stage's own error lines."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class DvcCommandFailed(RuntimeError):
    """`dvc pull` / `dvc push` failed; the message has DVC's own error lines and what to do."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Output:
    """What a DVC command printed (its last lines, for error messages only: what ran is DVC's answer) and how it
    ended."""

    code: int
    lines: list[str]
    seconds: float

    def errors(self) -> str:
        found = [line for line in self.lines if "error" in line.lower()] or self.lines[-5:]
        return " | ".join(found)


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only failures marked transient (lock busy, service down)."""
    error = state.result(raise_on_failure=False)
    return bool(getattr(error, "transient", False))


def io_retries(cfg: PrefectConfig) -> dict[str, Any]:
    """Task options for I/O: `prefect.retries` retries, waits doubling from `prefect.retry_delay_s`."""
    delays = exponential_backoff(backoff_factor=cfg.retry_delay_s)(cfg.retries) if cfg.retries else 0
    return {"retries": cfg.retries, "retry_delay_seconds": delays, "retry_jitter_factor": 0.2}


def stage_order(project_dir: Path) -> list[str]:
    """Stage names in an order DVC's graph allows (dependencies first, ties by name)."""
    from dvc.repo import Repo

    with Repo(str(project_dir)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        names = {stage: stage.name for stage in graph.nodes}
        ordered = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda stage: names[stage])
        return [names[stage] for stage in ordered]


def status_changes(project_dir: str | Path, stage: str | None = None) -> list[Any]:
    """DVC's status entries for one stage (None: every stage and .dvc file together); [] when up to date.

    The entries `dvc status --json` lists under each stage ({"changed deps": {path: state}}, {"changed outs":
    ...}, "always changed", ...), from DVC's Python API: `Repo.status` runs the checks `dvc repro` uses to
    decide whether to run a stage (`Stage.changed`), so a stage with no entries is one `dvc repro` skips.
    Raises dvc.lock.LockError while another DVC process holds the workspace.
    """
    from dvc.repo import Repo

    # DVC resolves a target, and names the stages it reports, against the current directory: use absolute paths
    target = f"{Path(project_dir).resolve() / 'dvc.yaml'}:{stage}" if stage else None
    with Repo(str(project_dir)) as repo:
        status = repo.status(targets=[target] if target else None)
    return [change for changes in status.values() for change in changes]


def _logger():
    """The Prefect run logger inside a flow or task; a plain logger when a task is called as `.fn()`."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def accelerator_stages(project_dir: Path) -> set[str]:
    """Stages that run on the configured device: those that declare the `device` param in dvc.yaml."""
    import yaml

    stages = yaml.safe_load((project_dir / "dvc.yaml").read_text())["stages"]
    return {name for name, stage in stages.items() if "device" in stage.get("params", [])}


def apply_overrides(params_path: Path, overrides: dict[str, Any]) -> None:
    """Write overrides into params.yaml as `dvc exp run -S` does, keeping comments; validated first."""
    from io import StringIO

    from ruamel.yaml import YAML

    overrides = normalize_overrides(overrides)
    load_config(params_path, overrides)  # an unknown key or wrong type fails here, before anything is written
    round_trip = YAML()  # round-trip mode (a safe loader: plain data + comments) preserves comments and key order
    doc = round_trip.load(params_path.read_text())
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    buffer = StringIO()
    round_trip.dump(doc, buffer)
    write_text(params_path, buffer.getvalue())


def _dvc_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for DVC: this interpreter's scripts folder first, so stage commands find `yolofps`."""
    env = dict(os.environ) | extra
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_dvc(args: list[str], project_dir: str, env: dict[str, str] | None = None, *, log=None) -> Output:
    """Run `dvc <args>`, streaming each line to `log` (a Prefect logger); keep the last lines."""
    command = [sys.executable, "-m", "dvc", *args]
    tail: deque[str] = deque(maxlen=40)
    start = time.perf_counter()
    with subprocess.Popen(command, cwd=project_dir, env=_dvc_env(env or {}), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                if log is not None:
                    log.info(line)
        code = process.wait()
    return Output(code, list(tail), round(time.perf_counter() - start, 2))


def _status_for_repro(project_dir: str, stage: str) -> list[Any]:
    """The stage's status changes ([] when up to date); a held workspace lock is a transient StageFailed."""
    from dvc.exceptions import DvcException
    from dvc.lock import LockError

    try:
        return status_changes(project_dir, stage)
    except LockError as err:
        raise StageFailed(f"stage {stage!r}: dvc status: {err} (transient: retried)", transient=True) from err
    except DvcException as err:  # dvc.yaml or dvc.lock unreadable, an unknown stage: no retry fixes these
        raise StageFailed(f"stage {stage!r}: dvc status failed: {err}") from err


@task(name="dvc-repro", task_run_name="dvc repro {stage}", retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def run_stage(stage: str, project_dir: str, env: dict[str, str] | None = None, force: bool = False
              ) -> dict[str, Any]:
    """Run one DVC stage (`dvc repro --single-item`), stream its output into the log; return what happened.

    Returns {"stage", "ran", "seconds", "metrics"}. `env` adds variables for the stage (the pipeline run id and
    MLflow parent run that group one execution). `ran` is DVC's own rule: `dvc repro` reproduces a stage when it
    is forced or its status is not clean (`Stage.reproduce`), so ran = (forced or out of date before) and the
    repro succeeded. Reproduced includes outputs restored from DVC's run-cache without running the command: the
    outputs and dvc.lock changed all the same. A failed repro raises StageFailed. After success the stage must be
    up to date (but for DVC's "always changed"); if not, something wrote into the workspace behind DVC and the
    lock does not describe the outputs, so that is a StageFailed too.
    """
    before = _status_for_repro(project_dir, stage)
    out = run_dvc(["repro", "--single-item", *(["--force"] if force else []), stage], project_dir, env, log=_logger())
    if out.code != 0:
        transient = out.code == EXIT_TEMPFAIL or any(LOCK_BUSY in line for line in out.lines)
        hint = " (transient: retried)" if transient else ""
        raise StageFailed(f"stage {stage!r} failed (exit {out.code}){hint}: {out.errors()}", transient=transient)
    after = [change for change in _status_for_repro(project_dir, stage) if change != ALWAYS_CHANGED]
    if after:
        raise StageFailed(f"stage {stage!r}: dvc repro succeeded but DVC still finds it out of date: "
                          f"{json.dumps(after)}; did another process write into the workspace during the run?")
    metrics_path = Path(project_dir) / "metrics" / f"{stage}.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return {"stage": stage, "ran": force or bool(before), "seconds": out.seconds, "metrics": metrics}


def default_remote(project_dir: str) -> str | None:
    """The name of the default DVC remote (`dvc remote add -d`), or None when none is configured."""
    out = run_dvc(["remote", "default"], project_dir)
    name = out.lines[-1].strip() if out.code == 0 and out.lines else ""
    return name or None


def missing_outputs(project_dir: str) -> bool:
    """True when DVC's status has a stage output (or `dvc add`ed file) gone from the workspace or the cache.

    Those are what `dvc pull` restores; `dvc repro` would recompute them (an output "not in cache" counts as
    changed too). A modified output or any changed dependency is not missing. False when DVC cannot answer
    (another DVC process holds the lock): nothing is pulled, and the repro after it meets the lock and retries.
    """
    from dvc.exceptions import DvcException

    try:
        changes = status_changes(project_dir)
    except DvcException as err:
        _logger().warning("dvc status failed, not pulling: %s", err)
        return False
    return any(state in PULLABLE for change in changes if isinstance(change, dict)
               for state in change.get("changed outs", {}).values())


def _transfer(verb: str, project_dir: str, extra: list[str]) -> dict[str, Any]:
    """`dvc pull` or `dvc push`; a missing remote is a permanent error, anything else is retried."""
    remote = default_remote(project_dir)
    if remote is None:
        raise DvcCommandFailed(f"dvc {verb}: no default DVC remote is configured in {project_dir}; add one with "
                               "`dvc remote add -d storage /path/to/folder` (credentials in .dvc/config.local). "
                               "Every output stays in the workspace.", transient=False)
    out = run_dvc([verb, *extra], project_dir, log=get_run_logger())
    if out.code != 0:
        permanent = any(marker in line for line in out.lines for marker in PERMANENT_TRANSFER_ERRORS)
        raise DvcCommandFailed(f"dvc {verb} with remote {remote!r} failed (exit {out.code}): {out.errors()}. "
                               "The workspace and its outputs are unchanged.", transient=not permanent)
    return {"remote": remote, "seconds": out.seconds, "summary": out.lines[-1] if out.lines else ""}


@task(name="dvc-pull", task_run_name="dvc pull", retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def dvc_pull(project_dir: str) -> dict[str, Any]:
    """Fetch the outputs dvc.lock names from the default remote (those it lacks are left to `dvc repro`)."""
    return _transfer("pull", project_dir, ["--allow-missing"])


@task(name="dvc-push", task_run_name="dvc push", retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def dvc_push(project_dir: str) -> dict[str, Any]:
    """Upload every cached output (and the run cache) to the default remote."""
    return _transfer("push", project_dir, ["--run-cache"])
