"""`bench` stage: every model the pipeline produced, in every execution mode of the device, measured end to end.

For each variant (model × mode): its detections on a few val images are checked against the source model (a
variant that diverges is `failed`, not reported as fast), its mAP is measured with the training evaluation code,
then batch-1 latency (p50/p95/p99, split into pre-process / model / post-process) and throughput at each of
`bench.batch_sizes`, all end to end: image file → letterbox → model → NMS at deployment settings. A mode that
fails to build or run is a `failed` row with the reason; a variant losing more than `bench.max_map_drop`
mAP50-95 against the baseline (the trained model, torch fp32 eager) is `rejected`. The policy picks the variant
to register. Writes `metrics/bench.json` (the contract the registry reads), `reports/bench/` (markdown table,
Pareto plot), `plots/bench.csv`, and `models/bench/` (the ONNX exports the ONNX Runtime rows ran).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yolofps import device as dev
from yolofps.bench import contract, measure, report
from yolofps.bench.environment import environment_stamp
from yolofps.bench.variants import Variant, build, onnx_variants, plan
from yolofps.config import BenchConfig, Config, to_dict
from yolofps.data import formats
from yolofps.engine import checkpoint, job
from yolofps.fileio import fresh_dir, write_json
from yolofps.lineage import lineage_tags
from yolofps.model.yolo import YOLOv5, model_info
from yolofps.paths import Paths
from yolofps.registry import TrackingRun, log_to_parent_run
from yolofps.stages import StageResult


@dataclasses.dataclass(frozen=True)
class SourceModel:
    """A model artifact to benchmark: a torch checkpoint folder, or an ONNX file with the torch model it came from."""

    name: str  # train, prune-0.5, distill, quantize
    artifact: Path  # the folder or file a registry would load
    torch_folder: Path  # the torch checkpoint (for quantize: the quantized model's fp32 source)
    onnx: Path | None = None  # set for ONNX-only models (INT8)
    verdict: dict[str, Any] | None = None  # the quantize stage's judgement of an INT8 model


def source_models(paths: Paths) -> list[SourceModel]:
    """Every model artifact the earlier stages left: baseline first, then pruned, distilled, quantized."""
    found = [SourceModel("train", paths.models("train") / "best", paths.models("train") / "best")]
    found += [SourceModel(p.name, p, p) for p in sorted(paths.models("prune").glob("prune-*"))]
    found.append(SourceModel("distill", paths.models("distill"), paths.models("distill")))
    quantized = paths.models("quantize")
    if (quantized / "meta.json").is_file() and (quantized / "model_int8.onnx").is_file():
        meta = json.loads((quantized / "meta.json").read_text())
        from yolofps.stages.quantize import source_folder

        found.append(SourceModel("quantize", quantized / "model_int8.onnx", source_folder(paths, meta["source"]),
                                 quantized / "model_int8.onnx", meta.get("variants", {}).get("ort-int8")))
    return [m for m in found if (m.torch_folder / checkpoint.ARCH).is_file()]


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Benchmark every variant, judge it, select one, and write the contract and the reports."""
    b = cfg.bench
    info = dev.resolve(cfg.device, amp=False)
    if b.threads:
        torch.set_num_threads(b.threads)
    _, base_meta = checkpoint.load_model(paths.models("train") / "best")
    deployment = measure.Deployment(base_meta["imgsz"], b.conf, b.iou, b.max_det)
    eval_train = dataclasses.replace(cfg.train, imgsz=deployment.imgsz, batch=1)  # b1: one traced/compiled shape
    data = job.load_data(cfg, paths, eval_train)
    onnx_dir = fresh_dir(paths.models("bench"))
    environment = _environment(cfg, info, deployment, paths)
    with TrackingRun(cfg.mlflow, run_name="bench", params={"bench": to_dict(b)},
                     tags=lineage_tags(paths.root, "bench", to_dict(b))) as tracking:
        rows, skipped, live = check_all(paths, b, info, deployment, data, eval_train, onnx_dir)
        time_variants(rows, live, data_images(data), deployment, b)
        report.judge_accuracy(rows, b.max_map_drop)
        report.add_speedups(rows)
        selected = report.select(rows, b.policy, b.max_map_drop, b.fps_tie)
        result = {"environment": environment, "variants": rows, "skipped": skipped, "selected": selected,
                  "summary": _summary(rows, selected)}
        contract.validate(result)  # what the registry and other tools read: never write a broken one
        write_json(paths.metrics("bench"), result)
        reports, table = write_reports(paths, result, deployment)
        tracking.log_metrics(result["summary"], step=0)
        tracking.set_tags({"selected": str(selected["name"])})
        for artifact in (reports, paths.metrics("bench")):
            tracking.log_artifacts(artifact, "bench")
            log_to_parent_run(cfg.mlflow, artifact, "bench")
    print(table, flush=True)
    return StageResult(outputs={"metrics": paths.metrics("bench"), "reports": reports, "models": onnx_dir},
                       metrics=result["summary"])


