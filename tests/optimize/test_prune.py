"""Structured pruning: a smaller, consistent model described by a new spec; the input model is left alone."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from yolofps.engine import checkpoint
from yolofps.model.spec import ArchSpec, preset
from yolofps.model.yolo import YOLOv5, build_model, model_info
from yolofps.optimize.prune import prune_model, spec_from_pruned

IMAGE_SIZE = 64
WIDTH_FIELDS = ("out_channels", "hidden_channels", "bypass_channels")


def _widths(spec: ArchSpec) -> list[int]:
    """Every channel width a spec names, in a fixed order (0 where a kind has none)."""
    widths = []
    for layer in spec.layers:
        widths += [getattr(layer, key) for key in WIDTH_FIELDS] + list(layer.bottleneck_channels)
    return widths


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _output_shapes(model: YOLOv5, x: torch.Tensor) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """Train-mode map shapes and eval-mode decoded shape (on a copy: train mode moves BN statistics)."""
    work = copy.deepcopy(model)
    with torch.no_grad():
        raw = [tuple(y.shape) for y in work.train()(x)]
        decoded = tuple(work.eval()(x).shape)
    return raw, decoded


def _trained_like(model: YOLOv5) -> YOLOv5:
    """He-initialised convs and varied BN affines, so head outputs depend on the features being pruned.

    Under the default init activations fade with depth and the head outputs are ~its bias priors, so a pruned
    and an unpruned model would differ only by float noise.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def tiny() -> tuple[YOLOv5, dict[str, torch.Tensor], YOLOv5]:
    """(original, its state dict copied before pruning, pruned at ratio 0.5)."""
    torch.manual_seed(0)
    original = _trained_like(build_model(preset("tiny", 3))).eval()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    return original, before, prune_model(original, ratio=0.5, image_size=IMAGE_SIZE)


def _check_pruned(original: YOLOv5, pruned: YOLOv5) -> None:
    """Shapes, parameter count, width rounding and Detect outputs of a ratio-0.5 prune."""
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert _output_shapes(pruned, x) == _output_shapes(original, x)
    before, after = _params(original), _params(pruned)
    assert 0.1 * before < after < 0.5 * before  # channel ratio r scales conv params by about (1 - r)^2
    old_widths, new_widths = _widths(original.spec), _widths(pruned.spec)
    assert all(new <= old for old, new in zip(old_widths, new_widths))
    assert all(new % 8 == 0 for old, new in zip(old_widths, new_widths) if old % 8 == 0)
    assert any(new < old for old, new in zip(old_widths, new_widths))
    for old_conv, new_conv in zip(original.detect.m, pruned.detect.m):
        assert new_conv.out_channels == old_conv.out_channels == 3 * (5 + 3)
    assert pruned.spec == spec_from_pruned(pruned)


def test_tiny_prune_shrinks_consistently(tiny):
    original, _, pruned = tiny
    _check_pruned(original, pruned)
    assert pruned.training == original.training


def test_n_prune_shrinks_consistently():
    torch.manual_seed(0)
    original = build_model(preset("n", 3)).eval()
    _check_pruned(original, prune_model(original, ratio=0.5, image_size=IMAGE_SIZE))


def test_spec_round_trip_and_strict_rebuild(tiny):
    _, _, pruned = tiny
    spec = ArchSpec.from_dict(pruned.spec.to_dict())
    assert spec == pruned.spec
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    torch.testing.assert_close(rebuilt.detect.anchors, pruned.detect.anchors)


def test_checkpoint_round_trip_gives_identical_outputs(tiny, tmp_path):
    _, _, pruned = tiny
    folder = checkpoint.save_model(tmp_path / "pruned", pruned, {"names": ["a", "b", "c"], "imgsz": IMAGE_SIZE})
    loaded, _ = checkpoint.load_model(folder)
    assert loaded.spec == pruned.spec
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), pruned.eval()(x))


def test_original_is_untouched_and_outputs_change(tiny):
    original, before, pruned = tiny
    after = original.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert original.spec == preset("tiny", 3)
    x = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        difference = (pruned.eval()(x) - original.eval()(x)).abs()
    assert difference[..., 4:].max() > 0.1  # objectness / class probabilities moved, not just float noise


def test_ratio_zero_is_an_identical_copy(tiny):
    original, _, _ = tiny
    copied = prune_model(original, ratio=0.0)
    assert copied is not original and copied.spec == original.spec
    assert _params(copied) == _params(original)
    x = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(copied.eval()(x), original.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_bad_ratio_is_rejected(tiny, ratio):
    with pytest.raises(ValueError, match="pruning ratio must be in"):
        prune_model(tiny[0], ratio=ratio)


def test_unknown_importance_is_rejected(tiny):
    with pytest.raises(ValueError, match="unknown pruning importance"):
        prune_model(tiny[0], ratio=0.5, importance="l7")


def test_group_norm_importance_and_iterative_steps(tiny):
    original, _, _ = tiny
    pruned = prune_model(original, ratio=0.5, importance="group_norm", iterative_steps=2)
    _check_pruned(original, pruned)


def test_gflops_drop(tiny):
    original, _, pruned = tiny
    before, after = model_info(original, IMAGE_SIZE), model_info(pruned, IMAGE_SIZE)
    assert after["gflops"] < 0.6 * before["gflops"]
    assert after["params"] == _params(pruned)


def test_prune_can_swap_the_activation_for_relu(tiny, tmp_path):
    original, _, silu_pruned = tiny
    relu_pruned = prune_model(original, ratio=0.5, image_size=IMAGE_SIZE, activation="relu")
    assert relu_pruned.spec == dataclasses.replace(silu_pruned.spec, activation="relu")
    assert not any(isinstance(m, nn.SiLU) for m in relu_pruned.modules())
    for key, value in silu_pruned.state_dict().items():  # the same channels survive: only the activation differs
        assert torch.equal(value, relu_pruned.state_dict()[key]), key
    x = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert _output_shapes(relu_pruned, x) == _output_shapes(original, x)
    checkpoint.save_model(tmp_path / "relu", relu_pruned, {"job": "test"})
    loaded, _ = checkpoint.load_model(tmp_path / "relu")
    assert loaded.spec.activation == "relu"
    assert prune_model(original, ratio=0.5, image_size=IMAGE_SIZE).spec.activation == "silu"  # None keeps it


def test_relu_student_exports_without_separate_activation_passes(tiny, tmp_path):
    """What ReLU is for: in ONNX every Conv block ends in a Relu that ONNX Runtime fuses into the conv; the only
    Sigmoids left are the Detect decode's (one per level), where SiLU would add a Sigmoid and a Mul per block."""
    import onnx

    from yolofps.optimize.export import export_onnx

    original, _, _ = tiny
    relu_pruned = prune_model(original, ratio=0.5, image_size=IMAGE_SIZE, activation="relu").eval()
    path = export_onnx(relu_pruned, tmp_path / "relu.onnx", IMAGE_SIZE)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    blocks = sum(isinstance(m, nn.ReLU) for m in relu_pruned.modules())
    assert ops.count("Relu") == blocks > 0
    assert ops.count("Sigmoid") == len(relu_pruned.detect.m)
