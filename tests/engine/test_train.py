"""The training loop: a tiny model overfits 4 images; an interrupted run resumes at the right epoch and LR."""

from __future__ import annotations

import json
import math

import pytest
import torch

from configs import PLAIN_LOADER, loader_config, replaced, train_config
from yolofps import device as dev
from yolofps.config import EvalConfig
from yolofps.data import synthetic
from yolofps.data.dataset import YoloDataset, build_loader
from yolofps.engine import checkpoint
from yolofps.engine.datasets import Data
from yolofps.engine.objectives import DetectionObjective
from yolofps.engine.optim import build_optimizer, lr_factor, pick_optimizer
from yolofps.engine.train import MemoryStore, TrainingDivergedError, TrainingJob, fit
from yolofps.model.loss import YOLOv5Loss
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model

CPU = dev.resolve("cpu")
# no augmentation: the point is to check the optimizer, loss and evaluation agree
PLAIN = loader_config(PLAIN_LOADER)
EVAL = EvalConfig(conf=0.001, iou=0.6, max_det=300, sample_images=0)


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    spec = synthetic.SyntheticSpec(num_train=4, num_val=1, image_size=64, min_aspect=1.0, max_objects=2,
                                   background_fraction=0.0, min_visible=0.5)
    return synthetic.generate(tmp_path_factory.mktemp("four"), spec, seed=3)


def _job(data_yaml, folder, epochs, seed=0, **settings) -> TrainingJob:
    """A tiny model on 4 images, evaluated on the same 4 (the point is that it learns them)."""
    dev.seed_everything(seed)
    dataset = YoloDataset(data_yaml, "train", 64, PLAIN, train=True, seed=seed)
    eval_loader = build_loader(YoloDataset(data_yaml, "train", 64, PLAIN, train=False), 4, shuffle=False, workers=0)
    arch = preset("tiny", len(dataset.names))
    loop = train_config({"epochs": epochs, "batch": 4, "optim.optimizer": "SGD", "optim.lr0": 0.02,
                         "optim.warmup_epochs": 0, "optim.nominal_batch": 4, "optim.ema": False,
                         "loader.close_mosaic": 0, "workers": 0} | settings)
    return TrainingJob("test", build_model(arch), DetectionObjective(YOLOv5Loss(arch, image_size=64)),
                       Data(dataset, eval_loader, dataset.names), loop, EVAL, CPU, folder, folder / "history.csv",
                       meta={"names": list(dataset.names), "imgsz": 64, "params_hash": "same"}, seed=seed)


def test_tiny_model_overfits_four_images(four_images, tmp_path):
    job = _job(four_images, tmp_path, epochs=300, **{"optim.lr0": 0.1, "patience": 10_000})  # 1 step an epoch
    job.validate, job.store = False, MemoryStore()  # evaluated once at the end, no files: keeps this test fast
    out = fit(job)
    first, last = out.state.history[0]["train/loss"], out.state.history[-1]["train/loss"]
    assert last < first / 2, (first, last)
    assert out.result.metrics()["metrics/mAP50B"] > 0.5
    assert "metrics/mAP50B" not in out.state.history[-2] and "metrics/mAP50B" in out.state.history[-1]


class Interrupt(Exception):
    pass


