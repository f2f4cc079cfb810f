"""Distillation objective: gradients reach the student and the adapters only; the teacher stays frozen in eval mode;
each term starts at its weight x the detection loss; a wider teacher works through the adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from yolofps.engine.objectives import DistillationObjective, QuantizationAwareObjective
from yolofps.errors import ConfigError
from yolofps.model.loss import YOLOv5Loss
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model
from yolofps.optimize.distill import channel_wise_kl, raw_outputs
from yolofps.optimize.prune import prune_model


def _batch():
    targets = torch.zeros(2, 4, 5)
    targets[0, 0] = torch.tensor([1, 0.5, 0.5, 0.3, 0.3])
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 0] = True
    return torch.rand(2, 3, 64, 64), targets, mask


def _objective(teacher, student, feature=1.0, logit=1.0):
    return DistillationObjective(teacher, student, YOLOv5Loss(student.spec, image_size=64), feature_weight=feature,
                                 logit_weight=logit)


def test_gradients_reach_student_and_adapters_only_and_teacher_stays_frozen():
    torch.manual_seed(0)
    arch = preset("tiny", 3)
    teacher, student = build_model(arch), build_model(arch)
    teacher_before = copy.deepcopy(teacher.state_dict())
    objective = _objective(teacher, student)
    student.train()
    parts = objective(student, *_batch())
    parts["loss"].backward()
    assert set(parts) >= {"loss", "box", "obj", "cls", "feature_kd", "logit_kd"} and parts["feature_kd"] > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not teacher.detect.training
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.learned["adapters"].parameters())
    for key, value in teacher.state_dict().items():  # BatchNorm running stats untouched: eval mode really held
        torch.testing.assert_close(value, teacher_before[key])


def test_each_term_starts_at_its_weight_times_the_detection_loss_and_keeps_its_scale():
    torch.manual_seed(0)
    arch = preset("tiny", 3)
    student = build_model(arch).train()
    objective = _objective(build_model(arch), student, feature=0.5, logit=0.25)
    images, targets, mask = _batch()
    parts = objective(student, images, targets, mask)
    detection = YOLOv5Loss(arch, image_size=64)(student(images), targets, mask)["loss"]
    torch.testing.assert_close(parts["loss"], detection * 1.75, rtol=1e-4, atol=1e-4)
    scales = objective.learned["balance"].scales.clone()
    objective(student, torch.rand(2, 3, 64, 64), targets, mask)
    torch.testing.assert_close(objective.learned["balance"].scales, scales)  # fixed after the first step


def test_a_wider_teacher_distills_into_a_pruned_student_through_the_adapters():
    torch.manual_seed(0)
    teacher = build_model(preset("tiny", 3))
    student = prune_model(copy.deepcopy(teacher), ratio=0.5, image_size=64, round_to=4).train()
    objective = _objective(teacher, student, logit=0.0)
    parts = objective(student, *_batch())
    assert parts["feature_kd"] > 0 and "logit_kd" not in parts
    convs = objective.learned["adapters"].convs
    assert [c.out_channels for c in convs] == [m.in_channels for m in teacher.detect.m]
    assert [c.in_channels for c in convs] == [m.in_channels for m in student.detect.m]
    assert any(a < b for a, b in zip([c.in_channels for c in convs], [c.out_channels for c in convs]))


def test_logit_terms_with_other_classes_are_a_named_error():
    student = build_model(preset("tiny", 3)).train()
    objective = _objective(build_model(preset("tiny", 5)), student, feature=0.0)
    with pytest.raises(ConfigError, match="logit_weight: 0"):
        objective(student, *_batch())


def test_channel_wise_kl_is_zero_for_equal_maps_and_positive_otherwise():
    a = torch.randn(2, 8, 4, 4)
    assert channel_wise_kl(a, a, 1.0).abs() < 1e-6 and channel_wise_kl(torch.randn(2, 8, 4, 4), a, 1.0) > 0


def test_kd_terms_vanish_when_the_student_is_the_teacher():
    torch.manual_seed(0)
    teacher = build_model(preset("tiny", 3))
    twin = copy.deepcopy(teacher).eval()
    twin.detect.train()  # raw maps with eval-mode BatchNorm, like the teacher
    parts = QuantizationAwareObjective(teacher, YOLOv5Loss(teacher.spec, image_size=64), weight=1.0)(twin, *_batch())
    assert parts["logit_kd"].abs() < 1e-4
    assert [o.shape for o in raw_outputs(teacher, _batch()[0])] == [o.shape for o in twin(_batch()[0])]
