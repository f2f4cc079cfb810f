"""Optimizer, schedule and weight averaging of the training loop, after yolov5/ultralytics.

`resolve_optimizer` turns `optimizer: auto` into what it stands for; `build_optimizer` makes yolov5's three parameter
groups; `warmup` and `lr_factor` are the schedule; `ModelEMA` the exponential moving average evaluated each epoch.
"""

from __future__ import annotations

import dataclasses
import math
from copy import deepcopy

import numpy as np
import torch
from torch import nn

from yolofps.config import OptimConfig, TrainConfig


def resolve_optimizer(cfg: TrainConfig, *, num_images: int, num_classes: int) -> TrainConfig:
    """The config `fit` runs with: `optimizer: auto` replaced by the optimizer and lr it stands for."""
    iterations = math.ceil(num_images / max(cfg.batch, cfg.optim.nominal_batch)) * cfg.epochs
    return dataclasses.replace(cfg, optim=pick_optimizer(cfg.optim, iterations=iterations, num_classes=num_classes))


def pick_optimizer(optim: OptimConfig, *, iterations: int, num_classes: int) -> OptimConfig:
    """ultralytics' `optimizer: auto`: AdamW with a class-count lr for short runs (<= 10k iterations), else SGD.

    Explicit names pass through unchanged.
    """
    if optim.optimizer != "auto":
        return optim
    if iterations > 10_000:
        return dataclasses.replace(optim, optimizer="SGD", lr0=0.01, momentum=0.9)
    # a bias lr above 0.01 destabilizes Adam
    return dataclasses.replace(optim, optimizer="AdamW", lr0=round(0.002 * 5 / (4 + num_classes), 6), momentum=0.9,
                               warmup_bias_lr=0.0)


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Multiplier of lr0 for an epoch: linear or cosine decay from 1 to lrf (yolov5's schedules)."""
    lrf = cfg.optim.lrf
    if cfg.optim.cos_lr:
        return ((1 - math.cos(epoch * math.pi / cfg.epochs)) / 2) * (lrf - 1) + 1
    return (1 - epoch / cfg.epochs) * (1.0 - lrf) + lrf


def accumulation(cfg: TrainConfig) -> int:
    """Batches whose gradients add up to one optimizer step (yolov5 steps every `nominal_batch` images)."""
    return max(round(cfg.optim.nominal_batch / cfg.batch), 1)


def build_optimizer(model: nn.Module, spec: TrainConfig, extra: list[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """SGD (nesterov) or AdamW with yolov5's three groups: pg0 conv weights (decayed), pg1 norm weights, pg2 biases.

    `extra` are learned parameters of the objective (distillation adapters): decayed like conv weights. Other
    parameters of the model (QAT quantizer ranges) go undecayed into pg1.
    """
    o = spec.optim
    if o.optimizer == "auto":
        raise ValueError("build_optimizer: resolve `optimizer: auto` first (resolve_optimizer)")
    decayed, norm_weights, biases = [], [], []
    for module in model.modules():
        if hasattr(module, "bias") and isinstance(module.bias, nn.Parameter):
            biases.append(module.bias)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            norm_weights.append(module.weight)
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):
            decayed.append(module.weight)
    decayed += list(extra)
    # anything else that trains (QAT quantizer ranges): no weight decay, like the norm weights
    grouped = {id(p) for p in decayed + norm_weights + biases}
    norm_weights += [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]
    weight_decay = o.weight_decay * spec.batch * accumulation(spec) / o.nominal_batch  # scaled like yolov5
    if o.optimizer == "AdamW":
        optimizer = torch.optim.AdamW(decayed, lr=o.lr0, betas=(o.momentum, 0.999), weight_decay=weight_decay)
    else:
        optimizer = torch.optim.SGD(decayed, lr=o.lr0, momentum=o.momentum, nesterov=True,
                                    weight_decay=weight_decay)
    optimizer.add_param_group({"params": norm_weights, "weight_decay": 0.0})
    optimizer.add_param_group({"params": biases, "weight_decay": 0.0})
    return optimizer


def warmup(optimizer: torch.optim.Optimizer, spec: TrainConfig, step: int, warmup_steps: int, epoch: int) -> None:
    """Linear warm-up: biases from warmup_bias_lr down, others from 0 up; momentum (Adam: beta1) ramps up."""
    o = spec.optim
    target = o.lr0 * lr_factor(spec, epoch)
    momentum = float(np.interp(step, [0, warmup_steps], [o.warmup_momentum, o.momentum]))
    for index, group in enumerate(optimizer.param_groups):
        start = o.warmup_bias_lr if index == 2 else 0.0
        group["lr"] = float(np.interp(step, [0, warmup_steps], [start, target]))
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        else:
            group["momentum"] = momentum


class ModelEMA:
    """Exponential moving average of weights with yolov5's warm-up ramp (decay grows with updates)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        self.module = deepcopy(model).eval()
        self.decay, self.tau, self.updates = decay, tau, updates
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        model_state = model.state_dict()
        seen = set()  # a tensor listed under two names (a QAT quantizer shared by two inputs) is averaged once
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                value.mul_(d).add_(model_state[name].detach(), alpha=1 - d)
