"""The Prefect flows end to end: real Prefect (one test server), real DVC in a throwaway git repo, real MLflow.

The tests of this module share one copy of the session's tiny pipeline and run in file order: a first pipeline
run that reruns every stage (an override of data.num_train), then runs that must skip, pull, retry, and a served
deployment triggered by `run_deployment`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers import PROJECT_ROOT, copy_run, run_cmd, tool_env

pytestmark = pytest.mark.slow
NAME = "yolofps-detector"
FLOW_PARAMS = {"prefect.retry_delay_s": 1.0, "register.backoff_s": 0.2}  # short waits between retries


@pytest.fixture(scope="module")
def flow_project(shared_run, tmp_path_factory) -> Path:
    """A copy of the shared run (empty MLflow store) for the module, with a local-folder DVC remote as the default."""
    from tasks.dvc import apply_overrides

    root = copy_run(shared_run, tmp_path_factory.mktemp("flows") / "project")
    apply_overrides(root / "params.yaml", FLOW_PARAMS)
    remote = root.parent / "dvc-remote"
    run_cmd([sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", str(remote)], root)
    return root


def dvc(project: Path, *args: str) -> str:
    return run_cmd([sys.executable, "-m", "dvc", *args], project).stdout


def assert_up_to_date(project: Path) -> None:
    status = dvc(project, "status", "--json")
    assert json.loads(status) == {}, status
    assert "Running stage" not in dvc(project, "repro")  # a laptop repro after the flow does nothing


def artifacts_of(flow_run_id) -> dict[str, object]:
    """key -> artifact of one flow run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in found}


def task_runs_of(flow_run_id) -> dict[str, object]:
    """task run name -> task run of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def mlflow_client(project: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def test_pipeline_flow_runs_registers_promotes_pushes_with_lineage(flow_project, prefect_harness):
    from flows.pipeline import pipeline
    from tasks.dvc import stage_order

    order = stage_order(flow_project)
    state = pipeline(overrides={"data.num_train": 10}, push=True, promote="gates", project_dir=str(flow_project),
                     return_state=True)
    runs = state.result()
    flow_run_id = state.state_details.flow_run_id
    assert list(runs) == order and all(r["ran"] for r in runs.values())
    assert runs["data"]["metrics"]["train_images"] == 10
    assert_up_to_date(flow_project)
    # lineage: the flow-run id on the registered version; the overrides on the MLflow parent run
    client = mlflow_client(flow_project)
    champion = client.get_model_version_by_alias(NAME, "champion")  # promote="gates": no champion yet, so it moved
    assert champion.tags["prefect_flow_run_id"] == str(flow_run_id)
    parent = client.search_runs([client.get_experiment_by_name("yolofps").experiment_id],
                                filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}' and "
                                              "tags.pipeline_run_id = '" + str(flow_run_id) + "'")
    assert any(r.data.params.get("override.data.num_train") == "10" for r in parent)
    # artifacts: stage durations, the benchmark table, links to the MLflow run and the registered version
    artifacts = artifacts_of(flow_run_id)
    assert {"stage-durations", "benchmark", "mlflow-run", "registered-model"} <= set(artifacts)
    selected = json.loads((flow_project / "metrics" / "bench.json").read_text())["selected"]["name"]
    assert selected in artifacts["benchmark"].data
    assert f"#/models/{NAME}/versions/{champion.version}" in artifacts["registered-model"].data
    table = json.loads(artifacts["stage-durations"].data)
    assert [row["stage"] for row in table] == order and all(row["status"] == "ran" for row in table)
    # dvc push: the remote holds the outputs
    assert any((flow_project.parent / "dvc-remote").rglob("*")), "dvc push left the remote empty"
    assert "dvc push" in task_runs_of(flow_run_id)


def test_second_run_skips_every_stage(flow_project, prefect_harness):
    from flows.pipeline import pipeline

    state = pipeline(project_dir=str(flow_project), return_state=True)
    runs = state.result()
    assert not any(r["ran"] for r in runs.values()), {s: r["ran"] for s, r in runs.items()}
    table = json.loads(artifacts_of(state.state_details.flow_run_id)["stage-durations"].data)
    assert {row["status"] for row in table} == {"skipped (unchanged)"}
    assert_up_to_date(flow_project)


def test_missing_outputs_are_pulled_from_the_remote_not_recomputed(flow_project, prefect_harness):
    from flows.pipeline import pipeline

    lock_before = (flow_project / "dvc.lock").read_text()
    for gone in ("data/prepared", "models", ".dvc/cache"):
        shutil.rmtree(flow_project / gone)
    state = pipeline(project_dir=str(flow_project), return_state=True)  # pull=None: remote set, outputs missing
    runs = state.result()
    assert "dvc pull" in task_runs_of(state.state_details.flow_run_id)
    assert not any(r["ran"] for r in runs.values())
    assert (flow_project / "models" / "train" / "best" / "weights.safetensors").is_file()
    assert (flow_project / "dvc.lock").read_text() == lock_before
    assert_up_to_date(flow_project)


def test_a_stage_that_meets_a_busy_dvc_lock_is_retried_and_the_flow_succeeds(flow_project, prefect_harness):
    """Another DVC process holds the workspace lock for a few seconds: the first stage fails, is retried, passes."""
    from dvc.lock import make_lock

    from flows.pipeline import pipeline

    lock = make_lock(str(flow_project / ".dvc" / "tmp" / "lock"), tmp_dir=str(flow_project / ".dvc" / "tmp"))
    lock.lock()
    releaser = threading.Timer(6.0, lock.unlock)
    releaser.start()
    try:
        state = pipeline(pull=False, project_dir=str(flow_project), return_state=True)
    finally:
        releaser.join()
    assert state.is_completed(), state.message
    first = task_runs_of(state.state_details.flow_run_id)["dvc repro data"]
    assert first.run_count >= 2, "the busy lock should have failed the first attempt"


def test_served_deployment_runs_when_triggered(flow_project, prefect_harness):
    """`python -m flows.serve` in a subprocess: its cron deployment exists and a triggered run completes."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    env = tool_env() | {"PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(PROJECT_ROOT),
                        "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    command = [sys.executable, "-m", "flows.serve", "--project-dir", str(flow_project), "--cron", "0 3 * * *"]
    server = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deployment = _wait_for_deployment("yolofps-pipeline/nightly", server)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        assert deployment.global_concurrency_limit.limit == 1
        run = run_deployment("yolofps-pipeline/nightly", parameters={"pull": False}, timeout=240, poll_interval=2)
        assert run.state.is_completed(), run.state.message
    finally:
        server.terminate()  # the serve process we started, by its PID
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    with get_client(sync_client=True) as client:  # pause_on_shutdown=False: the schedule survives the runner
        assert not client.read_deployment_by_name("yolofps-pipeline/nightly").paused


