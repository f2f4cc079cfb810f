"""Knowledge distillation as a training objective: the detection loss plus teacher-guided logit terms.

The student learns the teacher's objectness everywhere, and its class scores and box offsets where the teacher
sees an object (weighted by the teacher's objectness), as in the common YOLO logit-distillation recipe. The
teacher is frozen: eval mode (BatchNorm running stats), no gradients. Same training loop as `train`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from yolofps.model.loss import YOLOv5Loss
from yolofps.model.yolo import YOLOv5


def freeze(teacher: YOLOv5) -> YOLOv5:
    """Eval mode and no gradients, for good."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def raw_outputs(teacher: YOLOv5, images: torch.Tensor) -> list[torch.Tensor]:
    """The teacher's raw per-level maps [B, A, H, W, 5+nc] with its BatchNorms in eval mode.

    In eval mode the Detect head decodes; switching only the head (no BatchNorm or dropout in it) to training
    mode returns the raw maps while the backbone keeps its running statistics.
    """
    head = teacher.detect
    head.train()
    try:
        return teacher(images)
    finally:
        head.eval()


class DistillationObjective:
    """`(model, images, targets, mask) -> dict`: detection loss + `weight` x logit distillation."""

    def __init__(self, teacher: YOLOv5, loss: YOLOv5Loss, *, weight: float = 1.0, temperature: float = 1.0) -> None:
        self.teacher = freeze(teacher)
        self.loss = loss
        self.weight = weight
        self.temperature = temperature

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor) -> dict[str, torch.Tensor]:
        student = model(images)
        parts = self.loss(student, targets, mask)
        kd = sum(self._level(s, t) for s, t in zip(student, raw_outputs(self.teacher, images)))
        kd = kd * self.weight * images.shape[0]  # the detection loss is also summed over the batch
        return parts | {"loss": parts["loss"] + kd, "kd": kd.detach()}

    def _level(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Objectness everywhere; classes and box offsets weighted by the teacher's objectness."""
        student, teacher = student.float(), teacher.float()
        t_obj = teacher[..., 4].sigmoid()  # [B, A, H, W]
        obj = _binary_kl(student[..., 4], t_obj).mean()
        t_cls = (teacher[..., 5:] / self.temperature).sigmoid()
        cls = _binary_kl(student[..., 5:] / self.temperature, t_cls).mean(-1)  # [B, A, H, W]
        box = (student[..., :4].sigmoid() - teacher[..., :4].sigmoid()).pow(2).mean(-1)
        norm = t_obj.sum().clamp(min=1.0)
        return obj + (t_obj * cls).sum() / norm * self.temperature**2 + (t_obj * box).sum() / norm


def _binary_kl(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(target || sigmoid(logits)): BCE minus the target's own entropy.

    The gradient is that of BCE; subtracting the entropy (a constant for the student) makes the logged value 0
    when the student matches the teacher, instead of a floor that hides how close they are.
    """
    bce = F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
    entropy = F.binary_cross_entropy(target, target, reduction="none")
    return bce - entropy
