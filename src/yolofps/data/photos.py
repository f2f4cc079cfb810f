"""A small detection set cut from real photographs that scikit-image ships, for results beyond synthetic shapes.

Where the pixels come from: two photographs inside the scikit-image wheel (`skimage/data/`), read with
`skimage.data`; nothing is downloaded.

- `coin` (class 0): `coins.png`, 24 Greek coins from Pompeii on a grey background (303 x 384, grey; Brooklyn
  Museum collection). Labels: the region-based segmentation of scikit-image's gallery example
  "Comparing edge-based and region-based segmentation" — watershed of the Sobel elevation map from markers at the
  two ends of the grey histogram (< 30 background, > 150 coin), holes filled, components under 100 px dropped. All 24
  coins come out as one region each.
- `galaxy` (class 1): `hubble_deep_field.jpg`, the Hubble eXtreme Deep Field (872 x 1000, colour; NASA/ESA).
  Labels: the brightest channel of each pixel (so red and blue galaxies count as much as white ones), smoothed
  (Gaussian, sigma 1) and thresholded at 0.2, as in the gallery's thresholding examples; touching sources are split
  by a watershed from the local maxima (at least 6 px apart, above 0.35) of a sigma-2.5 smoothing, and sources
  under 30 px stay unlabeled as too small to see. 358 sources; galaxies, a few stars (with their diffraction
  spikes) and the pairs the watershed could not split are all `galaxy`.

Tiles: random crops with scale jitter (a window's long side drawn per photograph, aspect 3:4..4:3) and flips,
resized to `image_size` on the long side. Each photograph is split at one column near 65 % of its width, picked
where the fewest labeled boxes cross it: train windows lie left of it, val windows right of it, so validation never
sees a training pixel. A box cut by the window edge keeps its clipped box when >= 60 % of it is inside; one with
less is greyed out (its pixels, dilated 2 px, inpainted from the surroundings) so no visible part object is left
unlabeled; of 32 candidate windows the one with the least such area is used, which makes grey-outs rare (the
default set greys out 5 coins and 1 galaxy in 160 train tiles, none in val) without favouring a window size.
Each tile has its own RNG stream (seed, split, index), and photograph index % 2, as the synthetic set does.

Limitations: labels come from classical segmentation, not from an annotator. Coin boxes are exact; galaxy boxes
follow a fixed brightness threshold, so faint halos lie outside the box, the faintest specks are unlabeled, a few
overlapping galaxies share one box and a star's box includes its spikes. Each class lives in its own photograph,
so the class is also "which photograph", and the coins' val region holds only 8 coins (the train region 15, one
coin crosses the split column), so val coin tiles repeat the same coins at other scales. Galaxy boxes can be as
small as 2-3 px at 160 px tiles. The hematoxylin nuclei of `immunohistochemistry()` were tried as a third class and
left out: the nuclei inside the stained glands touch and cannot be separated reliably, and leaving them unlabeled
would teach a detector to miss visible nuclei.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from yolofps.data import formats
from yolofps.errors import YolofpsError

CLASS_NAMES = ("coin", "galaxy")
_SPLIT_IDS = {"train": 0, "val": 1}
SPLIT_FRACTION = 0.65  # share of each photograph's width that train windows may use
MIN_INSIDE = 0.6  # a cut box is kept (clipped) when at least this share of it lies inside the window
CANDIDATE_WINDOWS = 32  # windows tried per tile; the one cutting the least object area below MIN_INSIDE wins
Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in photograph pixels (x1, y1 exclusive)


class PhotosUnavailable(YolofpsError):
    """scikit-image, which ships the photographs, is not installed."""


@dataclass(frozen=True)
class Photo:
    """One segmented photograph: its pixels, an object-id image, the objects' boxes and how to crop it."""

    name: str
    class_id: int
    image: np.ndarray  # uint8 BGR [H, W, 3]
    objects: np.ndarray  # int32 [H, W]: 0 unlabeled, k + 1 for the pixels of object k
    boxes: np.ndarray  # float64 [n, 4] x0 y0 x1 y1 pixels, x1/y1 exclusive
    crop_sides: tuple[int, int]  # a window's long side is drawn from this range of photograph pixels


def _skimage():
    """The scikit-image modules used here, or PhotosUnavailable saying how to install it."""
    try:
        from skimage import color, data, feature, filters, measure, segmentation
    except ImportError as err:
        raise PhotosUnavailable(f"the photo data set needs scikit-image, whose wheel ships the photographs "
                                f"({err}); install it with `pip install scikit-image` (built with 0.26.0)") from None
    return color, data, feature, filters, measure, segmentation


