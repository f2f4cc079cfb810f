"""The training loop on an XLA device (torch-xla on PJRT_DEVICE=CPU): `make test-xla` runs these in .venv-xla.

Real torch-xla, real compilations: the loop must settle (no new graphs per step after warm-up), losses stay
finite in bf16, and what it saves loads back on a CPU-only torch.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("PJRT_DEVICE", "CPU")  # before torch_xla initializes its runtime
pytest.importorskip("torch_xla", reason="torch-xla is installed only in .venv-xla (make test-xla)")
pytestmark = pytest.mark.xla

from configs import PLAIN_LOADER, loader_config, train_config  # noqa: E402
from helpers import PROJECT_ROOT, TINY_PARAMS  # noqa: E402
from yolofps import device as dev  # noqa: E402
from yolofps.config import EvalConfig, load_config  # noqa: E402
from yolofps.data import synthetic  # noqa: E402
from yolofps.data.dataset import YoloDataset, build_loader  # noqa: E402
from yolofps.engine import checkpoint  # noqa: E402
from yolofps.engine.datasets import Data  # noqa: E402
from yolofps.engine.objectives import DetectionObjective  # noqa: E402
from yolofps.engine.train import TrainingJob, fit  # noqa: E402
from yolofps.model.loss import YOLOv5Loss  # noqa: E402
from yolofps.model.spec import preset  # noqa: E402
from yolofps.model.yolo import build_model  # noqa: E402

PLAIN = loader_config(PLAIN_LOADER)


@pytest.fixture(scope="module")
def eight_images(tmp_path_factory):
    spec = synthetic.SyntheticSpec(num_train=8, num_val=2, image_size=64, min_aspect=1.0, max_objects=3,
                                   background_fraction=0.2, min_visible=0.5)
    return synthetic.generate(tmp_path_factory.mktemp("xla"), spec, seed=5)


def test_resolve_xla_is_bf16_without_scaler():
    info = dev.resolve("xla")
    assert info.kind == "xla" and info.device.type == "xla" and info.amp_dtype == torch.bfloat16
    assert not dev.grad_scaler(info).is_enabled() and info.world_size == 1 and info.is_main


def test_training_steps_settle_and_checkpoint_loads_on_cpu(eight_images, tmp_path):
    info = dev.resolve("xla")
    dev.seed_everything(0)
    dataset = YoloDataset(eight_images, "train", 64, PLAIN, train=True, seed=0)
    arch = preset("tiny", len(dataset.names))
    model = build_model(arch)
    objective = DetectionObjective(YOLOv5Loss(arch, image_size=64))
    # 4 epochs x 2 steps; warm-up over the first 4 steps, so the lr changes every step (it must not recompile)
    loop = train_config({"epochs": 4, "batch": 4, "optim.optimizer": "SGD", "optim.lr0": 0.02, "optim.warmup_epochs": 2,
                         "optim.nominal_batch": 4, "optim.ema": True, "loader.close_mosaic": 0, "workers": 0})
    val = build_loader(YoloDataset(eight_images, "val", 64, PLAIN, train=False), 2, shuffle=False, workers=0)
    job = TrainingJob("xla", model, objective, Data(dataset, val, dataset.names), loop,
                      EvalConfig(0.001, 0.6, 300, 0), info, tmp_path, meta={"names": list(dataset.names), "imgsz": 64})
    result = fit(job)
    trained, state, saved = result.model, result.state, {"last": tmp_path / "last"}
    compiles = [record["xla_compiles"] for record in state.history]
    print("XLA compiles after each epoch:", compiles)
    assert state.optimizer_steps == 8
    assert all(math.isfinite(record["train/loss"]) and record["train/loss"] > 0 for record in state.history)
    assert compiles[0] > 0 and compiles[1] == compiles[2] == compiles[3], compiles  # settled after epoch 1

    assert checkpoint.load_model(saved["last"])[1]["epoch"] == 4
    cpu_model, _ = checkpoint.load_model(tmp_path / "best")  # plain CPU torch from here on: fit's best, bit for bit
    expected = {k: v.cpu() for k, v in trained.state_dict().items()}
    for name, value in cpu_model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    resume = checkpoint.load_state(saved["last"])
    assert resume["fit"]["optimizer_steps"] == 8
    assert all(t.device.type == "cpu" for s in resume["optimizer"]["state"].values() for t in s.values()
               if isinstance(t, torch.Tensor))
    cpu_model.eval()
    with torch.no_grad():
        out = cpu_model(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(out).all()


def test_train_stage_runs_on_xla(tmp_path):
    from yolofps.paths import Paths
    from yolofps.stages import augment, data, train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(PROJECT_ROOT / "params.yaml", TINY_PARAMS | {
        "device": "xla", "mlflow.tracking_uri": uri, "data.num_train": 8, "augment.copies": 0,
        "train.batch": 4, "eval.sample_images": 2})
    paths = Paths(tmp_path)
    data.run(cfg, paths)
    augment.run(cfg, paths)
    result = train.run(cfg, paths)
    metrics = json.loads(paths.metrics("train").read_text())
    assert metrics == result.metrics and metrics["epochs_run"] == 2 and metrics["stopped"] == "completed"
    assert 0.0 <= metrics["metrics/mAP50-95B"] <= 1.0
    _, meta = checkpoint.load_model(paths.models("train") / "best")
    assert meta["device"] == "xla" and meta["finished"] is True
