"""End-to-end GPU inference latency and throughput: pinned uint8 host images -> detections, per mode and batch.

    pip install torch==2.14.1 torchvision==0.29.1 -e .
    python benchmarks/gpu.py [--models s n] [--batch-sizes 1 32] [--modes eager compile] [--checkpoint FOLDER]

Runs offline on one NVIDIA GPU in under 5 minutes (`--time-budget`); `--device cpu` runs the same code paths on
CPU for the tests. The pipeline is the runtime's device path (`yolofps.runtime.ondevice`); each row times its
three phases on the device (CUDA events, medians after warm-up):
  pre    upload of pinned uint8 HWC images (non_blocking), HWC->CHW, to dtype, letterbox to imgsz (bilinear resize +
         pad 114; a no-op when the source is already imgsz x imgsz), /255
  model  the detector (random weights from its preset, or --checkpoint), decoded [B, N, 5+nc] predictions
  post   top --max-candidates boxes per image by obj x max class score, class-aware NMS (conf, IoU, max_det), boxes
         mapped back to the source images' pixels
Modes: eager (fp32), bf16 and channels_last (fp16) eager in channels_last, trace (jit.trace + freeze, fp16),
cudagraph (pre, model and candidate selection captured as three CUDA graphs, fp16), compile (torch.compile, fp16).
fp16 modes need CUDA: on CPU they are skipped unless named in --modes, and then run in fp32. Before timing, each
mode's predictions on the timed batch are compared with fp32 eager; a mode beyond its tolerance is a failed row.
Random weights detect almost nothing at conf 0.25, so NMS sees few boxes: --conf 0 gives the post-processing's
worst case (every candidate goes through NMS). Decoded RGB images are assumed (no BGR swap).

Reference, one H200, torch 2.11, model only (no pre-processing, no NMS), yolov5s at 640: fp32 eager b1 5.18 ms,
fp16 CUDA graph b1 1.29 ms, torch.compile (reduce-overhead) fp16 b1 0.77 ms; b32 fp32 eager 2,750 img/s,
compile fp16 5,692 img/s. Goal, pre-processing and NMS included, from 640x640 uint8 host images: yolov5s
b1 <= 1.0 ms and b32 >= 5,000 img/s. JSON with the environment goes to benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from yolofps import device as dev
from yolofps.bench.environment import write_result
from yolofps.engine import checkpoint
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model, model_info
from yolofps.runtime.host import Deployment
from yolofps.runtime.ondevice import NMS_KERNEL, DeviceMode, DevicePipeline, build, preprocess

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# row name -> (runtime.ondevice mode, dtype); every row but eager runs channels_last on CUDA
MODES = {"eager": ("eager", torch.float32), "bf16": ("eager", torch.bfloat16),
         "channels_last": ("eager", torch.float16), "trace": ("trace", torch.float16),
         "cudagraph": ("cudagraph", torch.float16), "compile": ("compile", torch.float16)}
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # max error vs fp32 eager
SETUP_RESERVE_S = {"compile": 60.0}  # a row that needs this long to set up is not started with less time left
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def run_once(pipe: DevicePipeline, host: torch.Tensor, cuda: bool) -> list[float]:
    """(pre, model, post) milliseconds of one pass: CUDA events on the GPU, perf_counter on CPU."""
    marks: list = []

    def mark() -> None:
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())

    mark()
    x = pipe.pre(host)
    mark()
    pred = pipe.model(x)
    mark()
    pipe.post(pred)
    mark()
    if cuda:
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in pairwise(marks)]
    return [(end - start) * 1000 for start, end in pairwise(marks)]


def divergence(pred: torch.Tensor, reference: torch.Tensor, imgsz: int) -> float:
    """Max error vs the fp32 eager predictions: boxes as a fraction of the input size, scores absolute."""
    error = (pred.float() - reference).abs()
    return max(error[..., :4].amax().item() / imgsz, error[..., 4:].amax().item())


def tolerance(dtype: torch.dtype, info: dev.DeviceInfo) -> float:
    """Max divergence allowed for `dtype`; fp32 convolutions on CUDA run in TF32 (fp16's mantissa) by default."""
    if dtype == torch.float32 and info.kind == "cuda" and torch.backends.cudnn.allow_tf32:
        return TOLERANCE[torch.float16]
    return TOLERANCE[dtype]


def measure(pipe: DevicePipeline, host: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
            info: dev.DeviceInfo, args: argparse.Namespace) -> dict:
    """Check the mode against fp32 eager on the timed batch, then time it; the row's status and figures."""
    pred = pipe.model(pipe.pre(host)).clone()  # clone: graph outputs are overwritten by the next pass
    error = divergence(pred, reference, args.imgsz)
    detections = pipe.post(pred)
    row = {"max_error": round(error, 6), "detections_per_image": round(sum(map(len, detections)) / len(host), 2)}
    limit = tolerance(dtype, info)
    if not error <= limit:  # `not <=`: NaN diverges too
        return row | {"status": "failed",
                      "reason": f"diverges from fp32 eager: max error {error:.3g} > {limit:g} (box / imgsz, score)"}
    runs = args.runs or (50 if len(host) == 1 else 20)
    for _ in range(args.warmup):
        run_once(pipe, host, info.kind == "cuda")
    phases = np.array([run_once(pipe, host, info.kind == "cuda") for _ in range(runs)])  # [runs, 3] ms
    total = phases.sum(1)
    p50, p95, p99 = np.percentile(total, [50, 95, 99])
    pre_ms, model_ms, post_ms = np.median(phases, axis=0)
    return row | {"status": "ok", "reason": None, "pre_ms": round(pre_ms, 3), "model_ms": round(model_ms, 3),
                  "post_ms": round(post_ms, 3), "total_ms": round(p50, 3), "p50_ms": round(p50, 3),
                  "p95_ms": round(p95, 3), "p99_ms": round(p99, 3), "img_per_s": round(len(host) * 1000 / p50, 1),
                  "runs": runs}


def skip_reason(mode: str, explicit: bool, info: dev.DeviceInfo, remaining_s: float) -> str | None:
    """Why a row is not run here, or None."""
    if mode == "cudagraph" and info.kind != "cuda":
        return "needs CUDA"
    if MODES[mode][1] == torch.float16 and info.kind != "cuda" and not explicit:
        return "needs CUDA (fp16); name it in --modes to run it in fp32 on CPU"
    if remaining_s <= SETUP_RESERVE_S.get(mode, 0.0):
        return "time budget"
    return None


def build_row(name: str, model: torch.nn.Module, host: torch.Tensor, dtype: torch.dtype, info: dev.DeviceInfo,
              args: argparse.Namespace) -> DevicePipeline:
    """The runtime's device pipeline for row `name` with this run's settings."""
    deployment = Deployment(args.imgsz, args.conf, args.iou, args.max_det)
    how = DeviceMode(MODES[name][0], dtype, channels_last=info.kind == "cuda" and name != "eager",
                     max_candidates=args.max_candidates, compile_mode=args.compile_mode)
    return build(how, model, host, info, deployment)


def bench_row(mode: str, model: torch.nn.Module, host: torch.Tensor, reference: torch.Tensor,
              info: dev.DeviceInfo, args: argparse.Namespace, reason: str | None) -> dict:
    """One (mode, batch) row; any exception becomes a failed row with its text."""
    dtype = MODES[mode][1]
    row = {"mode": mode, "dtype": DTYPE_NAMES[dtype], "batch": len(host), "status": "skipped", "reason": reason}
    if reason is not None:
        return row
    if info.kind != "cuda" and dtype == torch.float16:  # CPU fp16 convolutions are emulated: nothing to learn
        dtype = torch.float32
        row["dtype"] = "fp32"
    if info.kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        row |= measure(build_row(mode, model, host, dtype, info, args), host, reference, dtype, info, args)
    except Exception as err:  # noqa: BLE001  (a mode that breaks is a row, not a crash)
        row |= {"status": "failed", "reason": f"{type(err).__name__}: {str(err).strip()[:300]}"}
    if info.kind == "cuda":
        row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if mode == "compile":
        torch.compiler.reset()
    gc.collect()
    return row


def load_models(args: argparse.Namespace, info: dev.DeviceInfo) -> dict[str, torch.nn.Module]:
    """name -> fp32 eval model on the device: the checkpoint, else random weights from each preset."""
    if args.checkpoint:
        model, meta = checkpoint.load_model(Path(args.checkpoint))
        args.imgsz = args.imgsz or meta["imgsz"]
        folder = Path(args.checkpoint).resolve()
        models = {f"{folder.parent.name}/{folder.name}": model}
    else:
        torch.manual_seed(0)
        models = {f"yolov5{name}" if name != "tiny" else name: build_model(preset(name, args.num_classes))
                  for name in args.models}
        args.imgsz = args.imgsz or 640
    return {name: model.to(info.device).eval() for name, model in models.items()}


def print_table(rows: list[dict]) -> None:
    """The rows as a fixed-width table; the reason follows rows that did not run."""
    print(f"{'model':<10} {'mode':<14} {'dtype':<5} {'batch':>5} {'status':<7} {'pre ms':>8} {'model ms':>9} "
          f"{'post ms':>8} {'total ms':>9} {'img/s':>9}")
    for row in rows:
        figures = " ".join(f"{'-' if row.get(key) is None else row[key]!s:>{width}}" for key, width in
                           (("pre_ms", 8), ("model_ms", 9), ("post_ms", 8), ("total_ms", 9), ("img_per_s", 9)))
        line = f"{row['model']:<10} {row['mode']:<14} {row['dtype']:<5} {row['batch']:>5} {row['status']:<7} {figures}"
        print(line + (f"  {row['reason']}" if row["reason"] else ""))


def goal_check(rows: list[dict], args: argparse.Namespace) -> dict | None:
    """Best yolov5s b1 latency and b32 throughput among the modes that passed, against the issue's goal."""
    if args.imgsz != 640 or args.source_size != [640, 640]:
        return None
    ok = [row for row in rows if row["model"] == "yolov5s" and row["status"] == "ok"]
    b1 = min((row["total_ms"] for row in ok if row["batch"] == 1), default=None)
    b32 = max((row["img_per_s"] for row in ok if row["batch"] == 32), default=None)
    if b1 is None or b32 is None:
        return None
    return {"b1_ms": b1, "b32_img_per_s": b32, "met": b1 <= 1.0 and b32 >= 5000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--models", nargs="+", default=["s", "n"], help="presets: n s m l x tiny")
    parser.add_argument("--checkpoint", help="a trained model folder instead of --models (imgsz from its meta)")
    parser.add_argument("--imgsz", type=int, help="model input size (default 640, or the checkpoint's)")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--source-size", type=int, nargs=2, default=[640, 640], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help="default: all (fp16 ones need CUDA)")
    parser.add_argument("--runs", type=int, help="timed passes per row (default 50 at batch 1, else 20)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--iou", type=float, default=0.45)
    parser.add_argument("--max-det", type=int, default=300)
    parser.add_argument("--max-candidates", type=int, default=100, help="boxes per image kept for NMS")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="or max-autotune-no-cudagraphs")
    parser.add_argument("--time-budget", type=float, default=270.0, help="seconds; later rows are skipped")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "gpu.json"))
    args = parser.parse_args(argv)
    start = time.monotonic()
    info = dev.resolve(args.device, amp=False)
    models = load_models(args, info)
    height, width = args.source_size
    rows = []
    with torch.inference_mode():
        for name, model in models.items():
            stats = model_info(model, args.imgsz)
            for batch in args.batch_sizes:
                host = torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(batch))
                host = host.pin_memory() if info.kind == "cuda" else host
                reference = model(preprocess(host, info.device, torch.float32, args.imgsz)).float()
                for mode in args.modes or MODES:
                    remaining_s = args.time_budget - (time.monotonic() - start)
                    reason = skip_reason(mode, args.modes is not None, info, remaining_s)
                    row = bench_row(mode, model, host, reference, info, args, reason)
                    rows.append({"model": name} | row | {"params_m": round(stats["params"] / 1e6, 3),
                                                         "gflops": round(stats["gflops"], 2)})
                    rows[-1].setdefault("peak_memory_mb", None)
    print_table(rows)
    settings = {
        "device": info.name, "models": list(models), "checkpoint": args.checkpoint, "imgsz": args.imgsz,
        "num_classes": args.num_classes if not args.checkpoint else None, "source_size_hw": [height, width],
        "batch_sizes": args.batch_sizes, "modes": args.modes or list(MODES), "runs": args.runs or "50 at b1, else 20",
        "warmup": args.warmup, "conf": args.conf, "iou": args.iou, "max_det": args.max_det,
        "max_candidates": args.max_candidates, "nms_kernel": NMS_KERNEL, "compile_mode": args.compile_mode,
        "tolerance_vs_fp32_eager": {DTYPE_NAMES[d]: tolerance(d, info) for d in TOLERANCE},
        "timing": "CUDA events per phase + synchronize" if info.kind == "cuda" else "perf_counter per phase",
        "statistic": "median per phase; p50/p95/p99 of the total", "time_budget_s": args.time_budget,
        "weights": "checkpoint" if args.checkpoint else "random (preset)",
        "scope": "pinned uint8 HWC host images -> upload, letterbox, /255 on device -> model -> top-k candidates + "
                 "class-aware NMS + boxes to source pixels on device (yolofps.runtime.ondevice)",
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    write_result(args.out, "gpu", settings, rows, goal_check=goal_check(rows, args),
                 goal="yolov5s from 640x640 uint8 host images, pre + model + NMS: b1 <= 1.0 ms, b32 >= 5000 img/s",
                 wall_s=round(time.monotonic() - start, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
