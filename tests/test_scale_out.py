"""The at-scale setup, run for real: MLflow, Prefect and the benchmark store on one PostgreSQL server, and the
pipeline run by a Prefect work-pool worker in another process (docs/SCALE.md).

A copy of the session's shared run is up to date, so the worker's flow run reruns only what the one override
changes: `mlflow.tracking_uri` (a register param) now points at the PostgreSQL-backed tracking server, so register
runs and every other stage is skipped. The deployment is the repository's own prefect.yaml (`prefect deploy`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from helpers import PROJECT_ROOT, copy_run, start_mlflow_server
from servers import Postgres, postgres_bin, prefect_env, running_postgres, running_prefect_server, stop_process

pytestmark = pytest.mark.slow
NAME = "yolofps-detector"
POOL, DEPLOYMENT = "yolofps", "yolofps-pipeline/nightly"  # prefect.yaml's work pool and deployment
DATABASES = ("mlflow", "prefect", "bench")
WORKER_TIMEOUT_S = 300  # the flow run: 8 `dvc repro` checks and one register
# Switch on once the benchmark history store (issue 19, item 4: yolofps.history, params `bench.store`) is merged:
# the flow then also sets bench.store to the PostgreSQL bench database (bench reruns, as its section changed)
# and check_bench_rows reads the rows back.
CHECK_BENCH_STORE = True  # the bench stage's rows in a PostgreSQL bench.store (yolofps.history)


def test_pipeline_runs_through_a_worker_on_postgresql_backed_stores(shared_run, tmp_path):
    """PostgreSQL for the three stores; a `process` worker runs the deployment; all of it is found in PostgreSQL."""
    _require_postgres()
    project = copy_run(shared_run, tmp_path / "project")  # up to date; an empty MLflow store
    with ExitStack() as servers:
        pg = servers.enter_context(running_postgres(DATABASES))
        mlflow_process, mlflow_uri = start_mlflow_server(tmp_path, pg.url("mlflow"), pg.env())
        servers.callback(stop_process, mlflow_process)
        api_url = servers.enter_context(running_prefect_server(pg.url("prefect", "asyncpg"), tmp_path, pg.env()))
        env = prefect_env(api_url, tmp_path / "prefect-home") | pg.env() | {
            "YOLOFPS_PROJECT_DIR": str(PROJECT_ROOT),  # prefect.yaml's pull step: the checkout that holds flows/
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        prefect_cli(env, "work-pool", "create", POOL, "--type", "process")
        prefect_cli(env, "deploy", "--name", "nightly")  # from the repo root: prefect.yaml
        overrides = {"mlflow.tracking_uri": mlflow_uri} | (bench_store_overrides(pg) if CHECK_BENCH_STORE else {})
        flow_run_id = trigger(api_url, {"project_dir": str(project), "push": False, "overrides": overrides})
        run_worker(env, tmp_path / "worker.log")
        check_flow_run(api_url, pg, flow_run_id, tmp_path / "worker.log")
        version = check_registered_version(mlflow_uri, pg, project, flow_run_id)
        if CHECK_BENCH_STORE:
            check_bench_rows(pg, version)


def _require_postgres() -> None:
    """Skip (recorded) without PostgreSQL's server binaries or psycopg2; fail instead where CI requires them."""
    missing = [what for what, found in (("PostgreSQL server binaries (initdb, pg_ctl)", postgres_bin()),
                                        ("psycopg2 (pip install -e '.[dev]')", _importable("psycopg2"))) if not found]
    if missing:
        reason = f"{' and '.join(missing)} not installed (apt-get install postgresql; .ci/run installs it)"
        if os.environ.get("YOLOFPS_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def prefect_cli(env: dict[str, str], *args: str) -> str:
    """`prefect --no-prompt ARGS` in the repository root against the test's server; its output."""
    result = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def trigger(api_url: str, parameters: dict) -> str:
    """A run of the deployment, scheduled now, not waited for (the worker started next picks it up); its id."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        flow_run = run_deployment(DEPLOYMENT, parameters=parameters, timeout=0)
    return str(flow_run.id)


def run_worker(env: dict[str, str], log: Path) -> None:
    """`prefect worker start --pool yolofps --run-once --limit 1`: polls once, runs the flow run, exits after it."""
    with open(log, "w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--run-once",
                                   "--limit", "1"], cwd=PROJECT_ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            worker.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_process(worker)
            pytest.fail(f"the worker did not finish within {WORKER_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
    assert worker.returncode == 0, f"worker exited {worker.returncode}:\n{log.read_text()[-4000:]}"


def check_flow_run(api_url: str, pg: Postgres, flow_run_id: str, worker_log: Path) -> None:
    """COMPLETED through the Prefect API, run by the pool's worker in another process, and so in PostgreSQL."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        assert run.state.is_completed(), f"{run.state.type}: {run.state.message}\n{worker_log.read_text()[-4000:]}"
        durations = _artifact(client, flow_run_id, "stage-durations")
    assert run.work_pool_name == POOL and run.infrastructure_pid  # the process worker records its child's PID
    assert int(run.infrastructure_pid.rsplit(":", 1)[-1]) != os.getpid()
    ran = {row["stage"] for row in json.loads(durations.data) if row["status"] == "ran"}
    assert ran == ({"bench", "register"} if CHECK_BENCH_STORE else {"register"}), durations.data
    stored = pg.query("prefect", "SELECT state_type, work_queue_name FROM flow_run WHERE id = %s", [flow_run_id])
    assert stored == [("COMPLETED", "default")]


def _artifact(client, flow_run_id: str, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    found = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])))
    assert found, f"flow run {flow_run_id} published no {key!r} artifact"
    return found[0]


