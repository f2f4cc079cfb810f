"""The device path (`runtime.ondevice`) gives the host path's answer: same model input, same boxes in source pixels.

Run on CPU tensors: the device code is the same torch code on every device. Tolerances, measured on uint8 noise
images: the bilinear resize differs from cv2's INTER_LINEAR by at most 0.77 grey levels (cv2 rounds to uint8 with
fixed-point weights), 0 when there is nothing to resize; post-processing the same predictions differs by < 1e-5 px.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from yolofps import device as dev
from yolofps.bench.measure import agreement
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model
from yolofps.runtime import host, ondevice
from yolofps.runtime.host import Deployment
from yolofps.runtime.pipeline import Execution, build_pipeline

IMGSZ = 64
CPU = dev.resolve("cpu", amp=False)
MIXED = [(80, 96), (96, 64), (64, 64), (30, 64)]  # resize + pad rows, resize + pad columns, as is, pad only
GREY = 1 / 255


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(preset("tiny", 3)).eval()


def noise(shapes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def candidates_per_image(model: torch.nn.Module) -> int:
    """Every prediction of the model at IMGSZ: the top-k then drops nothing, as the host keeps everything."""
    with torch.inference_mode():
        return model(torch.zeros(1, 3, IMGSZ, IMGSZ)).shape[1]


@pytest.mark.parametrize("shape", MIXED + [(128, 128), (33, 17)])
def test_letterbox_records_match_the_host(shape):
    _, metas = host.preprocess(noise([shape, shape]), IMGSZ, CPU)
    assert ondevice.letterboxes((2, *shape, 3), IMGSZ) == metas


@pytest.mark.parametrize("shape", MIXED + [(128, 128), (33, 17)])
def test_device_preprocess_equals_the_host_preprocess(shape):
    (image,) = noise([shape], seed=shape[0])
    expected, _ = host.preprocess([image], IMGSZ, CPU)
    ours = ondevice.preprocess(torch.from_numpy(image)[None], CPU.device, torch.float32, IMGSZ)
    assert ours.shape == expected.shape == (1, 3, IMGSZ, IMGSZ) and ours.dtype == torch.float32
    error = (ours - expected).abs()
    if max(shape) == IMGSZ:  # nothing to resize: HWC->CHW, pad, /255 are exact
        assert torch.equal(ours, expected)
    else:
        assert error.max() <= GREY and error.mean() <= 0.35 * GREY  # measured: max 0.77, mean 0.14-0.26 grey


def test_channels_last_input_is_the_same_values():
    (image,) = noise([(80, 96)])
    batch = torch.from_numpy(image)[None]
    plain = ondevice.preprocess(batch, CPU.device, torch.float32, IMGSZ)
    strided = ondevice.preprocess(batch, CPU.device, torch.float32, IMGSZ, channels_last=True)
    assert strided.is_contiguous(memory_format=torch.channels_last) and torch.equal(plain, strided)


@pytest.mark.parametrize("conf, iou, max_det", [(0.0, 0.45, 300), (0.0, 0.3, 10), (0.0015, 0.7, 300)])
def test_device_postprocess_equals_the_host_postprocess(model, conf, iou, max_det):
    inputs, metas = host.preprocess(noise(MIXED), IMGSZ, CPU)  # one batch, four different letterboxes
    with torch.inference_mode():
        predictions = model(inputs)
    deployment = Deployment(IMGSZ, conf, iou, max_det)
    expected = host.postprocess(predictions, metas, deployment)
    geometry = ondevice.Geometry.of(metas, CPU.device)
    ours = ondevice.postprocess(predictions, geometry, deployment, max_candidates=candidates_per_image(model))
    assert all(len(d) >= 5 for d in expected)  # random weights: enough boxes to compare
    for want, got, meta in zip(expected, ours, metas, strict=True):
        got = got.numpy()
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got[:, 5], want[:, 5])  # classes, in the same (score) order
        np.testing.assert_allclose(got[:, :4], want[:, :4], rtol=0, atol=1e-3)  # source pixels
        np.testing.assert_allclose(got[:, 4], want[:, 4], rtol=0, atol=1e-6)
        height, width = meta.orig_shape
        assert (got[:, :4] >= 0).all() and (got[:, [0, 2]] <= width).all() and (got[:, [1, 3]] <= height).all()


def test_top_k_keeps_the_best_boxes(model):
    inputs, metas = host.preprocess(noise(MIXED), IMGSZ, CPU)
    with torch.inference_mode():
        predictions = model(inputs)
    geometry = ondevice.Geometry.of(metas, CPU.device)
    deployment = Deployment(IMGSZ, 0.0)
    capped = ondevice.postprocess(predictions, geometry, deployment, max_candidates=5)
    for want, got in zip(host.postprocess(predictions, metas, deployment), capped, strict=True):
        assert 1 <= len(got) <= 5  # NMS of the five best-scored candidates
        np.testing.assert_allclose(got[0].numpy(), want[0], rtol=0, atol=1e-3)  # the best box survives any NMS
    # mAP's multi-label NMS is the host's alone: the device path is the deployed single-label one
    with pytest.raises(ValueError, match="single-label"):
        ondevice.postprocess(predictions, geometry, Deployment.evaluation(IMGSZ, 0.001, 0.6, 300), max_candidates=5)


@pytest.mark.parametrize("mode", ["eager", "trace"])
def test_device_pipeline_gives_the_host_pipelines_detections(model, mode):
    images = noise([(IMGSZ, IMGSZ)] * 3, seed=1)  # square at imgsz: the two inputs are identical
    deployment = Deployment(IMGSZ, 0.0)
    expected = build_pipeline(Execution(), deployment, CPU, model=model).detect(images)
    how = ondevice.DeviceMode(mode, max_candidates=candidates_per_image(model))
    pipe = ondevice.build(how, model, ondevice.host_batch(images, CPU), CPU, deployment)
    ours = pipe.detect(ondevice.host_batch(images, CPU))
    assert sum(map(len, expected)) > 100 and agreement(expected, ours) == 1.0
    for want, got in zip(expected, ours, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_device_pipeline_agrees_after_a_resize(model):
    images = noise([(128, 128)] * 4, seed=2)  # resized by 1/2 on both paths: inputs within one grey level
    deployment = Deployment(IMGSZ, 0.001)
    expected = build_pipeline(Execution(), deployment, CPU, model=model).detect(images)
    how = ondevice.DeviceMode("eager", max_candidates=candidates_per_image(model))
    pipe = ondevice.build(how, model, ondevice.host_batch(images, CPU), CPU, deployment)
    ours = pipe.detect(ondevice.host_batch(images, CPU))
    # at conf 0 the ~140 overlapping low-score boxes per image flip in NMS on the resize's rounding (F1 0.993-1.0)
    assert sum(map(len, expected)) >= 4 * 10 and agreement(expected, ours) > 0.99


def test_build_refuses_what_it_cannot_run(model):
    sample = ondevice.host_batch(noise([(IMGSZ, IMGSZ)]), CPU)
    with pytest.raises(ValueError, match="needs CUDA"):
        ondevice.build(ondevice.DeviceMode("cudagraph"), model, sample, CPU, Deployment(IMGSZ))
    with pytest.raises(ValueError, match="unknown mode"):
        ondevice.build(ondevice.DeviceMode("tensorrt"), model, sample, CPU, Deployment(IMGSZ))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_replay_each_new_batch(model):
    info = dev.resolve("cuda", amp=False)
    deployment = Deployment(IMGSZ, 0.0)
    batches = [ondevice.host_batch(noise([(80, 96)] * 2, seed=seed), info) for seed in (3, 4)]
    options = {"dtype": torch.float16, "max_candidates": candidates_per_image(model), "channels_last": True}
    graphed = ondevice.build(ondevice.DeviceMode("cudagraph", **options), model, batches[0], info, deployment)
    eager = ondevice.build(ondevice.DeviceMode("eager", **options), model, batches[0], info, deployment)
    for batch in (*batches, batches[0]):  # the static buffers take each new batch
        assert agreement(eager.detect(batch), graphed.detect(batch)) > 0.99
