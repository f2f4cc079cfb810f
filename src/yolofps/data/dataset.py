"""Training and evaluation data: letterbox, yolov5-style augmentation, and fixed-shape padded samples.

Every sample has the same shapes (image uint8 [3, S, S], targets [max_boxes, 5] zero-padded, a bool mask), so a
batch never triggers an XLA recompile and the train step needs no host sync to find out how many boxes it got.
Train-time order follows yolov5: (4-image mosaic | letterbox) -> random affine -> the user's `augment.transforms`
-> HSV gains -> flips. All randomness comes from seeded streams that each loader worker reseeds from its own seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from yolofps import device as dev
from yolofps.config import LoaderConfig, TransformSpec
from yolofps.data import augment, formats
from yolofps.errors import ConfigError, DataSetError

FILL = 114  # yolov5's padding grey: neutral after normalization, and what pretrained weights saw


def letterbox(image: np.ndarray, size: int, fill: int = FILL) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping aspect ratio so the long side is `size` (up or down), pad to size x size centred.

    Returns (image, ratio, (pad_w, pad_h)) like yolov5's letterbox with auto=False: a point maps as
    x_input = x_orig * ratio + pad_w. The pads are the whole pixels added on the left and top.
    """
    height, width = image.shape[:2]
    ratio = size / max(height, width)
    new_w, new_h = max(1, min(size, round(width * ratio))), max(1, min(size, round(height * ratio)))
    if (new_w, new_h) != (width, height):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    image = cv2.copyMakeBorder(image, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT,
                               value=(fill, fill, fill))
    return image, ratio, (float(left), float(top))


def letterbox_rows(rows: np.ndarray, orig_shape: tuple[int, int], ratio: float, pad: tuple[float, float],
                   size: int) -> np.ndarray:
    """Label rows [n, 5] normalized to the original (h, w) image -> normalized to the size x size input."""
    height, width = orig_shape
    scale = np.array([width, height, width, height], np.float32) * ratio / size
    offset = np.array([pad[0], pad[1], 0.0, 0.0], np.float32) / size
    out = rows.astype(np.float32).copy()
    out[:, 1:5] = out[:, 1:5] * scale + offset
    return out


class YoloHSV(A.ImageOnlyTransform):
    """yolov5's augment_hsv on an RGB image: hue, saturation and value times random gains in [1 - g, 1 + g]."""

    def __init__(self, gains: tuple[float, float, float], p: float = 1.0):
        super().__init__(p=p)
        self.gains = tuple(float(g) for g in gains)

    def get_params(self) -> dict[str, Any]:
        return {"factors": self.random_generator.uniform(-1, 1, 3) * self.gains + 1}

    def apply(self, img: np.ndarray, factors: np.ndarray, **params: Any) -> np.ndarray:
        hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
        x = np.arange(256, dtype=np.float64)
        # lookup tables: one pass per channel instead of float maths on every pixel
        lut_hue = ((x * factors[0]) % 180).astype(np.uint8)  # OpenCV's uint8 hue wraps at 180
        lut_sat = np.clip(x * factors[1], 0, 255).astype(np.uint8)
        lut_val = np.clip(x * factors[2], 0, 255).astype(np.uint8)
        hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("gains",)


def _random_affine(spec: LoaderConfig, translate: float) -> A.Affine:
    """yolov5's random_perspective without perspective; `translate` is a fraction of the image it warps."""
    return A.Affine(scale=(1 - spec.scale, 1 + spec.scale), keep_ratio=True,
                    translate_percent={"x": (-translate, translate), "y": (-translate, translate)},
                    rotate=(-spec.degrees, spec.degrees), shear=(-spec.shear, spec.shear),
                    fill=FILL, border_mode=cv2.BORDER_CONSTANT, p=1.0)


