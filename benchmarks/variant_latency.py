"""Model-only CPU latency of the pipeline's variants, side by side in one run (batch 1, fixed input size).

    python benchmarks/variant_latency.py [--runs 50] [--threads 2]

Reads what `make demo` produced: models/train/best (torch fp32 eager, channels_last, and its ORT fp32 export
made here), models/prune/*, models/distill (torch eager + ORT fp32 export made here) and
models/quantize/model_int8.onnx. Model only: no pre-processing, no NMS — the end-to-end figures are the
bench stage's job. Rounds are interleaved so machine noise hits every variant alike; the median is reported.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from yolofps.bench.environment import write_result
from yolofps.engine import checkpoint
from yolofps.optimize.export import export_onnx, export_openvino
from yolofps.runtime.backends import OrtBackend
from yolofps.runtime.openvino import OpenVinoBackend, unavailable

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def load_variants(models: Path, tmp: Path) -> dict[str, object]:
    """name -> callable(images) for every variant found under `models`."""
    variants: dict[str, object] = {}
    torch_models = {"train": models / "train" / "best", "distill": models / "distill"}
    torch_models |= {p.name: p for p in sorted((models / "prune").glob("prune-*"))}
    for name, folder in torch_models.items():
        if not (folder / checkpoint.ARCH).is_file():
            continue
        model, meta = checkpoint.load_model(folder)
        model.eval()
        variants[f"{name}/torch-fp32"] = model
        # no spinning (the backend's default): spinning ORT workers slowed the torch rows interleaved with them 4x
        onnx = export_onnx(model, tmp / f"{name}.onnx", meta["imgsz"])
        variants[f"{name}/ort-fp32"] = OrtBackend(onnx)
        ir = export_openvino(onnx, tmp / f"{name}-openvino")
        for dtype in ("fp32", "bf16"):
            if unavailable(dtype) is None:
                variants[f"{name}/openvino-{dtype}"] = OpenVinoBackend(ir, dtype=dtype)
    int8 = models / "quantize" / "model_int8.onnx"
    if int8.is_file():
        variants["quantize/ort-int8"] = OrtBackend(int8)
    if (models / "quantize" / "openvino_int8" / "model.xml").is_file():
        variants["quantize/openvino-int8"] = OpenVinoBackend(models / "quantize" / "openvino_int8", dtype="int8")
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=str(PROJECT_ROOT / "models"))
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "variant_latency.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = torch.rand(1, 3, args.imgsz, args.imgsz)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        variants = load_variants(Path(args.models), Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(args.runs + 5):  # interleaved rounds; the first 5 are warm-up
            for name, run in variants.items():
                start = time.perf_counter()
                run(images)
                if i >= 5:
                    times[name].append((time.perf_counter() - start) * 1000)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    base = median.get("train/ort-fp32")
    rows = [{"variant": name, "latency_ms_p50": round(ms, 2),
             "speedup_vs_train_ort_fp32": round(base / ms, 2) if base else None} for name, ms in median.items()]
    print(f"{'variant':<24} {'p50 ms':>8} {'x train ORT fp32':>17}")
    for row in rows:
        print(f"{row['variant']:<24} {row['latency_ms_p50']:>8} {row['speedup_vs_train_ort_fp32']!s:>17}")
    settings = {"batch": 1, "imgsz": args.imgsz, "threads": args.threads, "runs": args.runs,
                "scope": "model only (no pre-processing, no NMS)", "statistic": "median"}
    write_result(args.out, "variant_latency", settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
