"""The `train` stage of the session's tiny pipeline: outputs on disk and a real MLflow run in its SQLite store."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from helpers import PROJECT_ROOT, SHARED_PIPELINE_RUN_ID
from yolofps.config import load_config
from yolofps.engine import checkpoint, resume
from yolofps.errors import ConfigError
from yolofps.paths import Paths
from yolofps.registry import resolve_tracking_uri
from yolofps.stages import train

METRIC_KEYS = {"metrics/mAP50B", "metrics/mAP50-95B", "metrics/precisionB", "metrics/recallB"}


@pytest.fixture(scope="module")
def trained(shared_run):
    """The shared run (read only): its config, with the project-relative tracking URI made absolute, and paths."""
    cfg = load_config(shared_run.root / "params.yaml")
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, shared_run.root)
    return dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=uri)), Paths(shared_run.root)


def test_outputs_on_disk(trained):
    cfg, paths = trained
    metrics = json.loads(paths.metrics("train").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert all(0.0 <= metrics[key] <= 1.0 for key in METRIC_KEYS)
    assert metrics["epochs_run"] == cfg.train.epochs and metrics["params"] > 0
    for name in ("best", "last"):
        model, meta = checkpoint.load_model(paths.models("train") / name)
        assert meta["names"] == ["ellipse", "rectangle", "triangle", "cross"] and meta["finished"] is True
        assert meta["imgsz"] == cfg.train.imgsz
    with (paths.plots / "train.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == list(range(cfg.train.epochs))
    assert {"train/box_loss", "train/obj_loss", "train/cls_loss", "lr/pg0", "lr/pg2"} | METRIC_KEYS <= set(rows[0])
    for png in ("pr_curve.png", "confusion_matrix.png", "val_predictions.png"):
        assert (paths.plots / "train" / png).stat().st_size > 1000


def test_mlflow_run_holds_metrics_params_tags_and_artifacts(trained):
    from mlflow import MlflowClient

    cfg, _ = trained
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")  # the other stages log runs too
    assert run.info.status == "FINISHED"
    assert METRIC_KEYS | {"train/box_loss", "train/obj_loss", "train/cls_loss", "lr/pg0"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "train/box_loss")) == cfg.train.epochs
    assert run.data.params["train.model"] == "tiny" and run.data.params["seed"] == "0"
    assert run.data.tags["pipeline_run_id"] == SHARED_PIPELINE_RUN_ID and run.data.tags["stage"] == "train"
    assert "git_commit" in run.data.tags and "params_hash" in run.data.tags

    def artifacts(path=None):
        for item in client.list_artifacts(run.info.run_id, path):
            yield from artifacts(item.path) if item.is_dir else [item.path]

    found = set(artifacts())
    assert {"model/best/arch.json", "model/best/weights.safetensors", "model/last/meta.json",
            "plots/pr_curve.png", "results/train.csv", "results/train.json"} <= found


def test_rerun_after_a_finished_run_starts_over_and_forced_resume_continues(trained, capsys):
    cfg, paths = trained
    assert resume.resume_point(paths.checkpoints("train"), "other-hash", force=False) is None
    state = resume.resume_point(paths.checkpoints("train"), "other-hash", force=True)
    assert state["fit"]["epoch"] == cfg.train.epochs


FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "yolov5" / "tiny_pkg.pt"  # upstream-made, 3 classes


def test_official_weights_with_other_classes_keep_backbone_and_neck(trained, tmp_path):
    """train.weights with 3 classes on the 4-class data: everything but the Detect convs comes from the checkpoint."""
    import shutil

    import torch

    from yolofps.model.upstream import import_checkpoint

    cfg, _ = trained
    (tmp_path / "weights").mkdir()
    shutil.copy(FIXTURE, tmp_path / "weights" / "tiny.pt")
    weights = dataclasses.replace(cfg.train, weights="weights/tiny.pt")
    with pytest.warns(UserWarning, match="3 classes, the data set 4: backbone and neck kept"):
        model, start = train.initial_model(Paths(tmp_path), weights, ("a", "b", "c", "d"))
    official = import_checkpoint(FIXTURE).model.state_dict()
    assert model.spec.num_classes == 4 and start["detect_reinitialized"] and len(start["start_weights_sha256"]) == 64
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in official.items() if not k.startswith("model.24.m."))
    assert ours["model.24.m.0.weight"].shape[0] == 3 * (5 + 4)
    with pytest.raises(ConfigError, match="train.epochs: 0 keeps the model as it is"):
        train.initial_model(Paths(tmp_path), dataclasses.replace(weights, epochs=0), ("a", "b", "c", "d"))
    with pytest.raises(ConfigError, match="does not exist"):
        train.initial_model(Paths(tmp_path), dataclasses.replace(weights, weights="weights/none.pt"), ("a",))
