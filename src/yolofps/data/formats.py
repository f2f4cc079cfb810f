"""Data set formats: YOLO (data.yaml + label txt files) and COCO instances JSON, read and written.

YOLO follows the ultralytics conventions: data.yaml with `path`, `train`, `val`, `names` (list or
{id: name}) and optional `nc`; images under `.../images/...` with labels at the same place under
`.../labels/...` as `<stem>.txt`, one `class cx cy w h` line per box, normalized to 0..1.

A data.yaml (or COCO JSON) is confined to its own folder tree: `path:`, the split entries, image lists and
(after symlinks are followed) every image and label must lie under the folder holding it. A data set handed in
cannot make the pipeline read `/etc` or `../../secrets`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from yolofps.errors import DataSetError
from yolofps.fileio import write_text

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "val")


@dataclass(frozen=True)
class DataYaml:
    """A parsed data.yaml: resolved image locations per split and the class names."""

    path: Path  # the data.yaml file itself
    splits: dict[str, list[Path]]  # split -> folders or .txt image lists, resolved
    names: tuple[str, ...]

    @property
    def base(self) -> Path:
        """The folder tree everything the data.yaml points at must stay in."""
        return self.path.parent.resolve()


def inside(path: Path, base: Path) -> bool:
    """Whether `path`, with symlinks and `..` resolved, lies in `base` (a bad path string is outside)."""
    try:
        return path.resolve().is_relative_to(base)
    except (OSError, ValueError, RuntimeError):  # embedded NUL, symlink loops, unknown ~user
        return False


def load_data_yaml(path: str | Path) -> DataYaml:
    """Parse and check a data.yaml; every problem is a DataSetError naming the key and the file."""
    path = Path(path)
    if not path.is_file():
        raise DataSetError(f"{path}: data.yaml not found")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataSetError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise DataSetError(f"{path}: not a text file ({err.reason} at byte {err.start})") from None
    if not isinstance(doc, dict):
        raise DataSetError(f"{path}: expected a mapping with keys path, train, val, names")
    missing = [key for key in ("train", "val", "names") if key not in doc]
    if missing:
        raise DataSetError(f"{path}: missing key(s) {missing}; a YOLO data.yaml needs train, val and names")
    names = _parse_names(doc["names"], doc.get("nc"), path)
    root = _data_root(doc.get("path"), path)
    splits = {split: _resolve_split(doc[split], root, split, path) for split in SPLITS}
    return DataYaml(path=path, splits=splits, names=names)


def _parse_names(raw: Any, nc: Any, path: Path) -> tuple[str, ...]:
    if isinstance(raw, dict) and raw:
        if not all(isinstance(k, int) and not isinstance(k, bool) or isinstance(k, str) and k.strip().isdigit()
                   for k in raw):
            raise DataSetError(f"{path}: names keys must be integer class ids, got {list(raw)}")
        by_id = {int(k): v for k, v in raw.items()}
        ids = sorted(by_id)
        if len(by_id) != len(raw) or ids != list(range(len(ids))):
            raise DataSetError(f"{path}: names ids must be 0..{len(raw) - 1} without gaps or repeats, got {list(raw)}")
        names = tuple(str(by_id[k]) for k in ids)
    elif isinstance(raw, list) and raw:
        names = tuple(str(n) for n in raw)
    else:
        raise DataSetError(f"{path}: names must be a non-empty list or a {{id: name}} mapping, got {raw!r}")
    if nc is not None and nc != len(names):
        raise DataSetError(f"{path}: nc is {nc} but names lists {len(names)} classes")
    return names


def _data_root(raw: Any, path: Path) -> Path:
    """`path:` in data.yaml; relative to the data.yaml's folder, and confined to it."""
    base = path.parent.resolve()
    if raw is None:
        return base
    root = Path(str(raw))
    root = root if root.is_absolute() else base / root
    if not inside(root, base):
        raise DataSetError(f"{path}: path {str(raw)!r} leads outside the data.yaml's folder {base}; put the "
                           "data.yaml at (or above) the data set's root, or copy the data set under it")
    return root.resolve()


