"""COCO instances JSON -> YOLO: round trip, category-id remapping, and the same fault policy."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np

from yolofps.data import formats, validate


def test_yolo_to_coco_to_yolo_round_trip(tiny_synthetic, tmp_path):
    original = validate.validate_yolo(tiny_synthetic)
    coco_dir = tmp_path / "coco"
    (coco_dir / "images").mkdir(parents=True)
    samples = original.splits["train"] + original.splits["val"]
    for sample in samples:
        shutil.copy(sample.image, coco_dir / "images" / sample.image.name)
    coco = formats.yolo_split_to_coco([s.image for s in samples], [(s.width, s.height) for s in samples],
                                      [s.rows for s in samples], original.names)
    (coco_dir / "instances.json").write_text(json.dumps(coco))

    back = validate.validate_coco(coco_dir / "instances.json", clip_tolerance=0.02, val_fraction=0.3, seed=0)
    assert back.names == original.names
    assert back.report.issues == []
    round_tripped = {s.image.name: s.rows for split in back.splits.values() for s in split}
    assert len(back.splits["val"]) == 3 and len(round_tripped) == len(samples)
    for sample in samples:
        np.testing.assert_allclose(round_tripped[sample.image.name], sample.rows, atol=2e-3)


def test_category_ids_remap_and_faults_are_reported(tiny_synthetic, tmp_path):
    image = sorted((tiny_synthetic.parent / "images" / "train").iterdir())[0]
    cv2.imwrite(str(tmp_path / "a.jpg"), cv2.resize(cv2.imread(str(image)), (100, 80)))  # the entry's size
    doc = {
        "images": [{"id": 5, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 6, "file_name": "missing.jpg", "width": 100, "height": 80}],
        "categories": [{"id": 11, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 3, "bbox": [10, 10, 20, 40], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 11, "bbox": [50, 20, 10, 10]},
            {"id": 3, "image_id": 5, "category_id": 99, "bbox": [50, 20, 10, 10]},
            {"id": 4, "image_id": 5, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},
            {"id": 5, "image_id": 42, "category_id": 3, "bbox": [0, 0, 5, 5]},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    result = validate.validate_coco(tmp_path / "instances.json", clip_tolerance=0.02, val_fraction=0.5, seed=0)
    assert result.names == ("cat", "dog")  # category ids in id order -> 0, 1
    rows = [s for split in result.splits.values() for s in split][0].rows
    np.testing.assert_allclose(rows, [[0, 0.2, 0.375, 0.2, 0.5], [1, 0.55, 0.3125, 0.1, 0.125]], atol=1e-6)
    faults = sorted(issue.fault for issue in result.report.issues)
    assert faults == ["class_out_of_range", "crowd_annotation", "unplaced_annotation", "unreadable_image"]


def test_an_entry_whose_size_disagrees_with_the_file_is_skipped_and_reported(tiny_synthetic, tmp_path):
    """Issue 20: COCO width/height that are not the file's passed as "no problems found", every box scaled wrong."""
    image = sorted((tiny_synthetic.parent / "images" / "train").iterdir())[0]
    height, width = cv2.imread(str(image)).shape[:2]
    for name in ("right.jpg", "wrong.jpg"):
        shutil.copy(image, tmp_path / name)
    doc = {"images": [{"id": 1, "file_name": "right.jpg", "width": width, "height": height},
                      {"id": 2, "file_name": "wrong.jpg", "width": width * 2, "height": height}],
           "categories": [{"id": 1, "name": "a"}],
           "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 8, 8]} for i in (1, 2)]}
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    result = validate.validate_coco(tmp_path / "instances.json", clip_tolerance=0.02, val_fraction=0.5, seed=0)
    assert [s.image.name for split in result.splits.values() for s in split] == ["right.jpg"]
    (issue,) = result.report.issues
    assert issue.fault == "size_mismatch" and issue.file.endswith("wrong.jpg")
    assert f"{width * 2}x{height}" in issue.detail
