"""End-to-end measurement of one detector: pre-process + model + NMS, as a deployment runs it.

Pre-process: decode the image file (to RGB), letterbox to S×S, HWC→CHW, host→device, uint8 → float 0..1.
Model: the variant under test (a torch module, a traced/compiled module or an onnxruntime session).
Post-process: decode is in the model; NMS at deployment settings (conf, IoU, max_det) and boxes mapped back to
the original image, in numpy and OpenCV (the same rule as `model.postprocess.non_max_suppression`, which the mAP
evaluation uses, without torch's per-op overhead). Each phase ends with a device synchronization, so the split is
wall time as a caller sees it.
The same pre- and post-processing code serves every variant; only the model differs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from yolofps import device as dev
from yolofps.data.dataset import letterbox
from yolofps.errors import DataSetError
from yolofps.model.postprocess import box_iou

Detector = Callable[[torch.Tensor], torch.Tensor]  # float [B, 3, S, S] in 0..1 -> decoded [B, N, 5+nc]


@dataclass(frozen=True)
class Deployment:
    """What a deployed detector is asked to do: input size and the NMS settings (recorded with every figure)."""

    imgsz: int
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300


@dataclass(frozen=True)
class Letterboxed:
    """Where an input image came from, to map its boxes back."""

    path: str
    orig_shape: tuple[int, int]
    ratio: float
    pad: tuple[float, float]


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB HWC; a file that is not an image is a DataSetError naming it."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataSetError(f"{path}: not a readable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # 0.03 ms at 320 px; a numpy [..., ::-1] copy took 0.3 ms


def preprocess(images: Sequence[Path | str | np.ndarray], imgsz: int, info: dev.DeviceInfo
               ) -> tuple[torch.Tensor, list[Letterboxed]]:
    """Image files (or uint8 RGB HWC arrays) -> float [B, 3, S, S] in 0..1 on the device, and their letterboxes."""
    arrays, metas = [], []
    for index, image in enumerate(images):
        source = f"array {index}" if isinstance(image, np.ndarray) else str(image)
        rgb = image if isinstance(image, np.ndarray) else read_rgb(image)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise DataSetError(f"{source}: expected a uint8 RGB image [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
        boxed, ratio, pad = letterbox(rgb, imgsz)
        arrays.append(boxed.transpose(2, 0, 1))  # HWC -> CHW
        metas.append(Letterboxed(source, rgb.shape[:2], ratio, pad))
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))
    return dev.to_device(batch, info), metas


def postprocess(predictions: torch.Tensor, metas: Sequence[Letterboxed], deployment: Deployment) -> list[np.ndarray]:
    """Decoded predictions -> per image [k, 6] (x1, y1, x2, y2, score, class) in original pixels, on the host."""
    return [_image_detections(pred, meta, deployment) for pred, meta in zip(predictions.float().cpu().numpy(), metas)]


def _image_detections(pred: np.ndarray, meta: Letterboxed, deployment: Deployment) -> np.ndarray:
    """One image's decoded [N, 5+nc] -> [k, 6] in its pixels: score = objectness x best class score above `conf`,
    class-aware greedy NMS (OpenCV's NMSBoxesBatched), best `max_det` kept, mapped through the letterbox."""
    pred = pred[pred[:, 4] > deployment.conf]  # objectness pre-filter, as non_max_suppression
    class_scores = pred[:, 5:] * pred[:, 4:5]
    labels = class_scores.argmax(1)
    scores = class_scores[np.arange(len(pred)), labels]
    keep = scores > deployment.conf
    pred, scores, labels = pred[keep], scores[keep], labels[keep]
    corner = pred[:, :2] - pred[:, 2:4] / 2  # OpenCV takes (x, y, w, h) with (x, y) the top-left corner
    kept = cv2.dnn.NMSBoxesBatched(np.concatenate((corner, pred[:, 2:4]), 1).astype(np.float64), scores, labels,
                                   deployment.conf, deployment.iou) if len(pred) else []
    kept = np.asarray(kept, dtype=np.int64).reshape(-1)[: deployment.max_det]  # by decreasing score
    boxes = np.concatenate((corner[kept], corner[kept] + pred[kept, 2:4]), 1)
    pad = np.array([*meta.pad, *meta.pad], np.float32)
    limits = np.array([meta.orig_shape[1], meta.orig_shape[0]] * 2, np.float32)
    boxes = np.minimum(np.maximum((boxes - pad) / meta.ratio, 0), limits)  # letterbox -> original pixels, clipped
    return np.concatenate((boxes, scores[kept, None], labels[kept, None]), 1).astype(np.float32)


def detect(model: Detector, images: Sequence[Path | str | np.ndarray], deployment: Deployment,
           info: dev.DeviceInfo) -> list[np.ndarray]:
    """The whole deployment path once, untimed: per image [k, 6] (x1, y1, x2, y2, score, class) in its pixels."""
    images, metas = preprocess(images, deployment.imgsz, info)
    with torch.inference_mode():
        return postprocess(model(images), metas, deployment)


@dataclass
class Timings:
    """Per-run milliseconds of each phase (one row per timed run)."""

    pre: list[float] = field(default_factory=list)
    model: list[float] = field(default_factory=list)
    post: list[float] = field(default_factory=list)

    @property
    def total(self) -> np.ndarray:
        return np.add(np.add(self.pre, self.model), self.post)

    def latency(self) -> dict[str, float]:
        """p50/p95/p99 of the total and the median of each phase, in ms."""
        p50, p95, p99 = np.percentile(self.total, [50, 95, 99])
        return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
                "pre": round(float(np.median(self.pre)), 3), "model": round(float(np.median(self.model)), 3),
                "post": round(float(np.median(self.post)), 3)}