def load_photos() -> list[Photo]:
    """Segment every photograph once (about half a second)."""
    return [_coins(), _galaxies()]


def _photo(name: str, class_id: int, image: np.ndarray, labels: np.ndarray, min_area: int,
           crop_sides: tuple[int, int]) -> Photo:
    """Keep the labeled regions of at least `min_area` pixels, renumbered 1..n, with their boxes."""
    _, _, _, _, measure, _ = _skimage()
    objects = np.zeros(labels.shape, np.int32)
    boxes = []
    for region in measure.regionprops(labels):
        if region.area < min_area:
            continue
        y0, x0, y1, x1 = region.bbox
        boxes.append((x0, y0, x1, y1))
        objects[region.coords[:, 0], region.coords[:, 1]] = len(boxes)
    return Photo(name, class_id, image, objects, np.array(boxes, np.float64).reshape(-1, 4), crop_sides)


def _coins() -> Photo:
    """coins.png, as in scikit-image's region-based segmentation gallery example."""
    from scipy import ndimage

    _, data, _, filters, _, segmentation = _skimage()
    grey = data.coins()  # uint8 [303, 384]
    markers = np.zeros_like(grey)
    markers[grey < 30] = 1  # surely background
    markers[grey > 150] = 2  # surely coin
    coin = segmentation.watershed(filters.sobel(grey), markers) == 2
    labels, _ = ndimage.label(ndimage.binary_fill_holes(coin))
    return _photo("coins", 0, cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), labels, 100, (110, 220))


def _galaxies() -> Photo:
    """hubble_deep_field.jpg: bright sources by threshold, touching ones split by a watershed from their peaks."""
    _, data, feature, filters, measure, segmentation = _skimage()
    rgb = data.hubble_deep_field()  # uint8 [872, 1000, 3]
    brightest = rgb.max(axis=2) / 255.0  # not luminance: red and blue galaxies are as visible as white ones
    smooth = filters.gaussian(brightest, sigma=1)
    mask = smooth > 0.2
    components = measure.label(mask)
    peaks = feature.peak_local_max(filters.gaussian(brightest, sigma=2.5), min_distance=6, threshold_abs=0.35,
                                   labels=components, exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-smooth, markers, mask=mask)
    unmarked = measure.label(mask & (labels == 0))  # sources with no peak above 0.35 stay whole
    labels[unmarked > 0] = unmarked[unmarked > 0] + labels.max()
    return _photo("hubble_deep_field", 1, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), labels, 30, (120, 240))


# --------------------------------------------------------------------------------------------- crop windows


def split_column(boxes: np.ndarray, width: int, fraction: float = SPLIT_FRACTION, search: float = 0.1) -> int:
    """The column within `fraction` +- `search` of the width crossed by the fewest boxes (nearest wins ties)."""
    columns = np.arange(round((fraction - search) * width), round((fraction + search) * width) + 1)
    crossing = ((boxes[:, None, 0] < columns) & (boxes[:, None, 2] > columns)).sum(0)  # [columns]
    order = np.lexsort((np.abs(columns - fraction * width), crossing))
    return int(columns[order[0]])


def split_regions(photo: Photo) -> dict[str, Window]:
    """Train and val regions of a photograph: columns left of the split column, and the rest."""
    height, width = photo.objects.shape
    column = split_column(photo.boxes, width)
    return {"train": (0, 0, column, height), "val": (column, 0, width, height)}


def pick_window(rng: np.random.Generator, region: Window, crop_sides: tuple[int, int]) -> Window:
    """A random window inside `region`: long side from `crop_sides`, aspect 3:4..4:3, clamped to the region."""
    rx0, ry0, rx1, ry1 = region
    long_side = rng.uniform(*crop_sides)
    short_side = long_side * rng.uniform(0.75, 1.0)
    width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    width, height = min(round(width), rx1 - rx0), min(round(height), ry1 - ry0)
    x0 = rx0 + int(rng.integers(0, rx1 - rx0 - width + 1))
    y0 = ry0 + int(rng.integers(0, ry1 - ry0 - height + 1))
    return x0, y0, x0 + width, y0 + height


