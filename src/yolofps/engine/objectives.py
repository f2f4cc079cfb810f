"""Training objectives, side by side: what `fit` optimizes for plain training, distillation and QAT.

An objective is a callable `(model, images, targets, mask) -> dict` whose "loss" entry is optimized (other entries
are logged). One with learned parts of its own (distillation adapters) exposes them as `learned`, an `nn.Module`
that `fit` optimizes with the model and saves in the resume state.

- `DetectionObjective`: the YOLOv5 loss (train, fine-tune after pruning).
- `DistillationObjective`: the YOLOv5 loss plus a teacher's neck features (channel-wise, through learned adapters)
  and logits (`optimize.distill`). Each distillation term is scaled to the detection loss: on the first step its
  scale is set so that the term equals `weight` x the detection loss, so `weight: 1.0` means "as much as the
  detection loss" whatever the raw magnitudes (CWD's KL is ~1e-2, the summed detection loss ~1e1).
- `QuantizationAwareObjective`: the YOLOv5 loss on the fake-quantized model, plus the logit term against the float
  model it was quantized from (supervision by the float model, as in NVIDIA's YOLO QAT recipe), scaled the same way.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from yolofps.config import LossConfig
from yolofps.model.loss import YOLOv5Loss
from yolofps.model.spec import ArchSpec
from yolofps.model.yolo import YOLOv5
from yolofps.optimize.distill import (
    FeatureAdapters,
    NeckCapture,
    channel_wise_kl,
    freeze,
    logit_kl,
    neck_channels,
    raw_outputs,
    teacher_outputs,
)


class Objective(Protocol):
    """A loss: returns a dict with a scalar "loss" to optimize plus named parts to log."""

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor) -> dict[str, torch.Tensor]: ...


def detection_loss(spec: ArchSpec, gains: LossConfig, image_size: int) -> YOLOv5Loss:
    """The YOLOv5 loss with train.loss's gains."""
    return YOLOv5Loss(spec, image_size=image_size, box=gains.box, obj=gains.obj, cls=gains.cls,
                      anchor_t=gains.anchor_t)


class DetectionObjective:
    """The plain detection loss."""

    def __init__(self, loss: YOLOv5Loss) -> None:
        self.loss = loss

    def __call__(self, model, images, targets, mask):
        return self.loss(model(images), targets, mask)


class Balance(nn.Module):
    """Per-term scales fixed on the first step so that each term starts at its weight x the detection loss."""

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        self.weights = {name: w for name, w in weights.items() if w > 0}
        self.register_buffer("scales", torch.zeros(len(self.weights)))  # 0 = not set yet (saved with resume state)

    def __call__(self, terms: dict[str, torch.Tensor], reference: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # no host sync: where() keeps a set scale, else takes this step's ratio
            ratios = torch.stack([reference.detach().float() / terms[name].detach().float().clamp_min(1e-8)
                                  for name in self.weights])
            self.scales.copy_(torch.where(self.scales > 0, self.scales, ratios))
        scales = self.scales.clone()  # the buffer changes in place; the graph keeps this copy
        return sum(terms[name] * scales[i] * weight for i, (name, weight) in enumerate(self.weights.items()))


class _GuidedObjective:
    """An objective with a frozen reference model (`teacher`) and learned parts: `to` moves all three."""

    teacher: YOLOv5
    loss: YOLOv5Loss
    learned: nn.Module

    def to(self, device: torch.device) -> _GuidedObjective:
        for module in (self.teacher, self.loss, self.learned):
            module.to(device)
        return self


class DistillationObjective(_GuidedObjective):
    """Detection loss + weight-scaled channel-wise feature KD (neck P3-P5) + logit KD, from a frozen teacher.

    `student` is the model being trained (its Detect head gets a capturing hook); `learned` holds the adapters and
    the term scales.
    """

    def __init__(self, teacher: YOLOv5, student: YOLOv5, loss: YOLOv5Loss, *, feature_weight: float,
                 logit_weight: float, temperature: float = 1.0) -> None:
        self.teacher = freeze(teacher)
        self.loss = loss
        self.temperature = temperature
        self.capture = NeckCapture()
        student.detect.register_forward_pre_hook(self.capture)
        self.learned = nn.ModuleDict({
            "adapters": FeatureAdapters(neck_channels(student), neck_channels(teacher)),
            "balance": Balance({"feature_kd": feature_weight, "logit_kd": logit_weight}),
        })

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor) -> dict[str, torch.Tensor]:
        student = model(images)
        parts = self.loss(student, targets, mask)
        balance = self.learned["balance"]
        features, logits = teacher_outputs(self.teacher, images)
        terms = {}
        if "feature_kd" in balance.weights:
            adapted = self.learned["adapters"](self.capture.take())
            terms["feature_kd"] = sum(channel_wise_kl(s, t, self.temperature) for s, t in zip(adapted, features))
        if "logit_kd" in balance.weights:
            terms["logit_kd"] = sum(logit_kl(s, t, self.temperature) for s, t in zip(student, logits))
        kd = balance(terms, parts["loss"]) if terms else 0.0
        return parts | {"loss": parts["loss"] + kd} | {name: term.detach() for name, term in terms.items()}


class QuantizationAwareObjective(_GuidedObjective):
    """Detection loss on the fake-quantized model + the float model's logits, scaled to `weight` x detection loss."""

    def __init__(self, float_model: YOLOv5, loss: YOLOv5Loss, *, weight: float, temperature: float = 1.0) -> None:
        self.teacher = freeze(float_model)
        self.loss = loss
        self.temperature = temperature
        self.learned = Balance({"logit_kd": weight})

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor) -> dict[str, torch.Tensor]:
        quantized = model(images)
        parts = self.loss(quantized, targets, mask)
        if not self.learned.weights:
            return parts
        term = sum(logit_kl(s, t, self.temperature) for s, t in zip(quantized, raw_outputs(self.teacher, images)))
        return parts | {"loss": parts["loss"] + self.learned({"logit_kd": term}, parts["loss"]),
                        "logit_kd": term.detach()}
