"""Augmentation keeps every box valid; the offline stage writes K copies and counts dropped boxes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import project_config
from helpers import PROJECT_ROOT
from yolofps.config import ConfigError, TransformSpec, load_config
from yolofps.data import augment, formats, validate
from yolofps.paths import Paths
from yolofps.stages import augment as augment_stage
from yolofps.stages import data as data_stage

# Heavier geometry than params.yaml's list, so boxes really get cut and dropped.
HARSH = project_config().augment.transforms + (
    TransformSpec("Affine", {"scale": [0.3, 2.0], "rotate": [-30, 30], "translate_percent": [-0.3, 0.3], "p": 1.0}),
    TransformSpec("RandomCrop", {"height": 40, "width": 40, "p": 0.5}),
)


@st.composite
def yolo_boxes(draw):
    """Random valid YOLO rows (class, cx, cy, w, h) inside the unit square, including tiny and full-image boxes."""
    count = draw(st.integers(0, 6))
    rows = []
    for _ in range(count):
        x1, x2 = sorted(draw(st.tuples(st.floats(0, 1), st.floats(0, 1))))
        y1, y2 = sorted(draw(st.tuples(st.floats(0, 1), st.floats(0, 1))))
        if x2 - x1 < 1e-3 or y2 - y1 < 1e-3:
            continue
        rows.append((draw(st.integers(0, 3)), (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1))
    return np.array(rows, np.float32).reshape(-1, 5)


@settings(max_examples=60, deadline=None)
@given(rows=yolo_boxes(), seed=st.integers(0, 2**16), height=st.sampled_from([48, 64]))
def test_augmented_boxes_stay_valid(rows, seed, height):
    pipeline = augment.build_pipeline(HARSH, min_visibility=0.2, min_area=1.0, seed=seed)
    image = np.random.default_rng(seed).integers(0, 255, (height, 64, 3), dtype=np.uint8)
    out_image, out_rows = augment.apply(pipeline, image, rows)
    assert out_image.dtype == np.uint8 and out_image.ndim == 3
    assert out_rows.shape[1] == 5 and len(out_rows) <= len(rows)
    assert set(out_rows[:, 0].astype(int)) <= set(rows[:, 0].astype(int))
    assert (out_rows[:, 3:] > 0).all()
    assert (out_rows[:, 1:3] - out_rows[:, 3:] / 2 >= -1e-5).all()
    assert (out_rows[:, 1:3] + out_rows[:, 3:] / 2 <= 1 + 1e-5).all()


@pytest.mark.parametrize("spec, match", [
    (TransformSpec("NoSuchTransform", {}), "no transform named"),
    (TransformSpec("Affine", {"scael": 2}), "unknown argument"),
    (TransformSpec("Affine", {"scale": "big"}), "bad arguments"),
    (TransformSpec("GridDistortion", {}), None),  # supports boxes: fine
    (TransformSpec("Normalize", {}), "turns a uint8 RGB image into float32"),  # issue 20: every JPEG came out black
    (TransformSpec("ToFloat", {"p": 0.5}), "turns a uint8 RGB image into float32"),
    (TransformSpec("ToGray", {"p": 0.1}), None),  # keeps 3 uint8 channels: fine
])
def test_bad_transforms_are_config_errors(spec, match):
    if match is None:
        augment.build_pipeline([spec])
        return
    with pytest.raises(ConfigError, match=match):
        augment.build_pipeline([spec])


def test_stage_writes_copies_keeps_val_and_counts_drops(tmp_path):
    cfg = load_config(PROJECT_ROOT / "params.yaml", {
        "data.num_train": 8, "data.num_val": 3, "data.image_size": 96, "augment.copies": 2,
        "augment.transforms": [{"Affine": {"scale": [0.3, 2.5], "translate_percent": [-0.4, 0.4], "p": 1.0}}],
    })
    paths = Paths(tmp_path)
    data_stage.run(cfg, paths)
    result = augment_stage.run(cfg, paths)
    m = result.metrics
    assert (m["train_images_in"], m["train_images_out"], m["augmented_images"], m["val_images"]) == (8, 24, 16, 3)
    assert m["augmented_boxes_dropped"] == m["augmented_boxes_in"] - m["augmented_boxes_kept"] > 0
    out = validate.validate_yolo(paths.augmented_data / "data.yaml", clip_tolerance=0.0)
    assert out.report.issues == [] and len(out.splits["train"]) == 24
    for image in (paths.prepared_data / "images" / "val").iterdir():  # val is untouched
        assert (paths.augmented_data / "images" / "val" / image.name).read_bytes() == image.read_bytes()
    kept = sum(len(formats.read_labels(p)) for p in (paths.augmented_data / "labels" / "train").glob("*_aug*.txt"))
    assert kept == m["augmented_boxes_kept"]


def test_bad_transform_fails_before_outputs_are_touched(tmp_path):
    paths = Paths(tmp_path)
    marker = paths.augmented_data / "earlier.txt"
    marker.parent.mkdir(parents=True)
    marker.write_text("kept")
    cfg = load_config(PROJECT_ROOT / "params.yaml", {"augment.transforms": ["Nope"]})
    with pytest.raises(ConfigError):
        augment_stage.run(cfg, paths)
    assert marker.read_text() == "kept"