class StopAfter:
    """A tracker that kills the run once `epochs` epochs are saved (as a crash right after a checkpoint would)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def log_metrics(self, metrics, step):
        if step == self.epochs:
            raise Interrupt

    def log_artifacts(self, path, artifact_path=None):
        return None


def test_resume_continues_at_the_right_epoch_and_lr(four_images, tmp_path):
    full = fit(_job(four_images, tmp_path / "full", epochs=4)).state
    interrupted = _job(four_images, tmp_path / "cut", epochs=4)
    interrupted.tracker = StopAfter(2)
    with pytest.raises(Interrupt):
        fit(interrupted)
    resumed = fit(_job(four_images, tmp_path / "cut", epochs=4)).state  # same params hash: continues from last
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    for before, after in zip(full.history, resumed.history):
        assert after["lr/pg0"] == pytest.approx(before["lr/pg0"])
        assert after["train/loss"] == pytest.approx(before["train/loss"], rel=1e-3, abs=1e-4)
    assert resumed.optimizer_steps == full.optimizer_steps
    other = _job(four_images, tmp_path / "cut", epochs=4)
    other.meta = other.meta | {"params_hash": "other"}  # other params: starts over (the finished flag is not set)
    assert [r["epoch"] for r in fit(other).state.history] == [0, 1, 2, 3]


def test_a_diverging_run_stops_with_a_named_error_and_keeps_the_last_good_epoch(four_images, tmp_path):
    """lr0 1e6 with plain SGD blows the weights up after the first step: the loop stops at the first non-finite
    epoch loss, before that epoch is saved."""
    job = _job(four_images, tmp_path, epochs=20, **{"optim.lr0": 1e6, "optim.grad_clip": 0.0})
    with pytest.raises(TrainingDivergedError, match="not finite; the last good checkpoint") as err:
        fit(job)
    saved = json.loads((tmp_path / "last" / checkpoint.META).read_text())
    assert math.isfinite(saved["metrics"]["train/loss"])
    assert f"epoch {saved['epoch'] + 1}:" in str(err.value)


def test_lr_schedule_decays_to_lrf():
    linear = train_config({"epochs": 10, "batch": 4, "optim.lr0": 0.01, "optim.lrf": 0.1, "optim.cos_lr": False})
    cosine = replaced(linear, {"optim.cos_lr": True})
    for spec in (linear, cosine):
        assert lr_factor(spec, 0) == pytest.approx(1.0) and lr_factor(spec, 10) == pytest.approx(0.1)
    assert lr_factor(cosine, 2) > lr_factor(linear, 2)


def test_optimizer_groups_follow_yolov5():
    model = build_model(preset("tiny", 2))
    optimizer = build_optimizer(model, train_config({"epochs": 1, "batch": 16, "optim.optimizer": "SGD",
                                                             "optim.momentum": 0.937}))
    decayed, norms, biases = optimizer.param_groups
    assert decayed["weight_decay"] > 0 and norms["weight_decay"] == 0 and biases["weight_decay"] == 0
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.937
    count = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert count == sum(p.numel() for p in model.parameters())
    assert all(p.ndim == 4 for p in decayed["params"]) and all(p.ndim == 1 for p in biases["params"])


def test_auto_optimizer_follows_ultralytics():
    optim = train_config({"epochs": 30, "batch": 16}).optim
    auto = replaced(train_config({"epochs": 30, "batch": 16}), {"optim.optimizer": "auto"}).optim
    short = pick_optimizer(auto, iterations=200, num_classes=4)
    assert (short.optimizer, short.lr0, short.momentum, short.warmup_bias_lr) == ("AdamW", 0.00125, 0.9, 0.0)
    assert pick_optimizer(auto, iterations=20_000, num_classes=80).optimizer == "SGD"
    explicit = replaced(train_config({"epochs": 1, "batch": 1}), {"optim.optimizer": "SGD"}).optim
    assert pick_optimizer(explicit, iterations=1, num_classes=1) == explicit and optim is not None
    model = build_model(preset("tiny", 2))
    adam = build_optimizer(model, train_config({"epochs": 1, "batch": 16, "optim.optimizer": "AdamW",
                                                "optim.lr0": 0.001}))
    assert isinstance(adam, torch.optim.AdamW) and len(adam.param_groups) == 3


def test_time_limit_stops_after_the_current_step_and_still_saves(four_images, tmp_path):
    job = _job(four_images, tmp_path, epochs=50, **{"batch": 2, "optim.nominal_batch": 2, "time_limit_min": 1e-6})
    state = fit(job).state  # 2 steps per epoch
    assert state.stopped == "time_limit" and state.optimizer_steps == 1 and len(state.history) == 1
    saved = checkpoint.load_state(tmp_path / "last")  # evaluated and checkpointed once
    assert saved["fit"]["stopped"] == "time_limit" and saved["fit"]["optimizer_steps"] == 1


def test_compile_is_opt_in_and_skipped_on_xla():
    """`train.compile` wraps only the model that runs the step (a real compiled training run costs minutes on 2
    cores, so this checks the wiring; the bench tests compare compiled inference with eager)."""
    model = build_model(preset("tiny", 2))
    assert dev.compile_model(model, CPU, False) is model
    compiled = dev.compile_model(model, CPU, True)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is model
    xla = dev.DeviceInfo("xla", torch.device("cpu"), torch.bfloat16)  # compile_model only reads the kind
    assert dev.compile_model(model, xla, True) is model