def _environment(cfg: Config, info: dev.DeviceInfo, deployment: measure.Deployment, paths: Paths) -> dict[str, Any]:
    """The environment stamp plus what every figure of this run shares: device, size, batches, NMS and eval settings."""
    val_images = formats.list_images(paths.augmented_data / "images" / "val")
    return environment_stamp() | {"device": info.kind, "imgsz": deployment.imgsz,
                                  "batch_sizes": list(cfg.bench.batch_sizes), "threads": torch.get_num_threads(),
                                  "deployment": dataclasses.asdict(deployment),
                                  "evaluation": {"conf": cfg.train.conf, "iou": cfg.train.iou,
                                                 "max_det": cfg.train.max_det, "images": len(val_images)}}


def check_all(paths: Paths, b: BenchConfig, info: dev.DeviceInfo, deployment: measure.Deployment, data: job.Data,
              eval_train, onnx_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any]]:
    """Build, check and score every model × mode: the rows, the skipped modes, and the live detectors to time."""
    check_images = formats.list_images(paths.augmented_data / "images" / "val")[: b.check_images]
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    live: dict[str, tuple[Any, dev.DeviceInfo]] = {}  # variants that passed the checks, timed side by side later
    for source in source_models(paths):
        model, _ = checkpoint.load_model(source.torch_folder)
        model.eval()
        size = model_info(model, deployment.imgsz)
        reference = measure.detect(model.to(info.device), check_images, deployment, info)
        if source.onnx is not None:
            variants = onnx_variants(source.name, "int8", b.ort_threads)
        else:
            variants, skipped_here = plan(source.name, b.modes, info, b.ort_threads)
            skipped += skipped_here
        for variant in variants:
            onnx = source.onnx or onnx_dir / f"{source.name}.onnx"
            row = _describe(variant, source, size, deployment.imgsz, paths.root, onnx)
            checked, detector, run_info = check_variant(variant, model, data, eval_train, check_images, reference,
                                                        deployment, info, b, onnx_path=onnx)
            row |= checked
            if row["runtime"] == "onnxruntime" and onnx.is_file():
                row["size_mb"] = round(onnx.stat().st_size / 2**20, 3)
            if source.verdict and source.verdict.get("status") == "rejected" and row["status"] == "ok":
                row["status"] = "rejected"
                row["reason"] = f"the quantize stage rejected it (mAP50-95 drop {source.verdict.get('map_drop')} " \
                                f"vs its fp32 source)"
            if detector is not None:
                live[row["name"]] = (detector, run_info)
            rows.append(row)
            _print_row(row)
    return rows, skipped, live


def write_reports(paths: Paths, result: dict[str, Any], deployment: measure.Deployment) -> tuple[Path, str]:
    """reports/bench/ (markdown table, Pareto plot) and plots/bench.csv; returns the folder and the table."""
    rows, selected = result["variants"], result["selected"]
    reports = fresh_dir(paths.reports / "bench")
    table = report.markdown_table(rows, result["environment"], dataclasses.asdict(deployment), selected)
    report.write_markdown(reports / "bench.md", table)
    report.pareto_plot(reports / "pareto.png", rows)
    report.write_csv(paths.plots / "bench.csv", rows)
    return reports, table


def check_variant(variant: Variant, model: YOLOv5, data: job.Data, eval_train, check_images: list[Path],
                  reference: list, deployment: measure.Deployment, info: dev.DeviceInfo, b: BenchConfig, *,
                  onnx_path: Path) -> tuple[dict[str, Any], Any, dev.DeviceInfo]:
    """Build a variant, check its detections against the source model, measure its mAP.

    Returns the row fields, the detector (None when it failed) and the device it runs on. Any exception becomes a
    `failed` row with its reason.
    """
    run_info = info if variant.device != "cpu" else dev.resolve("cpu", amp=False)
    try:
        detector = build(variant, model, run_info, deployment.imgsz, onnx_path=onnx_path,
                         threads=torch.get_num_threads())  # bench.threads, set at the start of run()
        detections = measure.detect(detector, check_images, deployment, run_info)
        agreement = round(measure.agreement(reference, detections), 4)
        floor = b.min_agreement_int8 if variant.dtype == "int8" else b.min_agreement
        if agreement < floor:
            return {"status": "failed", "agreement": agreement,
                    "reason": f"diverges from its source model: detection agreement {agreement} < {floor}"}, None, \
                run_info
        result, _ = job.evaluate(detector, data, run_info, eval_train)
        return {"agreement": agreement, "map50_95": round(result.map50_95, 5), "map50": round(result.map50, 5)}, \
            detector, run_info
    except Exception as err:  # a mode that cannot run here is a row, never a crash of the stage
        return {"status": "failed", "reason": _reason(err)}, None, run_info


