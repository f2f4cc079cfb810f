"""A bench row: one variant of one benchmark run, typed. `to_json()` is its entry in the metrics/bench.json contract."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from yolofps.metric_names import MAP50, MAP50_95

# Attribute -> contract key where the contract uses the one metric vocabulary (yolofps.metric_names)
JSON_KEYS = {"map50_95": MAP50_95, "map50": MAP50}


@dataclass
class BenchRow:
    """Identity (which model, run how), then what the run found: checks, accuracy, speed, the speed-ups."""

    name: str  # `prune-0.5/openvino-1t-bf16`
    model: str  # train, prune-0.5, distill, quantize
    runtime: str  # torch | xla | onnxruntime | openvino
    mode: str  # eager | channels_last | trace | compile | cudagraph
    dtype: str  # fp32 | fp16 | bf16 | int8
    device: str  # cpu | cuda | xla
    imgsz: int
    threads: int  # ONNX Runtime / OpenVINO intra-op threads; 0 = the run's thread setting
    params_m: float
    gflops: float
    artifact: str  # what a registry loads: checkpoint folder, ONNX file or IR folder (relative to the project)
    baseline: bool = False  # the unpruned model in torch fp32 eager: the accuracy bar and the first speed column
    status: str = "ok"  # ok | failed (could not build, run, or reproduce its source) | rejected (too inaccurate)
    reason: str | None = None
    size_mb: float | None = None
    agreement: float | None = None  # detection F1 against the source model in torch fp32 eager
    map50_95: float | None = None  # `metrics/mAP50-95B` in the contract
    map50: float | None = None  # `metrics/mAP50B`
    map_drop: float | None = None  # against the baseline
    fps_b1: float | None = None  # end to end, batch 1, from the p50 latency
    latency_ms_b1: dict[str, float] | None = None  # p50/p95/p99 and the pre/model/post medians
    throughput: dict[str, float] = field(default_factory=dict)  # batch size -> images/s, end to end
    peak_memory_mb: float | None = None  # CUDA only
    speedup_b1: float | None = None  # x the baseline (torch fp32 eager)
    speedup_vs_reference_b1: float | None = None  # x the unpruned model's fastest float row, any runtime

    @property
    def timed(self) -> bool:
        """Ran and was timed (ok or rejected): it has a place on the speed/accuracy plot."""
        return self.status != "failed" and bool(self.fps_b1)

    def fail(self, reason: str) -> None:
        """Could not be built, run or trusted: no figures are reported for it."""
        self.status, self.reason, self.fps_b1, self.latency_ms_b1 = "failed", reason, None, None

    def reject(self, reason: str) -> None:
        """Ran, but is not selectable (too inaccurate, or its quantization was rejected)."""
        self.status, self.reason = "rejected", reason

    def to_json(self) -> dict[str, Any]:
        """The contract's entry (`bench.contract.VARIANT`); fields that were never set are left out."""
        optional = ("reason", "agreement", "map_drop", "peak_memory_mb")
        return {JSON_KEYS.get(k, k): v for k, v in dataclasses.asdict(self).items()
                if v is not None or k not in optional}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchRow:
        """A row read back from metrics/bench.json (unknown keys are ignored)."""
        fields = ((f.name, JSON_KEYS.get(f.name, f.name)) for f in dataclasses.fields(cls))
        return cls(**{name: data[key] for name, key in fields if key in data})