def _resolve_split(raw: Any, root: Path, split: str, path: Path) -> list[Path]:
    entries = raw if isinstance(raw, list) else [raw]
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise DataSetError(f"{path}: {split} must be a folder, a .txt image list, or a list of them; got {raw!r}")
    resolved = []
    for entry in entries:
        location = Path(entry)
        location = location if location.is_absolute() else root / location
        if not inside(location, path.parent.resolve()):  # `..`, absolute paths and symlinks out are all refused
            raise DataSetError(f"{path}: {split} entry {entry!r} leads outside the data.yaml's folder "
                               f"{path.parent.resolve()}; a data set may only use files under it")
        if not location.exists():
            raise DataSetError(f"{path}: {split} points at {location}, which does not exist")
        resolved.append(location)
    return resolved


def decode_image(path: str | Path) -> np.ndarray:
    """uint8 BGR HWC of an image file, decoded the way every stage decodes it: OpenCV, from the file's bytes.

    Only a regular file is opened (a FIFO or a device would block the reader forever), and OpenCV never sees the
    path (its path handling crashed on a name that is not UTF-8). EXIF orientation is applied, as cv2.imread does.
    """
    path = Path(path)
    if not path.is_file():
        raise DataSetError(f"{path}: not a regular file; not opened")
    return decode_image_bytes(np.fromfile(path, dtype=np.uint8), str(path))


def decode_image_bytes(data: bytes | np.ndarray, source: str) -> np.ndarray:
    """uint8 BGR HWC of an encoded image (a file's bytes, an HTTP body); `source` names it in the DataSetError."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DataSetError(f"{source}: not an image OpenCV can decode (the decoder every stage uses)")
    return image


def list_images(location: Path) -> list[Path]:
    """Images of one split entry: a folder (searched recursively) or a .txt file of image paths."""
    if location.is_dir():
        return sorted(p for p in location.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not location.is_file():  # a FIFO would block read_text forever
        raise DataSetError(f"{location}: an image list must be a regular file; not opened")
    try:
        lines = [line.strip() for line in location.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataSetError(f"{location}: not a readable image list ({err.__class__.__name__}: {err})") from None
    return [location.parent / line if not Path(line).is_absolute() else Path(line) for line in lines]


def label_path_for(image: Path) -> Path:
    """The ultralytics rule: the last `images` folder in the path becomes `labels`, suffix `.txt`."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def format_labels(rows: np.ndarray) -> str:
    """YOLO label text for rows [n, 5] of (class, cx, cy, w, h)."""
    return "".join(f"{int(r[0])} {r[1]:.6f} {r[2]:.6f} {r[3]:.6f} {r[4]:.6f}\n" for r in rows)


def write_labels(path: Path, rows: np.ndarray) -> None:
    """Write one YOLO label file (an empty file marks a background image)."""
    write_text(path, format_labels(rows))


def read_labels(path: Path) -> np.ndarray:
    """Read a label file that is known to be valid (one this project wrote) as float32 [n, 5]."""
    text = path.read_text().strip() if path.is_file() else ""
    if not text:
        return np.zeros((0, 5), np.float32)
    return np.array([line.split() for line in text.splitlines()], np.float32).reshape(-1, 5)


def write_data_yaml(root: Path, names: tuple[str, ...] | list[str]) -> Path:
    """Write `root/data.yaml` for the standard layout images/{train,val} + labels/{train,val}."""
    doc = {"path": ".", "train": "images/train", "val": "images/val", "nc": len(names), "names": list(names)}
    path = root / "data.yaml"
    write_text(path, yaml.safe_dump(doc, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------- COCO


def yolo_split_to_coco(images: list[Path], sizes: list[tuple[int, int]], labels: list[np.ndarray],
                       names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """COCO instances dict for one split (category ids 1..nc, boxes in pixels xywh)."""
    coco: dict[str, Any] = {
        "images": [], "annotations": [],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(names)],
    }
    for image_id, (image, (width, height), rows) in enumerate(zip(images, sizes, labels), start=1):
        coco["images"].append({"id": image_id, "file_name": image.name, "width": width, "height": height})
        for cls, cx, cy, w, h in np.asarray(rows, np.float64).reshape(-1, 5):
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": int(cls) + 1,
                "bbox": [round(v, 3) for v in box], "area": round(box[2] * box[3], 3), "iscrowd": 0,
            })
    return coco


