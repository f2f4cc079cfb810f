"""Distillation objective: gradients reach the student only; the teacher stays frozen in eval mode."""

from __future__ import annotations

import copy

import torch

from yolofps.model.loss import YOLOv5Loss
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model
from yolofps.optimize.distill import DistillationObjective, raw_outputs


def _batch():
    targets = torch.zeros(2, 4, 5)
    targets[0, 0] = torch.tensor([1, 0.5, 0.5, 0.3, 0.3])
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 0] = True
    return torch.rand(2, 3, 64, 64), targets, mask


def test_gradients_reach_student_only_and_teacher_stays_frozen():
    torch.manual_seed(0)
    arch = preset("tiny", 3)
    teacher, student = build_model(arch), build_model(arch)
    teacher_before = copy.deepcopy(teacher.state_dict())
    objective = DistillationObjective(teacher, YOLOv5Loss(arch, image_size=64))
    student.train()
    parts = objective(student, *_batch())
    parts["loss"].backward()
    assert set(parts) >= {"loss", "box", "obj", "cls", "kd"} and parts["kd"] > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not teacher.detect.training
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for key, value in teacher.state_dict().items():  # BatchNorm running stats untouched: eval mode really held
        torch.testing.assert_close(value, teacher_before[key])


def test_student_equal_to_teacher_has_smaller_kd_than_a_random_student():
    torch.manual_seed(0)
    arch = preset("tiny", 3)
    teacher = build_model(arch)
    objective = DistillationObjective(teacher, YOLOv5Loss(arch, image_size=64))
    images, targets, mask = _batch()
    twin = copy.deepcopy(teacher).eval()
    twin.detect.train()  # raw maps with eval-mode BatchNorm, like the teacher
    other = build_model(arch).eval()
    other.detect.train()
    assert objective(twin, images, targets, mask)["kd"] < objective(other, images, targets, mask)["kd"]
    assert [o.shape for o in raw_outputs(teacher, images)] == [o.shape for o in twin(images)]


def test_kd_is_zero_when_the_student_is_the_teacher():
    torch.manual_seed(0)
    arch = preset("tiny", 3)
    teacher = build_model(arch)
    objective = DistillationObjective(teacher, YOLOv5Loss(arch, image_size=64))
    twin = copy.deepcopy(teacher).eval()
    twin.detect.train()
    assert objective(twin, *_batch())["kd"].abs() < 1e-4
