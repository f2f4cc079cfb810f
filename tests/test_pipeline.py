"""The pipeline end to end with real DVC and real Prefect: the session's tiny pipeline (tests/conftest.py:
`shared_run`), copies of it where a test changes something, and a fresh project for the flow's error paths."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from helpers import PROJECT_ROOT, SHARED_PARAMS, copy_run, run_cmd
from yolofps.cli import STAGES
from yolofps.paths import Paths

pytestmark = pytest.mark.slow
STAGE_ORDER = ["data", "augment", "train", "prune", "distill", "quantize", "bench", "register"]


def dvc(project, *args, check=True):
    return run_cmd([sys.executable, "-m", "dvc", *args], project, check=check)


def assert_up_to_date(project):
    status = dvc(project, "status", "--json").stdout
    assert json.loads(status) == {}, status


def test_dvc_yaml_matches_paths_and_cli():
    """dvc.yaml is the single definition of the graph: its outs are the paths stages write, deps exist."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    paths = Paths()
    assert set(stages) <= set(STAGES)
    expected_outs = {
        "data": {paths.prepared_data, paths.data_report},
        "augment": {paths.augmented_data},
        "train": {paths.models("train"), paths.plots / "train", paths.checkpoints("train")},
        "prune": {paths.models("prune"), paths.checkpoints("prune")},
        "distill": {paths.models("distill"), paths.checkpoints("distill")},
        "quantize": {paths.models("quantize")},
        "bench": {paths.models("bench"), paths.reports / "bench"},
        "register": {paths.reports / "registered_model.json"},
    }
    for name, stage in stages.items():
        assert stage["cmd"] == f"yolofps {name}"
        outs = {out if isinstance(out, str) else next(iter(out)) for out in stage["outs"]}
        assert {p.as_posix() for p in expected_outs[name]} == outs
        assert [next(iter(m)) for m in stage["metrics"]] == [paths.metrics(name).as_posix()]
        own_code = f"src/yolofps/stages/{name}.py"  # the full import closure: tests/test_dvc_deps.py
        assert any(own_code == dep or own_code.startswith(f"{dep}/") for dep in stage["deps"]), name
        produced = {p.as_posix() for o in expected_outs.values() for p in o} | {
            paths.metrics(s).as_posix() for s in stages}
        for dep in stage["deps"]:
            assert (PROJECT_ROOT / dep).exists() or dep in produced, dep
        assert "seed" in stage["params"] and name in stage["params"]


def test_dvc_repro_runs_every_stage_then_nothing(shared_run, tmp_path):
    for name in STAGE_ORDER:
        assert f"Running stage '{name}'" in shared_run.output[name], shared_run.output[name]
    root = shared_run.root
    assert json.loads((root / "metrics" / "train.json").read_text())["epochs_run"] == SHARED_PARAMS["train.epochs"]
    metrics = json.loads((root / "metrics" / "augment.json").read_text())
    assert metrics["train_images_out"] == SHARED_PARAMS["data.num_train"] and metrics["val_images"] == 4
    project = copy_run(shared_run, tmp_path / "project", keep_tracking=True)
    second = dvc(project, "repro").stdout
    assert "Running stage" not in second
    assert_up_to_date(project)
    # a params change reruns only the stages that declare it
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("copies: 0", "copies: 1"))
    rerun = dvc(project, "repro", "augment").stdout
    assert "Running stage 'augment'" in rerun and "Running stage 'data'" not in rerun
    assert json.loads((project / "metrics" / "augment.json").read_text())["train_images_out"] == 2 * 8


def test_dvc_repro_optimizes_an_imported_official_checkpoint(shared_run, tmp_path):
    """Bring your own yolov5: `train.weights` + `train.epochs: 0` reruns train .. register on the imported model."""
    import hashlib
    import shutil

    import mlflow

    from tasks.dvc import apply_overrides

    project = copy_run(shared_run, tmp_path / "project")  # data and augment are done and stay so
    checkpoint = PROJECT_ROOT / "tests" / "fixtures" / "yolov5" / "shapes_nc4.pt"  # upstream-made, the demo's classes
    shutil.copy(checkpoint, project / "weights" / "yolov5-shapes.pt")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    apply_overrides(project / "params.yaml", {"train.weights": "weights/yolov5-shapes.pt", "train.epochs": 0,
                                              "mlflow.tracking_uri": uri})
    out = dvc(project, "repro").stdout
    assert [n for n in STAGE_ORDER if f"Running stage '{n}'" in out] == STAGE_ORDER[2:], out  # train .. register
    assert "train: epochs is 0: evaluated weights/yolov5-shapes.pt as it is" in out
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert train["epochs_run"] == 0 and train["stopped"] == "not_trained" and 0 <= train["metrics/mAP50-95B"] <= 1
    meta = json.loads((project / "models" / "train" / "best" / "meta.json").read_text())
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["start_weights_sha256"] == sha256 and meta["names"] == ["ellipse", "rectangle", "triangle", "cross"]
    receipt = json.loads((project / "reports" / "registered_model.json").read_text())
    version = mlflow.MlflowClient(uri).get_model_version(receipt["model_name"], receipt["version"])
    assert version.tags["start_weights_sha256"] == sha256
    assert version.tags["start_weights"] == "weights/yolov5-shapes.pt"
    assert_up_to_date(project)


def test_flow_surfaces_the_stage_error(project, prefect_harness):
    from flows.pipeline import pipeline
    from yolofps.errors import ConfigError

    with pytest.raises(ConfigError, match="num_trian"):  # rejected before params.yaml is touched
        pipeline(overrides={"data.num_trian": 3}, project_dir=str(project))
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("copies: 1", "copies: -3"))
    state = pipeline(project_dir=str(project), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="augment.copies must be >= 0"):
        state.result()
