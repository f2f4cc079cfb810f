"""Fuzzed bad data: random label lines and data.yaml documents never crash the validator or the loader.

Every input either passes through as clean boxes or becomes a named fault in the report (a `DataSetError`
for a data.yaml that cannot be used at all); nothing else may come out, and nothing outside the data set's
folder is read.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import loader_config
from yolofps.data import augment, formats, validate
from yolofps.data.dataset import YoloDataset
from yolofps.errors import DataSetError
from yolofps.stages.data import write_prepared

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = ("a", "b", "c")
FLIP = augment.build_pipeline([])  # the Compose with the stages' bbox settings (it validates every box)
IMAGE = np.zeros((50, 70, 3), np.uint8)

# tokens a label field may hold: numbers at every edge, and the junk real label files contain
NUMBER_TOKENS = ["0", "1", "2", "3", "-1", "0.5", "0.0", "-0.0", "1e-9", "1e308", "1e400", "-1e400", "nan", "inf",
                 "-inf", "0x10", "1_0", "0.999999", "1.000001", "+0.5", ".5", "5.", "2.0", "99999999999999999999"]
JUNK_TOKENS = ["", "a", "#", "0,5", "0.5.5", "None", "\x00", "é", "١", "\u00a0", "\ufeff0", "0\r"]

LOADER = loader_config({"max_boxes": 16})  # read once: hypothesis runs the test body many times


# a box at the image's border: just inside, straddling, or just outside it (within data.clip_tolerance or not)
BORDER_BOX = st.tuples(st.integers(0, 2), st.floats(-0.05, 1.05), st.floats(-0.05, 1.05), st.floats(0, 0.06),
                       st.floats(0, 0.06)).map(lambda v: " ".join(map(repr, v)))


@st.composite
def label_text(draw) -> str:
    """Label file text: mostly lines of 0-7 fields from the tokens above or boxes at the border, sometimes
    arbitrary unicode."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=200))
    token = st.one_of(st.sampled_from(NUMBER_TOKENS), st.sampled_from(JUNK_TOKENS),
                      st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-5, 5).map(str))
    line = st.one_of(st.lists(token, min_size=0, max_size=7).map(" ".join), BORDER_BOX)
    lines = draw(st.lists(line, max_size=12))
    separator = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
    return separator.join(lines)


def _dropped(issue: validate.Issue) -> bool:
    return issue.action not in ("clipped box",)


@FUZZ
@given(label_text())
def test_label_lines_are_kept_clean_or_reported(text):
    report = validate.ValidationReport(source="fuzz")
    rows = validate.parse_label_text(text, len(NAMES), 0.02, report, file="fuzz.txt")
    assert rows.dtype == np.float32 and rows.shape[1] == 5
    assert np.isfinite(rows).all()
    assert ((rows[:, 0] >= 0) & (rows[:, 0] < len(NAMES)) & (rows[:, 0] == np.round(rows[:, 0]))).all()
    assert (rows[:, 3:] >= validate.MIN_SIDE * (1 - 1e-6)).all()  # issue 20: a clipped box had width -0.005
    eps = 1e-5  # float32 of a box touching the border
    assert (rows[:, 1] - rows[:, 3] / 2 >= -eps).all() and (rows[:, 1] + rows[:, 3] / 2 <= 1 + eps).all()
    assert (rows[:, 2] - rows[:, 4] / 2 >= -eps).all() and (rows[:, 2] + rows[:, 4] / 2 <= 1 + eps).all()
    # what is kept survives the augment stage's albumentations call, written and read back as the stages do
    written = np.array([line.split() for line in formats.format_labels(rows).splitlines()], np.float32).reshape(-1, 5)
    augment.apply(FLIP, IMAGE, written)
    # nothing silently dropped: every non-blank line is a kept box or a reported fault
    nonblank = sum(1 for line in text.splitlines() if line.split())
    assert len(rows) == nonblank - sum(_dropped(issue) for issue in report.issues)
    assert all(issue.fault in validate.POLICY for issue in report.issues)


@pytest.fixture(scope="module")
def dataset():
    """A one-image-per-split YOLO data set, a secret beside it, and a symlink that leads to the secret."""
    with tempfile.TemporaryDirectory() as tmp:
        outside = Path(tmp) / "secret"
        outside.mkdir()
        (outside / "passwd.jpg").write_bytes(b"root:x:0:0")
        root = Path(tmp) / "set"
        for split in ("train", "val"):
            (root / "images" / split).mkdir(parents=True)
            (root / "labels" / split).mkdir(parents=True)
            cv2.imwrite(str(root / "images" / split / "im.png"), np.full((40, 56, 3), 90, np.uint8))
            (root / "labels" / split / "im.txt").write_text("0 0.5 0.5 0.2 0.2\n")
        (root / "list.txt").write_text("images/train/im.png\n../secret/passwd.jpg\n/etc/hostname\n")
        os.symlink(outside, root / "escape")
        yield root


