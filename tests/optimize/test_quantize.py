"""ONNX export, onnxruntime INT8 static quantization, and the ORT backend behind engine.predict."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from configs import loader_config
from helpers import TINY_SPEC, lively
from yolofps import device as dev
from yolofps.data import synthetic
from yolofps.data.dataset import YoloDataset, build_loader
from yolofps.engine.predict import predict
from yolofps.model.spec import preset
from yolofps.model.yolo import YOLOv5, build_model
from yolofps.optimize.export import export_onnx
from yolofps.optimize.quantize import calibration_batches, detect_head_nodes, quantize_static_int8
from yolofps.runtime import Deployment, Pipeline
from yolofps.runtime.backends import OrtBackend, TorchBackend

SIZE = 64


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 calibration (train) + 4 evaluation (val) synthetic images."""
    spec = dataclasses.replace(TINY_SPEC, num_train=8, num_val=4, image_size=SIZE)
    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), spec, seed=0)


def _images(data_yaml: Path, split: str) -> list[Path]:
    return sorted((data_yaml.parent / "images" / split).glob("*.jpg"))


@pytest.fixture(scope="module")
def model(data_yaml: Path) -> YOLOv5:
    images = torch.from_numpy(np.concatenate(list(calibration_batches(_images(data_yaml, "train"), SIZE))))
    return lively(build_model(preset("tiny", 3)), images)


@pytest.fixture(scope="module")
def fp32_path(model: YOLOv5, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "fp32.onnx", SIZE)


@pytest.fixture(scope="module")
def int8(fp32_path: Path, data_yaml: Path) -> tuple[Path, dict]:
    out = fp32_path.with_name("int8.onnx")
    return out, quantize_static_int8(fp32_path, out, calibration_batches(_images(data_yaml, "train"), SIZE))


def _val_batch(data_yaml: Path) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(list(calibration_batches(_images(data_yaml, "val"), SIZE))))


def _errors(reference: torch.Tensor, output: torch.Tensor) -> tuple[float, float]:
    """Mean absolute error of the scores (objectness x class) and of the box xywh in pixels."""
    scores = lambda p: p[..., 4:5] * p[..., 5:]  # noqa: E731
    return ((scores(reference) - scores(output)).abs().mean().item(),
            (reference[..., :4] - output[..., :4]).abs().mean().item())


@pytest.mark.parametrize("batch", [1, 3])
def test_ort_fp32_matches_torch(model: YOLOv5, fp32_path: Path, batch: int) -> None:
    images = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        reference = model(images)
    output = OrtBackend(fp32_path, threads=1)(images)
    assert output.shape == reference.shape == (batch, 3 * (8 * 8 + 4 * 4 + 2 * 2), 8)
    assert reference[..., 4].std() > 0.05  # the model is not degenerate: scores vary
    torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_ort_backend_fixes_the_batch_dimension_per_batch_size(fp32_path: Path) -> None:
    detector = OrtBackend(fp32_path, threads=1)
    assert detector.batch_dim == "batch"  # export_onnx's dynamic axis
    for batch in (1, 3, 1):
        images = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        (dynamic,) = detector.session.run(None, {detector.input_name: images.numpy()})
        torch.testing.assert_close(detector(images), torch.from_numpy(dynamic))
    assert sorted(detector.sessions) == [1, 3]  # one fixed-shape session per batch size, reused


def test_export_names_and_dynamic_batch(fp32_path: Path) -> None:
    graph = onnx.load(str(fp32_path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["predictions"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed batch


def test_int8_is_smaller_quantized_and_close(fp32_path: Path, int8: tuple[Path, dict], data_yaml: Path) -> None:
    path, info = int8
    assert path.exists() and path.stat().st_size < fp32_path.stat().st_size
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert info["calibration_images"] == 8 and info["excluded_nodes"] > 0
    images = _val_batch(data_yaml)
    reference = OrtBackend(fp32_path)(images)
    score_error, box_error = _errors(reference, OrtBackend(path)(images))
    assert score_error < 0.05 and box_error < 3.0, (score_error, box_error)


def test_decode_stays_float(int8: tuple[Path, dict]) -> None:
    model = onnx.load(str(int8[0]))
    producers = {output: node for node in model.graph.node for output in node.output}
    initializers = {tensor.name for tensor in model.graph.initializer}
    decode, head_convs = detect_head_nodes(model)
    assert len(head_convs) == 3  # the walk from the output stops at the three Detect convs
    final = producers["predictions"]
    assert final.op_type == "Concat" and final.name in decode
    assert all(producers[i].op_type != "DequantizeLinear" for i in final.input)
    # no decode arithmetic reads a dequantized tensor, and the Detect convs keep their float weights
    arithmetic = [node for node in model.graph.node
                  if node.name in decode and node.op_type in ("Sigmoid", "Mul", "Add", "Pow", "Concat")]
    assert len(arithmetic) >= 3 * 4 and not any(
        i in producers and producers[i].op_type == "DequantizeLinear" for node in arithmetic for i in node.input)
    convs = [node for node in model.graph.node if node.name in head_convs]
    assert all(node.input[1] in initializers for node in convs)


def test_no_calibration_images_is_an_error(fp32_path: Path) -> None:
    with pytest.raises(ValueError, match="no images"):
        quantize_static_int8(fp32_path, fp32_path.with_name("never.onnx"), iter([]))


def test_naive_int8_breaks_the_scores(fp32_path: Path, int8: tuple[Path, dict], data_yaml: Path) -> None:
    """Why the decode stays float (onnxruntime#10787): one uint8 scale for pixels and scores rounds scores away."""
    naive = fp32_path.with_name("naive.onnx")
    quantize_static_int8(fp32_path, naive, calibration_batches(_images(data_yaml, "train"), SIZE),
                         keep_head_float=False)
    images = _val_batch(data_yaml)
    reference = OrtBackend(fp32_path)(images)
    naive_score_error, _ = _errors(reference, OrtBackend(naive)(images))
    kept_score_error, _ = _errors(reference, OrtBackend(int8[0])(images))
    assert naive_score_error > 3 * kept_score_error, (naive_score_error, kept_score_error)


def test_ort_backend_in_predict(model: YOLOv5, fp32_path: Path, data_yaml: Path) -> None:
    loader = build_loader(YoloDataset(data_yaml, "val", SIZE, loader_config(), train=False), 2,
                          shuffle=False, workers=0)
    info = dev.resolve("cpu")
    settings = Deployment(SIZE, conf=0.25, iou=0.6, max_det=100)
    expected = predict(Pipeline(TorchBackend(model), settings, info), loader)
    got = predict(Pipeline(OrtBackend(fp32_path, threads=1), settings, info), loader)
    assert got.paths == expected.paths and sum(len(d) for d in expected.detections) > 0
    for ours, theirs in zip(got.detections, expected.detections):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-2)
