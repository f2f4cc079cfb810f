"""`quantize` stage: INT8 variants of the chosen model for the CPU runtimes, each scored by the one evaluation path.

- ONNX Runtime static INT8 (QDQ), the Detect decode kept float (quantizing it zeroes YOLO mAP, onnxruntime #10787).
- OpenVINO INT8 through NNCF post-training quantization **with accuracy control**: the project's own COCO mAP50-95
  on the val images is NNCF's validation function and `quantize.max_map_drop` the allowed drop, so NNCF reverts the
  most harmful layers to float until the INT8 model keeps accuracy; the number reverted is reported.
- OpenVINO INT8 through quantization-aware training (`quantize.qat`): NNCF fake quantizers on the fp32 model, a short
  fine-tune through the one training loop (labels + the fp32 model's logits), exported to an INT8 IR. `when: auto`
  runs it only when the PTQ model loses more than `quantize.max_map_drop`; `always` reports PTQ and QAT side by side.
Every variant is scored through `runtime.Pipeline` (the pre/post the bench times). An INT8 model losing more than
`quantize.max_map_drop` mAP50-95 against torch fp32 is marked `rejected`, not silently kept. On CUDA, fp16 and bf16
variants of the torch model are evaluated too. Writes `models/quantize/` (model_fp32.onnx, model_int8.onnx,
openvino_int8/ and openvino_int8_qat/ IRs, meta.json) and `metrics/quantize.json`.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from yolofps import device as dev
from yolofps.config import Config, to_dict
from yolofps.data import formats
from yolofps.engine import checkpoint
from yolofps.engine.datasets import Data, evaluate_variant, load_data
from yolofps.engine.objectives import QuantizationAwareObjective, detection_loss
from yolofps.engine.predict import evaluate_pipeline
from yolofps.engine.train import MemoryStore, TrainingJob, fit
from yolofps.fileio import fresh_dir, write_json
from yolofps.lineage import lineage_tags
from yolofps.metric_names import MAP50, MAP50_95, scoped
from yolofps.model.yolo import YOLOv5, model_info
from yolofps.optimize.export import artifact_bytes, export_onnx
from yolofps.optimize.openvino_int8 import AccuracyControl, quantize_openvino_int8
from yolofps.optimize.qat import export_openvino_int8, prepare_qat
from yolofps.optimize.quantize import calibration_batches, quantize_static_int8
from yolofps.paths import Paths
from yolofps.registry import TrackingRun
from yolofps.runtime import Deployment, Execution, Pipeline, build_pipeline
from yolofps.stages import StageResult

OPENVINO_INT8 = "openvino_int8"  # the IR folder inside models/quantize
OPENVINO_INT8_QAT = "openvino_int8_qat"  # the QAT model's IR folder


def calibration_images(paths: Paths, count: int) -> list[Path]:
    """`count` train images spread evenly over the (sorted) train split, originals and augmented copies alike."""
    images = formats.list_images(paths.augmented_data / "images" / "train")
    step = max(len(images) / count, 1.0)
    return [images[int(i * step)] for i in range(min(count, len(images)))]


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Export, quantize and evaluate; the metrics say which variants are ok and which were rejected."""
    q, train = cfg.quantize, cfg.train
    info = dev.resolve(cfg.device, amp=False)
    model, meta = checkpoint.load_model(paths.model_folder(q.source))
    model.eval()
    deployment = Deployment(meta["imgsz"])
    data = load_data(cfg, paths, train)
    out = fresh_dir(paths.models("quantize"))
    size = model_info(model.cpu(), deployment.imgsz)
    cpu = dev.resolve("cpu", amp=False)

    def score(execution: Execution, **source: Any) -> dict[str, Any]:
        pipeline = build_pipeline(execution, deployment, info if execution.runtime == "torch" else cpu, **source)
        result, _ = evaluate_variant(pipeline, data, cfg.eval)
        return result.accuracy() | {"runtime": execution.runtime, "dtype": execution.dtype}

    with TrackingRun(cfg.mlflow, run_name="quantize", params={"quantize": to_dict(q)},
                     tags=lineage_tags(paths.root, "quantize", to_dict(q)) | {"source": q.source}) as tracking:
        variants = {"torch-fp32": score(Execution(), model=model.cpu())}
        fp32 = export_onnx(model, out / "model_fp32.onnx", deployment.imgsz, opset=q.opset)
        variants["ort-fp32"] = score(Execution("onnxruntime"), artifact=fp32) | {"file": fp32.name}
        calibration = list(calibration_batches(calibration_images(paths, q.calibration_images), deployment.imgsz))
        done = quantize_static_int8(fp32, out / "model_int8.onnx", calibration, per_channel=q.per_channel,
                                    keep_head_float=q.keep_head_float)
        variants["ort-int8"] = score(Execution("onnxruntime", dtype="int8"), artifact=out / "model_int8.onnx") | {
            "file": "model_int8.onnx", "quantization": done}
        variants["openvino-int8"] = openvino_int8(fp32, out / OPENVINO_INT8, calibration, data, cfg) | {
            "file": OPENVINO_INT8}
        ptq_drop = variants["torch-fp32"][MAP50_95] - variants["openvino-int8"][MAP50_95]
        if q.qat.when == "always" or (q.qat.when == "auto" and ptq_drop > q.max_map_drop):
            variants["openvino-int8-qat"] = quantization_aware(cfg, paths, model, calibration, data, info) | {
                "file": OPENVINO_INT8_QAT, "ptq_map_drop": round(ptq_drop, 5)}
        if info.kind == "cuda":
            for dtype in ("fp16", "bf16"):
                variants[f"torch-{dtype}"] = score(Execution("torch", "channels_last", dtype), model=model)
        _judge(variants, q.max_map_drop)
        for variant in variants.values():
            if "file" in variant:
                variant["size_mb"] = round(artifact_bytes(out / variant["file"]) / 2**20, 3)
        write_json(out / "meta.json", meta | {"source": q.source, "variants": variants, "params": size["params"]})
        metrics = flat_metrics(variants, size)
        write_json(paths.metrics("quantize"), metrics)
        tracking.log_metrics(metrics, step=0)
        tracking.log_artifacts(out, "model")
    for name, variant in variants.items():
        print(f"quantize: {name}: mAP50-95={variant[MAP50_95]:.4f} status={variant['status']}", flush=True)
    return StageResult(outputs={"models": out, "metrics": paths.metrics("quantize")}, metrics=metrics)


