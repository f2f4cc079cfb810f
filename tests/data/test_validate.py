"""Validation policy: every fault gets its named report entry and its action; fatal data.yaml errors are clear."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import PROJECT_ROOT, run_cmd
from yolofps.config import load_config
from yolofps.data import validate
from yolofps.errors import DataSetError
from yolofps.paths import Paths
from yolofps.stages import data as data_stage


def _by_fault(report):
    found = {}
    for issue in report.issues:
        found.setdefault(issue.fault, []).append(issue)
    return found


def test_every_fault_is_named_with_file_line_and_action(faulty_dataset):
    result = validate.validate_yolo(faulty_dataset, clip_tolerance=0.02)
    faults = _by_fault(result.report)
    good = "labels/train/good.txt"

    def one(fault):
        assert len(faults[fault]) == 1, faults.get(fault)
        return faults[fault][0]

    assert one("wrong_field_count").line == 2 and one("wrong_field_count").file.endswith(good)
    assert one("non_numeric").line == 3
    assert one("class_out_of_range").line == 4 and one("class_out_of_range").action == "dropped line"
    assert one("non_positive_size").line == 5
    outside = {i.line: i.action for i in faults["box_outside_image"]}
    assert outside == {6: "clipped box", 7: "dropped line"}
    assert one("duplicate_box").line == 8 and one("duplicate_box").action == "removed duplicate"
    unreadable = sorted(i.file.rsplit("/", 1)[-1] for i in faults["unreadable_image"])
    assert unreadable == ["corrupt.jpg", "truncated.jpg"]
    assert one("missing_label").file.endswith("nolabel.jpg") and one("missing_label").action == "kept as background"
    assert one("orphan_label").file.endswith("orphan.txt")

    train = {s.image.name: s for s in result.splits["train"]}
    assert sorted(train) == ["background.jpg", "good.jpg", "nolabel.jpg"]  # unreadable images skipped
    good_rows = train["good.jpg"].rows
    assert good_rows.shape == (3, 5)  # first line, the clipped one, the last one
    clipped = good_rows[1]
    assert clipped[1] + clipped[3] / 2 == pytest.approx(1.0, abs=1e-6)
    assert len(train["background.jpg"].rows) == 0 and len(train["nolabel.jpg"].rows) == 0
    counts = result.report.counts
    assert (counts["train/images"], counts["train/backgrounds"], counts["train/skipped_images"]) == (3, 2, 2)
    assert counts["val/images"] == 1 and counts["val/boxes"] == 1


def test_a_box_just_outside_the_image_is_dropped_not_kept_with_a_negative_width():
    """Issue 20: `0 1.01 0.5 0.01 0.01` overshoots by 0.015 (within the tolerance) but lies wholly outside; it was
    "clipped" to width -0.005 and the augment stage died on it."""
    report = validate.ValidationReport(source="t")
    rows = validate.parse_label_text("0 1.01 0.5 0.01 0.01\n0 0.995 0.5 0.02 0.02\n", 1, 0.02, report, "x.txt")
    assert rows.shape == (1, 5) and rows[0, 1] + rows[0, 3] / 2 == pytest.approx(1.0) and rows[0, 3] > 0
    actions = [(i.line, i.fault, i.action) for i in report.issues]
    assert actions == [(1, "box_outside_image", "dropped line"), (2, "box_outside_image", "clipped box")]
    assert "nothing is left after clipping" in report.issues[0].detail


@pytest.mark.parametrize("text, match", [
    ("train: images/train\nval: images/val\n", "missing key"),
    ("path: .\ntrain: images/train\nval: images/nowhere\nnames: [a]\n", "does not exist"),
    ("train: images/train\nval: images/val\nnames: {0: a, 2: b}\n", "without gaps"),
    ("train: images/train\nval: images/val\nnames: [a, b]\nnc: 3\n", "nc is 3"),
    ("train: [images/train\n", "not valid YAML"),
    ("- just a list\n", "mapping"),
])
def test_broken_data_yaml_is_fatal_and_clear(faulty_dataset, text, match):
    faulty_dataset.write_text(text)
    with pytest.raises(DataSetError, match=match):
        validate.validate_yolo(faulty_dataset)


def test_validate_command_names_every_affected_file(faulty_dataset, tmp_path):
    result = run_cmd(["yolofps", "validate", str(faulty_dataset), "--json", str(tmp_path / "r.json")], tmp_path)
    for name in ("good.txt", "corrupt.jpg", "truncated.jpg", "nolabel.jpg", "orphan.txt"):
        assert name in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["faults"]["box_outside_image"] == 2
    strict = run_cmd(["yolofps", "validate", "--strict", str(faulty_dataset)], tmp_path, check=False)
    assert strict.returncode == 1


def test_validate_command_fatal_exit_without_traceback(faulty_dataset, tmp_path):
    faulty_dataset.write_text("train: images/train\n")
    result = run_cmd(["yolofps", "validate", str(faulty_dataset)], tmp_path, check=False)
    assert result.returncode == 2
    assert "missing key" in result.stderr and "Traceback" not in result.stderr
    missing = run_cmd(["yolofps", "validate", str(tmp_path / "nothing.yaml")], tmp_path, check=False)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_data_stage_on_external_yaml_keeps_only_clean_data(faulty_dataset, tmp_path):
    cfg = load_config(PROJECT_ROOT / "params.yaml", {"data.source": str(faulty_dataset)})
    paths = Paths(tmp_path / "work")
    result = data_stage.run(cfg, paths)
    out = paths.prepared_data
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == ["background.jpg", "good.jpg", "nolabel.jpg"]
    assert (out / "labels" / "train" / "good.txt").read_text().count("\n") == 3
    assert validate.validate_yolo(out / "data.yaml").report.issues == []
    report = json.loads(paths.data_report.read_text())
    assert report["faults"]["unreadable_image"] == 2
    assert result.metrics["faults/duplicate_box"] == 1 and result.metrics["train_images"] == 3
    assert json.loads(paths.metrics("data").read_text()) == result.metrics


def test_fatal_source_leaves_previous_outputs(faulty_dataset, tmp_path):
    paths = Paths(tmp_path / "work")
    marker = paths.prepared_data / "kept.txt"
    marker.parent.mkdir(parents=True)
    marker.write_text("earlier output")
    faulty_dataset.write_text("names: [a]\n")
    cfg = load_config(PROJECT_ROOT / "params.yaml", {"data.source": str(faulty_dataset)})
    with pytest.raises(DataSetError):
        data_stage.run(cfg, paths)
    assert marker.read_text() == "earlier output"


def test_clean_rows_drops_non_finite():
    report = validate.ValidationReport(source="x")
    rows = validate.clean_rows([(0, float("nan"), 0.5, 0.1, 0.1), (0, 0.5, 0.5, 0.1, 0.1)], 1, 0.02, report, "f")
    assert rows.shape == (1, 5) and np.isfinite(rows).all()
    assert [i.fault for i in report.issues] == ["non_numeric"]


def _small_set(root, images: dict[str, object]):
    """A one-split YOLO set: `images` maps a file name under images/train to an array (written as that format
    by PIL, whatever the suffix says) or to None for a FIFO; every image gets a one-box label."""
    import os

    from PIL import Image

    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for name, content in images.items():
        path = root / "images" / "train" / name
        if content is None:
            os.mkfifo(path)
        else:
            array, fmt = content
            Image.fromarray(array).save(path, format=fmt)
        (root / "labels" / "train" / (path.stem + ".txt")).write_text("0 0.5 0.5 0.4 0.4\n")
    return root


@pytest.mark.timeout(60)  # the bug was a hang: a FIFO blocked the reader forever
def test_a_fifo_is_never_opened(tmp_path):
    import os

    rgb = np.full((32, 32, 3), 128, np.uint8)
    root = _small_set(tmp_path / "set", {"good.jpg": (rgb, "JPEG"), "pipe.jpg": None})
    (root / "list.txt").write_text("images/train/good.jpg\nimages/train/pipe.jpg\n")
    (root / "data.yaml").write_text("path: .\ntrain: list.txt\nval: list.txt\nnames: [a]\n")
    result = validate.validate_yolo(root / "data.yaml", clip_tolerance=0.02)
    (issue,) = [i for i in result.report.issues if i.file.endswith("pipe.jpg")][:1]
    assert issue.fault == "unreadable_image" and "not a regular file" in issue.detail
    assert [s.image.name for s in result.splits["train"]] == ["good.jpg"]
    os.mkfifo(root / "fifo.txt")  # the list itself a FIFO: a named error, not a hang
    (root / "data.yaml").write_text("path: .\ntrain: fifo.txt\nval: list.txt\nnames: [a]\n")
    with pytest.raises(DataSetError, match="must be a regular file"):
        validate.validate_yolo(root / "data.yaml", clip_tolerance=0.02)


def test_validation_decodes_with_the_pipelines_decoder(tmp_path):
    """TGA/ICO bytes named .jpg: PIL reads them, OpenCV (every stage's decoder) does not; so they are skipped at
    validation instead of failing in the augment stage. A file name that is not UTF-8 decodes (no crash)."""
    import os

    from yolofps.data import formats

    rgb = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    root = _small_set(tmp_path / "set", {"good.jpg": (rgb, "JPEG"), "tga.jpg": (rgb, "TGA"),
                                         "ico.jpg": (rgb, "ICO")})
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: [a]\n")
    result = validate.validate_yolo(root / "data.yaml", clip_tolerance=0.02)
    refused = {i.file.rsplit("/", 1)[-1]: i for i in result.report.issues if i.fault == "unreadable_image"}
    assert set(refused) >= {"tga.jpg", "ico.jpg"} and "OpenCV" in refused["tga.jpg"].detail
    assert [s.image.name for s in result.splits["train"]] == ["good.jpg"]
    odd = root / "images" / "train" / os.fsdecode(b"bad\xff.jpg")
    odd.write_bytes((root / "images" / "train" / "good.jpg").read_bytes())
    assert formats.decode_image(odd).shape == (32, 32, 3)


def test_a_stem_clash_across_folders_keeps_each_label(tmp_path):
    """x.jpg in one train folder and x.png in another: two images, two label files, one report line (issue 20:
    one labels/train/x.txt, x.png's box silently on x.jpg)."""
    rgb = np.full((32, 32, 3), 100, np.uint8)
    for folder, name, fmt, label in (("a", "x.jpg", "JPEG", "0 0.3 0.3 0.2 0.2\n"),
                                     ("b", "x.png", "PNG", "0 0.7 0.7 0.2 0.2\n")):
        _small_set(tmp_path / "set" / folder, {name: (rgb, fmt)})
        (tmp_path / "set" / folder / "labels" / "train" / "x.txt").write_text(label)
    (tmp_path / "set" / "data.yaml").write_text("path: .\ntrain: [a/images/train, b/images/train]\n"
                                                "val: a/images/train\nnames: [a]\n")
    cfg = load_config(PROJECT_ROOT / "params.yaml", {"data.source": str(tmp_path / "set" / "data.yaml")})
    paths = Paths(tmp_path / "work")
    data_stage.run(cfg, paths)
    labels = paths.prepared_data / "labels" / "train"
    assert sorted(p.name for p in labels.iterdir()) == ["x.txt", "x_1.txt"]
    assert {labels.joinpath(n).read_text().split()[1] for n in ("x.txt", "x_1.txt")} == {"0.300000", "0.700000"}
    report = json.loads(paths.data_report.read_text())
    assert report["faults"]["name_clash"] == 1


def test_a_split_left_without_usable_images_stops_the_data_stage_by_name(tmp_path):
    """Issue 20: a val split whose every image is unreadable passed the data stage as an empty split."""
    rgb = np.full((32, 32, 3), 128, np.uint8)
    root = _small_set(tmp_path / "set", {"good.jpg": (rgb, "JPEG")})
    (root / "images" / "val").mkdir()
    (root / "images" / "val" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a]\n")
    paths = Paths(tmp_path / "work")
    cfg = load_config(PROJECT_ROOT / "params.yaml", {"data.source": str(root / "data.yaml")})
    with pytest.raises(DataSetError, match=r"the val split has no usable image \(1 unreadable_image\)"):
        data_stage.run(cfg, paths)
    assert not paths.prepared_data.exists()  # fatal before any output is touched
