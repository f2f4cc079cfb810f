"""register stage and promotion against real MLflow: the embedded SQLite store and a `mlflow server` subprocess."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from configs import project_config
from helpers import PROJECT_ROOT, copy_run, free_port, tool_env, wait_for_url
from yolofps.config import load_config
from yolofps.data import formats
from yolofps.errors import YolofpsError
from yolofps.paths import Paths
from yolofps.registry import Judge, RegistryError, champion_history, check_gates, promote
from yolofps.registry import PromotionRequest as Request
from yolofps.serving.detector import Detector, ServingConfig
from yolofps.stages import register

NAME = "yolofps-detector"


def gates(**changes):
    """params.yaml's register.gates with `changes`."""
    return dataclasses.replace(project_config().register.gates, **changes)


@pytest.fixture(scope="module")
def pipeline(shared_run, tmp_path_factory):
    """A copy of the session's tiny pipeline (helpers.SHARED_PARAMS: no deployment threshold, relaxed agreement
    floors) and an empty SQLite MLflow store of this module's own: the tests here register and promote."""
    root = copy_run(shared_run, tmp_path_factory.mktemp("register") / "project")
    store = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'registry.db'}"
    return root, load_config(root / "params.yaml", {"mlflow.tracking_uri": store})


def with_register(cfg, **changes):
    return dataclasses.replace(cfg, register=dataclasses.replace(cfg.register, **changes))


def val_images(root):
    return formats.list_images(Paths(root).augmented_data / "images" / "val")


def in_process_detections(root, variant: str, images) -> np.ndarray:
    """[image_index, x1, y1, x2, y2, score, class_id] rows of one bench variant run here, as the pyfunc serves it."""
    bench = json.loads((root / "metrics" / "bench.json").read_text())
    row = next(v for v in bench["variants"] if v["name"] == variant)
    config = ServingConfig(row["runtime"], row["mode"], row["dtype"], row["imgsz"], ["a"] * 100, conf=0.0)
    local = Detector(root / row["artifact"], config).detect(images)
    return np.concatenate([np.c_[np.full(len(d), i), d[:, :6]] for i, d in enumerate(local)])


def assert_served_like_in_process(served: pd.DataFrame, expected: np.ndarray) -> None:
    """Same boxes, scores and classes, image by image, within float noise of another process."""
    got = served[["image_index", "x1", "y1", "x2", "y2", "score", "class_id"]].to_numpy(dtype=float)
    assert len(expected) > 0 and got.shape == expected.shape, (got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_registered_pyfunc_loads_by_alias_and_matches_the_in_process_model(pipeline):
    import mlflow

    root, cfg = pipeline
    result = register.run(cfg, Paths(root))
    receipt = json.loads((root / "reports" / "registered_model.json").read_text())
    assert receipt["version"] == result.metrics["version"] and receipt["reused"] is False
    bench = json.loads((root / "metrics" / "bench.json").read_text())
    assert receipt["variant"] == bench["selected"]["name"]

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    images = val_images(root)
    served = model.predict(pd.DataFrame({"image": [str(p) for p in images]}))
    assert list(served.columns) == ["image_index", "x1", "y1", "x2", "y2", "score", "class_id", "class_name"]
    assert len(served) > 0 and set(served["class_name"]) <= set(json.loads(
        (root / "models" / "train" / "best" / "meta.json").read_text())["names"])

    row = next(v for v in bench["variants"] if v["name"] == receipt["variant"])
    config = ServingConfig(row["runtime"], row["mode"], row["dtype"], row["imgsz"], ["a"] * 100, conf=0.0)
    assert_served_like_in_process(served, in_process_detections(root, row["name"], images))

    # a base64-encoded image file (what a REST client sends) gives the same detections as its path
    encoded = base64.b64encode(images[0].read_bytes()).decode()
    from_bytes = model.predict(pd.DataFrame({"image": [encoded]}))
    (alone,) = Detector(root / row["artifact"], config).detect(images[:1])
    assert np.allclose(from_bytes[["x1", "y1", "x2", "y2", "score"]].to_numpy(), alone[:, :5], atol=1e-3)

    version = mlflow.MlflowClient().get_model_version_by_alias(NAME, "challenger")
    for key in ("git_commit", "git_dirty", "params_hash", "pipeline_run_id", "variant", "device", "fps_b1",
                "metrics/mAP50-95B", "metrics/mAP50B", "throughput", "bench_environment", "content_hash"):
        assert version.tags.get(key), key
    assert float(version.tags["fps_b1"]) == row["fps_b1"] and version.tags["variant"] == row["name"]


def test_the_version_page_reads_like_a_model_card(pipeline):
    """The version's description says what it is, how it was made, how fast on which device, how accurate."""
    from mlflow import MlflowClient

    root, cfg = pipeline
    result = register.run(cfg, Paths(root))
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    version = client.get_model_version(NAME, str(result.metrics["version"]))
    bench = json.loads((root / "metrics" / "bench.json").read_text())
    row = next(v for v in bench["variants"] if v["name"] == version.tags["variant"])
    baseline = next(v for v in bench["variants"] if v["baseline"])
    card = version.description
    for fact in (row["name"], f"{row['runtime']} {row['dtype']}", str(row["fps_b1"]),
                 str(row["latency_ms_b1"]["p99"]), bench["environment"]["cpu"], str(row["metrics/mAP50-95B"]),
                 str(baseline["metrics/mAP50-95B"]), "`train`: YOLOv5tiny trained", version.tags["git_commit"],
                 f"models:/{NAME}/{version.version}"):
        assert fact in card, fact
    if row["model"] != "train":  # an optimized variant names the model it came from
        assert "→" in card
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "bench")}
    assert {"bench/pareto.png", "bench/bench.md", "bench/bench.json"} <= artifacts


