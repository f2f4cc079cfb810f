"""The training loop: a tiny model overfits 4 images; an interrupted run resumes at the right epoch and LR."""

from __future__ import annotations

import math

import pytest
import torch

from configs import PLAIN_LOADER, loader_config, replaced, train_config
from yolofps import device as dev
from yolofps.data import synthetic
from yolofps.data.dataset import YoloDataset, build_loader
from yolofps.engine.predict import evaluate_model, fitness
from yolofps.engine.train import TrainingDivergedError, fit, lr_factor
from yolofps.model.loss import YOLOv5Loss
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model
from yolofps.stages.train import DetectionObjective

CPU = dev.resolve("cpu")
# no augmentation: the point is to check the optimizer, loss and evaluation agree
PLAIN = loader_config(PLAIN_LOADER)


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    spec = synthetic.SyntheticSpec(num_train=4, num_val=1, image_size=64, min_aspect=1.0, max_objects=2,
                                   background_fraction=0.0, min_visible=0.5)
    return synthetic.generate(tmp_path_factory.mktemp("four"), spec, seed=3)


def _setup(data_yaml, epochs, seed=0):
    dev.seed_everything(seed)
    dataset = YoloDataset(data_yaml, "train", 64, PLAIN, train=True, seed=seed)
    eval_loader = build_loader(YoloDataset(data_yaml, "train", 64, PLAIN, train=False), 4, shuffle=False, workers=0)
    arch = preset("tiny", len(dataset.names))
    model = build_model(arch)
    objective = DetectionObjective(YOLOv5Loss(arch, image_size=64))
    loop = train_config({"epochs": epochs, "batch": 4, "optim.optimizer": "SGD", "optim.lr0": 0.02,
                         "optim.warmup_epochs": 0, "optim.nominal_batch": 4, "optim.ema": False,
                         "loader.close_mosaic": 0})

    def make_loader(epoch, mosaic):
        return build_loader(dataset, 4, shuffle=True, workers=0, seed=seed + epoch)

    def evaluate(m):
        return evaluate_model(m, eval_loader, CPU, dataset.names)[0].metrics()

    return model, objective, make_loader, evaluate, loop


def test_tiny_model_overfits_four_images(four_images):
    model, objective, make_loader, evaluate, loop = _setup(four_images, epochs=300)  # 1 step per epoch
    loop = replaced(loop, {"optim.lr0": 0.1, "patience": 10_000})
    evaluate_every = lambda m: {}  # noqa: E731  evaluation only at the end keeps this test fast
    trained, state = fit(model, objective, make_loader, evaluate_every, loop, CPU,
                         on_epoch_end=lambda *a: None, fitness=lambda m: 0.0)
    first, last = state.history[0]["train/loss"], state.history[-1]["train/loss"]
    assert last < first / 2, (first, last)
    assert evaluate(trained)["metrics/mAP50B"] > 0.5


class Interrupt(Exception):
    pass


def test_resume_continues_at_the_right_epoch_and_lr(four_images):
    model, objective, make_loader, evaluate, loop = _setup(four_images, epochs=4)
    _, full = fit(model, objective, make_loader, evaluate, loop, CPU, on_epoch_end=lambda *a: None, fitness=fitness)

    saved = {}

    def stop_after_two(_model, state, end):
        if state.epoch == 2:
            saved["state"] = end.resume_state()
            raise Interrupt

    model, objective, make_loader, evaluate, loop = _setup(four_images, epochs=4)
    with pytest.raises(Interrupt):
        fit(model, objective, make_loader, evaluate, loop, CPU, on_epoch_end=stop_after_two, fitness=fitness)
    model, objective, make_loader, evaluate, loop = _setup(four_images, epochs=4, seed=0)
    _, resumed = fit(model, objective, make_loader, evaluate, loop, CPU, resume=saved["state"],
                     on_epoch_end=lambda *a: None, fitness=fitness)
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    for before, after in zip(full.history, resumed.history):
        assert after["lr/pg0"] == pytest.approx(before["lr/pg0"])
        assert after["train/loss"] == pytest.approx(before["train/loss"], rel=1e-3, abs=1e-4)
    assert resumed.optimizer_steps == full.optimizer_steps


