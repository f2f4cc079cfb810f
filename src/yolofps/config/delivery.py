"""params sections of measuring and shipping a model: `bench`, `register` (with its gates), `mlflow`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from yolofps.config.common import _check
from yolofps.redact import has_secret

BENCH_MODES = ("eager", "channels_last", "trace", "compile", "onnxruntime", "openvino", "fp16", "bf16", "cudagraph")


@dataclass(frozen=True)
class BenchConfig:
    """`bench` section: end-to-end latency, throughput and mAP of every variant, and the selection policy."""

    modes: tuple[str, ...]  # execution modes timed (see BENCH_MODES); those that do not apply are listed as skipped
    batch_sizes: tuple[int, ...]  # throughput (img/s, end to end) at each
    warmup: int
    runs: int  # timed batch-1 runs per variant (p50/p95/p99)
    throughput_runs: int  # timed batches per batch size
    threads: int  # CPU threads for torch and onnxruntime; 0 = all cores
    # intra-op threads each ONNX Runtime / OpenVINO row is timed with, one row each (0 = `threads`): a small
    # pruned graph at batch 1 can run faster on 1 thread than on 2 (per-op wake-ups)
    runtime_threads: tuple[int, ...]
    conf: float  # deployment post-processing settings (the timed NMS)
    iou: float
    max_det: int
    check_images: int  # val images whose detections each variant must reproduce from its source model
    min_agreement: float  # matched detections vs the source model (F1 at IoU 0.5); float variants
    min_agreement_int8: float  # INT8 is judged by mAP; this only catches a broken model
    policy: Literal["fastest_within_drop", "pareto"]
    max_map_drop: float  # mAP50-95 a selectable variant may lose against the baseline
    fps_tie: float  # FPS within this fraction of the fastest counts as tied; the most accurate wins
    store: str  # the benchmark history: a SQLAlchemy URL every measurement is appended to (yolofps.history)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modes) - set(BENCH_MODES))
        _check(not unknown, f"bench.modes: unknown {unknown}; choose from {list(BENCH_MODES)}")
        _check("eager" in self.modes, "bench.modes must include eager: the baseline is the model in fp32 eager")
        _check(len(self.batch_sizes) >= 1 and all(b >= 1 for b in self.batch_sizes), "bench.batch_sizes must be >= 1")
        _check(self.warmup >= 0 and self.runs >= 3 and self.throughput_runs >= 1,
               "bench.warmup >= 0, bench.runs >= 3 and bench.throughput_runs >= 1")
        _check(self.threads >= 0 and self.max_det >= 1 and self.check_images >= 1,
               "bench.threads >= 0, bench.max_det >= 1 and bench.check_images >= 1")
        _check(len(self.runtime_threads) >= 1 and all(t >= 0 for t in self.runtime_threads)
               and len(set(self.runtime_threads)) == len(self.runtime_threads),
               "bench.runtime_threads must be distinct thread counts >= 0 (0 = bench.threads)")
        _check(0 <= self.conf < 1 and 0 < self.iou <= 1, "bench.conf must be in [0, 1) and bench.iou in (0, 1]")
        _check(0 <= self.min_agreement <= 1 and 0 <= self.min_agreement_int8 <= 1,
               "bench.min_agreement and bench.min_agreement_int8 must be in [0, 1]")
        _check(0 <= self.max_map_drop <= 1, "bench.max_map_drop must be in [0, 1]")
        _check(0 <= self.fps_tie < 1, "bench.fps_tie must be in [0, 1)")
        _check(bool(re.match(r"[A-Za-z][A-Za-z0-9+]*://", self.store)),
               f"bench.store must be a SQLAlchemy URL such as sqlite:///benchmarks.db or postgresql://user@host/db, "
               f"got {self.store!r}")
        # params.yaml is committed and logged: the password comes from the environment (yolofps.history.store)
        _check(not has_secret(self.store), "bench.store must not contain a password or token (params.yaml is "
               "committed to git and logged): set YOLOFPS_BENCH_STORE_PASSWORD (or, for PostgreSQL, PGPASSWORD or "
               "~/.pgpass) in the environment instead")


@dataclass(frozen=True)
class GatesConfig:
    """`register.gates`: what a challenger must show against the current champion to be promoted."""

    map_tolerance: float  # challenger mAP50-95 >= champion's - this
    min_fps_gain: float  # challenger fps_b1 >= champion's x (1 + this), compared on the same device only
    min_map50_95: float  # absolute floors, champion or not
    min_fps_b1: float

    def __post_init__(self) -> None:
        _check(0 <= self.map_tolerance <= 1 and 0 <= self.min_map50_95 <= 1,
               "register.gates.map_tolerance and register.gates.min_map50_95 must be in [0, 1]")
        _check(self.min_fps_gain >= -1 and self.min_fps_b1 >= 0,
               "register.gates.min_fps_gain must be >= -1 and register.gates.min_fps_b1 >= 0")


@dataclass(frozen=True)
class RegisterConfig:
    """`register` section: the MLflow registered model, its aliases and the promotion gates."""

    model_name: str
    variant: str  # "selected" (the bench stage's choice) or a variant name from metrics/bench.json
    auto_promote: bool  # run the gates after registering and move @champion when they pass
    retries: int  # attempts at the tracking server before a clear error
    backoff_s: float  # wait before retry n: backoff_s * 2**(n-1)
    gates: GatesConfig

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.model_name)),
               "register.model_name must be letters, digits, '_', '.' or '-'")
        _check(self.retries >= 1 and self.backoff_s >= 0, "register.retries >= 1 and register.backoff_s >= 0")


@dataclass(frozen=True)
class MLflowConfig:
    """`mlflow` section: where runs are tracked (an embedded SQLite store by default, no server)."""

    tracking_uri: str
    experiment: str
    system_metrics: bool  # CPU/GPU/memory sampled by MLflow in the background

    def __post_init__(self) -> None:
        _check(bool(self.tracking_uri.strip()) and bool(self.experiment.strip()),
               "mlflow.tracking_uri and mlflow.experiment must not be empty")
        # params.yaml is committed and logged as run params: credentials belong in the environment
        _check(not has_secret(self.tracking_uri), "mlflow.tracking_uri must not contain a password or token "
               "(params.yaml is committed to git and logged): set MLFLOW_TRACKING_USERNAME and "
               "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead")
