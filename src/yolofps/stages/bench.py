"""`bench` stage: every model the pipeline produced, on every runtime and execution mode of the machine, end to end.

For each variant (model × runtime × mode × dtype × threads), one `runtime.Pipeline` does everything: its
detections on a few val images are checked against the source model in torch fp32 eager (a variant that diverges
is `failed`, not reported as fast), its mAP is measured on the val set at the evaluation's NMS settings, then
batch-1 latency (p50/p95/p99, split into pre-process / model / post-process) and throughput at each of
`bench.batch_sizes`, all end to end: image file → letterbox → model → NMS at deployment settings. A mode that
fails to build or run is a `failed` row with the reason; a variant losing more than `bench.max_map_drop`
mAP50-95 against the baseline (the trained model, torch fp32 eager) is `rejected`. The policy picks the variant
to register. Writes `metrics/bench.json` (the contract the registry reads), `reports/bench/` (markdown table,
Pareto plot), `plots/bench.csv`, and `models/bench/` (the ONNX files and OpenVINO IR folders the rows ran).
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
from yolofps import history
from yolofps.bench import contract, measure, report
from yolofps.bench.environment import environment_stamp
from yolofps.bench.rows import BenchRow
from yolofps.bench.variants import Variant, plan
from yolofps.config import BenchConfig, Config, EvalConfig, to_dict
from yolofps.data import formats
from yolofps.engine import checkpoint
from yolofps.engine.datasets import Data, evaluate_variant, load_data
from yolofps.fileio import fresh_dir, write_json
from yolofps.lineage import lineage_tags
from yolofps.metric_names import MAP50_95, scoped
from yolofps.model.yolo import YOLOv5, model_info
from yolofps.optimize.export import artifact_bytes, export_onnx, export_openvino
from yolofps.paths import CONTROL, Paths
from yolofps.registry import TrackingRun, log_to_parent_run
from yolofps.runtime import Deployment, Execution, Pipeline, build_pipeline
from yolofps.stages import StageResult

INT8_VARIANTS = {"onnxruntime": "ort-int8", "openvino": "openvino-int8"}  # runtime -> the quantize stage's variant
QAT_VARIANT = "openvino-int8-qat"  # its quantization-aware-trained OpenVINO INT8 model: a model of its own, `qat`


@dataclasses.dataclass(frozen=True)
class SourceModel:
    """A model to benchmark: a torch checkpoint folder, or the quantize stage's INT8 files with their fp32 source."""

    name: str  # train, prune-0.5, distill, quantize
    torch_folder: Path  # the torch checkpoint (for quantize: the quantized model's fp32 source, the reference)
    int8: dict[str, Path] = dataclasses.field(default_factory=dict)  # runtime -> INT8 model file (quantize only)
    verdicts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # runtime -> quantize's judgement