def test_a_diverging_run_stops_with_a_named_error_and_keeps_the_last_good_epoch(four_images):
    """lr0 1e6 with plain SGD blows the weights up after the first step: the loop stops at the first non-finite
    epoch loss, before that epoch reaches on_epoch_end (which writes the checkpoints)."""
    model, objective, make_loader, evaluate, loop = _setup(four_images, epochs=20)
    loop = replaced(loop, {"optim.lr0": 1e6, "optim.grad_clip": 0.0})
    saved = []
    with pytest.raises(TrainingDivergedError, match="not finite; the last good checkpoint") as err:
        fit(model, objective, make_loader, lambda m: {}, loop, CPU,
            on_epoch_end=lambda m, state, end: saved.append(end.record), fitness=lambda m: 0.0)
    assert saved and all(math.isfinite(r["train/loss"]) for r in saved)
    assert f"epoch {len(saved) + 1}:" in str(err.value)


def test_lr_schedule_decays_to_lrf():
    linear = train_config({"epochs": 10, "batch": 4, "optim.lr0": 0.01, "optim.lrf": 0.1, "optim.cos_lr": False})
    cosine = replaced(linear, {"optim.cos_lr": True})
    for spec in (linear, cosine):
        assert lr_factor(spec, 0) == pytest.approx(1.0) and lr_factor(spec, 10) == pytest.approx(0.1)
    assert lr_factor(cosine, 2) > lr_factor(linear, 2)


def test_optimizer_groups_follow_yolov5():
    from yolofps.engine.train import build_optimizer

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
    from yolofps.engine.train import pick_optimizer

    short = pick_optimizer("auto", lr0=0.01, momentum=0.937, warmup_bias_lr=0.1, num_images=400, batch=16,
                           nominal_batch=64, epochs=30, num_classes=4)
    assert short == ("AdamW", 0.00125, 0.9, 0.0)
    long = pick_optimizer("auto", lr0=0.01, momentum=0.937, warmup_bias_lr=0.1, num_images=120_000, batch=16,
                          nominal_batch=64, epochs=300, num_classes=80)
    assert long[0] == "SGD"
    assert pick_optimizer("SGD", lr0=0.02, momentum=0.9, warmup_bias_lr=0.1, num_images=1, batch=1,
                          nominal_batch=1, epochs=1, num_classes=1) == ("SGD", 0.02, 0.9, 0.1)
    model = build_model(preset("tiny", 2))
    from yolofps.engine.train import build_optimizer

    adam = build_optimizer(model, train_config({"epochs": 1, "batch": 16, "optim.optimizer": "AdamW",
                                                        "optim.lr0": 0.001}))
    assert isinstance(adam, torch.optim.AdamW) and len(adam.param_groups) == 3


def test_time_limit_stops_after_the_current_step_and_still_saves(four_images):
    model, objective, make_loader, evaluate, loop = _setup(four_images, epochs=50)
    loop = replaced(loop, {"batch": 2, "optim.nominal_batch": 2, "time_limit_min": 1e-6})  # 2 steps per epoch
    ends = []
    _, state = fit(model, objective, make_loader, evaluate, loop, CPU,
                   on_epoch_end=lambda m, s, end: ends.append((end.stop, end.resume_state())), fitness=fitness)
    assert state.stopped == "time_limit" and state.optimizer_steps == 1 and len(state.history) == 1
    (stop, saved), = ends  # evaluated and checkpointed once, marked as the last epoch
    assert stop and saved["fit"]["stopped"] == "time_limit" and saved["fit"]["optimizer_steps"] == 1


def test_compile_is_opt_in_and_skipped_on_xla():
    """`train.compile` wraps only the model that runs the step (a real compiled training run costs minutes on 2
    cores, so this checks the wiring; the bench tests compare compiled inference with eager)."""
    model = build_model(preset("tiny", 2))
    assert dev.compile_model(model, CPU, False) is model
    compiled = dev.compile_model(model, CPU, True)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is model
    xla = dev.DeviceInfo("xla", torch.device("cpu"), torch.bfloat16)  # compile_model only reads the kind
    assert dev.compile_model(model, xla, True) is model