def train_pipeline(size: int, spec: LoaderConfig, extra_transforms: Sequence[TransformSpec], *,
                   mosaic: bool) -> A.Compose:
    """The train-time Compose at input `size`: mosaic or (already letterboxed) input -> affine -> user's list ->
    HSV -> flips."""
    if mosaic:
        # A.Mosaic on a 2S canvas has its junction fixed at the centre; yolov5 draws the junction anywhere in the
        # middle half, so that +-S/2 shift (a quarter of the canvas) joins the affine's translation.
        leading = [A.Mosaic(grid_yx=(2, 2), target_size=(2 * size, 2 * size), cell_shape=(size, size),
                            fit_mode="contain", fill=FILL, p=1.0),
                   _random_affine(spec, translate=0.25 + spec.translate / 2),
                   A.CenterCrop(height=size, width=size)]
    else:
        has_affine = spec.scale or spec.translate or spec.degrees or spec.shear
        leading = [_random_affine(spec, translate=spec.translate)] if has_affine else []
    trailing: list[A.BasicTransform] = []
    if spec.hsv_h or spec.hsv_s or spec.hsv_v:
        trailing.append(YoloHSV((spec.hsv_h, spec.hsv_s, spec.hsv_v)))
    if spec.fliplr:
        trailing.append(A.HorizontalFlip(p=spec.fliplr))
    if spec.flipud:
        trailing.append(A.VerticalFlip(p=spec.flipud))
    return augment.compose(extra_transforms, leading=leading, trailing=trailing, min_visibility=spec.min_visibility,
                           min_area=spec.min_box_size ** 2, min_side=spec.min_box_size)


def _read_rgb(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    try:
        image = formats.decode_image(path)
    except DataSetError as err:
        raise DataSetError(f"{err}; run `yolofps validate` on the data set") from None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), image.shape[:2]


