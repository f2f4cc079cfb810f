"""The built-in demo set: deterministic from the seed, and its labels pass validation untouched."""

from __future__ import annotations

import numpy as np

from helpers import TINY_SPEC
from yolofps.data import formats, synthetic, validate


def _snapshot(data_yaml):
    root = data_yaml.parent
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny_synthetic):
    again = synthetic.generate(tmp_path / "again", TINY_SPEC, seed=0)
    other = synthetic.generate(tmp_path / "other", TINY_SPEC, seed=1)
    assert _snapshot(tiny_synthetic) == _snapshot(again)
    assert _snapshot(tiny_synthetic) != _snapshot(other)


def test_labels_are_valid_and_varied(tmp_path):
    spec = synthetic.SyntheticSpec(num_train=40, num_val=5, image_size=96, min_aspect=0.75, max_objects=5,
                                   background_fraction=0.15, min_visible=0.3)
    data_yaml = synthetic.generate(tmp_path / "set", spec, seed=7)
    result = validate.validate_yolo(data_yaml, clip_tolerance=0.0)
    assert result.report.issues == []
    assert result.names == synthetic.CLASS_NAMES
    train = result.splits["train"]
    assert len(train) == 40 and len(result.splits["val"]) == 5
    rows = np.concatenate([s.rows for s in train])
    assert set(rows[:, 0].astype(int)) == {0, 1, 2, 3}
    assert (rows[:, 3:] > 0).all() and (rows[:, 1:3] - rows[:, 3:] / 2 >= -1e-6).all()
    assert (rows[:, 1:3] + rows[:, 3:] / 2 <= 1 + 1e-6).all()
    assert any(len(s.rows) == 0 for s in train), "expected some background images"
    sizes = {(s.width, s.height) for s in train}
    assert len(sizes) > 1 and all(max(size) == 96 for size in sizes)


def test_occluded_objects_get_no_label():
    mask_a = np.zeros((20, 20), np.uint8)
    mask_a[5:10, 5:10] = 1
    mask_b = np.zeros((20, 20), np.uint8)
    mask_b[4:11, 4:11] = 1  # drawn later, covers all of a
    rows = synthetic._visible_rows([(0, mask_a), (1, mask_b)], 20, 20, min_visible=0.3)
    assert rows[:, 0].tolist() == [1]


def test_data_yaml_round_trips(tiny_synthetic):
    spec = formats.load_data_yaml(tiny_synthetic)
    assert spec.names == synthetic.CLASS_NAMES
    assert [len(formats.list_images(loc)) for split in formats.SPLITS for loc in spec.splits[split]] == [6, 3]
