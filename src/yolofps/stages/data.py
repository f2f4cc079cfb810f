"""`data` stage: ingest + validate a data set into a normalized YOLO layout.

`data.source: synthetic` generates the built-in demo set; a data.yaml or COCO JSON is validated and
copied (clean labels, readable images only). Outputs: `data/prepared/`, the validation report,
`metrics/data.json`.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

from yolofps.config import Config, DataConfig
from yolofps.data import formats, synthetic, validate
from yolofps.fileio import fresh_dir, write_json
from yolofps.paths import Paths
from yolofps.stages import StageResult


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Produce the prepared data set; a fatal data problem raises before any output is touched."""
    data = cfg.data
    if data.source == "synthetic":
        out = fresh_dir(paths.prepared_data)
        synthetic.generate(out, synthetic_spec(data), cfg.seed)
        validated = validate.validate_yolo(out / "data.yaml", clip_tolerance=data.clip_tolerance)
    else:
        validated = validate.validate_source(paths.root / data.source, clip_tolerance=data.clip_tolerance,
                                             val_fraction=data.val_fraction, seed=cfg.seed)
        validated.require_every_split()
        out = fresh_dir(paths.prepared_data)
        write_prepared(validated, out)
    write_json(paths.data_report, validated.report.to_dict())
    metrics = data_metrics(validated)
    write_json(paths.metrics("data"), metrics)
    return StageResult(
        outputs={"data": out, "data_yaml": out / "data.yaml", "report": paths.data_report},
        metrics=metrics,
    )


def synthetic_spec(data: DataConfig) -> synthetic.SyntheticSpec:
    """The generator's view of the `data` section."""
    return synthetic.SyntheticSpec(
        num_train=data.num_train, num_val=data.num_val, image_size=data.image_size, min_aspect=data.min_aspect,
        max_objects=data.max_objects, background_fraction=data.background_fraction, min_visible=data.min_visible,
    )


def write_prepared(validated: validate.ValidatedSet, out: Path) -> None:
    """Copy usable images and write cleaned labels in the standard layout, then data.yaml."""
    for split, samples in validated.splits.items():
        used: set[str] = set()
        for sample in samples:
            name = _unique_name(sample.image, used)
            if name != sample.image.name:
                validated.report.add(sample.image, "name_clash", f"another {split} image has the stem "
                                     f"{sample.image.stem!r}; written as {name} with its own label file")
            image_path = out / "images" / split / name
            image_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample.image, image_path)
            formats.write_labels(out / "labels" / split / f"{Path(name).stem}.txt", sample.rows)
    formats.write_data_yaml(out, validated.names)


def _unique_name(image: Path, used: set[str]) -> str:
    """Images from several source folders may share a stem (x.jpg, x.png), and a label file is named by the stem:
    suffix later ones with a counter."""
    name, counter = image.name, 1
    while Path(name).stem.lower() in used:
        name, counter = f"{image.stem}_{counter}{image.suffix}", counter + 1
    used.add(Path(name).stem.lower())
    return name


def data_metrics(validated: validate.ValidatedSet) -> dict[str, int]:
    """Flat metrics: images, boxes and backgrounds per split, boxes per class, faults by kind."""
    counts = validated.report.counts
    metrics = {"num_classes": len(validated.names)}
    for split in formats.SPLITS:
        for what in ("images", "boxes", "backgrounds"):
            metrics[f"{split}_{what}"] = counts[f"{split}/{what}"]
    per_class = Counter(int(c) for samples in validated.splits.values() for s in samples for c in s.rows[:, 0])
    for index, name in enumerate(validated.names):
        metrics[f"boxes/{name}"] = per_class[index]
    faults = Counter(issue.fault for issue in validated.report.issues)
    metrics["issues"] = len(validated.report.issues)
    for fault in validate.POLICY:
        metrics[f"faults/{fault}"] = faults[fault]
    return metrics


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.data`: the same as `yolofps data`."""
    from yolofps import cli

    return cli.main(["data", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
