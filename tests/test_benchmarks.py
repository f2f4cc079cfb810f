"""Benchmark scripts stay runnable: a tiny run writes JSON stamped with THIS machine's environment, and the table
it prints shows the same rows as the JSON."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from importlib import metadata

import numpy as np
import pytest
import torch

from helpers import PROJECT_ROOT
from yolofps.data.dataset import letterbox

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))


def assert_stamped_here(environment: dict, started: dt.datetime) -> None:
    """The stamp is what this machine and interpreter report, taken during the run (not copied from elsewhere)."""
    assert environment["cpu_cores"] == os.cpu_count() and environment["python"] == platform.python_version()
    assert environment["platform"] == platform.platform()
    for package in ("torch", "numpy", "albumentations", "onnxruntime"):
        assert environment[package] == metadata.version(package), package
    assert environment["torch_threads"] == torch.get_num_threads()
    assert environment["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    stamped = dt.datetime.fromisoformat(environment["time_utc"])
    assert started.replace(microsecond=0) <= stamped <= dt.datetime.now(dt.timezone.utc)


def printed_rows(out: str, header: str) -> list[list[str]]:
    """The whitespace-split rows of the table that follows the line starting with `header` in `out`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 1
    return [line.split() for line in lines[start:] if line.strip() and not line.startswith("wrote ")]


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def test_data_throughput_writes_stamped_json(tmp_path, capsys):
    import data_throughput

    out, started = tmp_path / "result.json", now()
    assert data_throughput.main(["--images", "3", "--sizes", "64", "96", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert_stamped_here(result["environment"], started)
    assert result["environment"]["albumentations"] == "2.0.8"  # the version the transforms in params.yaml are for
    assert [row["image_size"] for row in result["results"]] == [64, 96]
    assert all(row["images"] == 3 and row["offline_img_per_s"] > 0 and row["online_img_per_s"] > 0
               for row in result["results"])
    table = printed_rows(capsys.readouterr().out, "  size")
    assert table == [[str(row[k]) for k in ("image_size", "images", "offline_img_per_s", "online_img_per_s")]
                     for row in result["results"]]


def test_train_throughput_writes_stamped_json(tmp_path, capsys):
    import train_throughput

    out, started = tmp_path / "result.json", now()
    args = ["--model", "tiny", "--imgsz", "64", "--batch", "2", "--steps", "1", "--workers", "0", "--images", "4",
            "--out", str(out)]
    assert train_throughput.main(args) == 0
    result = json.loads(out.read_text())
    assert {row["variant"] for row in result["results"]} == {"model_only", "model_loss", "full"}
    assert all(row["img_per_s"] > 0 for row in result["results"])
    for row in result["results"]:  # img/s is the batch over the measured step time
        assert row["img_per_s"] == pytest.approx(2 / row["s_per_step"], rel=0.01, abs=0.006)  # both rounded
    assert result["settings"]["imgsz"] == 64 and result["settings"]["steps"] == 1
    assert_stamped_here(result["environment"], started)
    table = printed_rows(capsys.readouterr().out, "variant ")
    assert table == [[row["variant"], str(row["s_per_step"]), str(row["img_per_s"]),
                      f"{row['overhead_vs_model_only']:.1%}"] for row in result["results"]]


def test_gpu_benchmark_runs_on_cpu(tmp_path, capsys):
    import gpu

    image = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)  # non-square: resize + pad
    ours = gpu.preprocess(torch.from_numpy(image)[None], torch.device("cpu"), torch.float32, 64)
    reference, _, _ = letterbox(image, 64)
    assert ours.shape == (1, 3, 64, 64)
    assert np.abs(ours[0].permute(1, 2, 0).numpy() * 255 - reference).max() <= 1  # cv2 rounds to uint8

    out, started = tmp_path / "result.json", now()
    args = ["--device", "cpu", "--models", "tiny", "--imgsz", "64", "--source-size", "96", "80", "--batch-sizes", "1",
            "2", "--runs", "3", "--warmup", "1", "--modes", "eager", "trace", "cudagraph", "--out", str(out)]
    assert gpu.main(args) == 0
    result = json.loads(out.read_text())
    assert_stamped_here(result["environment"], started)
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
    table = printed_rows(capsys.readouterr().out, "model ")
    assert [line[:5] for line in table] == [[r["model"], r["mode"], r["dtype"], str(r["batch"]), r["status"]]
                                            for r in result["results"]]
    for line, row in zip(table, result["results"]):
        assert line[5:10] == ["-" if row.get(k) is None else str(row[k])  # a skipped row has no timings
                              for k in ("pre_ms", "model_ms", "post_ms", "total_ms", "img_per_s")]


def test_deployment_levers_writes_stamped_json(tmp_path, capsys):
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
    out, started = tmp_path / "result.json", now()
    args = ["--baseline", str(tmp_path / "baseline"), "--pruned", str(tmp_path / "pruned"),
            "--images", str(tmp_path / "images"), "--runs", "3", "--out", str(out)]
    assert deployment_levers.main(args) == 0
    result = json.loads(out.read_text())
    rows = {row["row"]: row["latency_ms_p50"] for row in result["results"]}
    assert {f"{m}/{a}/{t}/{b}" for m in ("baseline", "pruned") for a in ("silu", "relu")
            for t in ("all cores", "1 thread") for b in ("batch 1", "dynamic")
            } | {"pre/now", "pre/before", "post/now", "post/before"} | {
            f"end to end/{m}/{t}" for m in ("baseline", "pruned") for t in ("all cores", "1 thread")} == set(rows)
    assert all(ms > 0 for ms in rows.values())
    assert_stamped_here(result["environment"], started)
    out_text = capsys.readouterr().out
    printed = {line[:36].strip(): line[36:].split() for line in out_text.splitlines()[
        next(i for i, line in enumerate(out_text.splitlines()) if line.startswith("row ")) + 1:]
        if line.strip() and not line.startswith("wrote ")}
    assert printed == {row["row"]: [str(row["latency_ms_p50"])] + (
        [str(row["speedup_vs_fastest_baseline"])] if "speedup_vs_fastest_baseline" in row else [])
        for row in result["results"]}
