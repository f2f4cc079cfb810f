"""Interleaved end-to-end timing of runtime pipelines, and how far a variant's detections agree with its source.

Each timed run is one `runtime.Pipeline.timed` call: decode + letterbox, model, NMS, every phase ending with a
device synchronization, so the split is wall time as a caller sees it. The same pre- and post-processing code
serves every variant; only the backend differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from yolofps import device as dev
from yolofps.errors import DataSetError
from yolofps.model.postprocess import box_iou
from yolofps.runtime import Pipeline


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


def time_interleaved(pipelines: dict[str, Pipeline], batches: Sequence[Sequence[Path]], *, warmup: int, runs: int,
                     block: int = 5) -> tuple[dict[str, Timings], dict[str, str]]:
    """Time every pipeline `runs` times over `batches` (cycled), in interleaved blocks of `block` runs.

    Interleaving spreads machine noise over all variants alike, so their ratios hold on a busy machine. Each
    block starts with one untimed run: a previous variant's threads (onnxruntime spins its workers after a run)
    must not be charged to the next one. A pipeline that raises is dropped; its error is returned by name.
    """
    detectors = dict(pipelines)
    timings = {name: Timings() for name in detectors}
    failures: dict[str, str] = {}
    counter = dict.fromkeys(detectors, 0)

    def once(name: str) -> tuple[float, float, float]:
        paths = batches[counter[name] % len(batches)]
        counter[name] += 1
        return detectors[name].timed(paths)[1]

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