def inside_fraction(boxes: np.ndarray, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """The boxes clipped to `window` [n, 4] and the share of each box's area that is inside it [n]."""
    clipped = np.clip(boxes, [window[0], window[1]] * 2, [window[2], window[3]] * 2)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
    return clipped, inside / area


def _greyed_area(boxes: np.ndarray, window: Window) -> float:
    """Visible box area of the objects the window would cut below MIN_INSIDE (they would be greyed out)."""
    clipped, fraction = inside_fraction(boxes, window)
    cut = (fraction > 0) & (fraction < MIN_INSIDE)
    return float(((clipped[cut, 2] - clipped[cut, 0]) * (clipped[cut, 3] - clipped[cut, 1])).sum())


# --------------------------------------------------------------------------------------------- tiles


def render_tile(rng: np.random.Generator, photo: Photo, region: Window,
                image_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One BGR tile, its label rows [n, 5] (class, cx, cy, w, h normalized) and how many objects were greyed out."""
    candidates = [pick_window(rng, region, photo.crop_sides) for _ in range(CANDIDATE_WINDOWS)]
    x0, y0, x1, y1 = window = min(candidates, key=lambda w: _greyed_area(photo.boxes, w))
    crop = photo.image[y0:y1, x0:x1].copy()
    clipped, fraction = inside_fraction(photo.boxes, window)
    cut = np.flatnonzero((fraction > 0) & (fraction < MIN_INSIDE))
    if len(cut):  # a part object too small to label must not stay visible as an unlabeled object
        mask = np.isin(photo.objects[y0:y1, x0:x1], cut + 1).astype(np.uint8)
        mask = cv2.dilate(mask, np.ones((5, 5), np.uint8))
        crop = cv2.inpaint(crop, mask, 3, cv2.INPAINT_TELEA)
    kept = clipped[fraction >= MIN_INSIDE] - [x0, y0, x0, y0]  # [k, 4] window pixels
    width, height = x1 - x0, y1 - y0
    rows = np.zeros((len(kept), 5), np.float32)
    rows[:, 0] = photo.class_id
    rows[:, 1:] = np.stack([(kept[:, 0] + kept[:, 2]) / 2 / width, (kept[:, 1] + kept[:, 3]) / 2 / height,
                            (kept[:, 2] - kept[:, 0]) / width, (kept[:, 3] - kept[:, 1]) / height], 1)
    if rng.random() < 0.5:
        crop, rows[:, 1] = crop[:, ::-1], 1 - rows[:, 1]
    if rng.random() < 0.5:
        crop, rows[:, 2] = crop[::-1], 1 - rows[:, 2]
    scale = image_size / max(width, height)
    size = (max(2, round(width * scale)), max(2, round(height * scale)))
    tile = cv2.resize(np.ascontiguousarray(crop), size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return tile, rows, len(cut)


def build_photo_dataset(out: Path, *, image_size: int = 160, num_train: int = 160, num_val: int = 48,
                        seed: int = 0) -> Path:
    """Write the photo set in YOLO layout under `out` and return its data.yaml."""
    out = Path(out)
    photos = load_photos()
    regions = [split_regions(photo) for photo in photos]
    for split, count in (("train", num_train), ("val", num_val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
            which = index % len(photos)
            image, rows, _ = render_tile(rng, photos[which], regions[which][split], image_size)
            stem = f"{split}_{index:05d}"
            cv2.imwrite(str(out / "images" / split / f"{stem}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
            formats.write_labels(out / "labels" / split / f"{stem}.txt", rows)
    return formats.write_data_yaml(out, CLASS_NAMES)


def summarize(data_yaml: Path) -> str:
    """One line: images and boxes per split and class."""
    root = Path(data_yaml).parent
    parts = []
    for split in formats.SPLITS:
        labels = sorted((root / "labels" / split).glob("*.txt"))
        classes = Counter(int(row[0]) for label in labels for row in formats.read_labels(label))
        per_class = ", ".join(f"{name} {classes[i]}" for i, name in enumerate(CLASS_NAMES))
        parts.append(f"{split} {len(labels)} images, {sum(classes.values())} boxes ({per_class})")
    return f"{data_yaml}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    """`python -m yolofps.data.photos OUT_FOLDER [--image-size N --num-train N --num-val N --seed N]`."""
    parser = argparse.ArgumentParser(description="Build the photo detection set from scikit-image's photographs.")
    parser.add_argument("out", type=Path, help="folder to write images/, labels/ and data.yaml into")
    parser.add_argument("--image-size", type=int, default=160, help="long side of every tile, pixels")
    parser.add_argument("--num-train", type=int, default=160)
    parser.add_argument("--num-val", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        data_yaml = build_photo_dataset(args.out, image_size=args.image_size, num_train=args.num_train,
                                        num_val=args.num_val, seed=args.seed)
    except YolofpsError as err:  # the message is the way out; a traceback would hide it
        raise SystemExit(f"error: {err}") from None
    print(summarize(data_yaml))


if __name__ == "__main__":
    main()
