"""Data pipeline throughput: the offline `augment` stage and the online (train-time) pipeline, images/s.

    python benchmarks/data_throughput.py [--images 64] [--sizes 320 640] [--out benchmarks/results/data_throughput.json]

Each size gets a fresh synthetic set. "offline" times the whole augment stage (read, augment, encode + write,
copies=1, originals copied too) per augmented image; "online" times decode + augment per image in memory,
as a loader worker would, with one process. Both use the default transforms from params.yaml.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2

from yolofps.bench.environment import write_result
from yolofps.config import load_config
from yolofps.data import augment, formats
from yolofps.paths import Paths
from yolofps.stages import augment as augment_stage
from yolofps.stages import data as data_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def measure(size: int, images: int, repeats: int) -> dict:
    """Offline and online images/s at one synthetic image size (best of `repeats` for each)."""
    cfg = load_config(PROJECT_ROOT / "params.yaml",
                      {"data.num_train": images, "data.num_val": 1, "data.image_size": size, "augment.copies": 1})
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths(Path(tmp))
        data_stage.run(cfg, paths)
        offline = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = augment_stage.run(cfg, paths)
            offline.append(result.metrics["augmented_images"] / (time.perf_counter() - start))
        pipeline = augment.build_pipeline(cfg.augment.transforms, min_visibility=cfg.augment.min_visibility,
                                          min_area=cfg.augment.min_area, seed=0)
        files = formats.list_images(paths.prepared_data / "images" / "train")
        online = []
        for _ in range(repeats):
            start = time.perf_counter()
            for image_path in files:
                image = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
                augment.apply(pipeline, image, formats.read_labels(formats.label_path_for(image_path)))
            online.append(len(files) / (time.perf_counter() - start))
    return {"image_size": size, "images": images, "offline_img_per_s": round(max(offline), 1),
            "online_img_per_s": round(max(online), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "data_throughput.json"))
    args = parser.parse_args(argv)
    rows = [measure(size, args.images, args.repeats) for size in args.sizes]
    print(f"{'size':>6} {'images':>7} {'offline img/s':>14} {'online img/s':>13}")
    for row in rows:
        print(f"{row['image_size']:>6} {row['images']:>7} {row['offline_img_per_s']:>14} {row['online_img_per_s']:>13}")
    settings = {"copies": 1, "transforms": "params.yaml defaults", "opencv_threads": cv2.getNumThreads(),
                "repeats": args.repeats, "statistic": "best of repeats"}
    write_result(args.out, "data_throughput", settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
