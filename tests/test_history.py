"""The benchmark history: the store on a real SQLite file (and a real PostgreSQL server where one can start), the
bench stage's and the register stage's rows, `yolofps bench history`, the re-bench rows and the promotion FPS gate."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import copy_run, free_port, tool_env
from yolofps.bench.environment import device_name
from yolofps.config import load_config, to_dict
from yolofps.errors import StoreError, StoreUnavailable
from yolofps.history import Measurement, append_or_warn, content_hash, open_store, same_run_fps, store_url
from yolofps.history.schema import TABLE, VERSION_TABLE, Base
from yolofps.history.store import current_revision, head_revision, postgres_driver
from yolofps.lineage import params_hash

NAME = "yolofps-detector"
T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
HOUR = dt.timedelta(hours=1)


def row(**changes) -> Measurement:
    """A complete batch-1 measurement with `changes`."""
    base = {"measured_at": T0, "run_id": "run-a", "source": "bench", "device_name": "AMD EPYC x2", "batch": 1,
            "model_hash": "aaaa1111", "variant": "train/eager-fp32", "runtime": "torch", "mode": "eager",
            "dtype": "fp32", "imgsz": 64, "cpu_flags": ("avx2", "avx512f"), "threads": 2, "p50_ms": 10.0,
            "p95_ms": 12.5, "p99_ms": 13.25, "throughput": 100.0, "map50_95": 0.5, "git_commit": "abc123",
            "params_hash": "p1", "extra": {"status": "ok", "latency_ms": {"pre": 1.0}}}
    return Measurement(**(base | changes))


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


# --- the store on SQLite ---

def test_open_migrates_a_new_file_to_head_and_a_second_open_changes_nothing(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect

    path = tmp_path / "stores" / "bench.db"  # the folder is created too
    store = open_store(sqlite_url(path))
    assert sorted(inspect(store.engine).get_table_names()) == sorted([TABLE, VERSION_TABLE])
    assert current_revision(store.engine) == head_revision() == "0001"
    with store.engine.connect() as connection:  # what the migrations built is what the ORM maps
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE, "compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    store.append([row()])
    store.close()
    before = (path.stat().st_mtime_ns, path.read_bytes())
    again = open_store(sqlite_url(path))
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before  # no migration, no write
    assert again.query() == [row()]
    with sqlite3.connect(path) as raw:
        assert raw.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall() == [("0001",)]


def test_append_and_query_round_trip_every_field_newest_first_with_filters(tmp_path):
    store = open_store(sqlite_url(tmp_path / "bench.db"))
    berlin = dt.timezone(dt.timedelta(hours=1))
    rows = [row(),
            row(measured_at=(T0 + HOUR).astimezone(berlin), run_id="run-b", model_hash="bbbb2222", batch=8,
                p50_ms=None, p95_ms=None, p99_ms=None, throughput=400.0, variant="quantize/openvino-1t-int8"),
            row(measured_at=T0 + 2 * HOUR, run_id="run-c", device_name="NVIDIA H200", cpu_flags=(), extra={}),
            row(measured_at=T0 + 3 * HOUR, run_id="run-d", source="rebench", model_name=NAME, model_version=2,
                map50_95=None, git_commit=None, params_hash=None)]
    assert store.append(rows) == 4
    got = store.query()
    assert got == rows[::-1]  # every field back as written, newest first
    assert got[2].measured_at.tzinfo == dt.timezone.utc and got[2].measured_at == T0 + HOUR
    assert [m.run_id for m in store.query(device="epyc")] == ["run-d", "run-b", "run-a"]  # part of it, any case
    assert [m.run_id for m in store.query(device="H200")] == ["run-c"]
    assert store.query(device="%") == []  # a LIKE wildcard typed by a user is a character, not "everything"
    assert [m.run_id for m in store.query(model=NAME)] == ["run-d"]
    assert [m.run_id for m in store.query(model=f"models:/{NAME}/2")] == ["run-d"]
    assert store.query(model=f"{NAME}/3") == []
    assert [m.run_id for m in store.query(model="quantize/openvino-1t-int8")] == ["run-b"]
    assert [m.run_id for m in store.query(model="bbbb")] == ["run-b"]  # a content-hash prefix
    assert [m.run_id for m in store.query(limit=2)] == ["run-d", "run-c"]


def test_a_measurement_refuses_a_naive_time_and_a_zero_batch():
    with pytest.raises(ValueError, match="timezone-aware"):
        row(measured_at=dt.datetime(2026, 12, 1))
    with pytest.raises(ValueError, match="batch >= 1"):
        row(batch=0)


def test_a_version_names_one_content(tmp_path):
    store = open_store(sqlite_url(tmp_path / "bench.db"))
    store.append([row(), row(batch=8), row(model_hash="bbbb2222"), row(model_hash="cccc", model_name="other",
                                                                        model_version=1)])
    assert store.mark_version("aaaa1111", NAME, 1) == 2
    # a registry started afresh gives number 1 to another content: the old rows lose it, other models keep theirs
    assert store.mark_version("bbbb2222", NAME, 1) == 1
    named = {(m.model_hash, m.batch): (m.model_name, m.model_version) for m in store.query()}
    assert named == {("aaaa1111", 1): (None, None), ("aaaa1111", 8): (None, None), ("bbbb2222", 1): (NAME, 1),
                     ("cccc", 1): ("other", 1)}


def test_paired_fps_is_the_newest_run_that_measured_both_versions_at_batch_1_on_one_device(tmp_path):
    store = open_store(sqlite_url(tmp_path / "bench.db"))

    def pair(run_id, at, fps1, fps2, **changes):
        return [row(run_id=run_id, measured_at=at, model_name=NAME, model_version=1, throughput=fps1, **changes),
                row(run_id=run_id, measured_at=at, model_name=NAME, model_version=2, throughput=fps2, **changes)]

    store.append(pair("old", T0, 100.0, 110.0) + pair("rebench-1", T0 + HOUR, 90.0, 120.0, source="rebench"))
    later_but_incomplete = [row(run_id="only-v2", measured_at=T0 + 2 * HOUR, model_name=NAME, model_version=2),
                            row(run_id="two-boxes", measured_at=T0 + 3 * HOUR, model_name=NAME, model_version=1),
                            row(run_id="two-boxes", measured_at=T0 + 3 * HOUR, model_name=NAME, model_version=2,
                                device_name="NVIDIA H200")]
    store.append(later_but_incomplete + pair("batch-8", T0 + 4 * HOUR, 1.0, 2.0, batch=8))
    found = store.paired_fps(NAME, (2, 1))
    assert (found.run_id, found.source, found.device_name, found.fps) == ("rebench-1", "rebench", "AMD EPYC x2",
                                                                          {1: 90.0, 2: 120.0})
    assert found.measured_at == T0 + HOUR
    assert store.paired_fps(NAME, (2, 3)) is None and store.paired_fps("another-model", (1, 2)) is None


# --- named errors ---

@pytest.mark.parametrize("url, match", [
    ("benchmarks.db", "not a SQLAlchemy URL"),
    ("nosuchdb://host/db", "unknown database dialect"),
    ("mysql+mysqldb://bench@127.0.0.1/bench", "driver is not installed"),  # mysqlclient is not a dependency
])
def test_a_bad_url_is_a_store_error(url, match):
    with pytest.raises(StoreError, match=match) as err:
        open_store(url)
    assert not isinstance(err.value, StoreUnavailable)  # nothing a retry could fix


def test_a_sqlite_path_that_is_a_folder_is_a_store_error_not_transient(tmp_path):
    with pytest.raises(StoreError, match="cannot be used") as err:
        open_store(sqlite_url(tmp_path))
    assert not isinstance(err.value, StoreUnavailable)


def test_an_unreachable_server_is_store_unavailable_without_the_password(monkeypatch):
    if postgres_driver() is None:
        pytest.skip("no PostgreSQL driver (the [scale] extra: psycopg2-binary) is installed")
    monkeypatch.setenv("YOLOFPS_BENCH_STORE_PASSWORD", "hunter2")
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match="did not answer") as err:
        open_store(f"postgresql://bench@127.0.0.1:{free_port()}/bench")
    assert time.monotonic() - start < 30 and "hunter2" not in str(err.value) and "127.0.0.1" in str(err.value)


def test_the_password_comes_from_the_environment(monkeypatch):
    assert store_url("postgresql://bench@db.example/bench").password is None
    monkeypatch.setenv("YOLOFPS_BENCH_STORE_PASSWORD", "hunter2")
    url = store_url("postgresql://bench@db.example/bench")
    assert url.password == "hunter2" and "hunter2" not in url.render_as_string(hide_password=True)


def test_a_relative_sqlite_path_resolves_against_the_project_root(tmp_path):
    assert store_url("sqlite:///benchmarks.db", tmp_path).database == str(tmp_path / "benchmarks.db")
    assert store_url(f"sqlite:///{tmp_path}/b.db", Path("/elsewhere")).database == str(tmp_path / "b.db")


def test_a_store_of_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "bench.db"
    open_store(sqlite_url(path)).close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"UPDATE {VERSION_TABLE} SET version_num = '0099'")
    with pytest.raises(StoreError, match="revision 0099.*upgrade yolofps"):
        open_store(sqlite_url(path))


def test_append_or_warn_on_a_store_that_refuses_writes_warns_and_returns(tmp_path, capsys):
    path = tmp_path / "bench.db"
    open_store(sqlite_url(path)).append([row()])
    read_only = open_store(f"sqlite:///file:{path}?mode=ro&uri=true")  # SQLite itself refuses the write
    note = append_or_warn(read_only, [row(run_id="run-b")])
    assert note.startswith("not recorded in the benchmark store") and "readonly" in note
    assert "warning: 1 measurements (run run-b) not recorded" in capsys.readouterr().err
    assert [m.run_id for m in open_store(sqlite_url(path)).query()] == ["run-a"]


# --- the store on a real PostgreSQL server ---

@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (trust auth), stopped at the end; skipped without initdb/psycopg2."""
    if postgres_driver() is None:
        pytest.skip("no PostgreSQL driver (the [scale] extra: psycopg2-binary) is installed")
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (Debian: apt-get install postgresql)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # postgres refuses to run as root
    folder = Path(tempfile.mkdtemp(prefix="yolofps-pg-"))
    if as_user:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    subprocess.run([*as_user, "initdb", "-D", str(data), "-U", "bench", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://bench@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


OPEN_AND_APPEND = """
import datetime as dt, sys, time
from yolofps.history import Measurement, open_store
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both processes open the fresh store at one moment
store = open_store(sys.argv[1])
store.append([Measurement(measured_at=dt.datetime.now(dt.timezone.utc), run_id=sys.argv[3], source="bench",
                          device_name="pg test", batch=1, throughput=1.0)])
"""


@pytest.mark.slow
def test_on_postgresql_two_first_opens_at_once_migrate_once_and_both_append(postgres):
    start_at = str(time.time() + 8)  # after both have imported sqlalchemy
    racers = [subprocess.Popen([sys.executable, "-c", OPEN_AND_APPEND, postgres, start_at, f"racer-{i}"],
                               env=tool_env(), stderr=subprocess.PIPE, text=True) for i in range(2)]
    for racer in racers:
        assert racer.wait(timeout=120) == 0, racer.stderr.read()[-3000:]
    store = open_store(postgres)
    assert current_revision(store.engine) == head_revision()
    assert sorted(m.run_id for m in store.query()) == ["racer-0", "racer-1"]
    store.append([row(model_name=NAME, model_version=1), row(model_name=NAME, model_version=2, throughput=150.0)])
    assert store.query(model=f"{NAME}/2")[0] == row(model_name=NAME, model_version=2, throughput=150.0)
    assert store.paired_fps(NAME, (2, 1)).fps == {1: 100.0, 2: 150.0}


# --- the writers, the CLI and the gate on the session's tiny pipeline ---

def bench_rows(root: Path) -> tuple[dict, list[Measurement]]:
    bench = json.loads((root / "metrics" / "bench.json").read_text())
    return bench, [m for m in open_store("sqlite:///benchmarks.db", root=root).query(limit=10_000)
                   if m.source == "bench"]


def test_the_bench_stage_appended_one_row_per_variant_and_batch_and_register_named_its_version(shared_run):
    """The shared run's `dvc repro` ran the bench stage, then register, against its sqlite:///benchmarks.db."""
    root = shared_run.root
    bench, rows = bench_rows(root)
    timed = {v["name"]: v for v in bench["variants"] if v["status"] != "failed" and v.get("fps_b1")}
    expected = {(name, int(batch)) for name, v in timed.items() for batch in v["throughput"]}
    assert {(m.variant, m.batch) for m in rows} == expected
    assert len(rows) == sum(len(v["throughput"]) for v in timed.values())  # one row each, once
    (run_id,) = {m.run_id for m in rows}  # one measuring run
    env = bench["environment"]
    settings = {k: v for k, v in to_dict(load_config(root / "params.yaml").bench).items() if k != "store"}
    receipt = json.loads((root / "reports" / "registered_model.json").read_text())
    for m in rows:
        variant = timed[m.variant]
        assert m.model_hash == content_hash(root / variant["artifact"], variant)
        assert (m.device_name, m.cpu_flags, m.imgsz) == (device_name(env), tuple(env["cpu_flags"]), variant["imgsz"])
        assert m.throughput == variant["throughput"][str(m.batch)] and m.map50_95 == variant["metrics/mAP50-95B"]
        assert m.params_hash == params_hash(settings) and m.threads == (variant["threads"] or env["threads"])
        if m.batch == 1:
            assert (m.p50_ms, m.p95_ms, m.p99_ms) == tuple(variant["latency_ms_b1"][k] for k in ("p50", "p95", "p99"))
        else:
            assert (m.p50_ms, m.p99_ms) == (None, None)  # percentiles are timed at batch 1
        registered = m.variant == receipt["variant"]
        assert (m.model_name, m.model_version) == ((NAME, receipt["version"]) if registered else (None, None))

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("yolofps").experiment_id],
                                "attributes.run_name = 'bench'")
    assert f"(run {run_id})" in run.data.tags["history"]


