"""Typed, frozen configuration loaded from params.yaml, one dataclass per section.

Unknown keys and wrong types are errors that name the key, the file and the accepted keys, so a typo in
params.yaml fails before any work starts. `-S key=value` overrides use the syntax of `dvc exp run -S`
(the value is parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from yolofps.errors import ConfigError

__all__ = ["AugmentConfig", "Config", "ConfigError", "DataConfig", "DistillConfig", "MLflowConfig", "PruneConfig",
           "QuantizeConfig", "TrainConfig", "TransformSpec", "load_config"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class TransformSpec:
    """One albumentations transform: its class name and keyword arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


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
    epochs: int = 30
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
        _check(self.epochs >= 1, "train.epochs must be >= 1")
        _check(self.imgsz >= 32 and self.imgsz % 32 == 0, "train.imgsz must be a positive multiple of 32")
        _check(self.batch >= 1, "train.batch must be >= 1")
        _check(self.workers >= 0, "train.workers must be >= 0")
        _check(self.max_boxes >= 1, "train.max_boxes must be >= 1")
        _check(self.lr0 > 0 and 0 < self.lrf <= 1, "train.lr0 must be > 0 and train.lrf in (0, 1]")
        _check(0 <= self.mosaic <= 1 and 0 <= self.fliplr <= 1, "train.mosaic and train.fliplr must be in [0, 1]")
        _check(self.close_mosaic >= 0 and self.patience >= 1, "train.close_mosaic >= 0 and train.patience >= 1")
        _check(0 <= self.conf < 1 and 0 < self.iou <= 1, "train.conf must be in [0, 1) and train.iou in (0, 1]")


@dataclass(frozen=True)
class PruneConfig:
    """`prune` section: structured channel pruning (torch-pruning DepGraph) + fine-tuning per ratio."""

    ratios: tuple[float, ...] = (0.3, 0.5)
    importance: Literal["l2", "group_norm"] = "l2"
    round_to: int = 8  # pruned widths stay multiples of this (SIMD / tensor-core friendly)
    iterative_steps: int = 1
    finetune_epochs: int = 10  # with the train section's hyperparameters (warm-up capped at 1 epoch)

    def __post_init__(self) -> None:
        _check(len(self.ratios) >= 1 and all(0 < r < 1 for r in self.ratios), "prune.ratios must be in (0, 1)")
        _check(len(set(self.ratios)) == len(self.ratios), "prune.ratios must not repeat")
        _check(self.round_to >= 1 and self.iterative_steps >= 1, "prune.round_to and prune.iterative_steps >= 1")
        _check(self.finetune_epochs >= 1, "prune.finetune_epochs must be >= 1")


@dataclass(frozen=True)
class DistillConfig:
    """`distill` section: teacher = the trained baseline; student = a pruned copy (or a preset) trained with KD."""

    student: str = "pruned"  # "pruned" (the baseline pruned at `ratio`) or a preset name: n | s | tiny ...
    ratio: float = 0.5  # prune ratio of the student; must be one of prune.ratios for the no-KD comparison
    epochs: int = 10  # equal to prune.finetune_epochs makes the KD vs no-KD comparison fair
    weight: float = 1.0  # distillation loss weight
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check(0 < self.ratio < 1, "distill.ratio must be in (0, 1)")
        _check(self.epochs >= 1 and self.weight >= 0 and self.temperature > 0,
               "distill.epochs >= 1, distill.weight >= 0 and distill.temperature > 0")


@dataclass(frozen=True)
class QuantizeConfig:
    """`quantize` section: ONNX Runtime fp32 and static INT8 (CPU); fp16/bf16 variants on CUDA."""

    source: str = "distill"  # which model to quantize: distill | train | prune-<ratio>
    calibration_images: int = 64  # train images used to calibrate INT8 activation ranges
    per_channel: bool = True
    keep_head_float: bool = True  # the Detect decode math stays float (quantizing it destroys mAP)
    max_map_drop: float = 0.015  # INT8 losing more mAP50-95 than this vs its fp32 source is rejected
    opset: int = 17

    def __post_init__(self) -> None:
        _check(self.calibration_images >= 1, "quantize.calibration_images must be >= 1")
        _check(0 <= self.max_map_drop <= 1, "quantize.max_map_drop must be in [0, 1]")
        _check(self.opset >= 17, "quantize.opset must be >= 17")