def source_models(paths: Paths) -> list[SourceModel]:
    """Every model artifact the earlier stages left: baseline first, then pruned, distilled, quantized."""
    found = [SourceModel("train", paths.model_folder("train"))]
    found.append(SourceModel(CONTROL, paths.model_folder(CONTROL)))
    found += [SourceModel(p.name, p) for p in sorted(paths.models("prune").glob("prune-*"))]
    found.append(SourceModel("distill", paths.model_folder("distill")))
    quantized = paths.models("quantize")
    if (quantized / "meta.json").is_file():
        meta = json.loads((quantized / "meta.json").read_text())
        variants = meta.get("variants", {})
        int8 = {runtime: quantized / variants[key]["file"] for runtime, key in INT8_VARIANTS.items()
                if key in variants and (quantized / variants[key]["file"]).exists()}
        verdicts = {runtime: variants[key] for runtime, key in INT8_VARIANTS.items() if runtime in int8}
        if int8:
            found.append(SourceModel("quantize", paths.model_folder(meta["source"]), int8, verdicts))
        qat = variants.get(QAT_VARIANT)
        if qat and (quantized / qat["file"]).exists():
            found.append(SourceModel("qat", paths.model_folder(meta["source"]), {"openvino": quantized / qat["file"]},
                                     {"openvino": qat}))
    return [m for m in found if (m.torch_folder / checkpoint.ARCH).is_file()]


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Benchmark every variant, judge it, select one, and write the contract and the reports."""
    b = cfg.bench
    # opened first: a bad URL or a server that is down stops the stage before it measures anything
    store = history.open_store(b.store, root=paths.root)
    info = dev.resolve(cfg.device, amp=False)
    if b.threads:
        torch.set_num_threads(b.threads)
    _, base_meta = checkpoint.load_model(paths.models("train") / "best")
    deployment = Deployment(base_meta["imgsz"], b.conf, b.iou, b.max_det)
    eval_train = dataclasses.replace(cfg.train, imgsz=deployment.imgsz, batch=1)  # b1: one traced/compiled shape
    data = load_data(cfg, paths, eval_train)
    exports = fresh_dir(paths.models("bench"))
    check_images = formats.list_images(paths.augmented_data / "images" / "val")[: b.check_images]
    bench = Bench(b, info, deployment, data, cfg.eval, exports, check_images, paths.root)
    environment = _environment(cfg, info, deployment, paths)
    with TrackingRun(cfg.mlflow, run_name="bench", params={"bench": to_dict(b)},
                     tags=lineage_tags(paths.root, "bench", to_dict(b))) as tracking:
        rows, skipped, live = check_all(bench, source_models(paths))
        time_variants(rows, live, data_images(data), b)
        report.judge_accuracy(rows, b.max_map_drop)
        report.add_speedups(rows)
        selected = report.select(rows, b.policy, b.max_map_drop, b.fps_tie)
        result = {"environment": environment, "variants": [row.to_json() for row in rows], "skipped": skipped,
                  "selected": selected, "summary": _summary(rows, selected)}
        contract.validate(result)  # what the registry and other tools read: never write a broken one
        write_json(paths.metrics("bench"), result)
        reports, table = write_reports(paths, rows, result, deployment)
        # after every output is on disk: a store failure now is a warning, metrics/bench.json holds the figures
        measuring = history.MeasuringRun.start("bench", paths.root, to_dict(b))
        recorded = history.append_or_warn(store, history.bench_measurements(result, paths.root, measuring))
        tracking.log_metrics(result["summary"], step=0)
        tracking.set_tags({"selected": str(selected["name"]), "history": recorded[:5000]})
        for artifact in (reports, paths.metrics("bench")):
            tracking.log_artifacts(artifact, "bench")
            log_to_parent_run(cfg.mlflow, artifact, "bench")
    print(table, flush=True)
    return StageResult(outputs={"metrics": paths.metrics("bench"), "reports": reports, "models": exports},
                       metrics=result["summary"])


def _environment(cfg: Config, info: dev.DeviceInfo, deployment: Deployment, paths: Paths) -> dict[str, Any]:
    """The environment stamp plus what every figure of this run shares: device, size, batches, NMS and eval settings."""
    val_images = formats.list_images(paths.augmented_data / "images" / "val")
    return environment_stamp() | {"device": info.kind, "imgsz": deployment.imgsz,
                                  "batch_sizes": list(cfg.bench.batch_sizes), "threads": torch.get_num_threads(),
                                  "deployment": dataclasses.asdict(deployment),
                                  "evaluation": {"conf": cfg.eval.conf, "iou": cfg.eval.iou,
                                                 "max_det": cfg.eval.max_det, "images": len(val_images)}}


@dataclasses.dataclass(frozen=True)
class Bench:
    """What every row of one bench run shares: settings, device, deployment, data and where exports go."""

    b: BenchConfig
    info: dev.DeviceInfo
    deployment: Deployment
    data: Data
    evaluation: EvalConfig  # mAP settings (the eval section)
    exports: Path  # models/bench: the ONNX and OpenVINO IR exports the rows run (registrable artifacts)
    check_images: list[Path]
    root: Path


def check_all(bench: Bench, sources: list[SourceModel]
              ) -> tuple[list[BenchRow], list[dict[str, str]], dict[str, Pipeline]]:
    """Build, check and score every model × execution: the rows, the skipped modes, and the live pipelines to time."""
    rows: list[BenchRow] = []
    skipped: list[dict[str, str]] = []
    live: dict[str, Pipeline] = {}  # variants that passed the checks, timed side by side later
    for source in sources:
        model, _ = checkpoint.load_model(source.torch_folder)
        model.eval()
        size = model_info(model, bench.deployment.imgsz)
        reference = build_pipeline(Execution(), bench.deployment, bench.info, model=model).detect(bench.check_images)
        if source.int8:
            variants = [Variant(source.name, Execution(runtime, "eager", "int8", threads), "cpu")
                        for runtime in source.int8 for threads in bench.b.runtime_threads]
        else:
            variants, skipped_here = plan(source.name, bench.b.modes, bench.info, bench.b.runtime_threads)
            skipped += skipped_here
        for variant in variants:
            row = _describe(variant, source, size, bench)
            pipeline = check_variant(row, variant, model, source, reference, bench)
            verdict = source.verdicts.get(variant.execution.runtime, {})
            if verdict.get("status") == "rejected" and row.status == "ok":
                row.reject(f"the quantize stage rejected it (mAP50-95 drop {verdict.get('map_drop')} vs its fp32 "
                           "source)")
            if pipeline is not None:
                live[row.name] = pipeline
            rows.append(row)
            _print_row(row)
    return rows, skipped, live


def artifact_for(variant: Variant, source: SourceModel, model: YOLOv5, bench: Bench) -> Path:
    """The file or folder a variant runs from (and a registry would load), exported on first use."""
    runtime = variant.execution.runtime
    if source.int8:
        return source.int8[runtime]
    if runtime in ("torch", "xla"):
        return source.torch_folder
    onnx = bench.exports / f"{source.name}.onnx"
    if not onnx.is_file():
        export_onnx(model, onnx, bench.deployment.imgsz)
    if runtime == "onnxruntime":
        return onnx
    folder = bench.exports / f"{source.name}-openvino"
    return folder if (folder / "model.xml").is_file() else export_openvino(onnx, folder)


def write_reports(paths: Paths, rows: list[BenchRow], result: dict[str, Any], deployment: Deployment
                  ) -> tuple[Path, str]:
    """reports/bench/ (markdown table, Pareto plot) and plots/bench.csv; returns the folder and the table."""
    reports = fresh_dir(paths.reports / "bench")
    table = report.markdown_table(rows, result["environment"], dataclasses.asdict(deployment), result["selected"])
    report.write_markdown(reports / "bench.md", table)
    report.pareto_plot(reports / "pareto.png", rows)
    report.write_csv(paths.plots / "bench.csv", rows)
    return reports, table


def check_variant(row: BenchRow, variant: Variant, model: YOLOv5, source: SourceModel, reference: list,
                  bench: Bench) -> Pipeline | None:
    """Build a variant, check its detections against the source model, measure its mAP; fills in `row`.

    Returns the pipeline, or None when the row failed: any exception becomes a `failed` row with its reason.
    """
    info = bench.info if variant.device != "cpu" else dev.resolve("cpu", amp=False)
    try:
        artifact = artifact_for(variant, source, model, bench)
        pipeline = build_pipeline(variant.execution, bench.deployment, info, model=model, artifact=artifact)
        row.artifact, row.size_mb = _relative(artifact, bench.root), round(artifact_bytes(artifact) / 2**20, 3)
        row.agreement = round(measure.agreement(reference, pipeline.detect(bench.check_images)), 4)
        floor = bench.b.min_agreement_int8 if variant.execution.dtype == "int8" else bench.b.min_agreement
        if row.agreement < floor:
            row.fail(f"diverges from its source model: detection agreement {row.agreement} < {floor}")
            return None
        result, _ = evaluate_variant(pipeline, bench.data, bench.evaluation)
        row.map50_95, row.map50 = round(result.map50_95, 5), round(result.map50, 5)
        return pipeline
    except Exception as err:  # a mode that cannot run here is a row, never a crash of the stage
        row.fail(_reason(err))
        return None


def time_variants(rows: list[BenchRow], live: dict[str, Pipeline], images: list[Path], b: BenchConfig) -> None:
    """Batch-1 latency and throughput at each batch size of every live variant, interleaved; fills in the rows."""
    by_name = {r.name: r for r in rows}
    for info in {p.info.kind: p.info for p in live.values()}.values():
        measure.reset_peak_memory(info)
    latency, failures = measure.time_interleaved(live, measure.batches_of(images, 1), warmup=b.warmup, runs=b.runs)
    for name, timings in latency.items():
        row, stats = by_name[name], timings.latency()
        row.fps_b1, row.latency_ms_b1 = round(1000 / stats["p50"], 2), stats
        row.throughput = {"1": row.fps_b1}
    for batch in (n for n in b.batch_sizes if n > 1):
        alive = {name: live[name] for name in latency if name not in failures}
        timed, failed = measure.time_interleaved(alive, measure.batches_of(images, batch), warmup=1,
                                                 runs=b.throughput_runs, block=b.throughput_runs)
        failures |= failed
        for name, timings in timed.items():
            by_name[name].throughput[str(batch)] = round(batch * 1000 / float(np.median(timings.total)), 2)
    for name, pipeline in live.items():
        by_name[name].peak_memory_mb = measure.peak_memory_mb(pipeline.info)  # CUDA: the highest of those timed
    for name, reason in failures.items():
        by_name[name].fail(reason)


def _reason(err: Exception) -> str:
    """One line: the exception, its first message line and where it was raised."""
    last = traceback.extract_tb(err.__traceback__)[-1]
    message = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"{type(err).__name__}: {message} (at {Path(last.filename).name}:{last.lineno})"


def data_images(data: Data) -> list[Path]:
    """The val images, in the evaluation loader's order."""
    return [Path(p) for p in data.val_loader.dataset.images]


