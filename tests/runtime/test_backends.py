"""Every backend of the one runtime gives torch eager's detections; evaluation and timing share the pipeline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from configs import loader_config
from helpers import TINY_SPEC, lively
from yolofps import device as dev
from yolofps.bench.measure import agreement
from yolofps.data import synthetic
from yolofps.data.dataset import YoloDataset, build_loader
from yolofps.engine.predict import predict
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model
from yolofps.optimize.export import export_onnx, export_openvino
from yolofps.runtime import Deployment, Execution, build_pipeline, host, openvino

CPU = dev.resolve("cpu", amp=False)
SIZE = 64


@pytest.fixture(scope="module")
def tiny(images):
    """A tiny model whose scores depend on the image (random init scores ~0 everywhere, nothing to compare)."""
    batch = torch.cat([host.preprocess([path], SIZE, CPU)[0] for path in images])
    return lively(build_model(preset("tiny", 3)), batch)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four synthetic images of different shapes (the letterbox has work to do)."""
    folder = tmp_path_factory.mktemp("runtime_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(80, 96), (96, 64), (64, 64), (50, 120)]):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        paths.append(folder / f"{i}.png")
    return paths


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    onnx = export_onnx(tiny, folder / "tiny.onnx", SIZE)
    return {"onnx": onnx, "ir": export_openvino(onnx, folder / "tiny-openvino")}


DEPLOYMENT = Deployment(SIZE, conf=0.25, iou=0.45, max_det=100)
FLOAT_EXECUTIONS = [(Execution("torch", "channels_last"), None), (Execution("torch", "trace"), None),
                    (Execution("onnxruntime"), "onnx"), (Execution("onnxruntime", threads=1), "onnx"),
                    (Execution("openvino"), "onnx"), (Execution("openvino"), "ir"),
                    (Execution("openvino", threads=1), "ir")]


@pytest.mark.parametrize(("execution", "artifact"), FLOAT_EXECUTIONS, ids=lambda e: getattr(e, "suffix", e))
def test_float_backends_give_torch_eagers_detections(tiny, images, exports, execution, artifact):
    reference = build_pipeline(Execution(), DEPLOYMENT, CPU, model=tiny)
    pipeline = build_pipeline(execution, DEPLOYMENT, CPU, model=tiny, artifact=exports.get(artifact))
    inputs, _ = reference.preprocess(images)
    want, got = reference.backend(inputs), pipeline.backend(inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # decoded predictions, fp32
    expected, detected = reference.detect(images), pipeline.detect(images)
    assert sum(map(len, expected)) > 20
    # not 1.0: a random model's boxes crowd at IoU ~0.45, where a 1e-5 difference can flip one NMS decision
    assert agreement(expected, detected) >= 0.9


def test_openvino_bf16_agrees_with_fp32(tiny, images, exports):
    if reason := openvino.unavailable("bf16"):
        pytest.skip(reason)
    reference = build_pipeline(Execution(), DEPLOYMENT, CPU, model=tiny)
    bf16 = build_pipeline(Execution("openvino", dtype="bf16"), DEPLOYMENT, CPU, artifact=exports["ir"])
    inputs, _ = reference.preprocess(images)
    # this random model is chaotic (built so that export errors show): bf16's 8-bit mantissa moves its scores by
    # 0.04 on average (fp32: 2e-7) and its detections agree 0.78 (fp32: 0.91); a trained model is far calmer
    assert (bf16.backend(inputs) - reference.backend(inputs)).abs()[..., 4:].mean() < 0.1
    assert agreement(reference.detect(images), bf16.detect(images)) >= 0.6
    compiled = next(iter(bf16.backend.requests.values())).get_compiled_model()
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'bfloat16'>"


def test_openvino_compiles_static_shapes_per_batch_size_with_the_precision_asked(exports):
    backend = openvino.OpenVinoBackend(exports["ir"], dtype="fp32", threads=1)
    for batch in (1, 3, 1):
        assert backend(torch.rand(batch, 3, SIZE, SIZE)).shape[0] == batch
    assert sorted(backend.requests) == [1, 3]
    compiled = backend.requests[3].get_compiled_model()
    assert compiled.input(0).get_partial_shape().is_static and list(compiled.input(0).shape) == [3, 3, SIZE, SIZE]
    # f32 asked explicitly: on AMX CPUs the plugin's default would be bf16
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_a_missing_openvino_model_is_a_named_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no OpenVINO model"):
        build_pipeline(Execution("openvino"), DEPLOYMENT, CPU, artifact=tmp_path)


def test_evaluation_and_timing_run_the_same_pipeline(tiny, exports, tmp_path):
    """The mAP path (loader batches) and the FPS path (image files) give identical detections per image."""
    data_yaml = synthetic.generate(tmp_path, dataclasses.replace(TINY_SPEC, image_size=96), seed=0)
    dataset = YoloDataset(data_yaml, "val", SIZE, loader_config(), train=False)
    for execution, artifact in ((Execution(), None), (Execution("openvino"), exports["ir"])):
        pipeline = build_pipeline(execution, DEPLOYMENT, CPU, model=tiny, artifact=artifact)
        evaluated = predict(pipeline, build_loader(dataset, 2, shuffle=False, workers=0))
        paths = [Path(p) for p in evaluated.paths]
        timed = [dets for i in range(0, len(paths), 2) for dets in pipeline.timed(paths[i:i + 2])[0]]  # same batches
        assert sum(map(len, timed)) > 0
        for ours, theirs in zip(evaluated.detections, timed, strict=True):
            np.testing.assert_array_equal(ours, theirs)
