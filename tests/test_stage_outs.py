"""Each stage writes exactly the outs dvc.yaml declares for it (and all of them), on the session's tiny pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import PROJECT_ROOT, copy_run
from yolofps import metric_names as names
from yolofps.bench import contract
from yolofps.config import load_config
from yolofps.paths import Paths
from yolofps.runtime import Execution, openvino


def declared(stage: dict) -> set[str]:
    paths = set()
    for key in ("outs", "metrics", "plots"):
        for entry in stage.get(key, []):
            paths.add(entry if isinstance(entry, str) else next(iter(entry)))
    return paths


STAGES = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]


@pytest.fixture(scope="module")
def pipeline_root(shared_run):
    return shared_run.root


@pytest.mark.parametrize("name", list(STAGES))
def test_run_writes_exactly_the_declared_outs(shared_run, name):
    """The shared run recorded what each stage's `dvc repro --single-item` wrote (DVC's own files aside)."""
    root, written, outs = shared_run.root, shared_run.written[name], declared(STAGES[name])
    stray = sorted(p for p in written if not any(p == o or p.startswith(o + "/") for o in outs))
    assert not stray, f"{name} wrote undeclared files: {stray[:5]}"
    for out in outs:
        assert (root / out).exists(), f"{name} did not write its declared out {out}"
        assert any(p == out or p.startswith(out + "/") for p in written) or out.startswith("checkpoints/"), \
            f"{name}'s out {out} exists but this stage did not write it"
    metrics = json.loads((root / "metrics" / f"{name}.json").read_text())
    if name == "bench":  # the contract document; its flat numbers sit under "summary"
        metrics = metrics["summary"]
    assert isinstance(metrics, dict) and metrics, metrics


def test_prune_and_distill_report_the_comparison(pipeline_root):
    root = pipeline_root
    prune = json.loads((root / "metrics" / "prune.json").read_text())
    assert prune["prune-0.5/params"] < prune["baseline/params"]
    assert {"prune-0.5/before_finetune/metrics/mAP50-95B", "prune-0.5/metrics/mAP50-95B", "prune-0.5/size_mb"} <= set(
        prune)
    distill = json.loads((root / "metrics" / "distill.json").read_text())
    no_kd = distill["no_kd/metrics/mAP50-95B"]
    assert distill["comparison_is_fair"] == 1 and no_kd == prune["prune-0.5/metrics/mAP50-95B"]
    assert distill["kd_gain/metrics/mAP50-95B"] == pytest.approx(distill["metrics/mAP50-95B"] - no_kd, abs=1e-5)
    assert distill["params"] == prune["prune-0.5/params"]  # same student architecture as the no-KD control
    # the equal-budget control: the unpruned baseline trained on for the fine-tune epochs, nothing removed
    assert prune["control/params"] == prune["baseline/params"]
    assert "control/before_finetune/metrics/mAP50-95B" not in prune
    assert distill["control/metrics/mAP50-95B"] == prune["control/metrics/mAP50-95B"]
    assert distill["kd_helped"] == int(distill["kd_gain/metrics/mAP50-95B"] > 0)
    assert distill["kd_verdict"].startswith("KD helped" if distill["kd_helped"] else "KD did not help")
    control = json.loads((root / "models" / "prune" / "control" / "meta.json").read_text())
    student = json.loads((root / "models" / "distill" / "meta.json").read_text())
    assert control["training_epochs"] == student["training_epochs"]  # the same budget


def test_quantize_scores_every_variant_through_the_same_evaluation(pipeline_root):
    root = pipeline_root
    metrics = json.loads((root / "metrics" / "quantize.json").read_text())
    for variant in ("torch-fp32", "ort-fp32", "ort-int8", "openvino-int8"):
        assert 0.0 <= metrics[f"{variant}/metrics/mAP50-95B"] <= 1.0 and metrics[f"{variant}/accepted"] in (0, 1)
    # ONNX Runtime fp32 runs the same graph: its accuracy matches torch
    assert abs(metrics["ort-fp32/metrics/mAP50-95B"] - metrics["torch-fp32/metrics/mAP50-95B"]) < 0.01
    assert metrics["ort-int8/size_mb"] < metrics["ort-fp32/size_mb"]
    meta = json.loads((root / "models" / "quantize" / "meta.json").read_text())
    assert meta["variants"]["ort-int8"]["quantization"]["format"] == "QDQ"
    # OpenVINO INT8 through NNCF with accuracy control: an IR folder, and how many layers it kept in float
    assert (root / "models" / "quantize" / "openvino_int8" / "model.xml").is_file()
    assert meta["variants"]["openvino-int8"]["quantization"]["accuracy_control"] is True
    assert metrics["openvino-int8/reverted_layers"] >= 0
    # QAT (quantize.qat.when: always in params.yaml): its own IR, scored by the same evaluation, judged the same way
    assert (root / "models" / "quantize" / "openvino_int8_qat" / "model.xml").is_file()
    assert 0.0 <= metrics["openvino-int8-qat/metrics/mAP50-95B"] <= 1.0
    assert meta["variants"]["openvino-int8-qat"]["quantization"]["method"] == "qat"


def test_bench_writes_the_contract_for_every_model_and_mode(pipeline_root):
    root = pipeline_root
    result = json.loads((root / "metrics" / "bench.json").read_text())
    contract.validate(result)
    names = {v["name"] for v in result["variants"]}
    for model in ("train", "prune-0.5", "distill"):
        assert {f"{model}/eager-fp32", f"{model}/trace-fp32", f"{model}/onnxruntime-fp32"} <= names
    assert {"quantize/onnxruntime-int8", "quantize/openvino-int8", "qat/openvino-int8", "control/eager-fp32"} <= (
        names)
    # accuracy is judged against the equal-budget control, not the shorter-trained baseline
    assert result["selected"]["accuracy_reference"] == "control/eager-fp32"
    by_name = {v["name"]: v for v in result["variants"]}
    control_map, distill_row = by_name["control/eager-fp32"]["metrics/mAP50-95B"], by_name["distill/eager-fp32"]
    assert distill_row["map_drop"] == pytest.approx(control_map - distill_row["metrics/mAP50-95B"], abs=1e-4)
    # OpenVINO rows for every model: fp32 always, bf16 where this CPU has it natively, else skipped with the reason
    bf16 = openvino.unavailable("bf16")
    for model in ("train", "prune-0.5", "distill"):
        assert f"{model}/openvino-fp32" in names and (f"{model}/openvino-bf16" in names) == (bf16 is None)
    assert (bf16 is None) or any(s["mode"] == "openvino-bf16" and s["reason"] == bf16 for s in result["skipped"])
    (baseline,) = [v for v in result["variants"] if v["baseline"]]
    assert baseline["name"] == "train/eager-fp32" and baseline["status"] == "ok" and baseline["speedup_b1"] == 1.0
    for variant in result["variants"]:
        if variant["status"] != "failed":
            assert set(variant["throughput"]) == {"1", "2"} and variant["fps_b1"] > 0
            assert (root / variant["artifact"]).exists()
    # trace and ONNX Runtime fp32 run the same weights: the same accuracy as eager
    by_name = {v["name"]: v for v in result["variants"]}
    assert abs(by_name["train/trace-fp32"]["metrics/mAP50-95B"] - baseline["metrics/mAP50-95B"]) < 1e-3
    assert abs(by_name["train/onnxruntime-fp32"]["metrics/mAP50-95B"] - baseline["metrics/mAP50-95B"]) < 0.01
    assert result["selected"]["name"] in names and result["environment"]["deployment"]["conf"] == load_config(
        root / "params.yaml").bench.conf
    assert "| train/eager-fp32 |" in (root / "reports" / "bench" / "bench.md").read_text()


def metric_keys(document: dict, where: str = "") -> list[tuple[str, str]]:
    """Every (where, key) in a JSON document, nested dicts and lists included."""
    found = []
    for key, value in document.items():
        found.append((where, key))
        values = value if isinstance(value, list) else [value]
        found += [k for v in values if isinstance(v, dict) for k in metric_keys(v, f"{where}/{key}")]
    return found


def test_every_accuracy_figure_is_spelled_the_ultralytics_way(pipeline_root):
    """One vocabulary: mAP, precision and recall appear only as `[scope/]metrics/<name>B` in every metrics file."""
    root = pipeline_root
    bad = []
    for path in sorted((root / "metrics").glob("*.json")):
        for where, key in metric_keys(json.loads(path.read_text())):
            name = key.lower()
            if any(word in name for word in ("map5", "precision", "recall")) and not any(
                    key == n or key.endswith("/" + n) for n in names.BOX):
                bad.append(f"{path.name}{where}: {key}")
    assert not bad, bad
    summary = json.loads((root / "metrics" / "bench.json").read_text())["summary"]
    assert {"selected/metrics/mAP50-95B", "baseline/metrics/mAP50-95B"} <= set(summary)
    header = (root / "reports" / "bench" / "bench.md").read_text()
    assert "| metrics/mAP50-95B | metrics/mAP50B |" in header
    assert "metrics/mAP50-95B" in (root / "plots" / "bench.csv").read_text().splitlines()[0]


def out_of_range(folder: Path) -> list[str]:
    """Accuracy figures outside [0, 1] in a folder of metrics files; `kd_gain/...` is a difference, in [-1, 1]."""
    def walk(value, where):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from walk(item, f"{where}/{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from walk(item, f"{where}[{index}]")
        elif isinstance(value, float) and any(where.endswith("/" + n) for n in names.BOX):
            low = -1.0 if "/kd_gain/" in where else 0.0
            if not low <= value <= 1.0:
                yield f"{where}: {value}"
    return [bad for path in sorted(folder.glob("*.json")) for bad in walk(json.loads(path.read_text()), path.name)]


def test_every_accuracy_figure_lies_in_its_range(pipeline_root):
    """Issue 20: recall reached 2.0 in metrics/train.json. Checked on the tiny pipeline and on the committed demo."""
    root = pipeline_root
    assert not out_of_range(root / "metrics")
    assert not out_of_range(PROJECT_ROOT / "metrics")


def test_bench_marks_a_broken_variant_failed_and_keeps_going(shared_run, tmp_path, monkeypatch):
    from yolofps.stages import bench

    real_build = bench.build_pipeline

    def build_with_faults(execution, deployment, info, **kwargs):
        pipeline = real_build(execution, deployment, info, **kwargs)
        # the rows get their artifact (for torch rows the checkpoint folder: models/prune/prune-0.5, ...); the
        # source model's own reference detections are built without one
        model = kwargs["artifact"].name if kwargs.get("artifact") else None
        if model == "prune-0.5" and execution.mode == "trace":
            backend = pipeline.backend  # every anchor fires
            pipeline.backend = lambda images: backend(images).index_fill(-1, torch.tensor([4, 5]), 1.0)
        if model == "distill" and execution == Execution():
            raise RuntimeError("no kernel for this mode here")
        return pipeline

    monkeypatch.setattr(bench, "build_pipeline", build_with_faults)
    root = copy_run(shared_run, tmp_path / "project")  # bench reruns in a copy: the shared run stays as it was
    bench.run(load_config(root / "params.yaml"), Paths(root))
    by_name = {v["name"]: v for v in json.loads((root / "metrics" / "bench.json").read_text())["variants"]}
    diverged, raised = by_name["prune-0.5/trace-fp32"], by_name["distill/eager-fp32"]
    assert diverged["status"] == "failed" and "diverges" in diverged["reason"] and diverged["fps_b1"] is None
    assert raised["status"] == "failed" and "no kernel for this mode here" in raised["reason"]
    assert by_name["train/eager-fp32"]["status"] == "ok"
