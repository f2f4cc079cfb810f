"""params sections of the data side and of training: `data`, `augment`, `train`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from yolofps.config.common import TransformSpec, _check


@dataclass(frozen=True)
class DataConfig:
    """`data` section: where the data set comes from and how the synthetic demo set looks."""

    source: str  # "synthetic", a YOLO data.yaml, or a COCO instances JSON
    num_train: int
    num_val: int
    image_size: int  # longest side of synthetic images, pixels
    min_aspect: float  # synthetic image height/width drawn from [min_aspect, 1]
    max_objects: int
    background_fraction: float  # share of synthetic images with no objects
    min_visible: float  # synthetic objects less visible than this (occlusion) get no label
    val_fraction: float  # split used when the source has no val split (a single COCO JSON)
    clip_tolerance: float  # boxes this far (normalized) outside the image are clipped, else dropped

    def __post_init__(self) -> None:
        _check(self.num_train >= 1 and self.num_val >= 1, "data.num_train and data.num_val must be >= 1")
        _check(self.image_size >= 32, "data.image_size must be >= 32")
        _check(0 < self.min_aspect <= 1, "data.min_aspect must be in (0, 1]")
        _check(self.max_objects >= 1, "data.max_objects must be >= 1")
        _check(0 <= self.background_fraction <= 1, "data.background_fraction must be in [0, 1]")
        _check(0 <= self.min_visible < 1, "data.min_visible must be in [0, 1)")
        _check(0 < self.val_fraction < 1, "data.val_fraction must be in (0, 1)")
        _check(0 <= self.clip_tolerance < 0.5, "data.clip_tolerance must be in [0, 0.5)")


@dataclass(frozen=True)
class AugmentConfig:
    """`augment` section: the bbox-aware albumentations pipeline and how many offline copies to write."""

    copies: int  # augmented copies of each train image written next to the original
    min_visibility: float  # boxes keeping less of their area than this are dropped
    min_area: float  # boxes smaller than this (pixels^2) after augmentation are dropped
    transforms: tuple[TransformSpec, ...]

    def __post_init__(self) -> None:
        _check(self.copies >= 0, "augment.copies must be >= 0")
        _check(0 <= self.min_visibility <= 1, "augment.min_visibility must be in [0, 1]")
        _check(self.min_area >= 0, "augment.min_area must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """`train.optim`: optimizer and schedule (values after YOLOv5 hyp.scratch-low)."""

    optimizer: Literal["auto", "SGD", "AdamW"]  # auto: ultralytics' rule (AdamW for short runs), lr0/momentum with it
    lr0: float  # ignored with optimizer: auto (it picks lr0 and momentum)
    lrf: float  # final lr
    cos_lr: bool
    momentum: float
    weight_decay: float
    warmup_epochs: float
    warmup_momentum: float
    warmup_bias_lr: float
    nominal_batch: int  # gradients accumulate up to this many images per step (yolov5's nbs)
    ema: bool
    grad_clip: float

    def __post_init__(self) -> None:
        _check(self.lr0 > 0, f"train.optim.lr0 must be > 0, got {self.lr0}")
        _check(0 < self.lrf <= 1, f"train.optim.lrf must be in (0, 1], got {self.lrf}")
        _check(self.nominal_batch >= 1, "train.optim.nominal_batch must be >= 1")
        for name in ("momentum", "warmup_momentum"):
            _check(0 <= getattr(self, name) < 1, f"train.optim.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "warmup_epochs", "warmup_bias_lr", "grad_clip"):
            _check(getattr(self, name) >= 0, f"train.optim.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class LossConfig:
    """`train.loss`: YOLOv5 loss gains and the anchor-matching threshold."""

    box: float
    obj: float
    cls: float
    anchor_t: float  # a target matches an anchor whose width and height ratios are all below this

    def __post_init__(self) -> None:
        for name in ("box", "obj", "cls"):
            _check(getattr(self, name) >= 0, f"train.loss.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.anchor_t > 0, f"train.loss.anchor_t must be > 0, got {self.anchor_t}")


@dataclass(frozen=True)
class LoaderConfig:
    """`train.loader`: padded targets and train-time augmentation (yolov5's order: mosaic -> affine -> HSV -> flips)."""

    max_boxes: int  # targets padded to this many per image; an image with more is refused, mosaics are cut
    mosaic: float  # probability of a 4-image mosaic
    close_mosaic: int  # mosaic off for the last N epochs
    hsv_h: float  # HSV gains: each channel times a random factor in [1 - g, 1 + g]
    hsv_s: float
    hsv_v: float
    translate: float  # random affine: fraction of the image
    scale: float  # random affine: zoom in [1 - scale, 1 + scale]
    degrees: float
    shear: float
    fliplr: float
    flipud: float
    min_visibility: float  # augmented boxes keeping less of their area than this are dropped
    min_box_size: float  # augmented boxes narrower or shorter than this many pixels are dropped
    online_transforms: bool  # also apply `augment.transforms` at train time (offline copies already exist)

    def __post_init__(self) -> None:
        _check(self.max_boxes >= 1, f"train.loader.max_boxes must be >= 1, got {self.max_boxes}")
        _check(self.close_mosaic >= 0, f"train.loader.close_mosaic must be >= 0, got {self.close_mosaic}")
        for name in ("mosaic", "hsv_h", "hsv_s", "hsv_v", "fliplr", "flipud", "min_visibility"):
            _check(0 <= getattr(self, name) <= 1, f"train.loader.{name} must be in [0, 1], got {getattr(self, name)}")
        _check(0 <= self.scale < 1, f"train.loader.scale must be in [0, 1), got {self.scale}")
        _check(0 <= self.translate <= 0.5, f"train.loader.translate must be in [0, 0.5], got {self.translate}")
        for name in ("degrees", "shear", "min_box_size"):
            _check(getattr(self, name) >= 0, f"train.loader.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class DistributedConfig:
    """`train.distributed`: several processes, started by torchrun (torch.distributed.run)."""

    nproc_per_node: int  # processes per machine (one per GPU); on XLA > 1 means every local core
    nnodes: int  # machines; > 1 needs rdzv_endpoint
    rdzv_endpoint: str  # host:port of the c10d rendezvous (any one node), the same on every node
    rdzv_id: str  # rendezvous (job) id, the same on every node
    sync_bn: bool  # SyncBatchNorm across processes (CUDA only; torch has no CPU SyncBatchNorm)

    @property
    def processes(self) -> int:
        return self.nproc_per_node * self.nnodes

    def __post_init__(self) -> None:
        _check(self.nproc_per_node >= 1 and self.nnodes >= 1,
               "train.distributed.nproc_per_node and train.distributed.nnodes must be >= 1")
        _check(self.nnodes == 1 or ":" in self.rdzv_endpoint,
               "train.distributed.rdzv_endpoint must be host:port when train.distributed.nnodes > 1")


@dataclass(frozen=True)
class TrainConfig:
    """`train` section: model, schedule length and batch, with the optimizer, loss, loader and processes below it."""

    model: Literal["n", "s", "m", "l", "x", "tiny"]
    # start from these weights instead of `model` from scratch: an official yolov5 .pt (imported safely) or a
    # yolofps model folder, under weights/ (the folder the DVC train stage depends on); "" = from scratch
    weights: str
    epochs: int  # 0 (with weights): evaluate the imported model as the baseline, untrained
    imgsz: int  # fixed square input (static shapes: XLA compiles once), multiple of 32
    batch: int  # the global batch: split evenly over train.distributed processes
    workers: int  # data loader processes
    resume: bool  # continue from checkpoints/train even if the last run finished
    patience: int  # early stop after this many epochs without improvement
    amp: bool  # autocast on CUDA/XLA (bf16 where supported, else fp16 with a grad scaler)
    compile: bool  # torch.compile the model for training (CPU/CUDA; XLA compiles its own graphs)
    time_limit_min: float  # stop after the step that crosses this many minutes, keep the checkpoint; 0
    optim: OptimConfig
    loss: LossConfig
    loader: LoaderConfig
    distributed: DistributedConfig

    def __post_init__(self) -> None:
        _check(self.epochs >= 1 or (self.epochs == 0 and bool(self.weights)),
               "train.epochs must be >= 1 (0 only with train.weights: the imported model is the baseline as it is)")
        parts = Path(self.weights).parts
        _check(not self.weights or (len(parts) > 1 and parts[0] == "weights" and ".." not in parts),
               f"train.weights must be a path under weights/ (the folder the DVC train stage depends on, so a new "
               f"file reruns training), e.g. weights/yolov5s.pt; got {self.weights!r}")
        _check(self.imgsz >= 32 and self.imgsz % 32 == 0, f"train.imgsz must be a positive multiple of 32, got "
                                                          f"{self.imgsz}")
        _check(self.batch >= 1 and self.workers >= 0, "train.batch must be >= 1 and train.workers >= 0")
        _check(self.patience >= 1, "train.patience must be >= 1")
        _check(self.time_limit_min >= 0, "train.time_limit_min must be >= 0 (0 = no limit)")
        _check(self.batch % self.distributed.processes == 0, "train.batch is the global batch: it must divide "
               "evenly by train.distributed.nproc_per_node * train.distributed.nnodes")

    def finetune(self, epochs: int) -> TrainConfig:
        """These hyperparameters for a short fine-tune: `epochs`, warm-up capped at 1 epoch, mosaic closing halved."""
        optim = dataclasses.replace(self.optim, warmup_epochs=min(self.optim.warmup_epochs, 1.0))
        loader = dataclasses.replace(self.loader, close_mosaic=min(self.loader.close_mosaic, epochs // 2))
        return dataclasses.replace(self, epochs=epochs, resume=False, optim=optim, loader=loader)


@dataclass(frozen=True)
class EvalConfig:
    """`eval` section: how every stage scores a model on the val split (ultralytics' val settings)."""

    conf: float  # score threshold before NMS (low: mAP integrates the whole precision-recall curve)
    iou: float  # NMS IoU threshold
    max_det: int  # detections kept per image
    sample_images: int  # val images drawn with predictions (plots/train/val_predictions.png)

    def __post_init__(self) -> None:
        _check(0 <= self.conf < 1 and 0 < self.iou <= 1, "eval.conf must be in [0, 1) and eval.iou in (0, 1]")
        _check(self.max_det >= 1 and self.sample_images >= 0, "eval.max_det >= 1 and eval.sample_images >= 0")
