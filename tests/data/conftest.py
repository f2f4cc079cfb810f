"""Fixtures for data tests: a tiny synthetic set, and a crafted data set with one of every fault."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import TINY_SPEC
from yolofps.data import synthetic


@pytest.fixture
def tiny_synthetic(tmp_path: Path) -> Path:
    """A 6 + 3 image synthetic set; returns its data.yaml."""
    return synthetic.generate(tmp_path / "synthetic", TINY_SPEC, seed=0)


def _jpeg(path: Path, seed: int = 0) -> bytes:
    image = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)
    return path.read_bytes()


GOOD_LABELS = """\
0 0.500000 0.500000 0.200000 0.300000
1 0.5 0.5 0.2
a b c d e
9 0.5 0.5 0.1 0.1
0 0.5 0.5 0.0 0.1
0 0.995 0.5 0.02 0.1
0 0.99 0.5 0.2 0.1
0 0.500000 0.500000 0.200000 0.300000
1 0.25 0.25 0.1 0.1
"""


@pytest.fixture
def faulty_dataset(tmp_path: Path) -> Path:
    """A YOLO data set with every fault of the validation policy; returns its data.yaml."""
    root = tmp_path / "faulty"
    images, labels = root / "images" / "train", root / "labels" / "train"
    _jpeg(images / "good.jpg")
    (labels).mkdir(parents=True)
    (labels / "good.txt").write_text(GOOD_LABELS)
    (images / "corrupt.jpg").write_bytes(b"this is not an image")
    (labels / "corrupt.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    data = _jpeg(images / "truncated.jpg", seed=1)
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    _jpeg(images / "nolabel.jpg", seed=2)
    _jpeg(images / "background.jpg", seed=3)
    (labels / "background.txt").write_text("")
    (labels / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    _jpeg(root / "images" / "val" / "v.jpg", seed=4)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "val" / "v.txt").write_text("1 0.5 0.5 0.4 0.4\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n")
    return root / "data.yaml"
