"""The photo set: valid YOLO labels, every class, boxes in the image, disjoint train/val regions, deterministic."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("skimage")

from yolofps.data import formats, photos, validate  # noqa: E402


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """12 train + 6 val tiles at 96 px; returns the data.yaml."""
    return photos.build_photo_dataset(tmp_path_factory.mktemp("photos"), image_size=96, num_train=12, num_val=6)


def _labels(data_yaml, split):
    return [formats.read_labels(p) for p in sorted((data_yaml.parent / "labels" / split).glob("*.txt"))]


def _snapshot(data_yaml):
    root = data_yaml.parent
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_validates_without_issues_and_every_class_appears(small_set):
    checked = validate.validate_yolo(small_set)
    assert checked.report.issues == []
    assert checked.names == photos.CLASS_NAMES
    assert (checked.report.counts["train/images"], checked.report.counts["val/images"]) == (12, 6)
    for split in formats.SPLITS:
        classes = {int(row[0]) for rows in _labels(small_set, split) for row in rows}
        assert classes == set(range(len(photos.CLASS_NAMES))), split


def test_tiles_have_the_long_side_and_boxes_inside(small_set):
    for split in formats.SPLITS:
        for image in sorted((small_set.parent / "images" / split).glob("*.jpg")):
            assert max(formats.decode_image(image).shape[:2]) == 96
        rows = np.concatenate(_labels(small_set, split))
        x1, y1 = rows[:, 1] - rows[:, 3] / 2, rows[:, 2] - rows[:, 4] / 2
        x2, y2 = rows[:, 1] + rows[:, 3] / 2, rows[:, 2] + rows[:, 4] / 2
        assert (rows[:, 3:] > 0).all()
        assert x1.min() >= -1e-6 and y1.min() >= -1e-6 and x2.max() <= 1 + 1e-6 and y2.max() <= 1 + 1e-6


def test_train_and_val_windows_come_from_disjoint_regions():
    for photo in photos.load_photos():
        regions = photos.split_regions(photo)
        (tx0, _, tx1, _), (vx0, _, vx1, _) = regions["train"], regions["val"]
        assert tx0 == 0 and tx1 == vx0 and vx1 == photo.image.shape[1]
        assert 0.55 <= tx1 / vx1 <= 0.75
        for index in range(200):
            rng = np.random.default_rng(index)
            train = photos.pick_window(rng, regions["train"], photo.crop_sides)
            val = photos.pick_window(rng, regions["val"], photo.crop_sides)
            assert 0 <= train[0] < train[2] <= tx1, (photo.name, train)
            assert tx1 <= val[0] < val[2] <= vx1, (photo.name, val)
            assert 0 <= min(train[1], val[1]) and max(train[3], val[3]) <= photo.image.shape[0]


def test_split_column_avoids_boxes():
    boxes = np.array([[0, 0, 60, 10], [62, 0, 80, 10], [50, 20, 70, 30]], np.float64)  # only column 60..62 is free
    column = photos.split_column(boxes, width=100)
    assert 60 <= column <= 62


def _square_photo():
    """A 100 x 100 black photograph with one white 40 x 40 object at (40..80, 30..70)."""
    image = np.zeros((100, 100, 3), np.uint8)
    objects = np.zeros((100, 100), np.int32)
    image[30:70, 40:80], objects[30:70, 40:80] = 255, 1
    return photos.Photo("square", 0, image, objects, np.array([[40, 30, 80, 70]], np.float64), (1000, 1000))


def test_cut_box_is_clipped_above_60_percent_and_greyed_out_below():
    photo = _square_photo()
    rng = np.random.default_rng(0)
    # crop sides larger than the region: the window is the region itself, here 70 % of the box inside
    tile, rows, greyed = photos.render_tile(rng, photo, (0, 0, 68, 100), image_size=100)
    assert greyed == 0 and len(rows) == 1
    box_width = rows[0, 3] * tile.shape[1]
    assert box_width == pytest.approx(28, abs=1)
    tile, rows, greyed = photos.render_tile(rng, photo, (0, 0, 60, 100), image_size=100)  # 50 % inside
    assert greyed == 1 and len(rows) == 0
    assert tile.max() < 128  # the unlabeled half square is painted over, not left visible


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small_set):
    again = photos.build_photo_dataset(tmp_path / "again", image_size=96, num_train=12, num_val=6)
    other = photos.build_photo_dataset(tmp_path / "other", image_size=96, num_train=12, num_val=6, seed=1)
    assert _snapshot(again) == _snapshot(small_set)
    assert _snapshot(other) != _snapshot(small_set)


def test_main_prints_counts_per_split_and_class(tmp_path, capsys):
    photos.main([str(tmp_path / "cli"), "--image-size", "64", "--num-train", "2", "--num-val", "2"])
    line = capsys.readouterr().out.strip()
    assert "train 2 images" in line and "val 2 images" in line and "coin" in line and "galaxy" in line
    assert (tmp_path / "cli" / "data.yaml").is_file()


def test_without_scikit_image_a_named_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # makes `import skimage` raise ImportError
    with pytest.raises(photos.PhotosUnavailable, match="pip install scikit-image"):
        photos.load_photos()