def time_variants(rows: list[dict[str, Any]], live: dict[str, tuple[Any, dev.DeviceInfo]], images: list[Path],
                  deployment: measure.Deployment, b: BenchConfig) -> None:
    """Batch-1 latency and throughput at each batch size of every live variant, interleaved; fills in the rows."""
    by_name = {r["name"]: r for r in rows}
    for info in {i.kind: i for _, i in live.values()}.values():
        measure.reset_peak_memory(info)
    latency, failures = measure.time_interleaved(live, measure.batches_of(images, 1), deployment,
                                                 warmup=b.warmup, runs=b.runs)
    for name, timings in latency.items():
        stats = timings.latency()
        by_name[name] |= {"fps_b1": round(1000 / stats["p50"], 2), "latency_ms_b1": stats,
                          "throughput": {"1": round(1000 / stats["p50"], 2)}}
    for batch in (n for n in b.batch_sizes if n > 1):
        alive = {name: live[name] for name in latency if name not in failures}
        timed, failed = measure.time_interleaved(alive, measure.batches_of(images, batch), deployment,
                                                 warmup=1, runs=b.throughput_runs, block=b.throughput_runs)
        failures |= failed
        for name, timings in timed.items():
            by_name[name]["throughput"][str(batch)] = round(batch * 1000 / float(np.median(timings.total)), 2)
    for name, (_, info) in live.items():
        by_name[name]["peak_memory_mb"] = measure.peak_memory_mb(info)  # CUDA: the highest of the variants timed
    for name, reason in failures.items():
        by_name[name] |= {"status": "failed", "reason": reason, "fps_b1": None, "latency_ms_b1": None}


def _reason(err: Exception) -> str:
    """One line: the exception, its first message line and where it was raised."""
    last = traceback.extract_tb(err.__traceback__)[-1]
    message = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"{type(err).__name__}: {message} (at {Path(last.filename).name}:{last.lineno})"


def data_images(data: job.Data) -> list[Path]:
    """The val images, in the evaluation loader's order."""
    return [Path(p) for p in data.val_loader.dataset.images]


def _describe(variant: Variant, source: SourceModel, size: dict[str, float], imgsz: int, root: Path,
              onnx: Path) -> dict[str, Any]:
    """The identity fields of a row (the contract's keys, in its order)."""
    artifact = onnx if variant.runtime == "onnxruntime" else source.artifact
    if source.onnx is not None:
        size_mb = source.onnx.stat().st_size / 2**20
    else:
        size_mb = (source.torch_folder / checkpoint.WEIGHTS).stat().st_size / 2**20
    return {"name": variant.name, "baseline": variant.model == "train" and variant.runtime == "torch"
            and variant.mode == "eager" and variant.dtype == "fp32", "model": variant.model,
            "runtime": variant.runtime, "mode": variant.mode, "status": "ok", "device": variant.device,
            "dtype": variant.dtype, "imgsz": imgsz, "fps_b1": None, "latency_ms_b1": None, "throughput": {},
            "map50_95": None, "map50": None, "size_mb": round(size_mb, 3), "params_m": round(size["params"] / 1e6, 4),
            "gflops": round(size["gflops"], 3), "speedup_b1": None, "threads": variant.threads,
            "artifact": str(artifact.relative_to(root)) if artifact.is_relative_to(root) else str(artifact)}


def _summary(rows: list[dict[str, Any]], selected: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for `dvc metrics show/diff` and MLflow: the selected variant and the reference rows."""
    by_name = {r["name"]: r for r in rows}
    summary: dict[str, float] = {}
    for label, name in (("selected", selected.get("name")), ("baseline", "train/eager-fp32"),
                        ("onnx_fp32", (report.reference_row(rows) or {}).get("name"))):
        row = by_name.get(name)
        if row and row.get("fps_b1"):
            summary |= {f"{label}/fps_b1": row["fps_b1"], f"{label}/map50_95": row["map50_95"]}
    row = by_name.get(selected.get("name"))
    if row:
        summary |= {"selected/speedup_b1": row["speedup_b1"] or 0.0,
                    "selected/speedup_vs_onnx_b1": row["speedup_vs_onnx_b1"] or 0.0}
    summary["variants_ok"] = sum(r["status"] == "ok" for r in rows)
    summary["variants_failed"] = sum(r["status"] == "failed" for r in rows)
    return summary


def _print_row(row: dict[str, Any]) -> None:
    if row.get("map50_95") is not None:
        print(f"bench: {row['name']}: mAP50-95 {row['map50_95']:.4f}, agreement with its source {row['agreement']}",
              flush=True)
    else:
        print(f"bench: {row['name']}: {row['status']}: {row.get('reason')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.bench`: the same as `yolofps bench`."""
    from yolofps import cli

    return cli.main(["bench", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