def check_registered_version(mlflow_uri: str, pg: Postgres, project: Path, flow_run_id: str) -> str:
    """The version register reported: in the tracking server's registry, tagged with the flow run, in PostgreSQL."""
    from mlflow import MlflowClient

    receipt = json.loads((project / "reports" / "registered_model.json").read_text())
    assert receipt["model_name"] == NAME and not receipt["reused"], receipt
    version = str(receipt["version"])
    registered = MlflowClient(tracking_uri=mlflow_uri).get_model_version(NAME, version)
    assert registered.tags["prefect_flow_run_id"] == flow_run_id
    key = [NAME, int(version)]
    assert pg.query("mlflow", "SELECT run_id FROM model_versions WHERE name = %s AND version = %s",
                    key) == [(registered.run_id,)]
    assert pg.query("mlflow", "SELECT value FROM model_version_tags WHERE name = %s AND version = %s AND key = %s",
                    [*key, "prefect_flow_run_id"]) == [(flow_run_id,)]
    return version


def bench_store_overrides(pg: Postgres) -> dict[str, str]:
    """Params that point the benchmark history at the PostgreSQL bench database (no password: PGPASSWORD)."""
    return {"bench.store": pg.url("bench")}


def check_bench_rows(pg: Postgres, version: str) -> None:
    """The bench stage's rows, read back through the history store, and the store's schema in PostgreSQL.

    The bench database is new to this test, so every row in it is this flow run's.
    """
    from yolofps.history import open_store

    with pytest.MonkeyPatch.context() as env:  # the URL has no password: the client reads PGPASSWORD, as the stages do
        env.setitem(os.environ, "PGPASSWORD", pg.env()["PGPASSWORD"])
        rows = open_store(pg.url("bench")).query(limit=1000)
    assert rows, "no benchmark rows in the PostgreSQL bench database"
    assert {row.source for row in rows} == {"bench"} and len({row.run_id for row in rows}) == 1
    assert all(row.throughput > 0 and row.device_name for row in rows)
    assert all(row.p50_ms > 0 for row in rows if row.batch == 1)
    # register named its version on the rows that measured the registered content
    assert {row.model_version for row in rows} == {None, int(version)}
    assert pg.query("bench", "SELECT count(*) FROM bench_alembic_version") == [(1,)]  # schema by Alembic