def _validated_or_named_error(data_yaml: Path) -> validate.ValidatedSet | None:
    """The only two outcomes allowed: a validated set, or a DataSetError (the fatal, named kind)."""
    try:
        return validate.validate_yolo(data_yaml)
    except DataSetError as err:
        assert str(data_yaml) in str(err) or "image list" in str(err)
        return None


@FUZZ
@given(label_text())
def test_validator_and_loader_survive_any_label_file(dataset, text):
    (dataset / "labels" / "train" / "im.txt").write_text(text, errors="surrogatepass")
    (dataset / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [a, b, c]\n")
    validated = validate.validate_yolo(dataset / "data.yaml")
    assert validated.report.counts["train/images"] == 1  # a bad label never costs the image itself
    with tempfile.TemporaryDirectory() as out:
        write_prepared(validated, Path(out))
        loader_set = YoloDataset(Path(out) / "data.yaml", "train", 64, LOADER, train=False)
        image, targets, mask, _ = loader_set[0]
        assert image.shape == (3, 64, 64) and targets.shape == (16, 5) and mask.shape == (16,)
        assert bool(targets.isfinite().all()) and int(mask.sum()) == len(validated.splits["train"][0].rows)


PATH_VALUES = ["images/train", "images/val", "images", ".", "..", "../..", "/etc", "/", "~", "~nobody/x", "escape",
               "escape/passwd.jpg", "list.txt", "labels/train/im.txt", "images/train/im.png", "a\x00b", "", "nope",
               "../secret", "images/../../secret", "//etc", "C:\\Windows"]
YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.floats(allow_nan=False),
                         st.sampled_from(PATH_VALUES), st.text(max_size=12))
YAML_VALUES = st.recursive(YAML_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.integers(-1, 4), st.sampled_from(["0", "1", " 0"]),
                                                           st.text(max_size=5)), inner, max_size=4)), max_leaves=8)
DOC_KEYS = st.sampled_from(["path", "train", "val", "names", "nc", "test", "download"])