def test_model_card_of_the_full_run_names_its_chain_and_fits_mlflow(tmp_path):
    """The committed full-profile bench (benchmarks/results/full) rendered: the INT8 variant's whole chain."""
    from yolofps.registry.card import MAX_CHARS, CardFacts, render_card

    bench = json.loads((PROJECT_ROOT / "benchmarks" / "results" / "full" / "metrics" / "bench.json").read_text())
    row = next(v for v in bench["variants"] if v["name"] == bench["selected"]["name"])
    chain = [{"name": "train", "job": "train", "model": "n", "epoch": 40, "optimizer": "AdamW"},
             {"name": "prune-0.5", "job": "prune-0.5", "source": "train", "epoch": 60},
             {"name": "distill", "job": "distill", "source": "prune-0.5", "epoch": 60},
             {"name": "quantize", "source": "distill"}]
    card = render_card(CardFacts(NAME, 7, row, bench, chain, ["ellipse", "rectangle"], {"git_commit": "d984b34"}))
    assert len(card) <= MAX_CHARS and "selected it" in card
    assert card.index("`train`") < card.index("`prune-0.5`") < card.index("`distill`") < card.index("INT8 of")
    assert f"| {row['fps_b1']} | {row['latency_ms_b1']['p50']} |" in card and "avx512_vnni" in card


def test_a_registered_openvino_variant_loads_by_alias_and_predicts(pipeline):
    """An OpenVINO row registers as IR files and serves through the same runtime, with the threads it was timed with."""
    import mlflow

    root, cfg = pipeline
    bench = json.loads((root / "metrics" / "bench.json").read_text())
    row = next(v for v in bench["variants"] if v["name"] == "train/openvino-fp32")
    assert row["status"] != "failed", row.get("reason")
    result = register.run(with_register(cfg, variant=row["name"]), Paths(root))
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    version = mlflow.MlflowClient().get_model_version_by_alias(NAME, "challenger")
    assert int(version.version) == result.metrics["version"] and version.tags["runtime"] == "openvino"
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    detector = model.unwrap_python_model().detector
    assert type(detector.pipeline.backend).__name__ == "OpenVinoBackend"
    assert sorted(p.name for p in (root / row["artifact"]).iterdir()) == ["model.bin", "model.xml"]
    images = val_images(root)
    served = model.predict(pd.DataFrame({"image": [str(p) for p in images]}))
    config = ServingConfig(row["runtime"], row["mode"], row["dtype"], row["imgsz"], ["a"] * 100, conf=0.0)
    local = Detector(root / row["artifact"], config).detect(images)
    assert len(served) == sum(map(len, local)) > 0
    np.testing.assert_allclose(served[["x1", "y1", "x2", "y2", "score"]].to_numpy(),
                               np.concatenate(local)[:, :5], atol=1e-3)


