"""`fit` on 8 images, alone or as a torchrun rank; each rank writes its loss history and weights to argv[1].<rank>.

BatchNorm is replaced by Identity: with BN each process normalizes over its own share of the batch, a real and
expected difference from one process that would hide what this checks (gradient sync and scale).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from yolofps import device as dev
from yolofps.config import EvalConfig
from yolofps.data import synthetic
from yolofps.data.dataset import YoloDataset, build_loader
from yolofps.engine.datasets import Data
from yolofps.engine.objectives import DetectionObjective
from yolofps.engine.train import MemoryStore, TrainingJob, fit
from yolofps.model.loss import YOLOv5Loss
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: torchrun starts this file as a script
from configs import PLAIN_LOADER, loader_config, train_config  # noqa: E402

PLAIN = loader_config(PLAIN_LOADER)


def without_batchnorm(module: nn.Module) -> nn.Module:
    """The same network with every BatchNorm2d replaced by Identity (in place)."""
    for name, child in module.named_children():
        setattr(module, name, nn.Identity() if isinstance(child, nn.BatchNorm2d) else without_batchnorm(child))
    return module


def main(out: str, data_root: str) -> None:
    """Train 3 epochs of two steps (global batch 4); every rank saves history, initial and final weights."""
    info = dev.resolve("cpu")
    dev.seed_everything(0)
    data_yaml = synthetic.generate(Path(data_root), synthetic.SyntheticSpec(
        num_train=8, num_val=1, image_size=64, min_aspect=1.0, max_objects=2, background_fraction=0.0,
        min_visible=0.5), seed=3) if info.is_main else None
    dev.barrier(info)
    data_yaml = dev.broadcast_object(data_yaml, info)
    dataset = YoloDataset(data_yaml, "train", 64, PLAIN, train=True, seed=0)
    arch = preset("tiny", len(dataset.names))
    model = without_batchnorm(build_model(arch))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    loop = train_config({"epochs": 3, "batch": 4, "optim.optimizer": "SGD", "optim.lr0": 0.01, "optim.warmup_epochs": 0,
                         "optim.nominal_batch": 4, "optim.ema": False, "loader.close_mosaic": 0, "workers": 0})
    val = build_loader(YoloDataset(data_yaml, "val", 64, PLAIN, train=False), 1, shuffle=False, workers=0)
    job = TrainingJob("ddp", model, DetectionObjective(YOLOv5Loss(arch, image_size=64)),
                      Data(dataset, val, dataset.names), loop, EvalConfig(0.001, 0.6, 300, 0), info,
                      Path(f"{out}.checkpoints"), meta={"names": list(dataset.names), "imgsz": 64},
                      store=MemoryStore())  # BatchNorm removed: not a loadable artifact
    result = fit(job)  # trains `model` in place; rank 0 evaluates and saves, only it gets a result
    torch.save({"history": result.state.history if result else [], "weights": model.state_dict(), "initial": initial,
                "has_result": result is not None}, f"{out}.{info.rank}")
    dev.shutdown(info)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