def test_bench_history_prints_the_rows_newest_first_with_filters(shared_run, capsys):
    from yolofps import cli

    root = shared_run.root
    receipt = json.loads((root / "reports" / "registered_model.json").read_text())
    params = ["--params", str(root / "params.yaml")]
    assert cli.main(["bench", "history", "--model", f"{NAME}/{receipt['version']}", *params]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    _, rows = bench_rows(root)
    assert header.split()[:4] == ["measured", "(UTC)", "source", "run"] and "img/s" in header
    assert len(lines) == sum(m.variant == receipt["variant"] for m in rows) >= 1
    assert all(f"{NAME} v{receipt['version']}" in line and receipt["variant"] in line for line in lines)
    assert cli.main(["bench", "history", "--limit", "3", *params]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 3
    assert cli.main(["bench", "history", "--device", "no such device", *params]) == 0
    assert capsys.readouterr().out.startswith("no measurements in sqlite:///")
    assert cli.main(["bench", "history", "--limit", "0", *params]) == 2
    assert "--limit" in capsys.readouterr().err


def test_yolofps_bench_alone_still_runs_the_stage():
    from yolofps import cli

    parser = cli.build_parser()
    stage = parser.parse_args(["bench", "-S", "bench.runs=3", "--params", "p.yaml"])
    assert (stage.handler, stage.overrides, stage.params) == (cli._run_stage, ["bench.runs=3"], "p.yaml")
    history = parser.parse_args(["bench", "history", "--device", "EPYC", "--limit", "5"])
    assert (history.handler, history.device, history.limit, history.model) == (cli._bench_history, "EPYC", 5, None)


@pytest.fixture(scope="module")
def registered(shared_run, tmp_path_factory):
    """A copy of the shared run (its benchmark rows included) with its own MLflow store: the selected variant
    registered as v1 and promoted to @champion, another timed variant as v2 (@challenger)."""
    from tasks.dvc import apply_overrides
    from yolofps.paths import Paths
    from yolofps.registry import Judge, PromotionRequest, promote
    from yolofps.stages import register

    folder = tmp_path_factory.mktemp("history")
    root = copy_run(shared_run, folder / "project")
    apply_overrides(root / "params.yaml", {"mlflow.tracking_uri": sqlite_url(folder / "registry.db")})
    cfg = load_config(root / "params.yaml")
    bench = json.loads((root / "metrics" / "bench.json").read_text())
    selected = bench["selected"]["name"]
    other = next(v["name"] for v in bench["variants"] if v["name"] != selected and v["status"] == "ok")
    first = register.run(cfg, Paths(root)).metrics["version"]
    with_other = dataclasses.replace(cfg, register=dataclasses.replace(cfg.register, variant=other))
    second = register.run(with_other, Paths(root)).metrics["version"]
    assert promote(cfg.mlflow, NAME, Judge(lenient(cfg)), PromotionRequest(version=first, user="test", reason="first"),
                   retries=1).moved
    return root, cfg, {first: selected, second: other}


def lenient(cfg):
    return dataclasses.replace(cfg.register.gates, map_tolerance=1.0, min_fps_gain=-1.0, min_map50_95=0.0,
                               min_fps_b1=0.0)


def fps_gate(cfg, judge) -> str:
    """The FPS-vs-champion gate's detail for @challenger, dry run."""
    from yolofps.registry import PromotionRequest, promote

    request = PromotionRequest(alias="challenger", dry_run=True, user="test")
    result = promote(cfg.mlflow, NAME, judge, request, retries=1)
    return next(g.detail for g in result.gates if g.name == "FPS vs champion")


def test_the_gate_compares_two_versions_on_figures_from_one_bench_run(registered):
    from yolofps.registry import Judge

    root, cfg, versions = registered
    (champion, selected), (challenger, other) = sorted(versions.items())
    bench, rows = bench_rows(root)
    (run_id,) = {m.run_id for m in rows}
    assert {m.model_version for m in rows if m.variant == other} == {challenger}  # register named its rows
    fps = {v["name"]: v["fps_b1"] for v in bench["variants"]}
    store = open_store(cfg.bench.store, root=root)
    detail = fps_gate(cfg, Judge(lenient(cfg), store.paired_fps))
    assert f"{fps[other]:.1f} >= {fps[selected]:.1f} x" in detail
    assert f"from the benchmark store, bench run {run_id} at" in detail and device_name(bench["environment"]) in detail
    assert fps_gate(cfg, Judge(lenient(cfg))).endswith("from version tags")


def test_the_gate_says_why_it_fell_back_to_the_tags(registered, tmp_path):
    from yolofps.registry import Judge

    root, cfg, versions = registered
    (champion, _), (challenger, _) = sorted(versions.items())
    empty = open_store(sqlite_url(tmp_path / "empty.db"))
    assert fps_gate(cfg, Judge(lenient(cfg), empty.paired_fps)).endswith(
        f"from version tags (the benchmark store has no run that measured v{challenger} and v{champion} on one "
        "device)")
    broken = fps_gate(cfg, Judge(lenient(cfg), same_run_fps("nosuchdb://host/db")))
    assert "from version tags (the benchmark store failed: bench.store nosuchdb://host/db: unknown" in broken


def test_a_rebench_appends_one_run_and_the_gate_then_uses_it(registered, capsys):
    from yolofps import cli
    from yolofps.bench.remeasure import remeasure_registered
    from yolofps.registry import Judge

    root, cfg, versions = registered
    results = remeasure_registered(cfg, ["champion", "challenger"], root, runs=3)
    rebench = [m for m in open_store(cfg.bench.store, root=root).query() if m.source == "rebench"]
    (run_id,) = {m.run_id for m in rebench}
    assert sorted(m.model_version for m in rebench) == sorted(versions) and all(m.batch == 1 for m in rebench)
    assert f"(run {run_id})" in results["champion"]["history"]
    for m in rebench:
        measured = results["champion" if m.model_version == min(versions) else "challenger"]
        assert (m.throughput, m.p50_ms, m.device_name) == (measured["fps_b1"], measured["latency_ms_b1"]["p50"],
                                                           measured["bench_device_name"])
        assert m.variant == versions[m.model_version] and m.map50_95 is None  # a re-bench times, it does not score
    store = open_store(cfg.bench.store, root=root)
    assert f"from the benchmark store, rebench run {run_id} at" in fps_gate(cfg, Judge(lenient(cfg),
                                                                                        store.paired_fps))
    assert cli.main(["promote", "--dry-run", "--params", str(root / "params.yaml")]) == 0
    assert f"rebench run {run_id}" in capsys.readouterr().out  # `yolofps promote` reads bench.store too


def test_a_store_failure_after_the_bench_keeps_every_output(shared_run, tmp_path, capsys):
    """The store refuses the write at the end (SQLite read-only): the stage completes, the warning says so."""
    from yolofps.paths import Paths
    from yolofps.stages import bench

    root = copy_run(shared_run, tmp_path / "project")
    before = (root / "metrics" / "bench.json").stat().st_mtime_ns
    count = len(open_store("sqlite:///benchmarks.db", root=root).query(limit=10_000))
    tracking = sqlite_url(tmp_path / "mlflow.db")
    cfg = load_config(root / "params.yaml", {"bench.store": f"sqlite:///file:{root}/benchmarks.db?mode=ro&uri=true",
                                             "mlflow.tracking_uri": tracking})
    result = bench.run(cfg, Paths(root))
    assert (root / "metrics" / "bench.json").stat().st_mtime_ns != before and result.outputs["reports"].is_dir()
    assert (root / "reports" / "bench" / "bench.md").is_file() and (root / "plots" / "bench.csv").is_file()
    assert "not recorded in the benchmark store" in capsys.readouterr().err
    assert len(open_store("sqlite:///benchmarks.db", root=root).query(limit=10_000)) == count

    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("yolofps").experiment_id])
    assert run.data.tags["history"].startswith("not recorded in the benchmark store")
