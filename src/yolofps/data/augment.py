"""Bbox-aware albumentations pipelines built from the `augment.transforms` list in params.yaml.

One builder serves both the offline `augment` stage and online (train-time) augmentation in the loader.
Boxes travel in YOLO format (class, cx, cy, w, h normalized); albumentations clips them to the image and
drops those that keep less than `min_visibility` of their area or fall under `min_area` pixels.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence

import albumentations as A
import numpy as np

from yolofps.config import TransformSpec
from yolofps.errors import ConfigError


def build_pipeline(transforms: Sequence[TransformSpec], *, min_visibility: float = 0.3, min_area: float = 4.0,
                   seed: int | None = None) -> A.Compose:
    """An `A.Compose` over the named transforms; bad names or arguments are a ConfigError naming them."""
    return compose(transforms, min_visibility=min_visibility, min_area=min_area, seed=seed)


def compose(transforms: Sequence[TransformSpec], *, leading: Sequence[A.BasicTransform] = (),
            trailing: Sequence[A.BasicTransform] = (), min_visibility: float = 0.3, min_area: float = 4.0,
            min_side: float = 0.0, seed: int | None = None) -> A.Compose:
    """`build_pipeline` with fixed transforms around the user's list (the train loader's mosaic, affine, flips)."""
    built = [*leading, *(_build_transform(i, spec) for i, spec in enumerate(transforms)), *trailing]
    bbox_params = A.BboxParams(format="yolo", label_fields=["class_labels"], min_visibility=min_visibility,
                               min_area=min_area, min_width=min_side, min_height=min_side, clip=True)
    pipeline = A.Compose(built, bbox_params=bbox_params)
    if seed is not None:
        seed_pipeline(pipeline, seed)
    return pipeline


def seed_pipeline(pipeline: A.Compose, seed: int) -> None:
    """Seed a Compose with ONE random stream shared by its transforms.

    albumentations 2.0.8's `Compose(seed=)` gives every transform its own generator with the same seed, so
    transforms with equal probability fire together (a horizontal flip would always come with a vertical one).
    """
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def _build_transform(index: int, spec: TransformSpec) -> A.BasicTransform:
    where = f"augment.transforms[{index}] ({spec.name})"
    cls = getattr(A, spec.name, None)
    if not isinstance(cls, type) or not issubclass(cls, A.BasicTransform):
        raise ConfigError(f"{where}: albumentations has no transform named {spec.name!r}")
    if not (issubclass(cls, A.ImageOnlyTransform) or _supports_bboxes(cls)):
        raise ConfigError(f"{where}: transform does not support bounding boxes, so labels would go stale")
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(spec.args) - set(accepted))
    if unknown:  # albumentations only warns about unknown arguments; a typo must not pass silently
        raise ConfigError(f"{where}: unknown argument(s) {unknown}; accepted: {sorted(accepted)}")
    try:
        transform = cls(**spec.args)
    except Exception as err:  # albumentations validates arguments with pydantic and raises its own types
        first_lines = " ".join(str(err).splitlines()[:3])
        raise ConfigError(f"{where}: bad arguments {spec.args}: {first_lines}") from None
    _check_keeps_uint8(where, cls, spec)
    return transform


_PROBE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _check_keeps_uint8(where: str, cls: type, spec: TransformSpec) -> None:
    """The pipeline writes JPEGs and feeds the model uint8: a transform that changes the dtype or the channels
    (Normalize, ToFloat, ...) would turn every augmented image black, so it is refused before any work."""
    try:
        always = cls(**(spec.args | {"p": 1.0}))  # fire it whatever its probability
        out = always(image=_PROBE.copy())["image"]
    except Exception:  # needs more than an image (extra targets): nothing to probe here, the stage will tell
        return
    if out.dtype != np.uint8 or out.shape[2:] != (3,):
        raise ConfigError(f"{where}: turns a uint8 RGB image into {out.dtype} {list(out.shape)} (values "
                          f"{float(out.min()):.3g}..{float(out.max()):.3g}); augmented images are written as "
                          "uint8 JPEGs, so only transforms that keep uint8 RGB can be listed")


def _supports_bboxes(cls: type) -> bool:
    targets = getattr(cls, "_targets", ())
    targets = targets if isinstance(targets, tuple) else (targets,)
    return any(getattr(t, "name", "") == "BBOXES" for t in targets)


def apply(pipeline: A.Compose, image: np.ndarray, rows: np.ndarray,
          mosaic_with: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Augment one image and its label rows [n, 5]; returns the new image and the surviving rows.

    `mosaic_with` are the other (image, rows) pairs for an `A.Mosaic` in the pipeline.
    """
    extra = {"mosaic_metadata": [{"image": im, **_box_fields(r)} for im, r in mosaic_with]} if mosaic_with else {}
    out = pipeline(image=image, **_box_fields(rows), **extra)
    out_boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
    classes = np.asarray(out["class_labels"], np.float32).reshape(-1, 1)  # albumentations may return floats
    out_rows = np.concatenate([classes, out_boxes], 1) if len(out_boxes) else np.zeros((0, 5), np.float32)
    return out["image"], out_rows[(out_rows[:, 3] > 0) & (out_rows[:, 4] > 0)]


def _box_fields(rows: np.ndarray) -> dict:
    """Label rows as the `bboxes` and `class_labels` fields of an albumentations call."""
    if not len(rows):
        return {"bboxes": np.zeros((0, 4), np.float32), "class_labels": []}
    return {"bboxes": _clip_yolo(rows[:, 1:5]), "class_labels": rows[:, 0].astype(np.int64)}


def _clip_yolo(boxes: np.ndarray) -> np.ndarray:
    """Clip (cx, cy, w, h) boxes to the unit square; validated labels only need float-rounding fixes here."""
    xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1).clip(0.0, 1.0)
    return np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1).astype(np.float32)
