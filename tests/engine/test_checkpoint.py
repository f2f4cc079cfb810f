"""Model artifacts round-trip through safetensors; damaged files are named errors, not tracebacks."""

from __future__ import annotations

import json

import pytest
import torch

from yolofps.engine import checkpoint
from yolofps.engine.checkpoint import CheckpointError
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(preset("tiny", 3)).eval()
    state = {"fit": {"epoch": 2}, "optimizer": None, "torch_rng": torch.get_rng_state()}
    folder = checkpoint.save_model(tmp_path / "last", model, {"names": ["a", "b", "c"], "imgsz": 64}, state=state)
    return model, folder


def test_round_trip_gives_identical_outputs(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted([checkpoint.ARCH, checkpoint.WEIGHTS, checkpoint.META,
                                                              checkpoint.STATE])
    loaded, meta = checkpoint.load_model(folder)
    loaded.eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))
    assert meta["names"] == ["a", "b", "c"] and loaded.spec == model.spec
    assert checkpoint.load_state(folder)["fit"]["epoch"] == 2


def test_overwrite_is_atomic_and_leaves_no_temp_folders(saved, tmp_path):
    model, folder = saved
    checkpoint.save_model(folder, model, {"names": ["a", "b", "c"], "imgsz": 64, "epoch": 3})
    assert json.loads((folder / checkpoint.META).read_text())["epoch"] == 3
    assert not (folder / checkpoint.STATE).exists()  # the new artifact replaced the old folder whole
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


@pytest.mark.parametrize("damage, name", [
    (lambda f: (f / checkpoint.WEIGHTS).write_bytes((f / checkpoint.WEIGHTS).read_bytes()[:1000]), "weights"),
    (lambda f: (f / checkpoint.ARCH).write_text("{not json"), "arch.json"),
    (lambda f: (f / checkpoint.META).write_text("[1, 2"), "meta.json"),
    (lambda f: (f / checkpoint.ARCH).write_text(json.dumps(preset("n", 3).to_dict())), "weights"),
])
def test_damaged_artifacts_are_named_errors(saved, damage, name):
    _, folder = saved
    damage(folder)
    with pytest.raises(CheckpointError, match=name) as err:
        checkpoint.load_model(folder)
    assert "rerun" in str(err.value)


def test_truncated_state_is_a_named_error(saved):
    _, folder = saved
    path = folder / checkpoint.STATE
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="train_state.pt"):
        checkpoint.load_state(folder)


def test_a_swap_cut_short_is_undone_and_stale_temp_folders_are_cleaned(saved, tmp_path):
    import os

    from yolofps.engine import resume

    model, folder = saved
    os.replace(folder, folder.with_name(".last.old"))  # the on-disk state of a kill between the two renames
    (tmp_path / ".last.k1ll3d").mkdir()  # the temp folder of an earlier save that was killed
    state = resume.resume_point(tmp_path, "any", force=True)
    assert state["fit"]["epoch"] == 2 and folder.is_dir()
    checkpoint.save_model(str(folder), model, {"names": ["a", "b", "c"], "imgsz": 64})
    assert [p.name for p in tmp_path.iterdir()] == ["last"]
