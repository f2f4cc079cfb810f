"""DDP through torchrun on CPU (gloo, two real processes) against one process with the same global batch.

The train stage relaunches itself through `torch.distributed.run`; rank 0 alone writes the checkpoints, the
metrics files and the one MLflow run.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from configs import PLAIN_LOADER, loader_config
from helpers import PROJECT_ROOT, TINY_PARAMS, run_cmd
from yolofps import device as dev
from yolofps.config import load_config
from yolofps.data.dataset import YoloDataset, build_loader
from yolofps.engine import checkpoint
from yolofps.paths import Paths
from yolofps.stages import augment, data, train

# no random augmentation: both runs must see the same pixels, so only the process split differs
PLAIN = {f"train.loader.{key}": value for key, value in PLAIN_LOADER.items() if key != "max_boxes"}
# a real learning rate from the first step, so the trajectories move and a missing gradient all-reduce shows
PARAMS = TINY_PARAMS | PLAIN | {"data.num_train": 8, "augment.copies": 0, "train.batch": 4, "train.epochs": 3,
                                "train.optim.nominal_batch": 4, "train.optim.ema": False,
                                "train.optim.optimizer": "SGD", "train.optim.lr0": 0.05, "train.optim.warmup_epochs": 0,
                                "eval.sample_images": 2}


def _run(root, processes: int):
    cfg = load_config(PROJECT_ROOT / "params.yaml", PARAMS | {"mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                                                              "train.distributed.nproc_per_node": processes})
    paths = Paths(root)
    data.run(cfg, paths)
    augment.run(cfg, paths)
    start = time.perf_counter()
    result = train.run(cfg, paths)
    print(f"train with {processes} process(es): {time.perf_counter() - start:.1f} s")
    with (paths.plots / "train.csv").open() as handle:
        history = list(csv.DictReader(handle))
    return cfg, paths, result, history


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), 1), _run(tmp_path_factory.mktemp("ddp"), 2)


def test_two_processes_follow_the_single_process_loss(runs):
    (_, _, _, single), (_, _, result, ddp) = runs
    assert len(single) == len(ddp) == 3
    assert float(single[-1]["train/loss"]) < float(single[0]["train/loss"])
    for one, two in zip(single, ddp):
        print({k: (float(one[k]), float(two[k])) for k in ("train/loss", "train/box_loss", "train/obj_loss")})
        assert float(two["lr/pg0"]) == pytest.approx(float(one["lr/pg0"]))
        # same global batches and averaged gradients, but BatchNorm statistics are per process (2 images, not 4):
        # that alone moves the losses by up to ~4 % (total) and ~15 % (the small objectness term) over 3 epochs.
        # The exact DDP == one process check, BN removed, is the test above.
        assert float(two["train/loss"]) == pytest.approx(float(one["train/loss"]), rel=0.05)
        for key in ("train/box_loss", "train/obj_loss", "train/cls_loss"):
            assert float(two[key]) == pytest.approx(float(one[key]), rel=0.25), key
    assert result.metrics["epochs_run"] == 3 and result.metrics["stopped"] == "completed"


def test_ddp_fit_syncs_and_scales_gradients_like_one_process(tmp_path):
    """The same loop as 2 gloo ranks and alone (BN removed): ranks stay identical, updates match one process."""
    worker = Path(__file__).with_name("ddp_fit_worker.py")
    run_cmd([sys.executable, str(worker), str(tmp_path / "one.pt"), str(tmp_path / "data1")], tmp_path)
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
             str(tmp_path / "two.pt"), str(tmp_path / "data2")], tmp_path)
    names = ("one.pt.0", "two.pt.0", "two.pt.1")
    one, rank0, rank1 = (torch.load(tmp_path / name, weights_only=True) for name in names)
    assert rank0["has_result"] and not rank1["has_result"]  # rank 0 evaluates and saves, rank 1 only trains
    for name, value in rank0["weights"].items():  # DDP keeps the replicas identical
        assert torch.allclose(rank1["weights"][name], value, rtol=0, atol=1e-7), name
    names = [n for n, v in one["initial"].items() if v.dtype.is_floating_point]

    def update(run):
        return torch.cat([(run["weights"][n] - run["initial"][n]).flatten() for n in names])

    single, ddp = update(one), update(rank0)
    cosine = torch.nn.functional.cosine_similarity(single, ddp, dim=0)
    print(f"update norm one process {single.norm():.4g}, two {ddp.norm():.4g}, cosine {cosine:.4f}")
    # a missing `loss * world_size` halves the update; unsynced ranks differ (above). What is left is yolov5's
    # own DDP difference: box and class losses are means over each process's anchor matches.
    assert ddp.norm() / single.norm() == pytest.approx(1.0, abs=0.15) and cosine > 0.95
    losses = [(r1["train/loss"], r2["train/loss"]) for r1, r2 in zip(one["history"], rank0["history"])]
    assert all(b == pytest.approx(a, rel=0.01) for a, b in losses), losses
    assert losses[-1][0] < losses[0][0]


def test_rank_zero_alone_writes_files_and_the_mlflow_run(runs):
    from mlflow import MlflowClient

    _, (cfg, paths, _, _) = runs
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3  # one value per epoch, not per rank
    assert sorted(p.name for p in paths.checkpoints("train").iterdir()) == ["best", "last"]
    assert sorted(p.name for p in paths.models("train").iterdir()) == ["best", "last"]
    _, meta = checkpoint.load_model(paths.models("train") / "best")
    assert meta["world_size"] == 2 and meta["finished"] is True
    assert json.loads(paths.metrics("train").read_text())["epochs_run"] == 3


def test_sharded_loader_splits_each_global_batch(tmp_path):
    from yolofps.data import synthetic

    spec = synthetic.SyntheticSpec(num_train=8, num_val=1, image_size=64, min_aspect=1.0, max_objects=2,
                                   background_fraction=0.0, min_visible=0.5)
    data_yaml = synthetic.generate(tmp_path, spec, seed=1)
    dataset = YoloDataset(data_yaml, "train", 64, loader_config({"max_boxes": 4}), train=False)

    def paths_of(loader):
        return [[meta["path"] for meta in metas] for _, _, _, metas in loader]

    whole = paths_of(build_loader(dataset, 4, shuffle=True, workers=0, seed=7, drop_last=True))
    shards = [paths_of(build_loader(dataset, 2, shuffle=True, workers=0, seed=7, drop_last=True, rank=rank,
                                    world_size=2)) for rank in (0, 1)]
    assert [a + b for a, b in zip(*shards)] == whole


def test_torchrun_command_single_and_multi_node():
    one = dev.torchrun_command(["yolofps.cli", "train"], nproc_per_node=2, nnodes=1, rdzv_endpoint="", rdzv_id="x")
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--standalone", "-m",
                       "yolofps.cli", "train"]
    two = dev.torchrun_command(["yolofps.cli", "train"], nproc_per_node=8, nnodes=2, rdzv_endpoint="node0:29500",
                               rdzv_id="job1")
    assert "--rdzv_backend=c10d" in two and "--rdzv_endpoint=node0:29500" in two and "--rdzv_id=job1" in two
