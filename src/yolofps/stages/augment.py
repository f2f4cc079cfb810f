"""`augment` stage: K albumentations copies of every train image, written next to the originals.

Reads `data/prepared/`, writes `data/augmented/` (originals + `<stem>_aug<k>` copies for train, val copied
untouched) and `metrics/augment.json`, including how many boxes augmentation dropped.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

from yolofps.config import Config
from yolofps.data import augment, formats
from yolofps.errors import DataSetError
from yolofps.fileio import fresh_dir, write_json
from yolofps.paths import Paths
from yolofps.stages import StageResult


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Write the augmented data set; config problems raise before any output is touched."""
    aug = cfg.augment
    pipeline = augment.build_pipeline(aug.transforms, min_visibility=aug.min_visibility, min_area=aug.min_area,
                                      seed=cfg.seed)
    source = formats.load_data_yaml(paths.prepared_data / "data.yaml")
    out = fresh_dir(paths.augmented_data)
    metrics = {"copies": aug.copies, "val_images": copy_split(source, "val", out)}
    metrics |= augment_train(source, out, pipeline, aug.copies)
    formats.write_data_yaml(out, source.names)
    write_json(paths.metrics("augment"), metrics)
    return StageResult(outputs={"data": out, "data_yaml": out / "data.yaml"}, metrics=metrics)


def copy_split(source: formats.DataYaml, split: str, out: Path) -> int:
    """Copy a split's images and labels unchanged; returns the image count."""
    images = _split_images(source, split)
    for image in images:
        _copy(image, out / "images" / split / image.name)
        _copy(formats.label_path_for(image), out / "labels" / split / f"{image.stem}.txt")
    return len(images)


def augment_train(source: formats.DataYaml, out: Path, pipeline, copies: int) -> dict[str, float]:
    """Originals plus `copies` augmented versions of each train image; counts boxes kept and dropped."""
    boxes_in = boxes_kept = written = 0
    images = _split_images(source, "train")
    for image_path in images:
        _copy(image_path, out / "images" / "train" / image_path.name)
        label_path = formats.label_path_for(image_path)
        _copy(label_path, out / "labels" / "train" / f"{image_path.stem}.txt")
        if copies == 0:
            continue
        image = _read_rgb(image_path)
        rows = formats.read_labels(label_path)
        for k in range(copies):
            new_image, new_rows = augment.apply(pipeline, image, rows)
            stem = f"{image_path.stem}_aug{k}"
            cv2.imwrite(str(out / "images" / "train" / f"{stem}{image_path.suffix}"),
                        cv2.cvtColor(new_image, cv2.COLOR_RGB2BGR))
            formats.write_labels(out / "labels" / "train" / f"{stem}.txt", new_rows)
            boxes_in, boxes_kept, written = boxes_in + len(rows), boxes_kept + len(new_rows), written + 1
    return {
        "train_images_in": len(images), "train_images_out": len(images) + written, "augmented_images": written,
        "augmented_boxes_in": boxes_in, "augmented_boxes_kept": boxes_kept,
        "augmented_boxes_dropped": boxes_in - boxes_kept,
        "augmented_boxes_dropped_fraction": round((boxes_in - boxes_kept) / max(boxes_in, 1), 4),
    }


def _split_images(source: formats.DataYaml, split: str) -> list[Path]:
    return [image for location in source.splits[split] for image in formats.list_images(location)]


def _read_rgb(path: Path) -> np.ndarray:
    try:  # the data stage only passes images this decoder reads; a failure means the folder was edited by hand
        image = formats.decode_image(path)
    except DataSetError as err:
        raise DataSetError(f"{err}; rerun the data stage (`dvc repro data`)") from None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.augment`: the same as `yolofps augment`."""
    from yolofps import cli

    return cli.main(["augment", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
