"""OpenVINO INT8 through NNCF: plain PTQ and PTQ with accuracy control, on a tiny detector at 64 px."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import TINY_SPEC, lively
from yolofps import device as dev
from yolofps.data import synthetic
from yolofps.model.spec import preset
from yolofps.model.yolo import YOLOv5, build_model
from yolofps.optimize.export import export_onnx
from yolofps.optimize.openvino_int8 import AccuracyControl, detect_head_ops, quantize_openvino_int8
from yolofps.runtime import Deployment, Execution, build_pipeline, host
from yolofps.runtime import openvino as ovr

SIZE = 64
CPU = dev.resolve("cpu", amp=False)
# accuracy control ranks every group of quantizers by compiling a model without it (~1 s each here): on the whole
# tiny YOLOv5 (~100 groups) that alone takes minutes, so the accuracy control tests quantize layers 0-1 only
FIRST_LAYERS_ONLY = [r"^/model\.([2-9]|\d\d)/"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """8 calibration (train) + 4 validation (val) synthetic images."""
    spec = dataclasses.replace(TINY_SPEC, num_train=8, num_val=4, image_size=SIZE)
    data_yaml = synthetic.generate(tmp_path_factory.mktemp("synthetic"), spec, seed=0)
    return {split: sorted((data_yaml.parent / "images" / split).glob("*.jpg")) for split in ("train", "val")}


def _inputs(paths: Sequence[Path]) -> torch.Tensor:
    """Letterboxed float [B, 3, S, S] in 0..1: the pipeline's own pre-processing."""
    return host.preprocess(paths, SIZE, CPU)[0]


@pytest.fixture(scope="module")
def model(images: dict[str, list[Path]]) -> YOLOv5:
    torch.manual_seed(0)
    return lively(build_model(preset("tiny", 3)), _inputs(images["train"]))


@pytest.fixture(scope="module")
def fp32_path(model: YOLOv5, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "fp32.onnx", SIZE)


@pytest.fixture(scope="module")
def calibration(images: dict[str, list[Path]]) -> list[np.ndarray]:
    return [image[None].numpy() for image in _inputs(images["train"])]  # [1, 3, S, S] float32 each