BENCH_MODES = ("eager", "channels_last", "trace", "compile", "onnxruntime", "fp16", "bf16", "cudagraph")


@dataclass(frozen=True)
class BenchConfig:
    """`bench` section: end-to-end latency, throughput and mAP of every variant, and the selection policy."""

    modes: tuple[str, ...] = ("eager", "channels_last", "trace", "compile", "onnxruntime", "fp16", "cudagraph")
    batch_sizes: tuple[int, ...] = (1, 8)  # throughput (img/s, end to end) at each
    warmup: int = 5
    runs: int = 50  # timed batch-1 runs per variant (p50/p95/p99)
    throughput_runs: int = 5  # timed batches per batch size
    threads: int = 0  # CPU threads for torch and onnxruntime; 0 = all cores
    conf: float = 0.25  # deployment post-processing settings (the timed NMS)
    iou: float = 0.45
    max_det: int = 300
    check_images: int = 8  # val images whose detections each variant must reproduce from its source model
    min_agreement: float = 0.95  # matched detections vs the source model (F1 at IoU 0.5); float variants
    min_agreement_int8: float = 0.6  # INT8 is judged by mAP; this only catches a broken model
    policy: Literal["fastest_within_drop", "pareto"] = "fastest_within_drop"
    max_map_drop: float = 0.015  # mAP50-95 a selectable variant may lose against the baseline

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modes) - set(BENCH_MODES))
        _check(not unknown, f"bench.modes: unknown {unknown}; choose from {list(BENCH_MODES)}")
        _check("eager" in self.modes, "bench.modes must include eager: the baseline is the model in fp32 eager")
        _check(len(self.batch_sizes) >= 1 and all(b >= 1 for b in self.batch_sizes), "bench.batch_sizes must be >= 1")
        _check(self.warmup >= 0 and self.runs >= 3 and self.throughput_runs >= 1,
               "bench.warmup >= 0, bench.runs >= 3 and bench.throughput_runs >= 1")
        _check(self.threads >= 0 and self.max_det >= 1 and self.check_images >= 1,
               "bench.threads >= 0, bench.max_det >= 1 and bench.check_images >= 1")
        _check(0 <= self.conf < 1 and 0 < self.iou <= 1, "bench.conf must be in [0, 1) and bench.iou in (0, 1]")
        _check(0 <= self.min_agreement <= 1 and 0 <= self.min_agreement_int8 <= 1,
               "bench.min_agreement and bench.min_agreement_int8 must be in [0, 1]")
        _check(0 <= self.max_map_drop <= 1, "bench.max_map_drop must be in [0, 1]")


@dataclass(frozen=True)
class GatesConfig:
    """`register.gates`: what a challenger must show against the current champion to be promoted."""

    map_tolerance: float = 0.005  # challenger mAP50-95 >= champion's - this
    min_fps_gain: float = 0.0  # challenger fps_b1 >= champion's x (1 + this), compared on the same device only
    min_map50_95: float = 0.0  # absolute floors, champion or not
    min_fps_b1: float = 0.0

    def __post_init__(self) -> None:
        _check(0 <= self.map_tolerance <= 1 and 0 <= self.min_map50_95 <= 1,
               "register.gates.map_tolerance and register.gates.min_map50_95 must be in [0, 1]")
        _check(self.min_fps_gain >= -1 and self.min_fps_b1 >= 0,
               "register.gates.min_fps_gain must be >= -1 and register.gates.min_fps_b1 >= 0")


@dataclass(frozen=True)
class RegisterConfig:
    """`register` section: the MLflow registered model, its aliases and the promotion gates."""

    model_name: str = "yolofps-detector"
    variant: str = "selected"  # "selected" (the bench stage's choice) or a variant name from metrics/bench.json
    auto_promote: bool = False  # run the gates after registering and move @champion when they pass
    retries: int = 3  # attempts at the tracking server before a clear error
    backoff_s: float = 2.0  # wait before retry n: backoff_s * 2**(n-1)
    gates: GatesConfig = field(default_factory=GatesConfig)

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.model_name)),
               "register.model_name must be letters, digits, '_', '.' or '-'")
        _check(self.retries >= 1 and self.backoff_s >= 0, "register.retries >= 1 and register.backoff_s >= 0")