def pad_targets(rows: np.ndarray, max_boxes: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows [n, 5] -> (targets [max_boxes, 5] zero-padded, mask [max_boxes], boxes cut beyond max_boxes)."""
    kept = np.asarray(rows, np.float32)[:max_boxes]
    targets = torch.zeros((max_boxes, 5), dtype=torch.float32)
    targets[: len(kept)] = torch.from_numpy(kept)
    mask = torch.zeros(max_boxes, dtype=torch.bool)
    mask[: len(kept)] = True
    return targets, mask, max(0, len(rows) - max_boxes)


def _check_room(images: list[Path], labels: list[np.ndarray], max_boxes: int) -> None:
    """Every image's boxes fit the padded targets: cutting them would drop objects from training and from the
    loss's view of evaluation without a word (issue 20)."""
    counts = [len(rows) for rows in labels]
    most = max(counts, default=0)
    if most > max_boxes:
        crowded = images[counts.index(most)]
        raise ConfigError(f"train.loader.max_boxes is {max_boxes} but {formats.label_path_for(crowded)} has {most} "
                          f"boxes ({sum(c > max_boxes for c in counts)} image(s) have more than {max_boxes}); set "
                          f"train.loader.max_boxes to at least {most} so no box is left out")


class YoloDataset(Dataset):
    """One split of a YOLO data set as fixed-shape samples at `image_size` (square, a multiple of 32; the train
    section's imgsz); `train=True` adds yolov5-style augmentation from `spec` (params.yaml's train.loader)."""

    def __init__(self, data_yaml: Path, split: str, image_size: int, spec: LoaderConfig, *, train: bool,
                 extra_transforms: Sequence[TransformSpec] = (), seed: int = 0, cache: bool = False):
        data = formats.load_data_yaml(data_yaml)
        if split not in data.splits:
            raise DataSetError(f"{data.path}: no split {split!r}; expected one of {sorted(data.splits)}")
        self.images = [image for location in data.splits[split] for image in formats.list_images(location)]
        if not self.images:
            raise DataSetError(f"{data.path}: split {split!r} has no images")
        self.labels = [formats.read_labels(formats.label_path_for(image)) for image in self.images]
        _check_room(self.images, self.labels, spec.max_boxes)
        self.names: tuple[str, ...] = data.names
        self.image_size, self.spec, self.train = image_size, spec, train
        # shared memory, so set_mosaic() also reaches persistent loader workers (each holds a copy of self)
        self._mosaic_on = torch.ones(1, dtype=torch.bool).share_memory_()
        self._cache = [_read_rgb(image) for image in self.images] if cache else None
        if train:
            self._pipelines = {mosaic: train_pipeline(image_size, spec, extra_transforms, mosaic=mosaic)
                               for mosaic in (True, False)}
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart every random stream from `seed` (build_loader calls it, once per worker)."""
        self._rng = np.random.default_rng(seed)
        if self.train:
            for pipeline, pipeline_seed in zip(self._pipelines.values(), self._rng.integers(0, 2**31, 2)):
                augment.seed_pipeline(pipeline, int(pipeline_seed))

    def set_mosaic(self, enabled: bool) -> None:
        """Turn mosaic on or off ("close mosaic" for the last epochs); call it between epochs."""
        self._mosaic_on.fill_(enabled)

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        return self._cache[index] if self._cache is not None else _read_rgb(self.images[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """image uint8 [3, S, S] RGB; targets float32 [max_boxes, 5] (class, cx, cy, w, h normalized to the input);
        mask bool [max_boxes]; meta {path, orig_shape, ratio, pad, truncated, mosaic}."""
        size = self.image_size
        image, orig_shape = self._load(index)
        mosaic = self.train and bool(self._mosaic_on) and self._rng.random() < self.spec.mosaic
        if mosaic:
            others = [int(i) for i in self._rng.integers(0, len(self), 3)]  # with replacement, like yolov5
            mosaic_with = [(self._load(i)[0], self.labels[i]) for i in others]
            image, rows = augment.apply(self._pipelines[True], image, self.labels[index], mosaic_with=mosaic_with)
            ratio, pad = size / max(orig_shape), (0.0, 0.0)  # this image's scale in its mosaic cell
        else:
            image, ratio, pad = letterbox(image, size)
            rows = letterbox_rows(self.labels[index], orig_shape, ratio, pad, size)
            if self.train:
                image, rows = augment.apply(self._pipelines[False], image, rows)
        if image.shape[:2] != (size, size):  # the user's transforms cropped or resized: restore the fixed shape
            shape = image.shape[:2]
            image, fix_ratio, fix_pad = letterbox(image, size)
            rows = letterbox_rows(rows, shape, fix_ratio, fix_pad, size)
        targets, mask, truncated = pad_targets(rows, self.spec.max_boxes)
        meta = {"path": str(self.images[index]), "orig_shape": tuple(orig_shape), "ratio": float(ratio),
                "pad": pad, "truncated": truncated, "mosaic": mosaic}
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), targets, mask, meta


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """images uint8 [B, 3, S, S], targets [B, max_boxes, 5], mask [B, max_boxes], metas."""
    images, targets, masks, metas = zip(*batch)
    return torch.stack(images), torch.stack(targets), torch.stack(masks), list(metas)


RANK_SEED_STRIDE = 1_000_003  # separates the augmentation streams of distributed ranks


def _seed_worker(worker_id: int, rank: int = 0) -> None:
    """Per-worker streams: torch derives each worker's seed from the loader's seeded generator (plus the rank)."""
    info = torch.utils.data.get_worker_info()
    seed = (info.seed + rank * RANK_SEED_STRIDE) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    cv2.setNumThreads(0)  # one worker per core already; OpenCV's own thread pool would oversubscribe
    info.dataset.reseed(seed)


class ShardedBatchSampler(BatchSampler):
    """Rank `rank`'s slice of each global batch: the world together sees exactly the single-process batches."""

    def __init__(self, global_batches: BatchSampler, rank: int, world_size: int) -> None:
        self.global_batches, self.rank, self.world_size = global_batches, rank, world_size

    def __iter__(self):
        for batch in self.global_batches:
            share = len(batch) // self.world_size  # a short last batch is split evenly, its remainder dropped
            if share:
                yield batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.global_batches)


def build_loader(dataset: YoloDataset, batch_size: int, *, shuffle: bool, workers: int = 2, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader with `collate`, a seeded order and seeded per-worker augmentation streams.

    With workers=0 the dataset is reseeded with `seed` here, so two loaders built alike give identical batches.
    Distributed (`world_size` > 1), `batch_size` is the per-process batch: the same seeded order as one process
    with batch_size * world_size is cut into global batches, and this rank takes its slice of each (the
    DistributedSampler idea, keeping the single-process batches so the two runs can be compared).
    """
    if workers == 0:
        dataset.reseed(seed + rank * RANK_SEED_STRIDE)
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_workers=workers, collate_fn=collate, generator=generator, persistent_workers=workers > 0,
                  worker_init_fn=partial(_seed_worker, rank=rank) if workers > 0 else None,
                  pin_memory=dev.pin_memory())
    if world_size == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **common)
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    global_batches = BatchSampler(order, batch_size * world_size, drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=ShardedBatchSampler(global_batches, rank, world_size), **common)
