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
