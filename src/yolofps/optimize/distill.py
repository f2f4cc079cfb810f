"""Knowledge-distillation terms for YOLO detectors: logits of the Detect head and features of the neck (P3-P5).

- Logit term (the common YOLO recipe): the student learns the teacher's objectness everywhere, and its class scores
  and box offsets where the teacher sees an object (weighted by the teacher's objectness). It needs the same anchors,
  strides and classes in both models.
- Feature term: channel-wise distillation (Shu et al., ICCV 2021, "Channel-wise Knowledge Distillation for Dense
  Prediction"): each channel of a neck output becomes a spatial distribution (softmax over H x W at a temperature),
  and the student matches the teacher's with a KL divergence. A learned 1x1 conv per level maps the student's
  channels onto the teacher's, so the teacher may be wider (a larger preset, or the unpruned parent of a pruned
  student). The neck outputs are read with forward hooks on the Detect head, so the models run unchanged (DDP and
  torch.compile still see one forward).

The teacher is frozen: eval mode (BatchNorm running stats), no gradients. `engine.objectives` combines these terms
with the detection loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from yolofps.errors import ConfigError
from yolofps.model.yolo import YOLOv5


def freeze(teacher: YOLOv5) -> YOLOv5:
    """Eval mode and no gradients, for good."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class NeckCapture:
    """A forward pre-hook on a Detect head that keeps its inputs (the P3-P5 neck outputs) of the last forward.

    Only while the head is in training mode: an EMA copy or an evaluation of the student keeps nothing. A plain
    object (not a bound method of the objective), so `copy.deepcopy` of the model copies this and nothing more.
    """

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if module.training:
            self.maps = list(args[0])

    def take(self) -> list[torch.Tensor]:
        maps, self.maps = self.maps, []
        return maps


@torch.no_grad()
def teacher_outputs(teacher: YOLOv5, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's neck outputs (P3-P5) and raw per-level maps [B, A, H, W, 5+nc], BatchNorms in eval mode.

    In eval mode the Detect head decodes; switching only the head (no BatchNorm or dropout in it) to training
    mode returns the raw maps while the backbone keeps its running statistics.
    """
    with _capturing(teacher) as capture:
        raw = teacher(images)
    return capture.maps, raw


def raw_outputs(teacher: YOLOv5, images: torch.Tensor) -> list[torch.Tensor]:
    """The teacher's raw per-level maps (see `teacher_outputs`)."""
    return teacher_outputs(teacher, images)[1]


@contextmanager
def _capturing(teacher: YOLOv5) -> Iterator[NeckCapture]:
    capture, head = NeckCapture(), teacher.detect
    handle = head.register_forward_pre_hook(capture)
    head.train()
    try:
        yield capture
    finally:
        head.eval()
        handle.remove()


def neck_channels(model: YOLOv5) -> list[int]:
    """Channels of each neck output the Detect head reads (P3, P4, P5)."""
    return [conv.in_channels for conv in model.detect.m]


class FeatureAdapters(nn.Module):
    """One learned 1x1 conv per level from the student's neck channels to the teacher's."""

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ConfigError(f"distill: the student has {len(student_channels)} detection levels, the teacher "
                              f"{len(teacher_channels)}: feature distillation needs the same levels")
        self.convs = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(student_channels, teacher_channels))

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(m) for conv, m in zip(self.convs, maps)]


def channel_wise_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """CWD: KL(teacher || student) of each channel's spatial softmax, averaged over images and channels, x T^2."""
    s = (student.float() / temperature).flatten(2).log_softmax(-1)
    t = (teacher.float() / temperature).flatten(2).softmax(-1)
    return (t * (t.clamp_min(1e-12).log() - s)).sum(-1).mean() * temperature**2


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """One level's logit term: objectness everywhere; classes and box offsets weighted by the teacher's objectness."""
    if student.shape != teacher.shape:
        raise ConfigError(f"distill: student and teacher Detect outputs differ ({tuple(student.shape)} vs "
                          f"{tuple(teacher.shape)}): logit distillation needs the same anchors and classes; set "
                          "distill.logit_weight: 0 to distill features only")
    student, teacher = student.float(), teacher.float()
    t_obj = teacher[..., 4].sigmoid()  # [B, A, H, W]
    obj = _binary_kl(student[..., 4], t_obj).mean()
    t_cls = (teacher[..., 5:] / temperature).sigmoid()
    cls = _binary_kl(student[..., 5:] / temperature, t_cls).mean(-1)  # [B, A, H, W]
    box = (student[..., :4].sigmoid() - teacher[..., :4].sigmoid()).pow(2).mean(-1)
    norm = t_obj.sum().clamp(min=1.0)
    return obj + (t_obj * cls).sum() / norm * temperature**2 + (t_obj * box).sum() / norm


def _binary_kl(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(target || sigmoid(logits)): BCE minus the target's own entropy.

    The gradient is that of BCE; subtracting the entropy (a constant for the student) makes the logged value 0
    when the student matches the teacher, instead of a floor that hides how close they are.
    """
    bce = F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
    entropy = F.binary_cross_entropy(target, target, reduction="none")
    return bce - entropy
