"""Benchmark scripts stay runnable: a tiny run writes JSON with the environment stamped on it."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from helpers import PROJECT_ROOT
from yolofps.data.dataset import letterbox

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))


def test_data_throughput_writes_stamped_json(tmp_path):
    import data_throughput

    out = tmp_path / "result.json"
    assert data_throughput.main(["--images", "3", "--sizes", "64", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["environment"]["cpu_cores"] >= 1 and result["environment"]["albumentations"] == "2.0.8"
    (row,) = result["results"]
    assert row["image_size"] == 64 and row["offline_img_per_s"] > 0 and row["online_img_per_s"] > 0


def test_train_throughput_writes_stamped_json(tmp_path):
    import train_throughput

    out = tmp_path / "result.json"
    args = ["--model", "tiny", "--imgsz", "64", "--batch", "2", "--steps", "1", "--workers", "0", "--images", "4",
            "--out", str(out)]
    assert train_throughput.main(args) == 0
    result = json.loads(out.read_text())
    assert {row["variant"] for row in result["results"]} == {"model_only", "model_loss", "full"}
    assert all(row["img_per_s"] > 0 for row in result["results"])
    assert result["settings"]["imgsz"] == 64 and result["environment"]["cpu_cores"] >= 1


def test_gpu_benchmark_runs_on_cpu(tmp_path):
    import gpu

    image = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)  # non-square: resize + pad
    ours = gpu.preprocess(torch.from_numpy(image)[None], torch.device("cpu"), torch.float32, 64)
    reference, _, _ = letterbox(image, 64)
    assert ours.shape == (1, 3, 64, 64)
    assert np.abs(ours[0].permute(1, 2, 0).numpy() * 255 - reference).max() <= 1  # cv2 rounds to uint8

    out = tmp_path / "result.json"
    args = ["--device", "cpu", "--models", "tiny", "--imgsz", "64", "--source-size", "96", "80", "--batch-sizes", "1",
            "2", "--runs", "3", "--warmup", "1", "--modes", "eager", "trace", "cudagraph", "--out", str(out)]
    assert gpu.main(args) == 0
    result = json.loads(out.read_text())
    assert result["environment"]["cpu_cores"] >= 1 and result["environment"]["gpu"] is None
    assert result["settings"]["source_size_hw"] == [96, 80] and result["settings"]["max_candidates"] == 100
    rows = {(row["mode"], row["batch"]): row for row in result["results"]}
    assert set(rows) == {(mode, batch) for mode in ("eager", "trace", "cudagraph") for batch in (1, 2)}
    for mode in ("eager", "trace"):
        for batch in (1, 2):
            row = rows[mode, batch]
            assert row["status"] == "ok" and row["img_per_s"] > 0 and row["max_error"] <= 1e-3
            assert row["pre_ms"] > 0 and row["model_ms"] > 0 and row["post_ms"] > 0
            assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    for batch in (1, 2):
        assert rows["cudagraph", batch]["status"] in {"failed", "skipped"} and rows["cudagraph", batch]["reason"]


def test_deployment_levers_writes_stamped_json(tmp_path):
    import cv2

    import deployment_levers
    from yolofps.engine import checkpoint
    from yolofps.model.spec import preset
    from yolofps.model.yolo import build_model

    torch.manual_seed(0)
    for name in ("baseline", "pruned"):
        checkpoint.save_model(tmp_path / name, build_model(preset("tiny", 3)).eval(), {"job": name, "imgsz": 64})
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 64), (64, 40)]):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    out = tmp_path / "result.json"
    args = ["--baseline", str(tmp_path / "baseline"), "--pruned", str(tmp_path / "pruned"),
            "--images", str(tmp_path / "images"), "--runs", "3", "--out", str(out)]
    assert deployment_levers.main(args) == 0
    result = json.loads(out.read_text())
    rows = {row["row"]: row["latency_ms_p50"] for row in result["results"]}
    assert {f"{m}/{a}/{t}/{b}" for m in ("baseline", "pruned") for a in ("silu", "relu")
            for t in ("all cores", "1 thread") for b in ("batch 1", "dynamic")
            } | {"pre/now", "pre/before", "post/now", "post/before"} | {
            f"end to end/{m}/{t}" for m in ("baseline", "pruned") for t in ("all cores", "1 thread")} == set(rows)
    assert all(ms > 0 for ms in rows.values()) and result["environment"]["cpu_cores"] >= 1