@dataclass(frozen=True)
class MLflowConfig:
    """`mlflow` section: where runs are tracked (an embedded SQLite store by default, no server)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "yolofps"
    system_metrics: bool = True  # CPU/GPU/memory sampled by MLflow in the background


@dataclass(frozen=True)
class Config:
    """The whole params.yaml."""

    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "xla"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    def __post_init__(self) -> None:
        if self.distill.student == "pruned":
            _check(self.distill.ratio in self.prune.ratios,
                   f"distill.ratio {self.distill.ratio} must be one of prune.ratios {list(self.prune.ratios)}")


# --------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path = "params.yaml",
                overrides: typing.Sequence[str] | typing.Mapping[str, Any] = ()) -> Config:
    """Load params.yaml, apply overrides, and return a validated frozen Config.

    Overrides are `key=value` strings (values parsed as YAML, as `dvc exp run -S`) or a {dotted key: value} dict.
    """
    path = Path(path)
    raw = read_params(path)
    for key, value in normalize_overrides(overrides).items():
        set_dotted(raw, key, value, source=str(path))
    return from_dict(Config, raw, source=str(path))


def normalize_overrides(overrides: typing.Sequence[str] | typing.Mapping[str, Any]) -> dict[str, Any]:
    """Overrides as a {dotted key: value} dict, whichever form they came in."""
    if isinstance(overrides, typing.Mapping):
        return dict(overrides)
    return dict(parse_override(text) for text in overrides)


def read_params(path: Path) -> dict[str, Any]:
    """Read a params file as a plain dict, with a clear error for a missing file or bad YAML."""
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (pass --params PATH or run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value` (as `dvc exp run -S`) into the dotted key and the YAML-parsed value."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. -S data.num_train=100")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from None
    return key.strip(), parsed


def set_dotted(raw: dict[str, Any], key: str, value: Any, *, source: str) -> None:
    """Set `raw[a][b] = value` for key `a.b`; the key must name a field of the schema."""
    parts = key.split(".")
    schema: Any = Config
    node = raw
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(schema)}
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"override {key!r}: unknown key {part!r} in {where}; accepted: {sorted(names)}")
        ftype = _field_types(schema)[part]
        if i == len(parts) - 1:
            node[part] = value
        elif dataclasses.is_dataclass(ftype):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {'.'.join(parts[: i + 1])} must be a mapping, got {child!r}")
            node, schema = child, ftype
        else:
            raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a section ({source})")


def from_dict(cls: type, raw: Any, *, source: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(raw).__name__}")
    types_by_name = _field_types(cls)
    unknown = sorted(set(raw) - set(types_by_name))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]!s} in {where}; accepted keys: {sorted(types_by_name)}"
        )
    values = {name: _coerce(types_by_name[name], raw[name], source, prefix + name) for name in raw}
    try:
        return cls(**values)
    except ConfigError as err:  # value checks in __post_init__ don't know the file
        raise ConfigError(f"{source}: {err}") from None


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert lists to tuples and ints to floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key} must be {expected}, got {value!r} ({type(value).__name__})")

    if tp is TransformSpec:
        return _transform(value, source, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=key + ".")
    if origin is Literal:
        if value not in args:
            fail(f"one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None) and value is None:
                return None
        return _coerce(next(a for a in args if a is not type(None)), value, source, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail("a list")
        return tuple(_coerce(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config schema: unsupported annotation {tp!r} for {key}")


def _transform(value: Any, source: str, key: str) -> TransformSpec:
    """A transform is written as a one-key mapping: `- Name: {arg: value}`."""
    if isinstance(value, TransformSpec):
        return value
    if isinstance(value, str):
        return TransformSpec(value, {})
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"{source}: {key} must be a one-key mapping like `- HorizontalFlip: {{p: 0.5}}`, "
                          f"got {value!r}")
    (name, args), = value.items()
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ConfigError(f"{source}: {key}.{name} arguments must be a mapping, got {args!r}")
    return TransformSpec(str(name), dict(args))


def to_dict(cfg: Any) -> Any:
    """Plain-data view of a config (for logging, hashing and JSON)."""
    if isinstance(cfg, TransformSpec):
        return {cfg.name: dict(cfg.args)}
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg
