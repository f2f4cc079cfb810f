"""Train-step throughput: the full step (real loader + augmentation + loss) vs the model-only step.

    python benchmarks/train_throughput.py [--model n] [--imgsz 320] [--batch 16] [--steps 12] [--workers 2]

Three variants, measured side by side in one run on the same model and optimizer settings:
  model_only   random tensors, loss = sum of outputs (forward + backward + SGD step)
  model_loss   random tensors, the real YOLOv5 loss on fixed padded targets
  full         the real train loader (mosaic + affine + HSV + flips, `workers` processes) + the real loss
The goal (issue 3) is full <= 1.10 x model_only per step. JSON with the environment goes to
benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from yolofps.bench.environment import write_result
from yolofps.config import load_config
from yolofps.data import synthetic
from yolofps.data.dataset import YoloDataset, build_loader
from yolofps.engine.optim import build_optimizer
from yolofps.model.loss import YOLOv5Loss
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def time_steps(model, optimizer, next_batch, step_loss, steps: int, warmup: int = 2) -> float:
    """Median seconds per step over `steps` after `warmup`; the clock includes `next_batch()` (the loader's cost)."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        images, targets, mask = next_batch()
        images = images.float().div(255) if images.dtype == torch.uint8 else images
        loss = step_loss(model(images), targets, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def loader_batches(loader):
    """(images, targets, mask) from the real loader, forever."""
    while True:
        for images, targets, mask, _ in loader:
            yield images, targets, mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="n")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        spec = synthetic.SyntheticSpec(num_train=args.images, num_val=1, image_size=args.imgsz, min_aspect=0.75,
                                       max_objects=6, background_fraction=0.1, min_visible=0.3)
        data_yaml = synthetic.generate(Path(tmp), spec, seed=0)
        train = load_config(PROJECT_ROOT / "params.yaml", {"train.batch": args.batch, "train.epochs": 1,
                                                          "train.optim.optimizer": "SGD"}).train
        dataset = YoloDataset(data_yaml, "train", args.imgsz, train.loader, train=True, seed=0)
        loader = build_loader(dataset, args.batch, shuffle=True, workers=args.workers, seed=0, drop_last=True)
        arch = preset(args.model, len(dataset.names))
        model = build_model(arch).train()
        optimizer = build_optimizer(model, train)
        loss_fn = YOLOv5Loss(arch, image_size=args.imgsz)
        images, targets, mask, _ = next(iter(loader))  # real padded targets for the model_loss variant
        random_images = torch.rand(args.batch, 3, args.imgsz, args.imgsz)
        fixed = lambda: (random_images, targets, mask)  # noqa: E731  (no loader cost)
        real = loader_batches(loader)
        detection = lambda out, t, m: loss_fn(out, t, m)["loss"]  # noqa: E731
        results = {
            # "* 0": the full backward still runs, but the weights stay finite (NaNs would change the timing)
            "model_only": time_steps(model, optimizer, fixed, lambda out, t, m: sum(o.sum() for o in out) * 0,
                                     args.steps),
            "model_loss": time_steps(model, optimizer, fixed, detection, args.steps),
            "full": time_steps(model, optimizer, lambda: next(real), detection, args.steps),
        }
    base = results["model_only"]
    rows = [{"variant": name, "s_per_step": round(s, 4), "img_per_s": round(args.batch / s, 2),
             "overhead_vs_model_only": round(s / base - 1, 4)} for name, s in results.items()]
    print(f"{'variant':<12} {'s/step':>8} {'img/s':>8} {'overhead':>9}")
    for row in rows:
        print(f"{row['variant']:<12} {row['s_per_step']:>8} {row['img_per_s']:>8} "
              f"{row['overhead_vs_model_only']:>9.1%}")
    settings = {"model": args.model, "imgsz": args.imgsz, "batch": args.batch, "dtype": "fp32", "device": "cpu",
                "workers": args.workers, "steps": args.steps, "statistic": "median",
                "augmentation": "params.yaml train.loader (mosaic, affine, HSV, flips)"}
    write_result(args.out, "train_throughput", settings, rows, goal="full <= 1.10 x model_only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
