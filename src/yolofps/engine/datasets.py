"""The data of a training job (the augmented train split and the val loader) and how a model is scored on it.

Every stage scores with the `eval` section's settings through the one evaluation path (`engine.predict`): a torch
model after every epoch, any runtime pipeline (a bench row, a quantized model) the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from yolofps import device as dev
from yolofps.config import Config, EvalConfig, TrainConfig
from yolofps.data.dataset import YoloDataset, build_loader
from yolofps.engine.evaluate import EvalResult
from yolofps.engine.predict import Predictions, evaluate_model, evaluate_pipeline
from yolofps.paths import Paths
from yolofps.runtime import Deployment, Pipeline


@dataclass
class Data:
    """Train and val datasets plus the val loader of one job."""

    train_set: YoloDataset
    val_loader: Any
    names: tuple[str, ...]


def load_data(cfg: Config, paths: Paths, train: TrainConfig) -> Data:
    """Datasets for training on the augmented data set and evaluating on its val split."""
    data_yaml = paths.augmented_data / "data.yaml"
    extra = cfg.augment.transforms if train.loader.online_transforms else ()
    train_set = YoloDataset(data_yaml, "train", train.imgsz, train.loader, train=True, extra_transforms=extra,
                            seed=cfg.seed)
    val_set = YoloDataset(data_yaml, "val", train.imgsz, train.loader, train=False)
    return Data(train_set, build_loader(val_set, train.batch, shuffle=False, workers=0), train_set.names)


def evaluate(model: nn.Module, data: Data, info: dev.DeviceInfo,
             settings: EvalConfig) -> tuple[EvalResult, Predictions]:
    """COCO evaluation with the `eval` section's settings (on the host when training on XLA)."""
    model, info = dev.host_model(model, info)
    return evaluate_model(model, data.val_loader, info, data.names, conf=settings.conf, iou=settings.iou,
                          max_det=settings.max_det)


def evaluate_variant(pipeline: Pipeline, data: Data, evaluation: EvalConfig) -> tuple[EvalResult, Predictions]:
    """COCO evaluation of any runtime pipeline (a bench row, a quantized model) at the `eval` section's settings."""
    settings = Deployment.evaluation(pipeline.deployment.imgsz, evaluation.conf, evaluation.iou, evaluation.max_det)
    return evaluate_pipeline(pipeline.with_deployment(settings), data.val_loader, data.names)
