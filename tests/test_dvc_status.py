"""The flow's view of a stage comes from DVC's status, never from what DVC or the stage prints.

Each test builds a real git + DVC project in tmp_path with stages made of small python commands and calls the
functions of tasks/dvc.py directly (`run_stage.fn`, no Prefect server). The stage `loud` prints DVC's own
wording for other stages and for being skipped, to show that no printed line decides anything.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from helpers import run_cmd

pytestmark = pytest.mark.slow  # real DVC: each test takes a few seconds

FAKE_LINES = ["Running stage 'other':", "Stage 'loud' didn't change, skipping", "ERROR: output 'loud.txt' deleted"]
# the `loud` stage's command: print lines that look like DVC's, count the run in runs.log, copy in.txt to loud.txt
LOUD_PY = (f"import shutil\nprint({chr(10).join(FAKE_LINES)!r})\nopen('runs.log', 'a').write('ran\\n')\n"
           "shutil.copy('in.txt', 'loud.txt')\n")


def copy_cmd(source: str, target: str) -> str:
    return f"{sys.executable} -c \"import shutil; shutil.copy('{source}', '{target}')\""


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    """A git + DVC project: `loud` (in.txt -> loud.txt) and `other` (other_in.txt -> deleted_rows.csv)."""
    run_cmd(["git", "init", "-q"], tmp_path)
    run_cmd([sys.executable, "-m", "dvc", "init", "-q"], tmp_path)
    run_cmd([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], tmp_path)
    (tmp_path / "in.txt").write_text("a")
    (tmp_path / "other_in.txt").write_text("b")
    (tmp_path / "loud.py").write_text(LOUD_PY)
    stages = {  # the output named "deleted_rows.csv": a status that merely mentions "deleted" is no missing output
        "loud": {"cmd": f"{sys.executable} loud.py", "deps": ["in.txt"], "outs": ["loud.txt"]},
        "other": {"cmd": copy_cmd("other_in.txt", "deleted_rows.csv"), "deps": ["other_in.txt"],
                  "outs": ["deleted_rows.csv"]},
    }
    write_stages(tmp_path, stages)
    return tmp_path


def write_stages(project: Path, stages: dict) -> None:
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))


def add_stage(project: Path, name: str, stage: dict) -> None:
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    write_stages(project, stages | {name: stage})


def repro(project: Path, stage: str, **options) -> dict:
    from tasks.dvc import run_stage

    return run_stage.fn(stage, str(project), **options)


def test_ran_is_what_dvc_did_whatever_the_stage_prints(dvc_project):
    from tasks.dvc import run_dvc, status_changes

    assert repro(dvc_project, "loud")["ran"]  # it printed "Stage 'loud' didn't change, skipping"
    assert (dvc_project / "loud.txt").read_text() == "a" and status_changes(dvc_project, "loud") == []
    assert not repro(dvc_project, "loud")["ran"]  # up to date: DVC skips it
    assert repro(dvc_project, "other")["ran"]  # `loud` printed "Running stage 'other':" before; it had not run
    assert not repro(dvc_project, "other")["ran"]
    (dvc_project / "in.txt").write_text("changed")
    assert not repro(dvc_project, "other")["ran"]  # another stage's dep changed: not this one's business
    assert repro(dvc_project, "loud")["ran"]
    # what a reader of the text would have seen: `other` started inside loud's run, and loud skipped
    out = run_dvc(["repro", "--single-item", "--force", "loud"], str(dvc_project))
    assert out.code == 0 and "Running stage 'other':" in out.lines and FAKE_LINES[1] in out.lines, out.lines


def test_a_forced_stage_ran_though_it_was_up_to_date(dvc_project):
    repro(dvc_project, "loud")
    assert repro(dvc_project, "loud", force=True)["ran"]
    assert not repro(dvc_project, "loud")["ran"]


def test_outputs_restored_from_the_run_cache_count_as_ran(dvc_project):
    """in.txt a -> b -> a: the third repro restores a's outputs from DVC's run-cache and runs no command."""
    repro(dvc_project, "loud")
    (dvc_project / "in.txt").write_text("b")
    repro(dvc_project, "loud")
    (dvc_project / "in.txt").write_text("a")
    result = repro(dvc_project, "loud")
    assert (dvc_project / "runs.log").read_text() == "ran\n" * 2  # the command did not run a third time ...
    assert result["ran"] and (dvc_project / "loud.txt").read_text() == "a"  # ... yet DVC reproduced the stage


def test_an_always_changed_stage_ran_every_time(dvc_project):
    add_stage(dvc_project, "clock", {"cmd": copy_cmd("in.txt", "clock.txt"), "deps": ["in.txt"],
                                     "outs": [{"clock.txt": {"cache": False}}], "always_changed": True})
    assert repro(dvc_project, "clock")["ran"]
    assert repro(dvc_project, "clock")["ran"]  # status after is "always changed": not an error


def test_a_failed_stage_raises_and_stays_out_of_date(dvc_project):
    from tasks.dvc import StageFailed, status_changes

    add_stage(dvc_project, "broken", {"cmd": f"{sys.executable} -c \"print('Running stage \\'broken\\':'); "
                                             "raise SystemExit(3)\"", "deps": ["in.txt"], "outs": ["never.txt"]})
    with pytest.raises(StageFailed, match=r"stage 'broken' failed \(exit") as failure:
        repro(dvc_project, "broken")
    assert not failure.value.transient
    assert status_changes(dvc_project, "broken")  # the next flow run tries again


def test_a_stage_that_meets_a_held_dvc_lock_fails_transiently(dvc_project):
    """The status before the repro is a DVC call too: a busy workspace lock there is retried, like the repro's."""
    from dvc.lock import make_lock

    from tasks.dvc import StageFailed

    lock = make_lock(str(dvc_project / ".dvc" / "tmp" / "lock"), tmp_dir=str(dvc_project / ".dvc" / "tmp"))
    lock.lock()
    try:
        with pytest.raises(StageFailed, match="Unable to acquire lock") as failure:
            repro(dvc_project, "loud")
    finally:
        lock.unlock()
    assert failure.value.transient
    assert not (dvc_project / "loud.txt").exists()
    assert repro(dvc_project, "loud")["ran"]