@pytest.fixture(scope="module")
def validation(model: YOLOv5, images: dict[str, list[Path]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input [1, 3, S, S], the torch fp32 model's predictions on it) per validation image."""
    inputs = _inputs(images["val"])
    with torch.no_grad():
        reference = model(inputs)
    return [(inputs[i:i + 1].numpy(), reference[i:i + 1].numpy()) for i in range(len(inputs))]


def fidelity(backend: Any, items: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """A deterministic metric, higher is better: minus the mean absolute error of the decoded predictions."""
    return -float(np.mean([np.abs(backend(torch.from_numpy(x)).numpy() - y).mean() for x, y in items]))


@pytest.fixture(scope="module")
def ptq(fp32_path: Path, calibration: list[np.ndarray]) -> Any:
    return quantize_openvino_int8(fp32_path, fp32_path.parent / "ptq", calibration)


def _ops(folder: Path) -> dict[str, Any]:
    return {op.get_friendly_name(): op for op in ovr.read_model(folder).get_ops()}


def _fed_by_fake_quantize(op: Any) -> bool:
    return any(port.get_source_output().get_node().get_type_name() == "FakeQuantize" for port in op.inputs())


def _errors(reference: torch.Tensor, output: torch.Tensor) -> tuple[float, float]:
    """Mean absolute error of the scores (objectness x class) and of the box xywh in pixels."""
    scores = lambda p: p[..., 4:5] * p[..., 5:]  # noqa: E731
    return ((scores(reference) - scores(output)).abs().mean().item(),
            (reference[..., :4] - output[..., :4]).abs().mean().item())


def test_plain_ptq_writes_an_int8_ir_the_pipeline_runs(ptq: Any, model: YOLOv5, fp32_path: Path,
                                                        images: dict[str, list[Path]]) -> None:
    assert (ptq.folder / "model.xml").is_file()
    assert (ptq.folder / "model.bin").stat().st_size < fp32_path.stat().st_size / 2  # int8 weights (0.48 vs 1.85 MB)
    assert (ptq.accuracy_control, ptq.reverted_layers, ptq.reverted) == (False, 0, [])
    assert ptq.metric_fp32 is None and ptq.metric_int8 is None and ptq.calibration_images == 8
    assert sum(op.get_type_name() == "FakeQuantize" for op in _ops(ptq.folder).values()) > 50
    pipeline = build_pipeline(Execution("openvino", dtype="int8"), Deployment(SIZE, conf=0.001), CPU,
                              artifact=ptq.folder)
    detections = pipeline.detect(images["val"])
    assert len(detections) == 4 and all(d.ndim == 2 and d.shape[1] == 6 for d in detections)
    inputs = _inputs(images["val"])
    with torch.no_grad():
        reference = model(inputs)
    assert reference[..., 4].std() > 0.05  # the model is not degenerate: scores vary
    score_error, box_error = _errors(reference, pipeline.backend(inputs))
    assert score_error < 0.015 and box_error < 1.5, (score_error, box_error)  # 2x what was seen: 0.0073, 0.70 px


def test_decode_and_head_convs_stay_float(ptq: Any, fp32_path: Path, calibration: list[np.ndarray]) -> None:
    ops = _ops(ptq.folder)
    decode, head_convs = detect_head_ops(ovr.read_model(ptq.folder))
    assert len(head_convs) == 3 and "predictions" in decode  # OpenVINO names the final Concat after the output
    assert not any(ops[name].get_type_name() == "FakeQuantize" or _fed_by_fake_quantize(ops[name])
                   for name in decode + head_convs)
    # without the ignored scope NNCF quantizes the Detect convs and the wh Power inputs: the check above can fail
    naive = quantize_openvino_int8(fp32_path, fp32_path.parent / "naive", calibration,
                                   keep_head_float=False)
    naive_ops = _ops(naive.folder)
    decode, head_convs = detect_head_ops(ovr.read_model(naive.folder))
    assert all(_fed_by_fake_quantize(naive_ops[name]) for name in head_convs)
    assert any(naive_ops[name].get_type_name() == "Power" and _fed_by_fake_quantize(naive_ops[name]) for name in decode)


@pytest.fixture(scope="module")
def partial(fp32_path: Path, calibration: list[np.ndarray], validation: list) -> tuple[Any, float, float]:
    """Plain PTQ of layers 0-1 only, and the fidelity of the float and of that INT8 model."""
    result = quantize_openvino_int8(fp32_path, fp32_path.parent / "partial", calibration,
                                    keep_float=FIRST_LAYERS_ONLY)
    fp32_metric = fidelity(ovr.OpenVinoBackend(fp32_path), validation)
    ptq_metric = fidelity(ovr.OpenVinoBackend(result.folder, dtype="int8"), validation)
    assert fp32_metric > -1e-4 and ptq_metric < fp32_metric - 1e-3  # INT8 costs something measurable
    return result, fp32_metric, ptq_metric


def test_accuracy_control_reverts_layers_until_the_drop_is_met(fp32_path: Path, calibration: list[np.ndarray],
                                                                 validation: list, partial: tuple) -> None:
    ptq, fp32_metric, ptq_metric = partial
    max_drop = (fp32_metric - ptq_metric) / 2
    result = quantize_openvino_int8(fp32_path, fp32_path.parent / "ac", calibration,
                                    AccuracyControl(validation, fidelity, max_drop), keep_float=FIRST_LAYERS_ONLY)
    assert result.accuracy_control and 0 < result.reverted_layers == len(result.reverted)
    assert result.metric_fp32 == pytest.approx(fp32_metric, abs=1e-6)
    assert result.metric_int8 >= result.metric_fp32 - max_drop > ptq_metric  # met the target the PTQ model missed
    # the reverted operations were quantized by plain PTQ and read no FakeQuantize output in the written model
    before, after = _ops(ptq.folder), _ops(result.folder)
    assert all(_fed_by_fake_quantize(before[name]) and not _fed_by_fake_quantize(after[name])
               for name in result.reverted)
    assert sum(_fed_by_fake_quantize(op) for op in after.values()) > 0  # not all of them: it stopped at the target
    assert json.loads(json.dumps(result.to_json()))["reverted_layers"] == result.reverted_layers


def test_accuracy_control_without_any_drop_reverts_every_layer(fp32_path: Path, calibration: list[np.ndarray],
                                                               validation: list, partial: tuple) -> None:
    """max_drop 0 cannot be met by any INT8 operation: NNCF reverts them all (then it logs no final report)."""
    ptq, fp32_metric, _ = partial
    quantized = [name for name, op in _ops(ptq.folder).items() if _fed_by_fake_quantize(op)]
    result = quantize_openvino_int8(fp32_path, fp32_path.parent / "all", calibration,
                                    AccuracyControl(validation, fidelity, 0.0), keep_float=FIRST_LAYERS_ONLY)
    assert sorted(result.reverted) == sorted(quantized) and result.reverted_layers == len(quantized) > 0
    assert not any(_fed_by_fake_quantize(op) for op in _ops(result.folder).values())
    assert result.metric_int8 == pytest.approx(fp32_metric, abs=1e-6)


def test_accuracy_control_within_a_loose_drop_reverts_nothing(fp32_path: Path, ptq: Any, calibration: list[np.ndarray],
                                                              validation: list) -> None:
    result = quantize_openvino_int8(fp32_path, fp32_path.parent / "loose", calibration,
                                    AccuracyControl(validation, fidelity, 1e9))
    assert result.accuracy_control and (result.reverted_layers, result.reverted) == (0, [])
    # the same calibration as plain PTQ: the same INT8 model, so the same metric
    assert result.metric_int8 == pytest.approx(fidelity(ovr.OpenVinoBackend(ptq.folder, dtype="int8"), validation))
    assert result.metric_int8 < result.metric_fp32


def test_no_calibration_or_validation_is_an_error(fp32_path: Path, calibration: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match="no images"):
        quantize_openvino_int8(fp32_path, fp32_path.parent / "never", [])
    with pytest.raises(ValueError, match="validation items"):
        quantize_openvino_int8(fp32_path, fp32_path.parent / "never", calibration, AccuracyControl([], fidelity, 0.0))