def _wait_for_deployment(name: str, process: subprocess.Popen, timeout: float = 90):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"flows.serve exited {process.returncode}:\n{process.stdout.read()}")
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(1)
    raise AssertionError(f"deployment {name} did not appear within {timeout} s")


def test_bench_flow_remeasures_registered_versions_on_this_device(flow_project, prefect_harness):
    from flows.bench import bench

    results = bench(aliases=["champion", "challenger", "nonexistent"], runs=3, project_dir=str(flow_project))
    assert results["champion"]["version"] == results["challenger"]["version"]  # one version, timed once
    assert results["champion"]["fps_b1"] > 0 and "skipped" in results["nonexistent"]
    version = mlflow_client(flow_project).get_model_version_by_alias(NAME, "champion")
    assert version.tags["bench_source"] == "remeasured"
    assert float(version.tags["fps_b1"]) == results["champion"]["fps_b1"]


def test_promote_flow_keeps_the_champion_and_reports_gates(flow_project, prefect_harness):
    from flows.promote import promote

    result = promote(dry_run=True, project_dir=str(flow_project))
    assert result["candidate"] == result["champion"] and not result["moved"]
    with pytest.raises(ValueError, match="needs a reason"):
        promote(force=True, project_dir=str(flow_project))


def test_gpu_slot_is_created_once_and_strict(prefect_harness):
    from prefect.client.orchestration import get_client

    from tasks.slots import GPU_LIMIT, ensure_gpu_limit, gpu_slot, needs_gpu

    with get_client(sync_client=True) as client:
        try:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
        except Exception:
            pass
    assert not needs_gpu("cpu")
    with pytest.raises(Exception, match=GPU_LIMIT):
        with gpu_slot(True):  # strict: a missing limit is an error, not a silent pass
            pass
    assert ensure_gpu_limit(1) is True and ensure_gpu_limit(4) is False  # an existing limit is left alone
    with gpu_slot(True):
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 1


def test_push_without_a_remote_is_a_clear_error_and_keeps_outputs(project):
    from tasks.dvc import DvcCommandFailed, dvc_push

    (project / "data").mkdir()
    with pytest.raises(DvcCommandFailed, match="no default DVC remote") as failure:
        dvc_push.fn(str(project))
    assert not failure.value.transient  # retrying cannot add a remote
    assert (project / "params.yaml").is_file()


def test_prefect_yaml_deploys_the_pipeline_on_the_params_schedule():
    doc = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    (deployment,) = doc["deployments"]
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["prefect"]
    assert deployment["schedules"][0]["cron"] == params["cron"]
    assert deployment["schedules"][0]["timezone"] == params["timezone"]
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    path, name = deployment["entrypoint"].split(":")
    assert (PROJECT_ROOT / path).is_file() and f"def {name}(" in (PROJECT_ROOT / path).read_text()


def test_a_second_run_on_the_same_workspace_waits_for_the_first(flow_project, prefect_harness):
    """The workspace slot: while one run holds the folder, another waits instead of failing on DVC's lock.

    States, not the clock: the holder lets go only once the second run is Running (it then sits at the slot, the
    first thing the flow does); by then no task of it has started, and each of its tasks starts after the release.
    """
    import datetime as dt

    from flows.pipeline import pipeline
    from tasks.slots import workspace_slot

    seen, held, stop = {}, threading.Event(), threading.Event()

    def first_run_holding_the_workspace():
        with workspace_slot(flow_project):
            held.set()
            while not stop.is_set() and not (waiting := _running_flow_runs()):
                stop.wait(0.5)  # poll the server's states; `stop` ends it if the second run fails to start
            if not stop.is_set():
                seen["waiting"] = waiting
                seen["tasks"] = {run.id: task_runs_of(run.id) for run in waiting}
            seen["released"] = dt.datetime.now(dt.timezone.utc)

    first = threading.Thread(target=first_run_holding_the_workspace)
    first.start()
    try:
        assert held.wait(timeout=60)
        state = pipeline(pull=False, project_dir=str(flow_project), return_state=True)
    finally:
        stop.set()
        first.join()
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    assert [run.id for run in seen.get("waiting", [])] == [flow_run_id], "the second run was never seen waiting"
    assert seen["tasks"][flow_run_id] == {}, "a task ran while the other run held the workspace"
    starts = [run.start_time for run in task_runs_of(flow_run_id).values()]
    assert starts and min(starts) >= seen["released"], (min(starts), seen["released"])


def _running_flow_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=running)
