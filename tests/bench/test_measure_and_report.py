"""Benchmark harness: the end-to-end path on a tiny model, the agreement check, Pareto and the selection policy."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from yolofps import device as dev
from yolofps.bench import contract, measure, report
from yolofps.bench.rows import BenchRow
from yolofps.bench.variants import plan
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model
from yolofps.runtime import Deployment, Execution, Letterboxed, Pipeline, build_pipeline, host

CPU = dev.resolve("cpu", amp=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three synthetic images of different shapes (the letterbox has work to do)."""
    folder = tmp_path_factory.mktemp("bench_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(80, 96), (96, 64), (64, 64)]):
        path = folder / f"{i}.jpg"
        cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(preset("tiny", 3)).eval()


class Confident(torch.nn.Module):
    """A deliberately broken variant: every anchor fires with full confidence."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        out = self.model(images).clone()
        out[..., 4:] = 1.0
        return out


def test_end_to_end_timing_returns_every_field_and_ordered_percentiles(images, tiny):
    deployment = Deployment(imgsz=64, conf=0.0, iou=0.45, max_det=50)
    detectors = {"eager": build_pipeline(Execution(), deployment, CPU, model=tiny),
                 "trace": build_pipeline(Execution(mode="trace"), deployment, CPU, model=tiny)}
    timings, failures = measure.time_interleaved(detectors, measure.batches_of(images, 1), warmup=1, runs=7, block=3)
    assert not failures
    for timing in timings.values():
        assert len(timing.pre) == len(timing.model) == len(timing.post) == 7
        lat = timing.latency()
        assert set(lat) == {"p50", "p95", "p99", "pre", "model", "post"}
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] and min(lat["pre"], lat["model"], lat["post"]) > 0
    # boxes come back in original pixels, inside each image
    for dets, path in zip(detectors["eager"].detect(images), images):
        height, width = cv2.imread(str(path)).shape[:2]
        assert dets.shape[1] == 6 and 0 < len(dets) <= 50
        assert (dets[:, [0, 2]] <= width).all() and (dets[:, [1, 3]] <= height).all() and (dets[:, :4] >= 0).all()


def test_a_variant_that_raises_while_timing_is_reported_not_fatal(images, tiny):
    def broken(_images):
        raise RuntimeError("kernel not available")

    deployment = Deployment(imgsz=64)
    pipelines = {"ok": Pipeline(tiny, deployment, CPU), "broken": Pipeline(broken, deployment, CPU)}
    timings, failures = measure.time_interleaved(pipelines, measure.batches_of(images, 2), warmup=0, runs=2)
    assert set(timings) == {"ok"} and "kernel not available" in failures["broken"]


def test_agreement_catches_a_broken_variant(images, tiny):
    deployment = Deployment(imgsz=64, conf=0.05)
    reference = Pipeline(tiny, deployment, CPU).detect(images)
    assert measure.agreement(reference, reference) == 1.0
    assert measure.agreement(reference, Pipeline(Confident(tiny), deployment, CPU).detect(images)) < 0.5


def test_agreement_on_hand_made_detections():
    box = np.array([[10, 10, 50, 50, 0.9, 1]], dtype=np.float32)
    moved = box + np.array([[30, 30, 30, 30, 0, 0]], dtype=np.float32)
    other_class = box.copy()
    other_class[0, 5] = 2
    empty = np.zeros((0, 6), np.float32)
    assert measure.agreement([box], [box]) == 1.0
    assert measure.agreement([box], [moved]) == 0.0
    assert measure.agreement([box], [other_class]) == 0.0
    assert measure.agreement([empty], [empty]) == 1.0
    assert measure.agreement([box, box], [box, empty]) == pytest.approx(2 / 3)


def test_plan_lists_cuda_only_modes_as_skipped_on_cpu():
    variants, skipped = plan("train", ("eager", "trace", "onnxruntime", "fp16", "cudagraph"), CPU)
    assert [v.name for v in variants] == ["train/eager-fp32", "train/trace-fp32", "train/onnxruntime-fp32"]
    assert {s["mode"] for s in skipped} == {"fp16", "cudagraph"} and all("CUDA" in s["reason"] for s in skipped)


def _row(name, fps, map50_95, status="ok", baseline=False, **changes):
    return BenchRow.from_json(_json(name, fps, map50_95, status, baseline) | changes)


def _json(name, fps, map50_95, status="ok", baseline=False):
    runtime = "onnxruntime" if "/onnxruntime" in name else "torch"
    return {"name": name, "baseline": baseline, "model": name.split("/")[0], "runtime": runtime, "mode": "eager",
            "status": status, "device": "cpu", "dtype": "fp32", "imgsz": 320, "fps_b1": fps,
            "latency_ms_b1": {"p50": 1.0, "p95": 1.1, "p99": 1.2, "pre": 0.1, "model": 0.8, "post": 0.1},
            "throughput": {"1": fps}, "metrics/mAP50-95B": map50_95, "metrics/mAP50B": map50_95, "size_mb": 1.0,
            "params_m": 1.0, "gflops": 1.0, "speedup_b1": None, "reason": "x", "threads": 0, "artifact": "models/x"}


def hand_made():
    return [_row("train/eager-fp32", 20.0, 0.60, baseline=True), _row("train/onnxruntime-fp32", 50.0, 0.60),
            _row("prune-0.3/onnxruntime-fp32", 80.0, 0.59), _row("prune-0.5/onnxruntime-fp32", 120.0, 0.50),
            _row("quantize/onnxruntime-int8", 130.0, 0.45), _row("slow/eager-fp32", 10.0, 0.40),
            _row("broken/trace-fp32", 500.0, 0.99, status="failed")]


def test_policy_picks_the_fastest_within_the_accuracy_budget():
    rows = hand_made()
    report.judge_accuracy(rows, max_map_drop=0.015)
    report.add_speedups(rows)
    by_name = {r.name: r for r in rows}
    assert by_name["prune-0.5/onnxruntime-fp32"].status == "rejected"
    assert by_name["prune-0.3/onnxruntime-fp32"].status == "ok"
    assert by_name["prune-0.3/onnxruntime-fp32"].speedup_b1 == 4.0
    assert by_name["prune-0.3/onnxruntime-fp32"].speedup_vs_reference_b1 == 1.6
    selected = report.select(rows, "fastest_within_drop", 0.015)
    assert selected["name"] == "prune-0.3/onnxruntime-fp32" and "0.015" in selected["reason"]
    assert "front" not in selected


def test_variants_tied_on_speed_are_decided_by_accuracy_not_noise():
    rows = [_row("train/eager-fp32", 20.0, 0.60, baseline=True), _row("prune-0.5/onnxruntime-fp32", 100.0, 0.62),
            _row("distill/onnxruntime-fp32", 103.0, 0.59), _row("slower/onnxruntime-fp32", 90.0, 0.70)]
    report.judge_accuracy(rows, 0.015)
    report.add_speedups(rows)
    selected = report.select(rows, "fastest_within_drop", 0.015)
    assert selected["name"] == "prune-0.5/onnxruntime-fp32" and "most accurate of 2" in selected["reason"]


def test_pareto_front_ignores_failed_and_dominated_rows():
    rows = hand_made()
    front = report.pareto_front(rows)
    assert front == ["quantize/onnxruntime-int8", "prune-0.5/onnxruntime-fp32", "prune-0.3/onnxruntime-fp32",
                     "train/onnxruntime-fp32"]
    report.judge_accuracy(rows, 0.015)
    report.add_speedups(rows)
    assert report.select(rows, "pareto", 0.015)["front"] == front


def test_nothing_selectable_is_said_not_guessed():
    rows = [_row("train/eager-fp32", 20.0, 0.6, status="failed", baseline=True)]
    assert report.select(rows, "fastest_within_drop", 0.015)["name"] is None


def test_reports_are_written(tmp_path):
    rows = hand_made()
    report.judge_accuracy(rows, 0.015)
    report.add_speedups(rows)
    selected = report.select(rows, "fastest_within_drop", 0.015)
    env = {"cpu": "cpu", "cpu_cores": 2, "torch": "x", "onnxruntime": "y", "gpu": None}
    table = report.markdown_table(rows, env, {"imgsz": 320, "conf": 0.25, "iou": 0.45, "max_det": 300}, selected)
    assert "| prune-0.3/onnxruntime-fp32 **(selected)** | ok |" in table and "broken/trace-fp32" in table
    report.pareto_plot(tmp_path / "pareto.png", rows)
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    report.write_csv(tmp_path / "bench.csv", rows)
    assert len((tmp_path / "bench.csv").read_text().splitlines()) == 1 + len(rows)


def test_contract_rejects_what_readers_cannot_trust():
    rows = [row.to_json() for row in hand_made()]
    good = {"environment": {"cpu": "c", "cpu_cores": 2, "torch": "t", "onnxruntime": "o", "device": "cpu",
                            "imgsz": 320}, "variants": rows, "selected": {"name": rows[1]["name"], "reason": "r"}}
    contract.validate(good)
    assert BenchRow.from_json(rows[1]).to_json() == rows[1]  # a row survives the round trip through the file
    bad_percentiles = {**good, "variants": [_json("a/eager-fp32", 1.0, 0.5) | {
        "latency_ms_b1": {"p50": 3.0, "p95": 2.0, "p99": 4.0, "pre": 1.0, "model": 1.0, "post": 1.0}}],
        "selected": {"name": None, "reason": "r"}}
    with pytest.raises(contract.BenchContractError, match="percentiles"):
        contract.validate(bad_percentiles)
    with pytest.raises(contract.BenchContractError, match="status"):
        contract.validate({**good, "variants": [rows[0] | {"status": "fast"}]})
    with pytest.raises(contract.BenchContractError, match="not a variant"):
        contract.validate({**good, "selected": {"name": "nope", "reason": "r"}})


@pytest.mark.parametrize(("seed", "conf"), [(0, 0.25), (1, 0.05), (2, 0.5)])
def test_deployment_postprocess_matches_the_evaluation_nms(seed, conf):
    """The timed numpy/OpenCV post-processing gives the detections of `non_max_suppression` + `scale_boxes`."""
    from yolofps.model.postprocess import non_max_suppression, scale_boxes

    generator = torch.Generator().manual_seed(seed)
    n, num_classes = 2000, 4
    centres = torch.rand(n, 2, generator=generator) * 320
    sizes = torch.rand(n, 2, generator=generator) * 60 + 4  # crowded: plenty of overlaps to suppress
    pred = torch.cat((centres, sizes, torch.rand(n, 1 + num_classes, generator=generator)), 1)[None]
    meta = Letterboxed("x", (240, 320), ratio=1.0, pad=(0.0, 40.0))
    deployment = Deployment(imgsz=320, conf=conf, iou=0.45, max_det=100)
    (got,) = host.postprocess(pred, [meta], deployment)
    (want,) = non_max_suppression(pred, conf, 0.45, max_det=100)
    want[:, :4] = scale_boxes(want[:, :4], (320, 320), meta.orig_shape, ((1.0, 1.0), meta.pad))
    assert 0 < len(got) == len(want) <= 100
    np.testing.assert_allclose(got, want.numpy(), atol=1e-3)
    (none,) = host.postprocess(pred, [meta], Deployment(imgsz=320, conf=0.9999))
    assert none.shape == (0, 6)


def test_runtime_rows_per_thread_setting_and_the_reference_is_the_fastest():
    variants, skipped = plan("train", ("eager", "onnxruntime", "openvino"), CPU, runtime_threads=(0, 1))
    from yolofps.runtime.openvino import unavailable

    openvino = [f"train/openvino{t}-{d}" for d in ("fp32", "bf16") if not unavailable(d) for t in ("", "-1t")]
    assert [v.name for v in variants] == ["train/eager-fp32", "train/onnxruntime-fp32",
                                          "train/onnxruntime-1t-fp32"] + openvino
    assert [v.execution.threads for v in variants[:3]] == [0, 0, 1]
    assert bool(unavailable("bf16")) == any(s["mode"] == "openvino-bf16" for s in skipped)
    rows = [_row("train/eager-fp32", 20.0, 0.6, baseline=True),
            _row("train/onnxruntime-fp32", 50.0, 0.6), _row("train/onnxruntime-1t-fp32", 40.0, 0.6),
            _row("prune-0.5/onnxruntime-1t-fp32", 100.0, 0.6)]
    assert report.reference_row(rows).name == "train/onnxruntime-fp32"
    rows[2].fps_b1 = 60.0  # the baseline is credited with its own best thread setting too
    report.add_speedups(rows)
    assert report.reference_row(rows).name == "train/onnxruntime-1t-fp32"
    assert rows[3].speedup_vs_reference_b1 == pytest.approx(100 / 60, abs=1e-3)


def test_the_reference_is_the_unpruned_models_fastest_float_row_on_any_runtime():
    """A runtime switch (OpenVINO bf16) is not credited to pruning; INT8 of the unpruned model is not a bar."""
    rows = [_row("train/eager-fp32", 20.0, 0.6, baseline=True), _row("train/onnxruntime-fp32", 50.0, 0.6),
            _row("train/openvino-bf16", 90.0, 0.6, runtime="openvino", dtype="bf16"),
            _row("train/openvino-int8", 150.0, 0.6, runtime="openvino", dtype="int8"),
            _row("prune-0.5/openvino-bf16", 180.0, 0.6, runtime="openvino", dtype="bf16"),
            _row("prune-0.3/openvino-bf16", 500.0, 0.6, status="failed")]
    report.add_speedups(rows)
    assert report.reference_row(rows).name == "train/openvino-bf16"
    assert rows[4].speedup_vs_reference_b1 == 2.0 and rows[4].speedup_b1 == 9.0
