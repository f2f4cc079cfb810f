"""Evaluation plots (PR curve, confusion matrix) and detection drawings, written as PNG files.

matplotlib and OpenCV are imported inside the functions so that importing this module stays cheap. Figures are
built with ``matplotlib.figure.Figure`` (rendered by Agg when saved as PNG) rather than pyplot, so no global backend
or figure registry is touched and nothing leaks between calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_MAX_LEGEND_CLASSES = 20  # beyond this a per-class legend hides the plot (ultralytics uses the same cut-off)
_MAX_ANNOTATED_CLASSES = 30  # beyond this the cell numbers of the confusion matrix become unreadable


def _palette(index: int) -> tuple[int, int, int]:
    """A stable, distinct BGR colour per class id (ultralytics' palette)."""
    hexes = ("FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
             "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7")
    h = hexes[index % len(hexes)]
    return int(h[4:6], 16), int(h[2:4], 16), int(h[0:2], 16)


def _save(fig, path: str | Path) -> Path:
    """Write a figure to PNG, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def plot_pr_curve(
    pr_curve: np.ndarray, recall_thresholds: np.ndarray, names: Sequence[str], path: str | Path
) -> Path:
    """Precision-recall curve at IoU 0.5 per class plus the class mean, from EvalResult.pr_curve [nc, R].

    Rows that are all nan (classes without ground truth) are left out, as COCO leaves them out of mAP.
    """
    from matplotlib.figure import Figure

    pr_curve = np.asarray(pr_curve, dtype=np.float64).reshape(len(names), -1)
    valid = ~np.isnan(pr_curve).all(axis=1)
    fig = Figure(figsize=(9, 6), tight_layout=True)
    ax = fig.add_subplot()
    show_legend = 0 < valid.sum() <= _MAX_LEGEND_CLASSES
    for k in np.flatnonzero(valid):
        label = f"{names[k]} {np.nanmean(pr_curve[k]):.3f}" if show_legend else None
        ax.plot(recall_thresholds, pr_curve[k], linewidth=1, label=label)
    if valid.any():
        mean_curve = pr_curve[valid].mean(axis=0)  # its mean over recall thresholds is COCO's mAP50
        ax.plot(recall_thresholds, mean_curve, linewidth=3, color="blue",
                label=f"all classes {mean_curve.mean():.3f} mAP@0.5")  # fmt: skip
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-Recall (IoU 0.5)")
    return _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, names: Sequence[str], path: str | Path) -> Path:
    """Confusion matrix [nc + 1, nc + 1] (rows predicted, columns true) normalised per true class, as a heat map."""
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix, dtype=np.float64)
    column_sums = matrix.sum(axis=0, keepdims=True)
    normalised = np.divide(matrix, column_sums, out=np.zeros_like(matrix), where=column_sums > 0)
    labels = [*names, "background"]
    size = max(6.0, 0.5 * len(labels) + 3)
    fig = Figure(figsize=(size, size * 0.85), tight_layout=True)
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if len(labels) <= _MAX_ANNOTATED_CLASSES:
        ticks = np.arange(len(labels))
        ax.set_xticks(ticks, labels, rotation=90)
        ax.set_yticks(ticks, labels)
        for row, col in zip(*np.nonzero(normalised)):
            value = normalised[row, col]
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if value > 0.5 else "black")  # fmt: skip
    ax.set(xlabel="True", ylabel="Predicted", title="Confusion matrix (normalised per true class)")
    return _save(fig, path)


def draw_detections(
    image_bgr: np.ndarray, detections: np.ndarray, names: Sequence[str], conf: float = 0.25
) -> np.ndarray:
    """A copy of the image with detections [k, 6] (x1, y1, x2, y2, score, class) >= conf drawn as labelled boxes."""
    import cv2

    canvas = np.ascontiguousarray(image_bgr).copy()  # OpenCV draws in place and needs contiguous memory
    if canvas.ndim == 2:
        canvas = cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR)
    detections = np.asarray(detections, dtype=np.float64).reshape(-1, 6)
    thickness = max(1, round(sum(canvas.shape[:2]) / 600))
    font_scale = thickness / 3
    for x1, y1, x2, y2, score, cls in detections[detections[:, 4] >= conf]:
        cls = int(cls)
        color = _palette(cls)
        top_left, bottom_right = (int(x1), int(y1)), (int(x2), int(y2))
        cv2.rectangle(canvas, top_left, bottom_right, color, thickness, cv2.LINE_AA)
        name = names[cls] if 0 <= cls < len(names) else str(cls)
        label = f"{name} {score:.2f}"
        (text_w, text_h), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, max(thickness - 1, 1))
        above = top_left[1] - text_h - 3 >= 0  # put the label inside the box when it would leave the image
        label_bottom = top_left[1] if above else top_left[1] + text_h + 3
        cv2.rectangle(canvas, (top_left[0], label_bottom - text_h - 3), (top_left[0] + text_w, label_bottom),
                      color, -1, cv2.LINE_AA)  # fmt: skip
        cv2.putText(canvas, label, (top_left[0], label_bottom - 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (255, 255, 255), max(thickness - 1, 1), cv2.LINE_AA)  # fmt: skip
    return canvas


def _fit_tile(image: np.ndarray, tile: int) -> np.ndarray:
    """Resize to fit a tile x tile square keeping the aspect ratio, padded with grey (letterbox, top-left)."""
    import cv2

    scale = tile / max(image.shape[:2])
    height, width = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    out = np.full((tile, tile, 3), 114, dtype=np.uint8)
    out[:height, :width] = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return out


def save_prediction_grid(
    images: list[np.ndarray],
    detections: list[np.ndarray],
    names: Sequence[str],
    path: str | Path,
    max_images: int = 16,
    conf: float = 0.25,
    tile: int = 320,
) -> Path:
    """A square-ish grid PNG of the first max_images BGR images with their predicted boxes drawn."""
    import cv2

    count = min(len(images), len(detections), max_images)
    if count == 0:
        raise ValueError("save_prediction_grid needs at least one image with its detections")
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * tile, columns * tile, 3), 255, dtype=np.uint8)
    for i in range(count):
        drawn = draw_detections(images[i], detections[i], names, conf=conf)
        row, col = divmod(i, columns)
        grid[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile] = _fit_tile(drawn.astype(np.uint8), tile)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), grid):
        raise OSError(f"could not write the prediction grid to {path}")
    return path