def _describe(variant: Variant, source: SourceModel, size: dict[str, float], bench: Bench) -> BenchRow:
    """A new row: the variant's identity (its artifact and size are set once it is built)."""
    execution = variant.execution
    return BenchRow(variant.name, variant.model, execution.runtime, execution.mode, execution.dtype, variant.device,
                    bench.deployment.imgsz, execution.threads, params_m=round(size["params"] / 1e6, 4),
                    gflops=round(size["gflops"], 3), artifact=_relative(source.torch_folder, bench.root),
                    baseline=variant.model == "train" and execution == Execution())


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _summary(rows: list[BenchRow], selected: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for `dvc metrics show/diff` and MLflow: the selected variant and the reference rows."""
    by_name = {r.name: r for r in rows}
    summary: dict[str, float] = {}
    for label, name in (("selected", selected.get("name")), ("baseline", "train/eager-fp32"),
                        ("control", report.CONTROL_ROW),
                        ("reference", getattr(report.reference_row(rows), "name", None))):
        row = by_name.get(name)
        if row and row.fps_b1:
            summary |= {f"{label}/fps_b1": row.fps_b1, scoped(label, MAP50_95): row.map50_95}
    row = by_name.get(selected.get("name"))
    if row:
        summary |= {"selected/speedup_b1": row.speedup_b1 or 0.0,
                    "selected/speedup_vs_reference_b1": row.speedup_vs_reference_b1 or 0.0}
    summary["variants_ok"] = sum(r.status == "ok" for r in rows)
    summary["variants_failed"] = sum(r.status == "failed" for r in rows)
    return summary


def _print_row(row: BenchRow) -> None:
    if row.map50_95 is not None:
        print(f"bench: {row.name}: mAP50-95 {row.map50_95:.4f}, agreement with its source {row.agreement}", flush=True)
    else:
        print(f"bench: {row.name}: {row.status}: {row.reason}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.bench`: the same as `yolofps bench`."""
    from yolofps import cli

    return cli.main(["bench", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
