"""Structured channel pruning with torch-pruning's DepGraph; the result is a new ArchSpec plus surviving weights.

DepGraph finds every coupling (Bottleneck residual adds, C3 / SPPF / PAN concats, Detect inputs) by tracing, so
removing a channel removes it from every layer that produces or consumes it. The pruned module tree is then read
back into an explicit ArchSpec and rebuilt from it with a strict state-dict load: a pruned model is just another
spec, saved like any other (never a pickled module).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch_pruning as tp
from torch import nn

from yolofps.config import PruneConfig
from yolofps.model.blocks import C3, SPPF, Conv
from yolofps.model.spec import ArchSpec, LayerSpec
from yolofps.model.yolo import YOLOv5, build_model

IMPORTANCES = ("l2", "group_norm")


def variant_name(ratio: float) -> str:
    """`prune-0.3`: the name a pruned model goes by in metrics, folders and the benchmark table."""
    return f"prune-{ratio:g}"


def prune_as_configured(model: YOLOv5, p: PruneConfig, ratio: float, imgsz: int) -> YOLOv5:
    """`model` pruned at `ratio` as the `prune` section says (the prune stage's variants, the distill student)."""
    activation = None if p.activation == "keep" else p.activation
    return prune_model(model.cpu(), ratio=ratio, image_size=imgsz, importance=p.importance, round_to=p.round_to,
                       iterative_steps=p.iterative_steps, activation=activation)


def make_importance(name: str) -> tp.importance.Importance:
    """The torch-pruning channel importance named `name` ('l2' or 'group_norm')."""
    if name == "l2":
        # per-layer squared L2 of each channel's weights (conv + BN), averaged over the layers of its group
        return tp.importance.MagnitudeImportance(p=2)
    if name == "group_norm":
        # torch-pruning 1.6 dropped GroupNormImportance; its score (squared L2 over the whole group) is this
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum")
    raise ValueError(f"unknown pruning importance {name!r}, expected one of {list(IMPORTANCES)}")


def prune_model(
    model: YOLOv5,
    *,
    ratio: float,
    image_size: int = 64,
    importance: str = "l2",
    round_to: int = 8,
    iterative_steps: int = 1,
    example_batch: torch.Tensor | None = None,
    activation: str | None = None,
) -> YOLOv5:
    """A NEW YOLOv5 whose ArchSpec has ~`ratio` fewer channels per prunable group, with the surviving weights.

    `activation` (spec.ACTIVATIONS) swaps every Conv block's activation in the result, e.g. SiLU -> ReLU for a
    student that ONNX Runtime runs with fused Conv + ReLU kernels; activations hold no weights, so the surviving
    weights carry over as they are and the fine-tune that follows adapts them. None keeps the model's.
    The input model is not modified (work on a deepcopy).
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1) (fraction of channels removed per group), got {ratio}")
    if round_to < 1 or iterative_steps < 1:
        raise ValueError(f"round_to and iterative_steps must be >= 1, got {round_to} and {iterative_steps}")
    scorer = make_importance(importance)
    weight = next(model.parameters())
    work = copy.deepcopy(model).eval()
    if ratio > 0:
        if example_batch is None:
            example_batch = torch.zeros(1, 3, image_size, image_size)
        example_batch = example_batch.to(device=weight.device, dtype=weight.dtype)
        _prune_in_place(work, example_batch, scorer, ratio, round_to, iterative_steps)
    spec = spec_from_pruned(work)
    pruned = build_model(dataclasses.replace(spec, activation=activation or spec.activation))
    # strict: every key and shape must match, which proves the spec describes the pruned module exactly
    pruned.load_state_dict(work.state_dict(), strict=True)
    return pruned.to(device=weight.device, dtype=weight.dtype).train(model.training)


def _prune_in_place(
    model: YOLOv5, example: torch.Tensor, scorer: tp.importance.Importance, ratio: float, round_to: int, steps: int
) -> None:
    """Run DepGraph pruning on `model` (in eval mode) for `steps` iterative steps."""
    # Trace in eval mode: BatchNorm running statistics stay untouched by the example forward, and the Detect
    # decode after its output convs only reshapes / adds constants, which DepGraph traces without trouble.
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=scorer,
        pruning_ratio=ratio,
        iterative_steps=steps,
        round_to=round_to,  # kept widths stay multiples of 8: tensor-core and SIMD friendly
        ignored_layers=[model.detect.m],  # out channels are anchors x (5 + classes): fixed
    )
    with torch.no_grad():
        for _ in range(steps):
            pruner.step()


def spec_from_pruned(pruned: YOLOv5) -> ArchSpec:
    """Read the actual channel widths off a pruned module tree into a new ArchSpec (same name/anchors/classes)."""
    old = pruned.spec
    pairs = zip(pruned.model, old.layers)  # model.24 (Detect) has no LayerSpec: zip stops before it
    layers = tuple(_layer_spec(i, module, layer.kind) for i, (module, layer) in enumerate(pairs))
    return ArchSpec(old.name, old.num_classes, old.anchors, old.strides, layers, old.activation)


def _layer_spec(index: int, module: nn.Module, kind: str) -> LayerSpec:
    """The LayerSpec a built layer actually has; TypeError if the module is not the kind the spec says."""
    expected = {"Conv": Conv, "C3": C3, "SPPF": SPPF}.get(kind)
    if expected is not None and not isinstance(module, expected):
        raise TypeError(f"model.{index}: spec says {kind}, module is {type(module).__name__}")
    if isinstance(module, Conv):
        return LayerSpec(kind, module.conv.out_channels)
    if isinstance(module, C3):
        inner = tuple(bottleneck.cv1.conv.out_channels for bottleneck in module.m)
        return LayerSpec(
            kind, module.cv3.conv.out_channels, module.cv1.conv.out_channels, module.cv2.conv.out_channels, inner
        )
    if isinstance(module, SPPF):
        return LayerSpec(kind, module.cv2.conv.out_channels, hidden_channels=module.cv1.conv.out_channels)
    return LayerSpec(kind)  # Upsample / Concat: width follows their inputs