@dataclass(frozen=True)
class CocoImage:
    """One image of a COCO file with its annotations converted to YOLO rows (unvalidated)."""

    path: Path
    width: int
    height: int
    rows: list[tuple[int, float, float, float, float]]  # (class index, cx, cy, w, h) normalized
    crowd_skipped: int


def read_coco(path: str | Path) -> tuple[tuple[str, ...], list[CocoImage], list[str]]:
    """Read a COCO instances JSON: category ids are remapped to 0..n-1 in id order.

    Returns (names, images, problems); problems describe annotations that could not be placed on an image.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataSetError(f"{path}: cannot read COCO JSON: {err}") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "categories")):
        raise DataSetError(f"{path}: a COCO instances file needs lists 'images' and 'categories'")
    try:
        categories = sorted(doc["categories"], key=lambda c: int(c["id"]))
        class_of = {int(c["id"]): i for i, c in enumerate(categories)}
        names = tuple(str(c["name"]) for c in categories)
        images = {int(im["id"]): im for im in doc["images"]}
    except (KeyError, TypeError, ValueError) as err:
        raise DataSetError(f"{path}: malformed images/categories entry ({err!r})") from None
    if not names:
        raise DataSetError(f"{path}: no categories")
    _require_unique(path, "images", [im["id"] for im in doc["images"]], len(images))
    _require_unique(path, "categories", [c["id"] for c in categories], len(class_of))
    if not isinstance(doc.get("annotations", []), list):
        raise DataSetError(f"{path}: 'annotations' must be a list, got {type(doc['annotations']).__name__}")
    rows: dict[int, list] = {image_id: [] for image_id in images}
    crowd: dict[int, int] = {image_id: 0 for image_id in images}
    problems = []
    for index, ann in enumerate(doc.get("annotations", [])):
        problem = _add_coco_annotation(ann, images, class_of, rows, crowd)
        if problem:
            problems.append(f"annotation #{index}: {problem}")
    result = []
    for image_id, im in images.items():
        try:
            image_path = _coco_image_path(path, str(im["file_name"]))
            result.append(CocoImage(image_path, int(im["width"]), int(im["height"]), rows[image_id], crowd[image_id]))
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"image id {image_id}: malformed entry ({err!r})")
    return names, result, problems


def _require_unique(path: Path, what: str, ids: list, distinct: int) -> None:
    """Two entries with one id would be merged silently (the later one wins): a fatal error naming the ids."""
    if distinct != len(ids):
        repeated = sorted(i for i, n in Counter(int(i) for i in ids).items() if n > 1)
        raise DataSetError(f"{path}: {what} ids must be unique; repeated: {repeated[:10]}")


def _add_coco_annotation(ann: Any, images: dict, class_of: dict, rows: dict, crowd: dict) -> str | None:
    """Convert one annotation to a YOLO row; unknown category ids become class -1 (validation drops them)."""
    try:
        image_id = int(ann["image_id"])
        image = images[image_id]
        x, y, w, h = (float(v) for v in ann["bbox"])
        width, height = float(image["width"]), float(image["height"])
        cls = class_of.get(int(ann.get("category_id", -1)), -1)
    except (KeyError, TypeError, ValueError) as err:
        return f"cannot be placed on an image ({err!r})"
    if ann.get("iscrowd", 0):
        crowd[image_id] += 1
        return None
    rows[image_id].append((cls, (x + w / 2) / width, (y + h / 2) / height, w / width, h / height))
    return None


def _coco_image_path(json_path: Path, file_name: str) -> Path:
    """Images sit next to the JSON, or in an `images/` folder beside it (first that exists)."""
    for candidate in (json_path.parent / file_name, json_path.parent / "images" / file_name):
        if candidate.exists():
            return candidate
    return json_path.parent / file_name