def run_once(model: Detector, paths: Sequence[Path], deployment: Deployment, info: dev.DeviceInfo
             ) -> tuple[float, float, float]:
    """One pass of the deployment path; (pre, model, post) milliseconds."""
    start = time.perf_counter()
    images, metas = preprocess(paths, deployment.imgsz, info)
    dev.synchronize(info)
    loaded = time.perf_counter()
    predictions = model(images)
    dev.synchronize(info)
    inferred = time.perf_counter()
    postprocess(predictions, metas, deployment)  # ends on the host: no sync needed
    done = time.perf_counter()
    return (loaded - start) * 1000, (inferred - loaded) * 1000, (done - inferred) * 1000


def time_interleaved(detectors: dict[str, tuple[Detector, dev.DeviceInfo]], batches: Sequence[Sequence[Path]],
                     deployment: Deployment, *, warmup: int, runs: int, block: int = 5
                     ) -> tuple[dict[str, Timings], dict[str, str]]:
    """Time every detector `runs` times over `batches` (cycled), in interleaved blocks of `block` runs.

    Interleaving spreads machine noise over all variants alike, so their ratios hold on a busy machine. Each
    block starts with one untimed run: a previous variant's threads (onnxruntime spins its workers after a run)
    must not be charged to the next one. A detector that raises is dropped; its error is returned by name.
    """
    detectors = dict(detectors)
    timings = {name: Timings() for name in detectors}
    failures: dict[str, str] = {}
    counter = dict.fromkeys(detectors, 0)

    def once(name: str) -> tuple[float, float, float]:
        model, info = detectors[name]
        paths = batches[counter[name] % len(batches)]
        counter[name] += 1
        return run_once(model, paths, deployment, info)

    def guarded(name: str, count: int, timed: bool) -> None:
        if name not in detectors:
            return
        try:
            for _ in range(count):
                pre, model_ms, post = once(name)
                if timed:
                    timings[name].pre.append(pre)
                    timings[name].model.append(model_ms)
                    timings[name].post.append(post)
        except Exception as err:  # the caller reports it as a failed row
            failures[name] = f"{type(err).__name__} while timing: {str(err).strip()[:300]}"
            del detectors[name]
            timings.pop(name)

    with torch.inference_mode():
        for name in list(detectors):
            guarded(name, warmup, timed=False)
        for start in range(0, runs, block):
            for name in list(detectors):
                guarded(name, 1, timed=False)
                guarded(name, min(block, runs - start), timed=True)
    return timings, failures


def batches_of(paths: Sequence[Path], batch: int) -> list[list[Path]]:
    """Consecutive batches of `batch` paths, wrapping around so every batch is full."""
    if not paths:
        raise DataSetError("no images to benchmark on")
    count = max(1, len(paths) // batch)
    return [[paths[(i * batch + j) % len(paths)] for j in range(batch)] for i in range(count)]


def peak_memory_mb(info: dev.DeviceInfo) -> float | None:
    """Peak device memory since the last reset (CUDA only; None elsewhere)."""
    if info.kind == "cuda":
        return round(torch.cuda.max_memory_allocated(info.device) / 2**20, 1)
    return None


def reset_peak_memory(info: dev.DeviceInfo) -> None:
    if info.kind == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)


def agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], iou: float = 0.5) -> float:
    """F1 of candidate detections against reference detections (same class, IoU ≥ `iou`, greedy by score).

    1.0 means the variant reproduces its source model's detections; images where both are empty count as agreeing.
    """
    matched = total_ref = total_cand = 0
    for ref, cand in zip(reference, candidate, strict=True):
        total_ref, total_cand = total_ref + len(ref), total_cand + len(cand)
        if len(ref) == 0 or len(cand) == 0:
            continue
        ious = box_iou(torch.from_numpy(ref[:, :4]).float(), torch.from_numpy(cand[:, :4]).float()).numpy()
        ious[ref[:, 5][:, None] != cand[:, 5][None, :]] = 0.0
        for r in np.argsort(-ref[:, 4]):
            c = int(np.argmax(ious[r]))
            if ious[r, c] >= iou:
                matched += 1
                ious[:, c] = 0.0
    if total_ref + total_cand == 0:
        return 1.0
    return 2 * matched / (total_ref + total_cand)
