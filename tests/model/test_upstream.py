"""Official yolov5 checkpoints import safely and predict what upstream predicts.

The golden outputs in tests/fixtures/yolov5/ were computed by the upstream yolov5 package itself
(`make_golden.py` there regenerates them in a throwaway venv); nothing here produced them.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from yolofps import cli
from yolofps.engine import checkpoint
from yolofps.model.upstream import (
    CheckpointImportError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
    import_checkpoint,
)
from yolofps.runtime.host import Deployment, Letterboxed, image_detections

FIXTURES = Path(__file__).parents[1] / "fixtures" / "yolov5"
GOLDEN = np.load(FIXTURES / "golden.npz")
INFO = json.loads((FIXTURES / "golden.json").read_text())


def _predict(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255  # as upstream's inference
    with torch.no_grad():
        return model.eval()(x)[0].numpy()


def _images() -> list[int]:
    return sorted(int(k.split("_")[1]) for k in GOLDEN.files if k.startswith("image_"))


@pytest.mark.parametrize("name", ["tiny_pkg.pt", "tiny_repo.pt"])
def test_imported_model_predicts_what_upstream_predicted(name):
    """`yolov5.models.*` (PyPI package) and `models.*` (git clone) pickles, fp16: decoded predictions within 1e-4."""
    imported = import_checkpoint(FIXTURES / name)
    assert imported.names == INFO["names"] and imported.source["dtype"] == "float16"
    for i in _images():
        ours, theirs = _predict(imported.model, GOLDEN[f"image_{i}"]), GOLDEN[f"pred_{i}"][0]
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


@pytest.mark.parametrize("multi_label", [False, True], ids=["deployed", "val.py multi-label"])
def test_after_nms_the_same_boxes_as_upstream(multi_label):
    """yolofps's NMS (the runtime's) on the imported model's predictions keeps upstream's boxes, same settings:
    single-label as deployed, and multi-label as upstream's val.py (and yolofps's mAP evaluation) runs it."""
    imported = import_checkpoint(FIXTURES / "tiny_pkg.pt")
    nms = INFO["nms"]
    deployment = Deployment(64, nms["conf_thres"], nms["iou_thres"], nms["max_det"], multi_label=multi_label)
    key = "nms_multi_label" if multi_label else "nms"
    compared = 0
    for i in _images():
        image = GOLDEN[f"image_{i}"]
        height, width = image.shape[:2]
        ours = image_detections(_predict(imported.model, image), Letterboxed("", (height, width), 1.0, (0.0, 0.0)),
                                deployment)
        theirs = GOLDEN[f"{key}_{i}"].copy()
        theirs[:, [0, 2]] = theirs[:, [0, 2]].clip(0, width)  # ours are clipped to the image, upstream's later
        theirs[:, [1, 3]] = theirs[:, [1, 3]].clip(0, height)
        assert len(ours) == len(theirs)
        order = lambda d: d[np.lexsort((d[:, 1], d[:, 0], d[:, 5]))]  # noqa: E731 - by class, then position
        np.testing.assert_allclose(order(ours), order(theirs), atol=1e-3)
        compared += len(theirs)
    assert compared > 0  # the fixture's weights leave boxes above conf_thres, so this compares something


def test_the_ema_weights_are_the_ones_imported():
    """upstream loads `ckpt['ema'] or ckpt['model']`; tiny_ema.pt holds the golden model as 'ema' and another
    model as 'model' (fp32), so only the EMA's weights give upstream's predictions."""
    imported = import_checkpoint(FIXTURES / "tiny_ema.pt")
    assert imported.source["weights_from"] == "ema" and imported.source["dtype"] == "float32"
    for i in _images():
        np.testing.assert_allclose(_predict(imported.model, GOLDEN[f"image_{i}"]), GOLDEN[f"pred_{i}"][0],
                                   rtol=1e-4, atol=1e-4 * np.abs(GOLDEN[f"pred_{i}"]).max())


def test_spec_comes_from_the_checkpoint():
    """Custom width/depth, class count and anchors are read from the checkpoint, not from a preset."""
    spec = import_checkpoint(FIXTURES / "tiny_pkg.pt").model.spec
    assert spec.num_classes == len(INFO["names"]) and list(spec.strides) == INFO["strides"]
    np.testing.assert_allclose(np.array(spec.anchors), np.array(INFO["anchors_pixels"]), rtol=1e-3)
    assert spec.layers[0].out_channels == 8 and spec.activation == "silu"


def test_a_planted_payload_is_refused_and_never_runs():
    marker = Path(INFO["payload_marker"])
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        import_checkpoint(FIXTURES / "payload.pt")
    assert not marker.exists()


@pytest.mark.parametrize(("name", "found"), [("focus_v5.pt", "Focus stem"), ("seg.pt", "SegmentationModel")])
def test_architectures_yolofps_cannot_express_are_refused_by_name(name, found):
    with pytest.raises(UnsupportedArchitectureError, match=found) as err:
        import_checkpoint(FIXTURES / name)
    assert "supported: ultralytics/yolov5 v6.0-v7.0" in str(err.value)


def test_damaged_files_are_named_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointImportError, match="not a torch zip checkpoint"):
        import_checkpoint(garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((FIXTURES / "tiny_pkg.pt").read_bytes()[:3000])
    with pytest.raises(CheckpointImportError):
        import_checkpoint(truncated)
    no_model = tmp_path / "no_model.pt"
    torch.save({"epoch": 3}, no_model)
    with pytest.raises(CheckpointImportError, match="no model in it"):
        import_checkpoint(no_model)
    assert zipfile.is_zipfile(no_model)


def _class_named(monkeypatch, module_name: str, name: str) -> type:
    """A plain class that pickles as `module_name.name` (a stand-in module registered for the test's duration)."""
    import sys
    import types

    cls = type(name, (), {"__module__": module_name})
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    setattr(sys.modules[module_name], name, cls)
    return cls


def test_an_ultralytics_package_model_is_refused_by_name(tmp_path, monkeypatch):
    """Anchor-free yolov5*u / YOLOv8 checkpoints pickle `ultralytics.nn.tasks.*`: refused before unpickling."""
    model = _class_named(monkeypatch, "ultralytics.nn.tasks", "DetectionModel")()
    torch.save({"model": model, "train_args": {}}, tmp_path / "yolov5nu.pt")
    with pytest.raises(UnsupportedArchitectureError, match="a model of the `ultralytics` package"):
        import_checkpoint(tmp_path / "yolov5nu.pt")


def test_a_checkpoint_of_admitted_names_but_wrong_shape_is_a_named_error(tmp_path, monkeypatch):
    """Only yolov5 class names in the pickle (so it is admitted), but nothing a model holds: a named error."""
    DetectionModel = _class_named(monkeypatch, "models.yolo", "DetectionModel")
    for state, message in (({"_modules": {"model": "not a module list"}}, "0 layers, not the 25"),
                           ({"_modules": ["not", "a", "dict"]}, "not a well-formed yolov5 model")):
        hostile = DetectionModel()
        hostile.__dict__.update(state)
        torch.save({"model": hostile}, tmp_path / "hostile.pt")
        with pytest.raises(CheckpointImportError, match=message):
            import_checkpoint(tmp_path / "hostile.pt")


def test_cli_import_writes_a_model_folder_that_loads(tmp_path, capsys):
    out = tmp_path / "imported"
    assert cli.main(["import", str(FIXTURES / "tiny_pkg.pt"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "classes (3): " + ", ".join(INFO["names"]) in printed and "parameters:" in printed
    model, meta = checkpoint.load_model(out)
    assert meta["names"] == INFO["names"] and meta["imported"]["sha256"] and meta["imported"]["file"] == "tiny_pkg.pt"
    np.testing.assert_allclose(_predict(model, GOLDEN["image_0"]), GOLDEN["pred_0"][0], rtol=1e-4,
                               atol=1e-4 * np.abs(GOLDEN["pred_0"]).max())
    assert cli.main(["import", str(FIXTURES / "payload.pt"), "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists() and "refused" in capsys.readouterr().err


def test_cli_import_never_replaces_what_is_not_a_model_folder(tmp_path, capsys):
    """Issue 20: `--out` an existing file or folder was swapped for the model (`--out /etc/passwd` replaced it);
    an unwritable place was an "unexpected error". A model folder is replaced, as a rerun expects."""
    source = str(FIXTURES / "tiny_pkg.pt")
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "f").write_text("keep me too")
    for out in ("notes.txt", "mine"):
        assert cli.main(["import", source, "--out", str(tmp_path / out)]) == 2
        assert "is not a yolofps model folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (tmp_path / "mine" / "f").read_text() == "keep me too"
    assert cli.main(["import", source, "--out", str(tmp_path / "no" / "such" / "\0x")]) == 2
    assert "unexpected" not in capsys.readouterr().err
    for _ in range(2):  # a model folder may be overwritten
        assert cli.main(["import", source, "--out", str(tmp_path / "model")]) == 0
