"""Re-measure registered models on this device, side by side, the way the bench stage measured them.

A version's `fps_b1` tag belongs to the device it was benchmarked on, and the promotion gate compares FPS only
between versions measured on one device. Moving to a new device (a GPU box, a production CPU) means timing the
champion and the challenger again there, interleaved so both see the same noise; the Prefect `bench` flow does
that, writes the new figures back as version tags and appends them to the benchmark store as one `rebench`
run, whose figures the promotion gate then compares.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yolofps import history
from yolofps.bench import measure
from yolofps.bench.environment import device_name, environment_stamp
from yolofps.config import Config, to_dict
from yolofps.data import formats
from yolofps.paths import Paths
from yolofps.runtime import Deployment, Pipeline


def row_pipeline(root: Path, row: dict[str, Any], deployment: Deployment) -> Pipeline:
    """The pipeline a metrics/bench.json row describes (runtime, mode, dtype, threads, artifact), rebuilt here."""
    from yolofps.serving.sources import bench_detector  # serving sits above bench: imported on use

    # the deployment exactly as given: a serving config has no multi_label (evaluation-style callers keep theirs)
    return bench_detector(root, row, deployment).pipeline.with_deployment(deployment)


def remeasure(detectors: dict[str, Any], images: Sequence[Path], *, warmup: int, runs: int) -> dict[str, dict]:
    """Batch-1 end-to-end latency of serving Detectors (label -> Detector) timed interleaved on `images`.

    Returns label -> {"fps_b1", "latency_ms_b1", "bench_device_name", "bench_environment"}, or {"error"} for a
    detector that failed while timing. Detectors with different deployments (image size, NMS settings) are
    timed in separate interleaved groups.
    """
    if not images:
        raise ValueError("no images to time the models on")
    stamp = environment_stamp()
    groups: dict[Deployment, dict[str, Pipeline]] = {}
    for label, detector in detectors.items():
        groups.setdefault(detector.pipeline.deployment, {})[label] = detector.pipeline
    results: dict[str, dict] = {}
    for deployment, group in groups.items():
        timings, failures = measure.time_interleaved(group, measure.batches_of(list(images), 1), warmup=warmup,
                                                     runs=runs)
        for label, error in failures.items():
            results[label] = {"error": error}
        for label, timing in timings.items():
            stats = timing.latency()
            kind = group[label].info.kind
            results[label] = {"fps_b1": round(1000 / stats["p50"], 2), "latency_ms_b1": stats,
                              "bench_device_name": device_name(stamp),
                              "bench_environment": stamp | {"device": kind, "imgsz": deployment.imgsz}}
    return results


def remeasure_registered(cfg: Config, aliases: Sequence[str], project_dir: Path, *, runs: int) -> dict[str, dict]:
    """Time the registered versions under `aliases` here (each version once), tag them with the new figures and
    append them to the benchmark store (bench.store) as one `rebench` run.

    Uses the project's val images. Returns alias -> {"version", figures..., "history"}, {"version", "error"} when
    timing failed, or {"skipped"} for an alias no version holds.
    """
    from yolofps import registry

    r = cfg.register
    store = history.open_store(cfg.bench.store, root=project_dir)  # first: a bad URL costs no measuring
    present = registry.with_retries("reading aliases", lambda: registry.aliases(cfg.mlflow, r.model_name),
                                    uri=cfg.mlflow.tracking_uri, retries=r.retries, backoff_s=r.backoff_s)
    versions = {alias: present[alias] for alias in aliases if alias in present}
    if not versions:
        raise registry.RegistryError(f"{r.model_name} has no version under {list(aliases)}; register one first")
    loaded = {}  # version -> (tags, serving Detector)
    for alias, version in versions.items():
        if version not in loaded:
            loaded[version] = registry.load_detector(cfg.mlflow, r.model_name, alias, retries=r.retries,
                                                     backoff_s=r.backoff_s)[1:]
    images = formats.list_images(Paths(project_dir).augmented_data / "images" / "val")
    figures = remeasure({f"v{v}": d for v, (_, d) in loaded.items()}, images, warmup=cfg.bench.warmup, runs=runs)
    for version in loaded:
        found = figures[f"v{version}"]
        if "error" not in found:
            registry.set_version_tags(cfg.mlflow, r.model_name, version, {
                "fps_b1": str(found["fps_b1"]), "bench_device_name": found["bench_device_name"],
                "bench_environment": json.dumps(found["bench_environment"])[:5000], "bench_source": "remeasured"},
                retries=r.retries, backoff_s=r.backoff_s)
    run = history.MeasuringRun.start("rebench", project_dir, to_dict(cfg.bench))
    recorded = history.append_or_warn(store, rebench_measurements(run, r.model_name, loaded, figures))
    return {alias: ({"version": versions[alias], "history": recorded} | figures[f"v{versions[alias]}"])
            if alias in versions else {"skipped": f"no version holds @{alias}"} for alias in aliases}


def rebench_measurements(run: history.MeasuringRun, model_name: str, loaded: dict[int, tuple[dict[str, str], Any]],
                         figures: dict[str, dict]) -> list[history.Measurement]:
    """One batch-1 history row per re-timed version (version -> (tags, serving Detector)); failed timings have none."""
    rows = []
    for version, (tags, detector) in loaded.items():
        found = figures[f"v{version}"]
        if "error" in found:
            continue
        env, serving, latency = found["bench_environment"], detector.config, found["latency_ms_b1"]
        rows.append(run.measurement(
            model_hash=tags.get("content_hash"), model_name=model_name, model_version=version,
            variant=tags.get("variant"), runtime=serving.runtime, mode=serving.mode, dtype=serving.dtype,
            batch=1, imgsz=env["imgsz"], device_name=found["bench_device_name"], cpu_flags=env["cpu_flags"],
            threads=serving.threads or env.get("torch_threads"), p50_ms=latency["p50"], p95_ms=latency["p95"],
            p99_ms=latency["p99"], throughput=found["fps_b1"],
            extra={"latency_ms": {k: latency[k] for k in ("pre", "model", "post")}}))
    return rows
