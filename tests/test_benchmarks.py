"""Benchmark scripts stay runnable: a tiny run writes JSON with the environment stamped on it."""

from __future__ import annotations

import json
import sys

from helpers import PROJECT_ROOT

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