def openvino_int8(fp32: Path, folder: Path, calibration: list, data: Data, cfg: Config) -> dict[str, Any]:
    """NNCF INT8 of the ONNX model with accuracy control: mAP50-95 on the val loader may drop by max_map_drop."""
    q, settings = cfg.quantize, cfg.eval
    evaluation = Deployment.evaluation(data.val_loader.dataset.image_size, settings.conf, settings.iou,
                                       settings.max_det)
    cpu = dev.resolve("cpu", amp=False)

    def validate(backend, batches) -> float:
        # the same evaluation as every other row: val loader batches (NNCF passes a subset) through a pipeline
        return evaluate_pipeline(Pipeline(backend, evaluation, cpu), batches, data.names)[0].map50_95

    control = AccuracyControl(list(data.val_loader), validate, q.max_map_drop) if q.accuracy_control else None
    result = quantize_openvino_int8(fp32, folder, calibration, control, keep_head_float=q.keep_head_float)
    pipeline = build_pipeline(Execution("openvino", dtype="int8"), evaluation, cpu, artifact=folder)
    scored, _ = evaluate_variant(pipeline, data, settings)
    return scored.accuracy() | {"runtime": "openvino", "dtype": "int8", "quantization": result.to_json()}


def quantization_aware(cfg: Config, paths: Paths, model: YOLOv5, calibration: list, data: Data,
                       info: dev.DeviceInfo) -> dict[str, Any]:
    """QAT: NNCF's fake quantizers on the fp32 model (PTQ ranges as the start), `quantize.qat.epochs` through the
    training loop against labels + the fp32 model's logits, then exported to an OpenVINO INT8 IR and scored."""
    q = cfg.quantize.qat
    start = time.perf_counter()
    quantized = prepare_qat(copy.deepcopy(model).cpu(), [torch.from_numpy(b) for b in calibration],
                            keep_head_float=cfg.quantize.keep_head_float)
    finetune = cfg.train.finetune(q.epochs)
    settings = dataclasses.replace(finetune, optim=dataclasses.replace(
        finetune.optim, optimizer="AdamW", lr0=q.lr0, warmup_epochs=0.0, ema=False))
    objective = QuantizationAwareObjective(copy.deepcopy(model), detection_loss(model.spec, settings.loss,
                                                                                 settings.imgsz), weight=q.supervision)
    job = TrainingJob("qat", quantized, objective, data, settings, cfg.eval, info, paths.checkpoints("quantize"),
                      paths.models("quantize") / "qat_history.csv", seed=cfg.seed,
                      store=MemoryStore())  # no artifact until exported; its curve sits beside its IR
    out = fit(job)
    folder = export_openvino_int8(out.model.cpu().eval(), paths.models("quantize") / OPENVINO_INT8_QAT,
                                  data.val_loader.dataset.image_size)
    pipeline = build_pipeline(Execution("openvino", dtype="int8"), Deployment(data.val_loader.dataset.image_size),
                              dev.resolve("cpu", amp=False), artifact=folder)
    scored, _ = evaluate_variant(pipeline, data, cfg.eval)
    return scored.accuracy() | {"runtime": "openvino", "dtype": "int8", "quantization": {
        "method": "qat", "epochs": out.state.epoch, "best_epoch": out.state.best_epoch + 1,
        "seconds": round(time.perf_counter() - start, 1)}}


def _judge(variants: dict[str, dict[str, Any]], max_drop: float) -> None:
    """Each variant's mAP50-95 drop against torch fp32; more than `max_drop` is rejected."""
    reference = variants["torch-fp32"][MAP50_95]
    for variant in variants.values():
        variant["map_drop"] = round(reference - variant[MAP50_95], 5)
        variant["status"] = "rejected" if variant["map_drop"] > max_drop else "ok"


def flat_metrics(variants: dict[str, dict[str, Any]], size: dict[str, float]) -> dict[str, float]:
    """Flat numeric metrics per variant (status as accepted = 1 / rejected = 0; layers NNCF kept float)."""
    metrics: dict[str, float] = {"params": size["params"], "gflops": round(size["gflops"], 4)}
    for name, v in variants.items():
        metrics |= {scoped(name, MAP50_95): v[MAP50_95], scoped(name, MAP50): v[MAP50],
                    f"{name}/map_drop": v["map_drop"], f"{name}/accepted": int(v["status"] == "ok")}
        if "size_mb" in v:
            metrics[f"{name}/size_mb"] = v["size_mb"]
        if "reverted_layers" in v.get("quantization", {}):
            metrics[f"{name}/reverted_layers"] = v["quantization"]["reverted_layers"]
    return metrics


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.quantize`: the same as `yolofps quantize`."""
    from yolofps import cli

    return cli.main(["quantize", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
