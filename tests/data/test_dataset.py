"""The loader gives fixed shapes, correct boxes through letterbox and augmentation, and seeded randomness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs import loader_config, project_config, train_config
from yolofps.config import LoaderConfig, TransformSpec
from yolofps.data import augment, formats
from yolofps.data.dataset import (
    YoloDataset,
    build_loader,
    collate,
    letterbox,
    letterbox_rows,
    pad_targets,
    train_pipeline,
)
from yolofps.errors import ConfigError, DataSetError

SIZE = 64
# stronger geometry than the defaults, so boxes really get cut, rotated and dropped
HARSH = loader_config({"max_boxes": 8, "mosaic": 1.0, "translate": 0.2, "scale": 0.5, "degrees": 15, "shear": 5,
                       "flipud": 0.5})
DEFAULT_TRANSFORMS = project_config().augment.transforms


@pytest.mark.parametrize("height, width", [(60, 120), (150, 50)])
def test_letterbox_ratio_pad_and_box_round_trip(height, width):
    image = np.zeros((height, width, 3), np.uint8)
    x1, y1, x2, y2 = width // 4, height // 3, width // 2, height - 5
    image[y1:y2, x1:x2] = 255
    out, ratio, (pad_w, pad_h) = letterbox(image, SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    assert ratio == pytest.approx(SIZE / max(height, width))
    new_w, new_h = round(width * ratio), round(height * ratio)
    assert (pad_w, pad_h) == ((SIZE - new_w) // 2, (SIZE - new_h) // 2)
    assert (out[:, : int(pad_w)] == 114).all() and (out[: int(pad_h)] == 114).all()
    # the white box, found in the letterboxed image and mapped back, is where it was drawn
    ys, xs = np.nonzero(out[..., 0] > 127)
    found = (np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) - [pad_w, pad_h, pad_w, pad_h]) / ratio
    assert np.abs(found - [x1, y1, x2, y2]).max() <= 1 / ratio + 1
    # and the label mapping agrees with the pixels
    row = np.array([[0, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]])
    cx, cy, w, h = letterbox_rows(row, (height, width), ratio, (pad_w, pad_h), SIZE)[0, 1:] * SIZE
    assert np.allclose([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], [xs.min(), ys.min(), xs.max() + 1,
                                                                          ys.max() + 1], atol=1.0)


def _label_rows(dataset: YoloDataset, index: int) -> np.ndarray:
    return formats.read_labels(formats.label_path_for(dataset.images[index]))


def test_eval_samples_have_exact_shapes_and_boxes_map_back(tiny_synthetic):
    dataset = YoloDataset(tiny_synthetic, "train", SIZE, loader_config({"max_boxes": 8}), train=False)
    backgrounds = 0
    for index in range(len(dataset)):
        image, targets, mask, meta = dataset[index]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
        assert targets.shape == (8, 5) and targets.dtype == torch.float32
        assert mask.shape == (8,) and mask.dtype == torch.bool
        assert set(meta) >= {"path", "orig_shape", "ratio", "pad", "truncated"} and meta["truncated"] == 0
        assert not meta["mosaic"] and (targets[~mask] == 0).all()
        rows = _label_rows(dataset, index)
        assert int(mask.sum()) == len(rows)
        backgrounds += len(rows) == 0
        height, width = meta["orig_shape"]
        (pad_w, pad_h), ratio = meta["pad"], meta["ratio"]
        boxes = targets[mask, 1:].numpy() * SIZE  # cx, cy, w, h in input pixels
        back = np.stack([(boxes[:, 0] - pad_w) / ratio, (boxes[:, 1] - pad_h) / ratio,
                         boxes[:, 2] / ratio, boxes[:, 3] / ratio], 1)
        assert np.abs(back - rows[:, 1:] * [width, height, width, height]).max(initial=0) <= 1.0
        assert np.array_equal(targets[mask, 0].numpy(), rows[:, 0])
    assert backgrounds > 0, "the tiny set should include a background image"


def _assert_valid_sample(sample, spec: LoaderConfig, num_classes: int) -> None:
    image, targets, mask, _ = sample
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
    assert targets.shape == (spec.max_boxes, 5) and mask.shape == (spec.max_boxes,)
    assert (targets[~mask] == 0).all()
    valid = targets[mask].numpy()
    assert set(valid[:, 0].tolist()) <= set(range(num_classes))
    assert (valid[:, 3:] > 0).all()
    assert (valid[:, 1:3] - valid[:, 3:] / 2 >= -1e-5).all() and (valid[:, 1:3] + valid[:, 3:] / 2 <= 1 + 1e-5).all()


@pytest.mark.parametrize("extra", [(), DEFAULT_TRANSFORMS + (TransformSpec("RandomCrop", {"height": 48, "width": 48,
                                                                                              "p": 0.5}),)])
def test_train_samples_stay_valid_with_and_without_mosaic(tiny_synthetic, extra):
    for seed in range(3):
        dataset = YoloDataset(tiny_synthetic, "train", SIZE, HARSH, train=True, extra_transforms=extra, seed=seed)
        boxes = 0
        for mosaic in (True, False):
            dataset.set_mosaic(mosaic)
            for index in range(len(dataset)):
                sample = dataset[index]
                _assert_valid_sample(sample, HARSH, len(dataset.names))
                assert sample[3]["mosaic"] == mosaic
                boxes += int(sample[2].sum())
        assert boxes > 0  # augmentation must not drop everything


def test_flips_are_independent_draws():
    """Compose(seed=) would give every transform the same stream: flips would only ever happen together."""
    spec = loader_config({"scale": 0, "translate": 0, "degrees": 0, "shear": 0, "hsv_h": 0, "hsv_s": 0, "hsv_v": 0,
                          "fliplr": 0.5, "flipud": 0.5})
    pipeline = train_pipeline(SIZE, spec, (), mosaic=False)
    augment.seed_pipeline(pipeline, 0)
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[:8, :8] = 255  # a marker in the top-left corner shows which flips happened
    rows = np.array([[0, 0.0625, 0.0625, 0.125, 0.125]], np.float32)
    corners = set()
    for _ in range(40):
        out, out_rows = augment.apply(pipeline, image, rows)
        ys, xs = np.nonzero(out[..., 0])
        corners.add((int(xs.mean() > SIZE / 2), int(ys.mean() > SIZE / 2)))
        assert np.allclose(out_rows[0, 1:3], [xs.mean() + 0.5, ys.mean() + 0.5] / np.float32(SIZE), atol=1e-3)
    assert corners == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_an_image_with_more_boxes_than_max_boxes_is_refused_by_name(tiny_synthetic):
    """Issue 20: boxes beyond train.loader.max_boxes were cut without a word; now the loader refuses to start."""
    most = max(len(formats.read_labels(p)) for p in (tiny_synthetic.parent / "labels" / "train").glob("*.txt"))
    assert most > 2
    with pytest.raises(ConfigError, match=rf"train.loader.max_boxes is 2 but .*labels/train/.*\.txt has {most} boxes"):
        YoloDataset(tiny_synthetic, "train", SIZE, loader_config({"max_boxes": 2}), train=False)
    dataset = YoloDataset(tiny_synthetic, "train", SIZE, loader_config({"max_boxes": most}), train=False)
    assert all(dataset[i][3]["truncated"] == 0 for i in range(len(dataset)))


def test_pad_targets_counts_what_a_mosaic_cuts():
    rows = np.tile(np.array([[0, 0.5, 0.5, 0.1, 0.1]], np.float32), (5, 1))
    targets, mask, cut = pad_targets(rows, 3)
    assert targets.shape == (3, 5) and bool(mask.all()) and cut == 2


def _first_batch(dataset: YoloDataset, seed: int, shuffle: bool = True):
    return next(iter(build_loader(dataset, 4, shuffle=shuffle, workers=0, seed=seed)))


def test_loader_seed_fixes_batches(tiny_synthetic):
    def fresh() -> YoloDataset:
        return YoloDataset(tiny_synthetic, "train", SIZE, HARSH, train=True, seed=123)

    reused = fresh()
    first, again, reused_again = _first_batch(fresh(), 0), _first_batch(fresh(), 0), _first_batch(reused, 0)
    assert torch.equal(reused_again[0], _first_batch(reused, 0)[0])  # the loader seed restarts the streams
    for other in (again, reused_again):
        for a, b in zip(first[:3], other[:3]):
            assert torch.equal(a, b)
        assert [m["path"] for m in first[3]] == [m["path"] for m in other[3]]
    assert not torch.equal(first[0], _first_batch(fresh(), 1)[0])
    # same order, different seed: the augmentation itself differs
    assert not torch.equal(_first_batch(fresh(), 0, shuffle=False)[0], _first_batch(fresh(), 1, shuffle=False)[0])


def test_worker_loader_shapes_and_close_mosaic(tiny_synthetic):
    dataset = YoloDataset(tiny_synthetic, "train", SIZE, HARSH, train=True)
    loader = build_loader(dataset, 3, shuffle=True, workers=2, seed=0)
    images, targets, mask, metas = next(iter(loader))
    assert images.shape == (3, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert targets.shape == (3, 8, 5) and mask.shape == (3, 8) and len(metas) == 3
    assert all(m["mosaic"] for m in metas)
    dataset.set_mosaic(False)  # must reach the persistent workers' copies
    assert not any(m["mosaic"] for m in next(iter(loader))[3])


def test_collate_stacks_samples_and_cache_changes_nothing(tiny_synthetic):
    dataset = YoloDataset(tiny_synthetic, "val", SIZE, loader_config({"max_boxes": 4}), train=False)
    cached = YoloDataset(tiny_synthetic, "val", SIZE, loader_config({"max_boxes": 4}), train=False, cache=True)
    images, targets, mask, metas = collate([dataset[0], dataset[1]])
    assert torch.equal(images, collate([cached[0], cached[1]])[0])
    assert images.shape == (2, 3, SIZE, SIZE) and targets.shape == (2, 4, 5) and mask.shape == (2, 4)
    assert [m["path"] for m in metas] == [str(dataset.images[0]), str(dataset.images[1])]


def test_bad_settings_and_splits_fail_loudly(tiny_synthetic):
    """Loader settings are checked once, when params.yaml is read, and the message names the params key."""
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.imgsz must be a positive multiple of 32"):
        train_config({"imgsz": 100})
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.loader\.fliplr must be in \[0, 1\], got 1\.5"):
        loader_config({"fliplr": 1.5})
    with pytest.raises(ConfigError, match=r"train\.loader\.scale must be in \[0, 1\)"):
        loader_config({"scale": 1.5})
    with pytest.raises(DataSetError, match="no split 'test'"):
        YoloDataset(tiny_synthetic, "test", SIZE, loader_config(), train=False)
