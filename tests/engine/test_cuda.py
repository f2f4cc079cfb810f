"""CUDA fast paths of training: AMP + channels_last. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from configs import train_config
from yolofps import device as dev
from yolofps.engine.optim import build_optimizer
from yolofps.model.loss import YOLOv5Loss
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_amp_channels_last_train_step():
    info = dev.resolve("cuda")
    assert info.amp_dtype in (torch.bfloat16, torch.float16) and torch.backends.cudnn.benchmark
    arch = preset("tiny", 4)
    model = dev.prepare_model(build_model(arch), info).train()
    optimizer = build_optimizer(model, train_config({"epochs": 1, "batch": 4, "optim.optimizer": "SGD"}))
    scaler = dev.grad_scaler(info)
    images = dev.to_device(torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8), info)
    assert images.is_contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([[1, 0.5, 0.5, 0.2, 0.3]], device=info.device).repeat(4, 8, 1)
    mask = torch.zeros(4, 8, dtype=torch.bool, device=info.device)
    mask[:, 0] = True
    loss_fn = YOLOv5Loss(arch, image_size=64).to(info.device)
    before = [p.detach().clone() for p in model.parameters()]
    with dev.autocast(info):
        loss = loss_fn(model(images), targets, mask)["loss"]
    scaler.scale(loss).backward()
    dev.optimizer_step(optimizer, scaler, info)
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
