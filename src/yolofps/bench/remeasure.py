"""Re-measure registered models on this device, side by side, the way the bench stage measured them.

A version's `fps_b1` tag belongs to the device it was benchmarked on, and the promotion gate compares FPS only
between versions measured on one device. Moving to a new device (a GPU box, a production CPU) means timing the
champion and the challenger again there, interleaved so both see the same noise; the Prefect `bench` flow does
that and writes the new figures back as version tags.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yolofps.bench import measure
from yolofps.bench.environment import device_name, environment_stamp
from yolofps.config import Config
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
    """Time the registered versions under `aliases` here (each version once) and tag them with the new figures.

    Uses the project's val images. Returns alias -> {"version", figures...}, {"version", "error"} when timing
    failed, or {"skipped"} for an alias no version holds.
    """
    from yolofps import registry

    r = cfg.register
    present = registry.with_retries("reading aliases", lambda: registry.aliases(cfg.mlflow, r.model_name),
                                    uri=cfg.mlflow.tracking_uri, retries=r.retries, backoff_s=r.backoff_s)
    versions = {alias: present[alias] for alias in aliases if alias in present}
    if not versions:
        raise registry.RegistryError(f"{r.model_name} has no version under {list(aliases)}; register one first")
    detectors = {}
    for alias, version in versions.items():
        if version not in detectors:
            detectors[version] = registry.load_detector(cfg.mlflow, r.model_name, alias, retries=r.retries,
                                                        backoff_s=r.backoff_s)[2]
    images = formats.list_images(Paths(project_dir).augmented_data / "images" / "val")
    figures = remeasure({f"v{v}": d for v, d in detectors.items()}, images, warmup=cfg.bench.warmup, runs=runs)
    for version in detectors:
        found = figures[f"v{version}"]
        if "error" not in found:
            registry.set_version_tags(cfg.mlflow, r.model_name, version, {
                "fps_b1": str(found["fps_b1"]), "bench_device_name": found["bench_device_name"],
                "bench_environment": json.dumps(found["bench_environment"])[:5000], "bench_source": "remeasured"},
                retries=r.retries, backoff_s=r.backoff_s)
    return {alias: ({"version": versions[alias]} | figures[f"v{versions[alias]}"]) if alias in versions
            else {"skipped": f"no version holds @{alias}"} for alias in aliases}
