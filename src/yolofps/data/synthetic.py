"""The built-in demo data set: shapes on textured backgrounds, deterministic from the seed.

Four classes of filled shapes with varied size, aspect ratio, colour and rotation, overlapping and
occluding each other, on noisy gradient backgrounds with unlabeled clutter; some images have no objects.
An object hidden by later ones below `min_visible` of its area gets no label (as an annotator would skip it).
Each image has its own RNG stream (seed, split, index), so any image can be regenerated alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from yolofps.data import formats

CLASS_NAMES = ("ellipse", "rectangle", "triangle", "cross")
_SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticSpec:
    """What the generator needs (a subset of the `data` params section)."""

    num_train: int
    num_val: int
    image_size: int
    min_aspect: float
    max_objects: int
    background_fraction: float
    min_visible: float


def generate(root: Path, spec: SyntheticSpec, seed: int) -> Path:
    """Write the demo set in YOLO layout under `root` and return its data.yaml."""
    for split, count in (("train", spec.num_train), ("val", spec.num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
            image, rows = render_image(rng, spec)
            stem = f"{split}_{index:05d}"
            cv2.imwrite(str(root / "images" / split / f"{stem}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
            formats.write_labels(root / "labels" / split / f"{stem}.txt", rows)
    return formats.write_data_yaml(root, CLASS_NAMES)


def render_image(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """One BGR image and its label rows [n, 5] (class, cx, cy, w, h normalized)."""
    long_side = spec.image_size
    short_side = int(round(long_side * rng.uniform(spec.min_aspect, 1.0) / 2) * 2)
    width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    image = _background(rng, width, height)
    num_objects = 0 if rng.random() < spec.background_fraction else int(rng.integers(1, spec.max_objects + 1))
    objects = [_draw_object(rng, image) for _ in range(num_objects)]
    rows = _visible_rows(objects, width, height, spec.min_visible)
    noise = rng.normal(0, rng.uniform(2, 8), image.shape)
    image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return image, rows


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A colour gradient plus blurred noise texture and a few unlabeled lines (clutter)."""
    corners = rng.uniform(40, 215, (2, 2, 3)).astype(np.float32)  # [2, 2, BGR]
    image = cv2.resize(corners, (width, height), interpolation=cv2.INTER_LINEAR)  # [H, W, 3]
    texture = cv2.GaussianBlur(rng.normal(0, 25, (height, width)).astype(np.float32), (0, 0), rng.uniform(1, 4))
    image = np.clip(image + texture[..., None], 0, 255).astype(np.uint8)  # [H, W, 3]
    for _ in range(int(rng.integers(0, 6))):
        p1 = tuple(int(v) for v in rng.integers(0, (width, height)))
        p2 = tuple(int(v) for v in rng.integers(0, (width, height)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.line(image, p1, p2, color, int(rng.integers(1, 4)), cv2.LINE_AA)
    return image


def _shape_polygon(cls: int) -> np.ndarray:
    """Unit-size outline of a class, centred at the origin, as [k, 2] points in [-0.5, 0.5]."""
    if cls == 0:  # ellipse
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return 0.5 * np.stack([np.cos(t), np.sin(t)], 1)
    if cls == 1:  # rectangle
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if cls == 2:  # triangle
        return np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    a = 0.17  # cross: arm half-width
    return np.array([[-a, -0.5], [a, -0.5], [a, -a], [0.5, -a], [0.5, a], [a, a], [a, 0.5], [-a, 0.5],
                     [-a, a], [-0.5, a], [-0.5, -a], [-a, -a]])


def _draw_object(rng: np.random.Generator, image: np.ndarray) -> tuple[int, np.ndarray]:
    """Draw one random shape onto `image`; return (class, its filled mask)."""
    height, width = image.shape[:2]
    cls = int(rng.integers(0, len(CLASS_NAMES)))
    size = rng.uniform(0.08, 0.4) * min(width, height)
    aspect = rng.uniform(0.6, 1.6)
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = rng.uniform((0.05 * width, 0.05 * height), (0.95 * width, 0.95 * height))
    points = (_shape_polygon(cls) * (size * aspect, size / aspect)) @ rotation.T + centre  # [k, 2] pixels
    polygon = np.round(points).astype(np.int32)
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(120, 256), rng.integers(90, 256)]]])
    color = tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])
    cv2.fillPoly(image, [polygon], color, cv2.LINE_AA)
    if rng.random() < 0.5:  # a darker outline on some objects
        cv2.polylines(image, [polygon], True, tuple(c // 2 for c in color), 2, cv2.LINE_AA)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [polygon], 1)
    return cls, mask


def _visible_rows(objects: list[tuple[int, np.ndarray]], width: int, height: int, min_visible: float) -> np.ndarray:
    """Label rows for objects that stay visible enough after everything drawn later on top of them."""
    rows = []
    covered = np.zeros((height, width), bool)  # union of masks drawn after the current object
    for cls, mask in reversed(objects):
        filled = mask.astype(bool)
        area = int(filled.sum())
        visible = int((filled & ~covered).sum())
        covered |= filled
        if area == 0 or visible < min_visible * area:
            continue
        ys, xs = np.nonzero(filled)
        x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        rows.append((cls, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height))
    rows.reverse()
    return np.array(rows, np.float32).reshape(-1, 5)
