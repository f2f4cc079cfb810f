"""Data set validation shared by the `data` stage and `yolofps validate`.

Every bad input becomes an `Issue` in the report, naming the file, the line and what was done with it;
nothing is dropped silently. Only a data set that cannot be read at all (bad data.yaml, missing folders)
is fatal, raised as a `DataSetError`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from yolofps.data import formats
from yolofps.errors import DataSetError

# fault -> the action the policy takes (issue 2's table); `box_outside_image` is clipped or dropped.
POLICY = {
    "unreadable_image": "skipped image",
    "unreadable_label": "skipped image",
    "wrong_field_count": "dropped line",
    "non_numeric": "dropped line",
    "class_out_of_range": "dropped line",
    "non_positive_size": "dropped line",
    "box_outside_image": "clipped box / dropped line",
    "duplicate_box": "removed duplicate",
    "missing_label": "kept as background",
    "orphan_label": "ignored",
    "crowd_annotation": "ignored",
    "unplaced_annotation": "dropped",
    "outside_data_set": "skipped image",  # a list entry, file_name or symlink leading out of the data set's folder
    "name_clash": "renamed",  # two images of one split with one file stem (x.jpg, x.png) would share a label file
    "size_mismatch": "skipped image",  # a COCO entry's width/height are not the file's: its pixel boxes are unplaceable
}


@dataclass(frozen=True)
class Issue:
    """One problem found: where, what, and what the policy did about it."""

    file: str
    line: int | None
    fault: str
    action: str
    detail: str


@dataclass(frozen=True)
class Sample:
    """One usable image with its cleaned boxes (class, cx, cy, w, h) normalized to 0..1."""

    image: Path
    width: int
    height: int
    rows: np.ndarray  # [n, 5] float32


@dataclass
class ValidationReport:
    """All issues found plus counts per split; `to_dict()` is the JSON written next to the data."""

    source: str
    names: tuple[str, ...] = ()
    issues: list[Issue] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def add(self, file: Path | str, fault: str, detail: str, line: int | None = None, action: str = "") -> None:
        self.issues.append(Issue(str(file), line, fault, action or POLICY[fault], detail))

    def to_dict(self) -> dict:
        faults = Counter(issue.fault for issue in self.issues)
        return {
            "source": self.source, "names": list(self.names), "counts": dict(sorted(self.counts.items())),
            "faults": dict(sorted(faults.items())), "issues": [asdict(issue) for issue in self.issues],
        }

    def affected_files(self) -> list[str]:
        return sorted({issue.file for issue in self.issues})

    def summary(self) -> str:
        """Human summary: totals, then every affected file with its faults."""
        c = self.counts
        lines = [f"{self.source}: {len(self.names)} classes {list(self.names)}"]
        for split in formats.SPLITS:
            lines.append(
                f"  {split}: {c[f'{split}/images']} images ({c[f'{split}/backgrounds']} background), "
                f"{c[f'{split}/boxes']} boxes, {c[f'{split}/skipped_images']} skipped"
            )
        if not self.issues:
            lines.append("  no problems found")
            return "\n".join(lines)
        lines.append(f"  {len(self.issues)} problem(s) in {len(self.affected_files())} file(s):")
        for issue in self.issues:
            where = f"{issue.file}:{issue.line}" if issue.line else issue.file
            lines.append(f"    {where}: {issue.fault} -> {issue.action} ({issue.detail})")
        return "\n".join(lines)


@dataclass
class ValidatedSet:
    """The usable part of a data set, per split, and the report of what was not."""

    names: tuple[str, ...]
    splits: dict[str, list[Sample]]
    report: ValidationReport

    def require_every_split(self) -> None:
        """A split left without a usable image is fatal, naming what cost its images (issue 20: it passed as an
        empty split and failed later, in training, with no word of why)."""
        for split, samples in self.splits.items():
            if samples:
                continue
            faults = Counter(issue.fault for issue in self.report.issues if issue.action == POLICY["unreadable_image"])
            why = ", ".join(f"{n} {fault}" for fault, n in sorted(faults.items())) or "no image reached it"
            raise DataSetError(f"{self.report.source}: the {split} split has no usable image ({why}); "
                               f"`yolofps validate {self.report.source}` lists every problem")


# --------------------------------------------------------------------------------------------- entry points


def validate_source(source: str | Path, *, clip_tolerance: float = 0.02, val_fraction: float = 0.2,
                    seed: int = 0) -> ValidatedSet:
    """Validate a YOLO data.yaml or a COCO instances JSON; fatal problems raise DataSetError."""
    source = Path(source)
    if not source.exists():
        raise DataSetError(f"{source}: data source not found (data.source must be 'synthetic', a data.yaml or a "
                           "COCO JSON)")
    if source.suffix.lower() == ".json":
        return validate_coco(source, clip_tolerance=clip_tolerance, val_fraction=val_fraction, seed=seed)
    if source.suffix.lower() in (".yaml", ".yml"):
        return validate_yolo(source, clip_tolerance=clip_tolerance)
    raise DataSetError(f"{source}: expected a data.yaml (.yaml/.yml) or a COCO instances JSON (.json)")


def validate_yolo(data_yaml: str | Path, *, clip_tolerance: float = 0.02) -> ValidatedSet:
    """Validate every image and label file a YOLO data.yaml points at."""
    spec = formats.load_data_yaml(data_yaml)
    report = ValidationReport(source=str(data_yaml), names=spec.names)
    splits = {}
    for split, locations in spec.splits.items():
        images = [image for location in locations for image in formats.list_images(location)]
        kept = [image for image in images if _confined(image, spec.base, report, split)]
        splits[split] = [s for s in (_yolo_sample(i, spec.names, clip_tolerance, report, split) for i in kept) if s]
        _count_split(report, split, splits[split])
        for location in locations:
            _report_orphans(location, images, report)
    return ValidatedSet(spec.names, splits, report)


def validate_coco(path: Path, *, clip_tolerance: float, val_fraction: float, seed: int) -> ValidatedSet:
    """Validate a COCO instances JSON; with no val split of its own, a seeded `val_fraction` is held out."""
    names, images, problems = formats.read_coco(path)
    report = ValidationReport(source=str(path), names=names)
    for problem in problems:
        report.add(path, "unplaced_annotation", problem)
    samples = []
    base = path.parent.resolve()
    for image in images:
        if not _confined(image.path, base, report):
            continue
        if image.crowd_skipped:
            report.add(image.path, "crowd_annotation",
                       f"{image.crowd_skipped} iscrowd annotation(s) not used for training")
        if (size := _image_size(image.path, report)) is None:
            continue
        if size != (image.width, image.height):  # COCO boxes are pixels of that size: normalizing by it would misplace
            report.add(image.path, "size_mismatch", f"the COCO entry says {image.width}x{image.height}, the file "
                       f"decodes to {size[0]}x{size[1]}; its boxes cannot be placed with certainty")
            continue
        rows = clean_rows(image.rows, len(names), clip_tolerance, report, file=f"{path}#{image.path.name}")
        samples.append(Sample(image.path, size[0], size[1], rows))
    order = np.random.default_rng(seed).permutation(len(samples))
    num_val = max(1, round(len(samples) * val_fraction)) if len(samples) > 1 else 0
    splits = {"val": [samples[i] for i in sorted(order[:num_val])],
              "train": [samples[i] for i in sorted(order[num_val:])]}
    for split in formats.SPLITS:
        _count_split(report, split, splits[split])
    return ValidatedSet(names, {"train": splits["train"], "val": splits["val"]}, report)


# --------------------------------------------------------------------------------------------- checks


def _yolo_sample(image: Path, names: tuple[str, ...], tolerance: float, report: ValidationReport,
                 split: str) -> Sample | None:
    size = _image_size(image, report)
    if size is None:
        report.counts[f"{split}/skipped_images"] += 1
        return None
    label = formats.label_path_for(image)
    if not label.is_file():
        report.add(image, "missing_label", f"no label file at {label}")
        return Sample(image, size[0], size[1], np.zeros((0, 5), np.float32))
    try:
        text = label.read_text()
    except (OSError, UnicodeDecodeError) as err:
        report.add(label, "unreadable_label", f"{err.__class__.__name__}: {err}")
        report.counts[f"{split}/skipped_images"] += 1
        return None
    rows = parse_label_text(text, len(names), tolerance, report, file=label)
    return Sample(image, size[0], size[1], rows)


def _confined(image: Path, base: Path, report: ValidationReport, split: str = "") -> bool:
    """Whether an image and its label (symlinks followed) stay in the data set's folder; else reported, skipped."""
    label = formats.label_path_for(image)
    for path in (image, label):
        if (path is image or os.path.lexists(path)) and not formats.inside(path, base):
            report.add(image, "outside_data_set", f"{path} leads outside the data set folder {base}; not read")
            if split:
                report.counts[f"{split}/skipped_images"] += 1
            return False
    return True


