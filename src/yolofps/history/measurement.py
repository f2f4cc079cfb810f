"""A measurement as the benchmark store keeps it, the content hash that names a model, and the bench's rows as
measurements."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolofps.bench.environment import device_name
from yolofps.lineage import git_state, params_hash, pipeline_run_id
from yolofps.metric_names import MAP50_95


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """One measured figure set: one model, run one way, at one batch size, on one device, in one measuring run.

    Fields a measurement does not have stay None (a batch-8 throughput row has no p99; a re-bench has no mAP).
    """

    measured_at: dt.datetime  # UTC
    run_id: str  # shared by every row of one measuring run (one bench stage run, one re-bench)
    source: str  # bench | rebench | serve:yolofps | serve:mlflow ...
    device_name: str  # bench.environment.device_name: the GPU, else "CPU model xN"
    batch: int
    model_hash: str | None = None  # content_hash(): the registry's identity of the artifact + how it runs
    model_name: str | None = None  # None until the content is registered
    model_version: int | None = None
    variant: str | None = None  # quantize/openvino-1t-int8
    runtime: str | None = None
    mode: str | None = None
    dtype: str | None = None
    imgsz: int | None = None
    cpu_flags: tuple[str, ...] = ()  # bench.environment.cpu_flags
    threads: int | None = None  # the threads it actually ran with
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    throughput: float | None = None  # images/s
    map50_95: float | None = None
    git_commit: str | None = None
    params_hash: str | None = None  # of the settings it was measured under (lineage.params_hash)
    extra: dict[str, Any] = field(default_factory=dict)  # JSON: concurrency, errors, server, latency split...

    def __post_init__(self) -> None:
        if self.measured_at.tzinfo is None:
            raise ValueError("Measurement.measured_at must be timezone-aware (UTC)")
        if self.batch < 1 or not self.run_id or not self.source:
            raise ValueError(f"a measurement needs batch >= 1, a run_id and a source; got {self.batch}, "
                             f"{self.run_id!r}, {self.source!r}")
        object.__setattr__(self, "cpu_flags", tuple(self.cpu_flags))


def content_hash(artifact: Path, row: dict[str, Any]) -> str:
    """sha256 of the model files plus how it runs (a bench row's runtime, mode, dtype, imgsz, threads).

    The registry registers one version per hash, and the benchmark store names what it measured by it, so
    the register stage finds the bench's rows of the version it registers.
    """
    how = [row["runtime"], row["mode"], row["dtype"], row["imgsz"]] + ([row["threads"]] if row.get("threads") else [])
    digest = hashlib.sha256(json.dumps(how).encode())
    files = sorted(p for p in artifact.rglob("*") if p.is_file()) if artifact.is_dir() else [artifact]
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class MeasuringRun:
    """What every row of one measuring run shares: its id, source, time, code and settings."""

    run_id: str
    source: str
    measured_at: dt.datetime
    git_commit: str | None
    params_hash: str | None
    extra: dict[str, Any]

    @classmethod
    def start(cls, source: str, root: Path, settings: dict[str, Any]) -> MeasuringRun:
        """A new run id, now, the project's git commit and the hash of the settings (bench.store left out)."""
        measured = {k: v for k, v in settings.items() if k != "store"}  # where figures go is not how they were made
        return cls(uuid.uuid4().hex, source, dt.datetime.now(dt.timezone.utc), git_state(root)["git_commit"],
                   params_hash(measured), {"pipeline_run_id": pipeline_run_id()})

    def measurement(self, **fields: Any) -> Measurement:
        """A row of this run; `extra` is merged over the run's own."""
        extra = self.extra | fields.pop("extra", {})
        return Measurement(measured_at=self.measured_at, run_id=self.run_id, source=self.source,
                           git_commit=self.git_commit, params_hash=self.params_hash, extra=extra, **fields)


def bench_measurements(result: dict[str, Any], root: Path, run: MeasuringRun) -> list[Measurement]:
    """metrics/bench.json as measurements: one per timed variant and batch size (failed variants have no figures)."""
    env = result["environment"]
    rows: list[Measurement] = []
    for variant in result["variants"]:
        if variant["status"] == "failed" or not variant.get("fps_b1"):
            continue
        common = {"model_hash": content_hash(root / variant["artifact"], variant), "variant": variant["name"],
                  "runtime": variant["runtime"], "mode": variant["mode"], "dtype": variant["dtype"],
                  "imgsz": variant["imgsz"], "device_name": device_name(env), "cpu_flags": tuple(env["cpu_flags"]),
                  "threads": variant.get("threads") or env["threads"], "map50_95": variant.get(MAP50_95)}
        extra = {"status": variant["status"], "device": variant["device"], "model": variant["model"],
                 "size_mb": variant.get("size_mb")}
        for batch, images_per_s in sorted(variant["throughput"].items(), key=lambda item: int(item[0])):
            latency = variant["latency_ms_b1"] if batch == "1" else {}  # percentiles are timed at batch 1 only
            split = {k: latency[k] for k in ("pre", "model", "post") if k in latency}
            rows.append(run.measurement(**common, batch=int(batch), throughput=images_per_s,
                                        p50_ms=latency.get("p50"), p95_ms=latency.get("p95"),
                                        p99_ms=latency.get("p99"), extra=extra | ({"latency_ms": split} if split
                                                                                   else {})))
    return rows


COLUMNS = ("measured (UTC)", "source", "run", "model", "variant", "batch", "clients", "imgsz", "device", "threads",
           "p50 ms", "p95 ms", "p99 ms", "img/s", "mAP50-95")  # clients: a load test's concurrency


def table(rows: Sequence[Measurement]) -> str:
    """Measurements as an aligned text table, one line each, in the order given."""
    def cell(value: Any, digits: int = 2) -> str:
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = [COLUMNS]
    for m in rows:
        model = f"{m.model_name} v{m.model_version}" if m.model_version is not None else (m.model_hash or "-")[:12]
        lines.append((m.measured_at.strftime("%Y-%m-%d %H:%M:%S"), m.source, m.run_id[:12], model, cell(m.variant),
                      str(m.batch), cell(m.extra.get("concurrency")), cell(m.imgsz), m.device_name, cell(m.threads),
                      cell(m.p50_ms, 3),
                      cell(m.p95_ms, 3), cell(m.p99_ms, 3), cell(m.throughput, 1), cell(m.map50_95, 4)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in lines)

