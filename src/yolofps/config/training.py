"""params sections of the data side and of training: `data`, `augment`, `train`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from yolofps.config.common import TransformSpec, _check


@dataclass(frozen=True)
class DataConfig:
    """`data` section: where the data set comes from and how the synthetic demo set looks."""

    source: str = "synthetic"  # "synthetic", a YOLO data.yaml, or a COCO instances JSON
    num_train: int = 200
    num_val: int = 50
    image_size: int = 320  # longest side of synthetic images, pixels
    min_aspect: float = 0.75  # synthetic image height/width drawn from [min_aspect, 1]
    max_objects: int = 6
    background_fraction: float = 0.1  # share of synthetic images with no objects
    min_visible: float = 0.3  # synthetic objects less visible than this (occlusion) get no label
    val_fraction: float = 0.2  # split used when the source has no val split (a single COCO JSON)
    clip_tolerance: float = 0.02  # boxes this far (normalized) outside the image are clipped, else dropped

    def __post_init__(self) -> None:
        _check(self.num_train >= 1 and self.num_val >= 1, "data.num_train and data.num_val must be >= 1")
        _check(self.image_size >= 32, "data.image_size must be >= 32")
        _check(0 < self.min_aspect <= 1, "data.min_aspect must be in (0, 1]")
        _check(self.max_objects >= 1, "data.max_objects must be >= 1")
        _check(0 <= self.background_fraction <= 1, "data.background_fraction must be in [0, 1]")
        _check(0 <= self.min_visible < 1, "data.min_visible must be in [0, 1)")
        _check(0 < self.val_fraction < 1, "data.val_fraction must be in (0, 1)")
        _check(0 <= self.clip_tolerance < 0.5, "data.clip_tolerance must be in [0, 0.5)")


DEFAULT_TRANSFORMS = (
    TransformSpec("HueSaturationValue", {"hue_shift_limit": 4, "sat_shift_limit": 70, "val_shift_limit": 40, "p": 0.8}),
    TransformSpec("HorizontalFlip", {"p": 0.5}),
    TransformSpec("Affine", {"scale": [0.5, 1.5], "translate_percent": [-0.1, 0.1], "fill": 114, "p": 0.8}),
    TransformSpec("RandomBrightnessContrast", {"p": 0.2}),
    TransformSpec("Blur", {"blur_limit": 3, "p": 0.05}),
    TransformSpec("GaussNoise", {"std_range": [0.02, 0.08], "p": 0.05}),
)


@dataclass(frozen=True)
class AugmentConfig:
    """`augment` section: the bbox-aware albumentations pipeline and how many offline copies to write."""

    copies: int = 1  # augmented copies of each train image written next to the original
    min_visibility: float = 0.3  # boxes keeping less of their area than this are dropped
    min_area: float = 4.0  # boxes smaller than this (pixels^2) after augmentation are dropped
    transforms: tuple[TransformSpec, ...] = DEFAULT_TRANSFORMS

    def __post_init__(self) -> None:
        _check(self.copies >= 0, "augment.copies must be >= 0")
        _check(0 <= self.min_visibility <= 1, "augment.min_visibility must be in [0, 1]")
        _check(self.min_area >= 0, "augment.min_area must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """`train` section: model preset, schedule and hyperparameters (defaults from YOLOv5 hyp.scratch-low)."""

    model: Literal["n", "s", "m", "l", "x", "tiny"] = "n"
    # start from these weights instead of `model` from scratch: an official yolov5 .pt (imported safely) or a
    # yolofps model folder, under weights/ (the folder the DVC train stage depends on); "" = from scratch
    weights: str = ""
    epochs: int = 30  # 0 (with weights): evaluate the imported model as the baseline, untrained
    imgsz: int = 320  # fixed square input (static shapes: XLA compiles once), multiple of 32
    batch: int = 16
    workers: int = 2  # data loader processes
    resume: bool = False  # continue from checkpoints/train even if the last run finished
    max_boxes: int = 64  # targets padded to this many per image
    # optimizer and schedule
    optimizer: Literal["auto", "SGD", "AdamW"] = "auto"  # auto: ultralytics' rule (AdamW for short runs)
    lr0: float = 0.01  # ignored with optimizer: auto (it picks lr0 and momentum)
    lrf: float = 0.01  # final lr = lr0 * lrf
    cos_lr: bool = False
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    nominal_batch: int = 64  # gradients accumulate up to this many images per step (yolov5's nbs)
    ema: bool = True
    grad_clip: float = 10.0
    patience: int = 100  # early stop after this many epochs without improvement
    amp: bool = True  # autocast on CUDA/XLA (bf16 where supported, else fp16 with a grad scaler)
    compile: bool = False  # torch.compile the model for training (CPU/CUDA; XLA compiles its own graphs)
    time_limit_min: float = 0.0  # stop after the step that crosses this many minutes, keep the checkpoint; 0 = none
    # several processes: torchrun (torch.distributed.run) starts them; `batch` is the global batch, split evenly
    nproc_per_node: int = 1  # processes per machine (one per GPU); on XLA > 1 means every local core
    nnodes: int = 1  # machines; > 1 needs rdzv_endpoint
    rdzv_endpoint: str = ""  # host:port of the c10d rendezvous (any one node), the same on every node
    rdzv_id: str = "yolofps"  # rendezvous (job) id, the same on every node
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only; torch has no CPU SyncBatchNorm)
    # loss gains
    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    anchor_t: float = 4.0
    # train-time augmentation (the albumentations list from `augment.transforms` runs as well)
    mosaic: float = 1.0
    close_mosaic: int = 5  # turn mosaic off for the last N epochs
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    translate: float = 0.1
    scale: float = 0.5
    fliplr: float = 0.5
    online_transforms: bool = False  # also apply `augment.transforms` online (offline copies already exist)
    # evaluation (ultralytics val settings)
    conf: float = 0.001
    iou: float = 0.6
    max_det: int = 300
    sample_images: int = 16  # val images drawn with predictions

    def __post_init__(self) -> None:
        _check(self.epochs >= 1 or (self.epochs == 0 and bool(self.weights)),
               "train.epochs must be >= 1 (0 only with train.weights: the imported model is the baseline as it is)")
        parts = Path(self.weights).parts
        _check(not self.weights or (len(parts) > 1 and parts[0] == "weights" and ".." not in parts),
               f"train.weights must be a path under weights/ (the folder the DVC train stage depends on, so a new "
               f"file reruns training), e.g. weights/yolov5s.pt; got {self.weights!r}")
        _check(self.imgsz >= 32 and self.imgsz % 32 == 0, "train.imgsz must be a positive multiple of 32")
        _check(self.batch >= 1, "train.batch must be >= 1")
        _check(self.workers >= 0, "train.workers must be >= 0")
        _check(self.max_boxes >= 1, "train.max_boxes must be >= 1")
        _check(self.lr0 > 0 and 0 < self.lrf <= 1, "train.lr0 must be > 0 and train.lrf in (0, 1]")
        _check(0 <= self.mosaic <= 1 and 0 <= self.fliplr <= 1, "train.mosaic and train.fliplr must be in [0, 1]")
        _check(self.close_mosaic >= 0 and self.patience >= 1, "train.close_mosaic >= 0 and train.patience >= 1")
        _check(0 <= self.conf < 1 and 0 < self.iou <= 1, "train.conf must be in [0, 1) and train.iou in (0, 1]")
        _check(self.time_limit_min >= 0, "train.time_limit_min must be >= 0 (0 = no limit)")
        _check(self.nproc_per_node >= 1 and self.nnodes >= 1, "train.nproc_per_node and train.nnodes must be >= 1")
        _check(self.nnodes == 1 or ":" in self.rdzv_endpoint,
               "train.rdzv_endpoint must be host:port when train.nnodes > 1")
        _check(self.batch % (self.nproc_per_node * self.nnodes) == 0,
               "train.batch is the global batch: it must divide evenly by nproc_per_node * nnodes")
        _check(self.nominal_batch >= 1 and self.max_det >= 1 and self.sample_images >= 0,
               "train.nominal_batch >= 1, train.max_det >= 1 and train.sample_images >= 0")
        _check(0 <= self.momentum < 1 and 0 <= self.warmup_momentum < 1, "train.momentum and train.warmup_momentum "
               "must be in [0, 1)")
        _check(self.weight_decay >= 0 and self.warmup_epochs >= 0 and self.grad_clip >= 0,
               "train.weight_decay, train.warmup_epochs and train.grad_clip must be >= 0")
        _check(min(self.box, self.obj, self.cls) >= 0 and self.anchor_t > 0,
               "train.box, train.obj and train.cls must be >= 0 and train.anchor_t > 0")