def test_registering_the_same_content_again_reuses_the_version(pipeline):
    from mlflow import MlflowClient

    root, cfg = pipeline
    client = MlflowClient(cfg.mlflow.tracking_uri)
    before = client.search_model_versions(f"name = '{NAME}'")
    # a new benchmark of the same model content: no new version, the figures on the version are the new ones
    bench_json = root / "metrics" / "bench.json"
    original = bench_json.read_text()
    bench = json.loads(original)
    row = next(v for v in bench["variants"] if v["name"] == bench["selected"]["name"])
    row["fps_b1"] = round(row["fps_b1"] * 1.5, 2)
    bench_json.write_text(json.dumps(bench))
    try:
        again = register.run(cfg, Paths(root))
    finally:
        bench_json.write_text(original)
    after = client.search_model_versions(f"name = '{NAME}'")
    assert again.metrics["reused"] == 1 and len(after) == len(before)
    version = client.get_model_version(NAME, str(again.metrics["version"]))
    assert float(version.tags["fps_b1"]) == row["fps_b1"] and version.tags["stage"] == "register"


def test_gates_on_hand_made_tags():
    rules = gates(map_tolerance=0.01, min_fps_gain=0.1, min_map50_95=0.3, min_fps_b1=10)
    champion = {"metrics/mAP50-95B": "0.50", "fps_b1": "100", "bench_device_name": "cpu x2"}
    ok = {"metrics/mAP50-95B": "0.495", "fps_b1": "111", "bench_device_name": "cpu x2"}
    assert all(g.passed for g in check_gates(ok, champion, rules))
    worse = ok | {"metrics/mAP50-95B": "0.48"}
    assert [g.name for g in check_gates(worse, champion, rules) if not g.passed] == ["mAP50-95 vs champion"]
    slower = ok | {"fps_b1": "105"}
    assert [g.name for g in check_gates(slower, champion, rules) if not g.passed] == ["FPS vs champion"]
    other_device = ok | {"bench_device_name": "NVIDIA H200"}
    assert [g.name for g in check_gates(other_device, champion, rules) if not g.passed] == ["FPS vs champion"]
    poor = ok | {"metrics/mAP50-95B": "0.2"}
    assert [g.name for g in check_gates(poor, None, rules) if not g.passed] == ["mAP50-95 floor"]
    # a champion registered before the one vocabulary carries `map50_95`; it is still compared, not read as nan
    legacy = {"map50_95": "0.50", "fps_b1": "100", "bench_device_name": "cpu x2"}
    assert [g.name for g in check_gates(worse, legacy, rules) if not g.passed] == ["mAP50-95 vs champion"]


def test_promotion_follows_the_gates_and_keeps_history(pipeline):
    root, cfg = pipeline
    first = register.run(cfg, Paths(root)).metrics["version"]
    strict = gates(min_map50_95=1.0)  # no model reaches mAP 1.0
    refused = promote(cfg.mlflow, NAME, Judge(strict), Request(version=first, user="test"), retries=1)
    assert not refused.moved and not refused.passed and "FAIL" in refused.table()
    dry = promote(cfg.mlflow, NAME, Judge(gates()), Request(version=first, dry_run=True, user="test"), retries=1)
    assert dry.passed and not dry.moved
    moved = promote(cfg.mlflow, NAME, Judge(gates()), Request(version=first, user="test", reason="first champion"),
                    retries=1)
    assert moved.moved and moved.champion is None

    # a second version: the INT8 model (served through onnxruntime inside the same pyfunc interface), or the
    # torch baseline when INT8 is the bench's choice and so already version 1
    bench = json.loads((root / "metrics" / "bench.json").read_text())
    other = "quantize/onnxruntime-int8" if bench["selected"]["name"] != "quantize/onnxruntime-int8" else \
        "train/eager-fp32"
    second = register.run(with_register(cfg, variant=other), Paths(root)).metrics["version"]
    assert second > first  # a new version (the OpenVINO test before this one registered another in between)
    impossible = gates(min_fps_gain=1000.0)  # would need 1001x the champion's FPS
    assert not promote(cfg.mlflow, NAME, Judge(impossible), Request(alias="challenger", user="test"), retries=1).moved
    forced = promote(cfg.mlflow, NAME, Judge(impossible),
                     Request(alias="challenger", force=True, reason="INT8 for the edge box", user="test"), retries=1)
    assert forced.moved and forced.forced and forced.champion == first
    history = champion_history(cfg.mlflow, NAME)
    assert [(h["version"], h["previous"], h["forced"]) for h in history] == [(first, None, False),
                                                                            (second, first, True)]
    assert history[1]["reason"] == "INT8 for the edge box"

    import mlflow

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    images = val_images(root)
    champion = mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion")
    assert int(champion.version) == second and champion.tags["variant"] == other
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"image": [str(p) for p in images]}))
    assert_served_like_in_process(served, in_process_detections(root, other, images))


def test_auto_promote_runs_the_same_gates_in_the_stage(pipeline):
    root, cfg = pipeline
    lenient = dataclasses.replace(cfg.register.gates, map_tolerance=1.0, min_fps_gain=-1.0)
    cfg = with_register(cfg, variant="train/trace-fp32", auto_promote=True, gates=lenient)
    result = register.run(cfg, Paths(root))
    assert result.metrics["promoted"] == 1
    assert champion_history(cfg.mlflow, NAME)[-1] == champion_history(cfg.mlflow, NAME)[-1] | {
        "version": result.metrics["version"], "by": "register stage", "reason": "register.auto_promote"}
    refused = with_register(cfg, variant="train/onnxruntime-fp32", gates=gates(min_map50_95=1.0))
    assert register.run(refused, Paths(root)).metrics["promoted"] == 0


def test_cli_refuses_force_without_a_reason(pipeline, tmp_path):
    from yolofps import cli

    assert cli.main(["promote", "--force", "--params", str(PROJECT_ROOT / "params.yaml")]) == 2


def test_unknown_variant_is_a_named_error(pipeline):
    root, cfg = pipeline
    with pytest.raises(YolofpsError, match="not in metrics/bench.json"):
        register.run(with_register(cfg, variant="nope/eager-fp32"), Paths(root))


def test_against_a_real_server_then_an_outage(pipeline, tmp_path):
    """Register through `mlflow server`; with the server stopped, retries end in a clear error, files intact."""
    root, cfg = pipeline
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_url(f"{uri}/health", server)
        remote = dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=uri))
        result = register.run(remote, Paths(root))
        import mlflow

        mlflow.set_tracking_uri(uri)
        served = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger").predict(
            pd.DataFrame({"image": [str(val_images(root)[0])]}))
        assert result.metrics["version"] == 1 and "x1" in served.columns
    finally:
        server.terminate()
        server.wait(timeout=30)
    receipt = (root / "reports" / "registered_model.json").read_text()
    outage = with_register(remote, variant="train/trace-fp32", retries=2, backoff_s=0.1)
    start = time.monotonic()
    with pytest.raises(RegistryError, match="failed after 2 attempts") as err:
        register.run(outage, Paths(root))
    assert "intact" in str(err.value) and time.monotonic() - start < 120
    assert (root / "reports" / "registered_model.json").read_text() == receipt  # nothing already produced is lost
    assert (root / "metrics" / "bench.json").is_file() and any((root / "models" / "bench").iterdir())


def _chromium() -> tuple[str, str] | None:
    found = shutil.which("chromium"), shutil.which("chromedriver")
    return found if all(found) else None


def test_mlflow_ui_shows_the_version_and_its_alias_in_a_real_browser(pipeline, tmp_path):
    """`yolofps ui` over the store; headless Chromium opens the version page and sees the @challenger alias."""
    if _chromium() is None:
        if os.environ.get("YOLOFPS_REQUIRE_BROWSER"):
            pytest.fail("chromium/chromedriver not installed (.ci/run installs Debian's chromium chromium-driver)")
        pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root, cfg = pipeline
    version = register.run(cfg, Paths(root)).metrics["version"]
    params = tmp_path / "params.yaml"
    params.write_text((PROJECT_ROOT / "params.yaml").read_text().replace(
        "tracking_uri: sqlite:///mlflow.db", f"tracking_uri: {cfg.mlflow.tracking_uri}"))
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "yolofps.cli", "ui", "--port", str(port), "--params", str(params)],
                          env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    chromium, chromedriver = _chromium()
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    browser = None
    try:
        wait_for_url(f"http://127.0.0.1:{port}/health", ui)
        browser = webdriver.Chrome(service=Service(chromedriver), options=options)
        browser.get(f"http://127.0.0.1:{port}/#/models/{NAME}")
        WebDriverWait(browser, 60).until(lambda b: f"Version {version}" in b.find_element(By.TAG_NAME, "body").text)
        browser.find_element(By.LINK_TEXT, f"Version {version}").click()  # the click a user makes
        WebDriverWait(browser, 60).until(lambda b: "challenger" in b.find_element(By.TAG_NAME, "body").text)
        text = browser.find_element(By.TAG_NAME, "body").text
        artifacts = PROJECT_ROOT / ".test-artifacts"
        artifacts.mkdir(exist_ok=True)
        browser.save_screenshot(str(artifacts / "mlflow_ui_model_version.png"))
        assert f"Version {version}" in text and "Aliases" in text and "fps_b1" in text
    finally:
        if browser is not None:
            browser.quit()
        os.killpg(ui.pid, signal.SIGTERM)  # the UI and the workers it started
        ui.wait(timeout=30)


RACER = """
import json, sys, time
from pathlib import Path
from yolofps.config import load_config
from yolofps.paths import Paths
from yolofps.stages import register
params, overrides, root, start_at = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4])
cfg = load_config(params, overrides)
time.sleep(max(0.0, start_at - time.time()))  # both racers enter register.run at the same moment
print(json.dumps(register.run(cfg, Paths(Path(root))).metrics))
"""


def race(root, overrides_each: list[dict]) -> list[dict]:
    """Run register.run in one process per overrides dict, all starting together; their metrics."""
    start_at = time.time() + 20  # after both have imported torch and mlflow
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(root / "params.yaml"),
                                json.dumps(overrides), str(root), str(start_at)],
                               env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for overrides in overrides_each]
    results = []
    for racer in racers:
        out, err = racer.communicate(timeout=300)
        assert racer.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.slow
def test_two_registrations_at_once_give_one_version_per_content_and_a_consistent_alias(pipeline, tmp_path):
    from mlflow import MlflowClient

    root, _ = pipeline
    store = f"sqlite:///{tmp_path / 'race.db'}"
    client = MlflowClient(store)
    client.search_experiments()  # the store exists before the race (two first users racing its migrations crash)
    same = race(root, [{"mlflow.tracking_uri": store}] * 2)  # the same model content twice
    experiment = client.get_experiment_by_name("yolofps").experiment_id
    runs = client.search_runs([experiment], "attributes.run_name = 'register'")
    assert len(runs) == 2  # both raced past the "already registered?" check and logged a model
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert [int(v.version) for v in versions] == [1]  # the later twin removed itself
    assert {r["version"] for r in same} == {1} and sorted(r["reused"] for r in same) == [0, 1]
    assert int(client.get_model_version_by_alias(NAME, "challenger").version) == 1

    bench = json.loads((root / "metrics" / "bench.json").read_text())
    selected = bench["selected"]["name"]
    others = [v["name"] for v in bench["variants"] if v["name"] != selected and v["status"] != "failed"]
    different = race(root, [{"mlflow.tracking_uri": store, "register.variant": variant} for variant in others[:2]])
    new = sorted(r["version"] for r in different)
    assert len(set(new)) == 2 and min(new) > 1 and all(r["reused"] == 0 for r in different)
    versions = {int(v.version): v for v in client.search_model_versions(f"name = '{NAME}'")}
    assert sorted(versions) == [1, *new]  # (the deleted twin's number is not reused)
    assert len({v.tags["content_hash"] for v in versions.values()}) == 3
    challenger = client.get_model_version_by_alias(NAME, "challenger")
    assert int(challenger.version) in new and challenger.tags["variant"] in others[:2]