def test_a_write_behind_dvcs_back_after_the_repro_is_an_error(dvc_project):
    """The command leaves a child that rewrites its output once dvc.lock is written: the lock no longer holds."""
    from tasks.dvc import StageFailed

    late_writer = ("import pathlib, time\n"
                   "lock, deadline = pathlib.Path('dvc.lock'), time.monotonic() + 60\n"
                   "def locked():\n"
                   "    return 'late.txt' in (lock.read_text() if lock.exists() else '')\n"
                   "while not locked() and time.monotonic() < deadline:\n"
                   "    time.sleep(0.01)\n"
                   "pathlib.Path('late.txt').write_text('rewritten')\n")
    (dvc_project / "late_writer.py").write_text(late_writer)
    # the child keeps the output pipe open, so the flow reads on until it has written: no race with the status
    cmd = (f"{sys.executable} -c \"import pathlib, subprocess, sys; pathlib.Path('late.txt').write_text('first'); "
           "subprocess.Popen([sys.executable, 'late_writer.py'])\"")
    add_stage(dvc_project, "late", {"cmd": cmd, "deps": ["late_writer.py"], "outs": [{"late.txt": {"cache": False}}]})
    with pytest.raises(StageFailed, match="still finds it out of date") as failure:
        repro(dvc_project, "late")
    assert "late.txt" in str(failure.value) and not failure.value.transient


def test_missing_outputs_means_an_output_dvc_can_pull(dvc_project):
    from tasks.dvc import missing_outputs

    assert missing_outputs(str(dvc_project))  # never produced: both outputs are missing
    repro(dvc_project, "loud")
    repro(dvc_project, "other")
    assert not missing_outputs(str(dvc_project))
    (dvc_project / "deleted_rows.csv").unlink()
    (dvc_project / "deleted_rows.csv").write_text("edited")  # modified, under a name that says "deleted"
    (dvc_project / "in.txt").write_text("changed")  # a changed dependency is for dvc repro, not dvc pull
    assert not missing_outputs(str(dvc_project))
    (dvc_project / "loud.txt").unlink()
    assert missing_outputs(str(dvc_project))


def test_outputs_gone_from_the_cache_are_missing_too(dvc_project):
    """Present in the workspace but not in .dvc/cache: `dvc repro` would rerun the stage, `dvc pull` restores it."""
    from tasks.dvc import missing_outputs, status_changes

    stages = yaml.safe_load((dvc_project / "dvc.yaml").read_text())["stages"]
    write_stages(dvc_project, {"loud": stages["loud"]})  # no output named "deleted_rows.csv" here
    repro(dvc_project, "loud")
    shutil.rmtree(dvc_project / ".dvc" / "cache")
    assert status_changes(dvc_project, "loud") == [{"changed outs": {"loud.txt": "not in cache"}}]
    assert missing_outputs(str(dvc_project))


def test_missing_outputs_is_false_while_dvc_cannot_answer(dvc_project):
    from dvc.lock import make_lock

    from tasks.dvc import missing_outputs

    lock = make_lock(str(dvc_project / ".dvc" / "tmp" / "lock"), tmp_dir=str(dvc_project / ".dvc" / "tmp"))
    lock.lock()
    try:
        assert not missing_outputs(str(dvc_project))  # though nothing was ever produced
    finally:
        lock.unlock()
    assert missing_outputs(str(dvc_project))
