"""What each CPU deployment lever is worth, measured one at a time, side by side in one run (batch 1).

    python benchmarks/deployment_levers.py [--baseline models/train/best] [--pruned models/prune/prune-0.5]
                                           [--images data/prepared/images/val] [--runs 60]

Model rows: the baseline and the pruned model as ONNX Runtime fp32 sessions (no spinning, as the bench stage
runs them), each with SiLU and with ReLU (the same weights, the activation swapped: a speed figure only, its
accuracy is the prune stage's business), with all cores or one intra-op thread, and with the batch dimension
fixed to 1 (what `runtime.backends.OrtBackend` does now) or left dynamic (what it did before).
Pre/post rows: the bench stage's pre-processing (decode, RGB, letterbox, CHW float) and deployment NMS as they
are now, and as they were (a numpy channel flip; torch NMS + box scaling, which the mAP evaluation used before the
one runtime).
End-to-end rows: the bench stage's whole path (decode to NMS) for the baseline's and the pruned model's ONNX
Runtime fp32 sessions as the pipeline made them, with all cores and with one thread: a second, longer run of the
headline ratio, separate from the bench stage's.
All rows are timed in interleaved rounds on the same images; the median is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from yolofps import device as dev
from yolofps.bench import measure
from yolofps.bench.environment import write_result
from yolofps.data import formats
from yolofps.data.dataset import letterbox
from yolofps.engine import checkpoint
from yolofps.model.postprocess import non_max_suppression, scale_boxes
from yolofps.model.yolo import YOLOv5, build_model
from yolofps.optimize.export import export_onnx
from yolofps.runtime import Deployment, Pipeline, host
from yolofps.runtime.backends import OrtBackend

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def with_activation(model: YOLOv5, activation: str) -> YOLOv5:
    """The same weights behind a spec with `activation` (activations hold no weights)."""
    swapped = build_model(dataclasses.replace(model.spec, activation=activation))
    swapped.load_state_dict(model.state_dict(), strict=True)
    return swapped.eval()


def model_rows(models: dict[str, Path], imgsz: int, tmp: Path) -> dict[str, Callable[[np.ndarray], object]]:
    """name -> ORT call on a float [1, 3, S, S] array, per model x activation x intra-op threads x batch shape."""
    rows = {}
    for name, folder in models.items():
        model, _ = checkpoint.load_model(folder)
        for activation in ("silu", "relu"):
            onnx = export_onnx(with_activation(model, activation), tmp / f"{name}-{activation}.onnx", imgsz)
            for threads in (0, 1):
                detector = OrtBackend(onnx, threads=threads or None)
                label = f"{name}/{activation}/{'1 thread' if threads else 'all cores'}"
                for shape, session in (("batch 1", detector.session_for(1)), ("dynamic", detector.session)):
                    rows[f"{label}/{shape}"] = lambda x, s=session, i=detector.input_name: s.run(None, {i: x})
    return rows


def old_preprocess(path: Path, imgsz: int, info: dev.DeviceInfo) -> torch.Tensor:
    """The pre-processing before this change: a numpy channel flip (a 0.3 ms copy at 320 px)."""
    rgb = np.ascontiguousarray(cv2.imread(str(path))[:, :, ::-1])
    boxed, _, _ = letterbox(rgb, imgsz)
    return dev.to_device(torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1)[None])), info)


def old_postprocess(predictions: torch.Tensor, metas: list[host.Letterboxed], deployment: Deployment
                    ) -> list[np.ndarray]:
    """The post-processing before this change: torch NMS (the evaluation's) and torch box scaling."""
    out = []
    size = (deployment.imgsz, deployment.imgsz)
    for dets, meta in zip(non_max_suppression(predictions, deployment.conf, deployment.iou,
                                              max_det=deployment.max_det), metas):
        dets[:, :4] = scale_boxes(dets[:, :4], size, meta.orig_shape, ((meta.ratio, meta.ratio), meta.pad))
        out.append(dets.numpy())
    return out


def interleaved(calls: dict[str, Callable[[int], object]], runs: int, count: int) -> dict[str, float]:
    """Median ms of each call over `runs` interleaved rounds (5 warm-up rounds first), cycling `count` inputs."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(runs + 5):
        for name, call in calls.items():
            start = time.perf_counter()
            call(i % count)
            if i >= 5:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: round(float(np.median(t)), 3) for name, t in times.items()}


def end_to_end(models: dict[str, Path], imgsz: int, tmp: Path, paths: list[Path], deployment: Deployment,
               info: dev.DeviceInfo, runs: int) -> dict[str, float]:
    """p50 ms of the bench stage's whole path for each model as built (ONNX fp32), all cores and one thread."""
    detectors = {}
    for name, folder in models.items():
        model, _ = checkpoint.load_model(folder)
        onnx = export_onnx(model, tmp / f"{name}-as-built.onnx", imgsz)
        for threads in (0, 1):
            label = f"end to end/{name}/{'1 thread' if threads else 'all cores'}"
            detectors[label] = Pipeline(OrtBackend(onnx, threads=threads or None), deployment, info)
    timings, _ = measure.time_interleaved(detectors, measure.batches_of(paths, 1), warmup=5, runs=runs)
    return {name: t.latency()["p50"] for name, t in timings.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=str(PROJECT_ROOT / "models" / "train" / "best"))
    parser.add_argument("--pruned", default=str(PROJECT_ROOT / "models" / "prune" / "prune-0.5"))
    parser.add_argument("--images", default=str(PROJECT_ROOT / "data" / "prepared" / "images" / "val"))
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "deployment_levers.json"))
    args = parser.parse_args(argv)
    info = dev.resolve("cpu", amp=False)
    _, meta = checkpoint.load_model(args.baseline)
    imgsz = meta["imgsz"]
    deployment = Deployment(imgsz)
    paths = formats.list_images(Path(args.images))[:20]  # 20 images cycled: varied shapes, short rounds
    folders = {"baseline": Path(args.baseline), "pruned": Path(args.pruned)}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        detectors = model_rows(folders, imgsz, Path(tmp))
        inputs = [host.preprocess([p], imgsz, info) for p in paths]
        arrays = [images.numpy() for images, _ in inputs]
        model_ms = interleaved({name: (lambda i, run=run: run(arrays[i])) for name, run in detectors.items()},
                               args.runs, len(paths))
        reference = next(iter(detectors.values()))
        predictions = [torch.from_numpy(reference(x)[0]) for x in arrays]
        steps = interleaved({
            "pre/now": lambda i: host.preprocess([paths[i]], imgsz, info),
            "pre/before": lambda i: old_preprocess(paths[i], imgsz, info),
            "post/now": lambda i: host.postprocess(predictions[i], inputs[i][1], deployment),
            "post/before": lambda i: old_postprocess(predictions[i], inputs[i][1], deployment),
        }, args.runs, len(paths))
        e2e = end_to_end(folders, imgsz, Path(tmp), paths, deployment, info, args.runs * 2)
    rows = [{"row": name, "latency_ms_p50": ms} for name, ms in (model_ms | steps | e2e).items()]
    best_baseline = min(ms for name, ms in e2e.items() if "/baseline/" in name)
    for row in rows:
        if row["row"].startswith("end to end/"):
            row["speedup_vs_fastest_baseline"] = round(best_baseline / row["latency_ms_p50"], 3)
    print(f"{'row':<36} {'p50 ms':>8} {'x baseline':>10}")
    for row in rows:
        print(f"{row['row']:<36} {row['latency_ms_p50']:>8} {row.get('speedup_vs_fastest_baseline', ''):>10}")
    settings = {"batch": 1, "imgsz": imgsz, "runs": args.runs, "images": len(paths), "runtime": "onnxruntime fp32",
                "spinning": False, "baseline": args.baseline, "pruned": args.pruned,
                "statistic": "median of interleaved rounds", "nms": dataclasses.asdict(deployment)}
    write_result(args.out, "deployment_levers", settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