@st.composite
def data_yaml_text(draw) -> str:
    """A data.yaml: a mapping of the usual keys to random values (paths leading anywhere), or raw text."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=120))
    doc = {"train": draw(st.sampled_from(PATH_VALUES)), "val": "images/val", "names": list(NAMES)} if kind < 4 else {}
    doc |= draw(st.dictionaries(DOC_KEYS, YAML_VALUES, max_size=5))
    return yaml.safe_dump(doc, allow_unicode=True)


@FUZZ
@given(data_yaml_text())
def test_any_data_yaml_is_validated_or_a_named_error_and_stays_inside(dataset, text):
    (dataset / "labels" / "train" / "im.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (dataset / "data.yaml").write_text(text, errors="surrogatepass")
    validated = _validated_or_named_error(dataset / "data.yaml")
    if validated is None:
        return
    base = dataset.resolve()
    for samples in validated.splits.values():
        for sample in samples:
            assert sample.image.resolve().is_relative_to(base), sample.image
    assert all(issue.fault in validate.POLICY for issue in validated.report.issues)


@pytest.mark.parametrize("doc, match", [
    ("path: ../secret\ntrain: .\nval: .\nnames: [a]\n", "leads outside"),
    ("path: /etc\ntrain: .\nval: .\nnames: [a]\n", "leads outside"),
    ("train: escape\nval: images/val\nnames: [a]\n", "leads outside"),  # a symlink to a folder outside
    ("train: ../secret\nval: images/val\nnames: [a]\n", "leads outside"),
    ("train: [images/train, /etc]\nval: images/val\nnames: [a]\n", "leads outside"),
])
def test_path_traversal_in_data_yaml_is_a_named_fatal_error(dataset, doc, match):
    (dataset / "data.yaml").write_text(doc)
    with pytest.raises(DataSetError, match=match) as err:
        validate.validate_yolo(dataset / "data.yaml")
    assert "data.yaml" in str(err.value)


def test_image_list_and_symlinked_images_leading_outside_are_skipped_and_reported(dataset):
    link = dataset / "images" / "train" / "linked.jpg"
    os.symlink(dataset.parent / "secret" / "passwd.jpg", link)
    try:
        (dataset / "data.yaml").write_text("train: [list.txt, images/train]\nval: images/val\nnames: [a]\n")
        validated = validate.validate_yolo(dataset / "data.yaml")
    finally:
        link.unlink()
    outside = [issue for issue in validated.report.issues if issue.fault == "outside_data_set"]
    assert {Path(issue.file).name for issue in outside} == {"passwd.jpg", "hostname", "linked.jpg"}
    assert all(s.image.name == "im.png" for s in validated.splits["train"])
    assert validated.report.counts["train/skipped_images"] == 3


def test_coco_file_names_leading_outside_are_skipped(dataset):
    coco = {"images": [{"id": 1, "file_name": "../secret/passwd.jpg", "width": 10, "height": 10},
                       {"id": 2, "file_name": "/etc/hostname", "width": 10, "height": 10},
                       {"id": 3, "file_name": "images/train/im.png", "width": 56, "height": 40}],
            "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    path = dataset / "coco.json"
    path.write_text(json.dumps(coco))
    validated = validate.validate_coco(path, clip_tolerance=0.02, val_fraction=0.5, seed=0)
    faults = [issue.fault for issue in validated.report.issues]
    assert faults.count("outside_data_set") == 2
    assert [s.image.name for split in validated.splits.values() for s in split] == ["im.png"]


def test_no_value_in_the_report_is_nan(dataset):
    """The report is JSON for DVC and MLflow: a fuzzed value must not leak NaN into it."""
    (dataset / "labels" / "train" / "im.txt").write_text("nan 0.5 0.5 0.1 0.1\n0 inf 0.5 0.1 0.1\n")
    (dataset / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [a]\n")
    report = validate.validate_yolo(dataset / "data.yaml").report.to_dict()
    assert report["faults"] == {"non_numeric": 2}
    assert not any(isinstance(v, float) and math.isnan(v) for v in report["counts"].values())


COCO_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 4), st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from(["images/train/im.png", "../secret/passwd.jpg", "/etc/hostname", "", "a"]),
                         st.text(max_size=6))
COCO_VALUES = st.recursive(COCO_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)), max_leaves=6)
GOOD_IMAGE = {"id": 1, "file_name": "images/train/im.png", "width": 56, "height": 40}


def _entry(good: dict) -> st.SearchStrategy:
    """A well-formed entry with some of its keys replaced by random values or dropped."""
    return st.fixed_dictionaries({}, optional={key: st.one_of(st.just(value), COCO_VALUES)
                                               for key, value in good.items()})


COCO_DOCUMENT = st.one_of(COCO_VALUES, st.fixed_dictionaries({
    "images": st.one_of(st.lists(st.one_of(st.just(GOOD_IMAGE), _entry(GOOD_IMAGE)), max_size=3), COCO_VALUES),
    "categories": st.one_of(st.lists(_entry({"id": 1, "name": "a"}), max_size=3), COCO_VALUES),
    "annotations": st.one_of(st.lists(_entry({"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 10],
                                              "iscrowd": 0}), max_size=4), COCO_VALUES),
}))


@FUZZ
@given(COCO_DOCUMENT)
def test_any_coco_document_is_validated_or_a_named_error(dataset, document):
    """Issue 20, class 2: a COCO JSON of any shape (wrong types, missing keys, repeated ids, dangling references,
    nan boxes) ends in a validated set whose every annotation is a kept box or a reported fault, or in a
    DataSetError naming the file; never "unexpected error"."""
    path = dataset / "coco.json"
    path.write_text(json.dumps(document))
    try:
        validated = validate.validate_coco(path, clip_tolerance=0.02, val_fraction=0.5, seed=0)
    except DataSetError as err:
        assert str(path) in str(err)
        return
    kept = [s for split in validated.splits.values() for s in split]
    assert all(s.image.name == "im.png" for s in kept)  # nothing outside the data set is ever used
    for sample in kept:
        assert np.isfinite(sample.rows).all() and (sample.rows[:, 3:] >= validate.MIN_SIDE * (1 - 1e-6)).all()
    if isinstance(document, dict) and isinstance(document.get("annotations"), list):
        boxes = sum(len(s.rows) for s in kept)
        assert boxes <= len(document["annotations"])
        assert boxes == len(document["annotations"]) or validated.report.issues


def test_repeated_coco_ids_are_named_not_merged(dataset):
    """Two images (or categories) with one id were merged silently, the later entry winning."""
    path = dataset / "coco.json"
    for images, categories, what in (([GOOD_IMAGE, GOOD_IMAGE | {"file_name": "x.png"}], [{"id": 1, "name": "a"}],
                                      "images"),
                                     ([GOOD_IMAGE], [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], "categories")):
        path.write_text(json.dumps({"images": images, "categories": categories, "annotations": []}))
        with pytest.raises(DataSetError, match=rf"{what} ids must be unique; repeated: \[1\]"):
            validate.validate_coco(path, clip_tolerance=0.02, val_fraction=0.5, seed=0)
