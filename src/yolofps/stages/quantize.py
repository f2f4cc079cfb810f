"""`quantize` stage: ONNX Runtime fp32 and static INT8 (CPU) variants of the chosen model, each evaluated.

The INT8 model is calibrated on `quantize.calibration_images` train images and keeps the Detect head's decode
arithmetic in float (quantizing it is what drops YOLO to ~0 mAP in naive INT8, onnxruntime #10787). Every
variant is scored by the same evaluation code as training, through an ORT inference path with identical pre-
and post-processing; an INT8 model losing more than `quantize.max_map_drop` mAP50-95 against its fp32 source is
marked `rejected`, not silently kept. On CUDA, fp16 and bf16 variants of the torch model are evaluated too.
Writes `models/quantize/` (model_fp32.onnx, model_int8.onnx, meta.json) and `metrics/quantize.json`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from yolofps import device as dev
from yolofps.config import Config, to_dict
from yolofps.data import formats
from yolofps.engine import checkpoint, job
from yolofps.errors import ConfigError
from yolofps.fileio import fresh_dir, write_json
from yolofps.lineage import lineage_tags
from yolofps.model.yolo import model_info
from yolofps.optimize.export import OrtDetector, export_onnx
from yolofps.optimize.quantize import calibration_batches, quantize_static_int8
from yolofps.paths import Paths
from yolofps.registry import TrackingRun
from yolofps.stages import StageResult


def source_folder(paths: Paths, source: str) -> Path:
    """The model folder a `quantize.source` name refers to."""
    if source == "train":
        return paths.models("train") / "best"
    if source == "distill":
        return paths.models("distill")
    if source.startswith("prune-"):
        return paths.models("prune") / source
    raise ConfigError(f"quantize.source must be train, distill or prune-<ratio>, got {source!r}")


def calibration_images(paths: Paths, count: int) -> list[Path]:
    """`count` train images spread evenly over the (sorted) train split, originals and augmented copies alike."""
    images = formats.list_images(paths.augmented_data / "images" / "train")
    step = max(len(images) / count, 1.0)
    return [images[int(i * step)] for i in range(min(count, len(images)))]


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Export, quantize and evaluate; the metrics say which variants are ok and which were rejected."""
    q, train = cfg.quantize, cfg.train
    info = dev.resolve(cfg.device, amp=False)
    cpu = dev.resolve("cpu")
    model, meta = checkpoint.load_model(source_folder(paths, q.source))
    imgsz = meta["imgsz"]
    data = job.load_data(cfg, paths, train)
    out = fresh_dir(paths.models("quantize"))
    size = model_info(model.cpu(), imgsz)
    variants: dict[str, dict[str, Any]] = {}
    with TrackingRun(cfg.mlflow, run_name="quantize", params={"quantize": to_dict(q)},
                     tags=lineage_tags(paths.root, "quantize", to_dict(q)) | {"source": q.source}) as tracking:
        variants["torch-fp32"] = _score(model.eval(), data, cpu, train) | {"runtime": "torch", "dtype": "fp32"}
        fp32 = export_onnx(model, out / "model_fp32.onnx", imgsz, opset=q.opset)
        variants["ort-fp32"] = _score(OrtDetector(fp32), data, cpu, train) | {"runtime": "onnxruntime",
                                                                             "dtype": "fp32", "file": fp32.name}
        done = quantize_static_int8(fp32, out / "model_int8.onnx", calibration_batches(
            calibration_images(paths, q.calibration_images), imgsz), per_channel=q.per_channel,
            keep_head_float=q.keep_head_float)
        variants["ort-int8"] = _score(OrtDetector(out / "model_int8.onnx"), data, cpu, train) | {
            "runtime": "onnxruntime", "dtype": "int8", "file": "model_int8.onnx", "quantization": done}
        if info.kind == "cuda":
            for dtype in (torch.float16, torch.bfloat16):
                name = "fp16" if dtype == torch.float16 else "bf16"
                half = dev.prepare_model(model, info).to(dtype)
                variants[f"torch-{name}"] = _score(_CastInput(half, dtype), data, info, train) | {
                    "runtime": "torch", "dtype": name}
        _judge(variants, q.max_map_drop)
        for name, variant in variants.items():
            if "file" in variant:
                variant["size_mb"] = round((out / variant["file"]).stat().st_size / 2**20, 3)
        write_json(out / "meta.json", meta | {"source": q.source, "variants": variants, "params": size["params"]})
        metrics = flat_metrics(variants, size)
        write_json(paths.metrics("quantize"), metrics)
        tracking.log_metrics(metrics, step=0)
        tracking.log_artifacts(out, "model")
    for name, variant in variants.items():
        print(f"quantize: {name}: mAP50-95={variant['mAP50-95']:.4f} status={variant['status']}", flush=True)
    return StageResult(outputs={"models": out, "metrics": paths.metrics("quantize")}, metrics=metrics)


class _CastInput(torch.nn.Module):
    """Feed a half-precision model: the evaluation path hands it float32 images."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.dtype)).float()


def _score(model, data: job.Data, info: dev.DeviceInfo, train) -> dict[str, Any]:
    result, _ = job.evaluate(model, data, info, train)
    return {"mAP50-95": round(result.map50_95, 5), "mAP50": round(result.map50, 5)}


def _judge(variants: dict[str, dict[str, Any]], max_drop: float) -> None:
    """Each variant's mAP50-95 drop against torch fp32; more than `max_drop` is rejected."""
    reference = variants["torch-fp32"]["mAP50-95"]
    for variant in variants.values():
        variant["map_drop"] = round(reference - variant["mAP50-95"], 5)
        variant["status"] = "rejected" if variant["map_drop"] > max_drop else "ok"


def flat_metrics(variants: dict[str, dict[str, Any]], size: dict[str, float]) -> dict[str, float]:
    """Flat numeric metrics per variant (status as accepted = 1 / rejected = 0)."""
    metrics: dict[str, float] = {"params": size["params"], "gflops": round(size["gflops"], 4)}
    for name, v in variants.items():
        metrics |= {f"{name}/mAP50-95": v["mAP50-95"], f"{name}/mAP50": v["mAP50"], f"{name}/map_drop": v["map_drop"],
                    f"{name}/accepted": int(v["status"] == "ok")}
        if "size_mb" in v:
            metrics[f"{name}/size_mb"] = v["size_mb"]
    return metrics


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.quantize`: the same as `yolofps quantize`."""
    from yolofps import cli

    return cli.main(["quantize", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
