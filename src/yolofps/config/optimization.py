"""params sections of the optimization stages: `prune`, `distill`, `quantize`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from yolofps.config.common import _check


@dataclass(frozen=True)
class PruneConfig:
    """`prune` section: structured channel pruning (torch-pruning DepGraph) + fine-tuning per ratio."""

    ratios: tuple[float, ...]
    importance: Literal["l2", "group_norm"]
    round_to: int  # pruned widths stay multiples of this (SIMD / tensor-core friendly)
    iterative_steps: int
    finetune_epochs: int  # with the train section's hyperparameters (warm-up capped at 1 epoch)
    activation: Literal["keep", "silu", "relu"]  # of the pruned model (relu: fused Conv+ReLU in ORT)

    def __post_init__(self) -> None:
        _check(len(self.ratios) >= 1 and all(0 < r < 1 for r in self.ratios), "prune.ratios must be in (0, 1)")
        _check(len(set(self.ratios)) == len(self.ratios), "prune.ratios must not repeat")
        _check(self.round_to >= 1 and self.iterative_steps >= 1, "prune.round_to and prune.iterative_steps >= 1")
        _check(self.finetune_epochs >= 1, "prune.finetune_epochs must be >= 1")


@dataclass(frozen=True)
class DistillConfig:
    """`distill` section: a teacher (the baseline, a larger preset trained here, or a model folder) distilled into a
    student (the baseline pruned at `ratio`, or a preset) through neck-feature and logit terms."""

    teacher: str  # baseline | control | a preset (s, m, ...) trained in the stage | a model folder / yolov5 .pt
    teacher_epochs: int  # epochs of a preset teacher trained here (train settings otherwise)
    student: str  # "pruned" (the baseline pruned at `ratio`) or a preset name: n | s | tiny ...
    ratio: float  # prune ratio of the student; must be one of prune.ratios for the no-KD comparison
    epochs: int  # equal to prune.finetune_epochs makes the KD vs no-KD comparison fair
    feature_weight: float  # channel-wise KD of the neck outputs P3-P5, x the detection loss at the first step
    logit_weight: float  # logit KD (objectness, classes, boxes), x the detection loss at the first step
    temperature: float

    def __post_init__(self) -> None:
        _check(0 < self.ratio < 1, "distill.ratio must be in (0, 1)")
        _check(self.epochs >= 1 and self.teacher_epochs >= 1, "distill.epochs and distill.teacher_epochs must be >= 1")
        _check(self.feature_weight >= 0 and self.logit_weight >= 0 and self.temperature > 0,
               "distill.feature_weight >= 0, distill.logit_weight >= 0 and distill.temperature > 0")
        _check(bool(self.teacher), "distill.teacher must be baseline, a preset name or a model folder")


@dataclass(frozen=True)
class QatConfig:
    """`quantize.qat`: quantization-aware training (NNCF fake quantizers, the one training loop) for OpenVINO INT8."""

    when: Literal["auto", "always", "never"]  # auto: only when post-training INT8 loses more than max_map_drop
    epochs: int
    lr0: float  # AdamW, no warm-up: a QAT fine-tune starts from trained weights and calibrated ranges
    supervision: float  # the float model's logits as a second target, x the detection loss at the first step

    def __post_init__(self) -> None:
        _check(self.epochs >= 1 and self.lr0 > 0 and self.supervision >= 0,
               "quantize.qat.epochs >= 1, quantize.qat.lr0 > 0 and quantize.qat.supervision >= 0")


@dataclass(frozen=True)
class QuantizeConfig:
    """`quantize` section: ONNX Runtime static INT8 and OpenVINO INT8 (NNCF, accuracy control); fp16/bf16 on CUDA."""

    source: str  # which model to quantize: distill | train | prune-<ratio>
    calibration_images: int  # train images used to calibrate INT8 activation ranges
    per_channel: bool
    keep_head_float: bool  # the Detect decode math stays float (quantizing it destroys mAP)
    max_map_drop: float  # INT8 losing more mAP50-95 than this vs its fp32 source is rejected
    accuracy_control: bool  # OpenVINO INT8: NNCF reverts layers to float until the drop is within max_map_drop
    opset: int
    qat: QatConfig

    def __post_init__(self) -> None:
        _check(self.source in ("train", "distill") or self.source.startswith("prune-"),
               f"quantize.source must be train, distill or prune-<ratio>, got {self.source!r}")
        _check(self.calibration_images >= 1, "quantize.calibration_images must be >= 1")
        _check(0 <= self.max_map_drop <= 1, "quantize.max_map_drop must be in [0, 1]")
        _check(self.opset >= 17, "quantize.opset must be >= 17")
