"""`yolofps serve` as a real subprocess on the shared run's registered model, and `mlflow models serve` beside it."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from helpers import copy_run, free_port, tool_env, wait_for_url
from yolofps.data import formats
from yolofps.paths import Paths
from yolofps.serving.detector import Detector, ServingConfig
from yolofps.serving.server import ServeOptions, bench_row, best_batch

MODEL = "models:/yolofps-detector@challenger"
MAX_BYTES = 2**20  # small, so the oversize body of the test is small too


def post(url: str, body: bytes, content_type: str | None = "image/jpeg", method: str = "POST"):
    """(status, JSON answer) of one request; an HTTP error status is an answer too."""
    request = urllib.request.Request(url, data=body if method == "POST" else None, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def project(shared_run, tmp_path_factory):
    """A copy of the shared run with its MLflow store (read here, never written): v1 holds @challenger."""
    return copy_run(shared_run, tmp_path_factory.mktemp("serve") / "project", keep_tracking=True)


@pytest.fixture(scope="module")
def server(project):
    """`yolofps serve` on the registered model: batches of up to 4, a 1 MiB body limit. Yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "yolofps.cli", "serve", "--model", MODEL, "--port", str(port),
               "--max-batch", "4", "--max-wait-ms", "50", "--max-bytes", str(MAX_BYTES)]
    log = project / "serve.log"
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=project, env=tool_env(), stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_url(f"{url}/health", process)
        except AssertionError:
            raise AssertionError(f"yolofps serve did not come up:\n{log.read_text()}") from None
        yield url
    finally:
        stop(process)


def registered_detector(project) -> tuple[Detector, dict]:
    """The registered variant's bench row run in this process, with the registered model's settings."""
    receipt = json.loads((project / "reports" / "registered_model.json").read_text())
    bench = json.loads((project / "metrics" / "bench.json").read_text())
    row = next(v for v in bench["variants"] if v["name"] == receipt["variant"])
    names = json.loads((project / "models" / "train" / "best" / "meta.json").read_text())["names"]
    deployment = bench["environment"]["deployment"]
    config = ServingConfig(row["runtime"], row["mode"], row["dtype"], row["imgsz"], list(names),
                           conf=deployment["conf"], iou=deployment["iou"], max_det=deployment["max_det"],
                           threads=row.get("threads", 0))
    return Detector(project / row["artifact"], config), row


def val_images(project):
    return formats.list_images(Paths(project).augmented_data / "images" / "val")


def assert_same_records(served: list[dict], expected: list[dict]) -> None:
    assert len(served) == len(expected) > 0
    assert [r["class_name"] for r in served] == [r["class_name"] for r in expected]
    keys = ["x1", "y1", "x2", "y2", "score", "class_id"]
    np.testing.assert_allclose([[r[k] for k in keys] for r in served], [[r[k] for k in keys] for r in expected],
                               atol=1e-3)


def test_health_names_the_model_and_a_good_image_gets_the_in_process_detections(server, project):
    detector, row = registered_detector(project)
    health = get(f"{server}/health")
    assert health["status"] == "ok" and health["variant"] == row["name"] and health["model"] == MODEL
    assert (health["runtime"], health["dtype"], health["imgsz"]) == (row["runtime"], row["dtype"], row["imgsz"])
    assert health["options"]["max_batch"] == 4 and health["max_batch_from"] == "--max-batch"

    image = val_images(project)[0]
    status, answer = post(f"{server}/predict", image.read_bytes())
    assert status == 200, answer
    assert_same_records(answer["detections"], detector.rows([image]))
    assert set(answer["timing_ms"]) == {"decode", "queue", "pre", "model", "post"}
    height, width = formats.decode_image(image).shape[:2]
    assert (answer["width"], answer["height"], answer["batch"]) == (width, height, 1)


def test_concurrent_requests_are_answered_in_batches(server, project):
    images = [path.read_bytes() for path in val_images(project)] * 2  # 8 requests
    before = get(f"{server}/health")
    answers: list = [None] * len(images)
    start = threading.Barrier(len(images))

    def send(index: int) -> None:
        start.wait()
        answers[index] = post(f"{server}/predict", images[index])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [status for status, _ in answers] == [200] * len(images), answers
    after = get(f"{server}/health")
    assert after["served"] - before["served"] == len(images)
    assert after["batches"] - before["batches"] < len(images)  # some requests shared a batch
    assert max(answer["batch"] for _, answer in answers) > 1 and after["largest_batch"] <= 4
    for (_, first), (_, second) in zip(answers[:4], answers[4:], strict=True):  # the same image twice
        assert len(first["detections"]) == len(second["detections"]) > 0


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_stays_up(server, project):
    good = val_images(project)[0].read_bytes()
    huge = png(10000, 10000)  # ~0.3 MB that decodes to 300 MB
    assert len(huge) < MAX_BYTES
    cases = {  # name -> (route, body, content type, method, expected status, words in the message)
        "garbage": ("/predict", bytes(range(256)) * 8, "image/jpeg", "POST", 400, "not an image"),
        "truncated JPEG": ("/predict", good[: len(good) // 2], "image/jpeg", "POST", 400, "truncated"),
        "oversize body": ("/predict", b"\0" * (MAX_BYTES + 1), "image/png", "POST", 413, "over the limit"),
        "too many pixels": ("/predict", huge, "image/png", "POST", 413, "10000x10000"),
        "wrong content type": ("/predict", good, "application/json", "POST", 415, "Content-Type"),
        "form encoding (curl's default)": ("/predict", good, "application/x-www-form-urlencoded", "POST", 415,
                                           "--data-binary"),
        "empty body": ("/predict", b"", "image/jpeg", "POST", 400, "empty"),
        "wrong route": ("/detect", good, "image/jpeg", "POST", 404, "Not Found"),
        "wrong method": ("/predict", b"", None, "GET", 405, "Method Not Allowed"),
    }
    for name, (route, body, content_type, method, expected, words) in cases.items():
        status, answer = post(f"{server}{route}", body, content_type, method)
        assert status == expected and words in answer["error"], (name, status, answer)
    health = get(f"{server}/health")
    assert health["status"] == "ok" and "500" not in health["responses"]
    assert post(f"{server}/predict", good)[0] == 200


def test_the_load_test_client_drives_the_server_and_its_rows_fit_the_history(server, project):
    """benchmarks/serve_load.py's client at 4 clients against the running server, then history_rows of its rows."""
    import asyncio

    from benchmarks import serve_load

    port = int(server.rsplit(":", 1)[1])
    target = serve_load.Server("yolofps", [], port, "/predict", "/health")
    payloads = [target.request(path.read_bytes()) for path in val_images(project)]
    before = serve_load.health(target)
    measured = asyncio.run(serve_load.drive(target, payloads, 4, 20, timeout_s=60))
    row = serve_load.level_row(target, 4, measured, (1.0, 2.0)) | serve_load.batching(before, serve_load.health(target))
    assert row["requests"] == row["ok"] == 20 and row["errors"] == 0 and row["p50_ms"] <= row["p99_ms"]
    assert row["mean_batch"] >= 1
    result = {"settings": {"variant": "v", "runtime": "onnxruntime", "dtype": "fp32", "imgsz": "64", "threads": "1"},
              "results": [row], "servers": {"yolofps": {"about": before}}}
    (history,) = serve_load.history_rows(result)
    assert history["source"] == "serve:yolofps" and history["batch"] == 4 and history["throughput"] == row["throughput"]
    assert set(history) == {"source", "variant", "runtime", "dtype", "batch", "imgsz", "threads", "p50_ms", "p95_ms",
                            "p99_ms", "throughput", "extra"}
    assert history["extra"]["concurrency"] == 4 and history["extra"]["errors"] == 0


def test_the_default_max_batch_is_the_bench_rows_best_batch(project):
    detector, row = registered_detector(project)
    found = bench_row(project / "metrics" / "bench.json", detector.config)
    assert found is not None and found["name"] == row["name"]  # the registered row is the selected one
    assert best_batch(found["throughput"]) == int(max(found["throughput"], key=found["throughput"].get))
    assert best_batch({"1": 300.0, "8": 500.0, "16": 480.0}) == 8 and best_batch(None) == 1
    assert bench_row(project / "no-such.json", detector.config) is None
    assert ServeOptions().max_batch == 1


def test_serve_help_states_the_server_defaults_and_bad_options_are_named_errors(tmp_path, capsys):
    from yolofps.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    defaults = ServeOptions()
    for value in (f"{defaults.max_wait_ms} ms", str(defaults.max_bytes), str(defaults.max_pixels)):
        assert f"(default {value})" in help_text, value
    assert main(["serve", "--max-batch", "0", "--params", str(tmp_path / "params.yaml")]) == 2


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_base64_image_like_the_detector(project):
    """The shipped comparison: `mlflow models serve --env-manager local` on the same registered version."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL, "--env-manager", "local",
               "--host", "127.0.0.1", "-p", str(port), "--workers", "1"]
    env = tool_env() | {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db", "MLFLOW_DISABLE_TELEMETRY": "true"}
    process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_url(f"{url}/ping", process)
        image = val_images(project)[0]
        payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]}}
        status, answer = post(f"{url}/invocations", json.dumps(payload).encode(), "application/json")
        assert status == 200, answer
        detector, _ = registered_detector(project)
        assert_same_records(answer["predictions"], detector.rows([image]))
        status, answer = post(f"{url}/invocations", json.dumps({"dataframe_split": {"columns": ["picture"],
                              "data": [["x"]]}}).encode(), "application/json")
        assert status == 400, answer
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # mlflow models serve runs uvicorn as its child
        process.wait(30)