def _image_size(path: Path, report: ValidationReport) -> tuple[int, int] | None:
    """(width, height) of a fully decodable image, else None with an `unreadable_image` issue."""
    if not path.is_file():  # a FIFO or a device would block the decoder forever
        report.add(path, "unreadable_image", "not a regular file; not opened")
        return None
    try:
        with Image.open(path) as image:
            image.load()  # a full decode: truncated files fail here, not later in the loader
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        report.add(path, "unreadable_image", f"{err.__class__.__name__}: {err}")
        return None
    try:  # what PIL reads the pipeline may not (DDS, ICO, QOI, TGA named .jpg): check with the pipeline's decoder
        formats.decode_image(path)
    except DataSetError as err:
        report.add(path, "unreadable_image", str(err).removeprefix(f"{path}: "))
        return None
    if width < 2 or height < 2:
        report.add(path, "unreadable_image", f"image is {width}x{height} pixels")
        return None
    return width, height


def parse_label_text(text: str, num_classes: int, tolerance: float, report: ValidationReport,
                     file: Path | str) -> np.ndarray:
    """Parse YOLO label text line by line; every rejected or repaired line is reported."""
    raw_rows: list[tuple[int, tuple[float, ...]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            report.add(file, "wrong_field_count", f"{len(fields)} fields, expected 5 (class cx cy w h)", number)
            continue
        try:
            values = tuple(float(v) for v in fields)
        except ValueError:
            report.add(file, "non_numeric", f"not numbers: {line.strip()[:60]!r}", number)
            continue
        raw_rows.append((number, values))
    return _clean(raw_rows, num_classes, tolerance, report, file)


def clean_rows(rows: Iterable[tuple[float, ...]], num_classes: int, tolerance: float, report: ValidationReport,
               file: Path | str) -> np.ndarray:
    """Apply the box policy to already-numeric rows (COCO annotations); line = annotation index + 1."""
    numbered = [(i, tuple(map(float, r))) for i, r in enumerate(rows, start=1)]
    return _clean(numbered, num_classes, tolerance, report, file)


def _clean(rows: list[tuple[int, tuple[float, ...]]], num_classes: int, tolerance: float,
           report: ValidationReport, file: Path | str) -> np.ndarray:
    kept: list[tuple[float, ...]] = []
    seen: set[tuple[float, ...]] = set()
    for line, values in rows:
        row = _check_box(values, num_classes, tolerance, report, file, line)
        if row is None:
            continue
        key = tuple(round(v, 6) for v in row)
        if key in seen:
            report.add(file, "duplicate_box", "same class and coordinates as an earlier line", line)
            continue
        seen.add(key)
        kept.append(row)
    return np.array(kept, np.float32).reshape(-1, 5)


MIN_SIDE = 1e-5  # normalized; a side under this has no area once written with the label files' 6 decimals


def _check_box(values: tuple[float, ...], num_classes: int, tolerance: float, report: ValidationReport,
               file: Path | str, line: int) -> tuple[float, ...] | None:
    """One box through the policy: drop bad ones, clip slightly-outside ones; what is kept has area in the image."""
    cls, cx, cy, w, h = values
    if not all(math.isfinite(v) for v in values):
        report.add(file, "non_numeric", f"non-finite value in {values}", line)
        return None
    if cls != int(cls) or not 0 <= cls < num_classes:
        report.add(file, "class_out_of_range", f"class {cls:g}, data set has classes 0..{num_classes - 1}", line)
        return None
    if w < MIN_SIDE or h < MIN_SIDE:
        report.add(file, "non_positive_size", f"width {w:g}, height {h:g} (a side must be >= {MIN_SIDE:g})", line)
        return None
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    overshoot = max(-x1, -y1, x2 - 1, y2 - 1)
    if overshoot <= 1e-6:
        return (cls, cx, cy, w, h)
    if overshoot > tolerance:
        report.add(file, "box_outside_image", f"extends {overshoot:.3f} beyond the image (tolerance {tolerance})",
                   line, action="dropped line")
        return None
    # clip every corner into the image: a box lying just outside (x1 > 1) has nothing left, not a negative width
    x1, x2 = min(max(x1, 0.0), 1.0), min(max(x2, 0.0), 1.0)
    y1, y2 = min(max(y1, 0.0), 1.0), min(max(y2, 0.0), 1.0)
    if x2 - x1 < MIN_SIDE or y2 - y1 < MIN_SIDE:
        report.add(file, "box_outside_image", f"extends {overshoot:.3f} beyond the image and lies (almost) wholly "
                   "outside it: nothing is left after clipping", line, action="dropped line")
        return None
    report.add(file, "box_outside_image", f"extends {overshoot:.3f} beyond the image", line, action="clipped box")
    return (cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)


def _report_orphans(location: Path, images: list[Path], report: ValidationReport) -> None:
    """Label files under the split's labels folder that no image claims."""
    if not location.is_dir() or "images" not in location.parts:
        return
    labels_dir = formats.label_path_for(location / "placeholder.jpg").parent
    if not labels_dir.is_dir():
        return
    claimed = {formats.label_path_for(image) for image in images}
    for label in sorted(labels_dir.rglob("*.txt")):
        if label not in claimed:
            report.add(label, "orphan_label", "no image with this name")


def _count_split(report: ValidationReport, split: str, samples: list[Sample]) -> None:
    report.counts[f"{split}/images"] += len(samples)
    report.counts[f"{split}/backgrounds"] += sum(1 for s in samples if len(s.rows) == 0)
    report.counts[f"{split}/boxes"] += sum(len(s.rows) for s in samples)
    report.counts[f"{split}/skipped_images"] += 0  # present even when zero
