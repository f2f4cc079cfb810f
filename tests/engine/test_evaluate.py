"""COCO evaluation via faster-coco-eval, the confusion matrix and the evaluation plots."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from yolofps.engine.evaluate import EvalResult, confusion_matrix, evaluate_detections
from yolofps.engine.plots import draw_detections, plot_confusion_matrix, plot_pr_curve, save_prediction_grid

NAMES = ["cat", "dog", "bird"]  # "bird" never appears in the ground truth
SIZES = [(128, 128)] * 3


def _ground_truth() -> list[np.ndarray]:
    """Three images: two boxes, one box, and a background image with none."""
    return [
        np.array([[0, 10, 10, 50, 50], [1, 60, 60, 110, 120]], dtype=np.float32),
        np.array([[0, 20, 30, 90, 100]], dtype=np.float32),
        np.zeros((0, 5), dtype=np.float32),
    ]


def _perfect_predictions(ground_truth: list[np.ndarray]) -> list[np.ndarray]:
    """Each ground-truth box predicted exactly, with descending scores."""
    out = []
    for gt in ground_truth:
        scores = np.linspace(0.9, 0.8, len(gt))[:, None]
        out.append(np.concatenate([gt[:, 1:5], scores, gt[:, :1]], axis=1))
    return out


def test_perfect_predictions_score_one():
    gt = _ground_truth()
    result = evaluate_detections(_perfect_predictions(gt), gt, SIZES, NAMES)
    for value in (result.map50_95, result.map50, result.precision, result.recall):
        assert value == pytest.approx(1.0, abs=1e-6)
    assert set(result.metrics()) == {"metrics/mAP50B", "metrics/mAP50-95B", "metrics/precisionB", "metrics/recallB"}
    assert result.metrics()["metrics/mAP50-95B"] == result.map50_95
    assert (result.num_images, result.num_gt, result.num_predictions) == (3, 3, 3)
    assert result.per_class_ap == pytest.approx({"cat": 1.0, "dog": 1.0})  # class names; "bird" has no GT
    assert set(result.per_class_ap50) == {"cat", "dog"}
    assert result.settings["max_dets"] == [1, 10, 100]
    assert result.pr_curve.shape == (3, len(result.recall_thresholds))
    assert np.isnan(result.pr_curve[2]).all() and not np.isnan(result.pr_curve[:2]).any()


def test_no_predictions_is_all_zero():
    gt = _ground_truth()
    empty = [np.zeros((0, 6), dtype=np.float32) for _ in gt]
    result = evaluate_detections(empty, gt, SIZES, NAMES)
    assert all(value == 0.0 for value in result.metrics().values())  # not nan
    assert result.per_class_ap == {"cat": 0.0, "dog": 0.0}
    assert result.num_predictions == 0


def test_no_ground_truth_at_all_is_zero_not_nan():
    preds = [np.array([[1, 1, 20, 20, 0.9, 2]])]
    result = evaluate_detections(preds, [np.zeros((0, 5))], [(32, 32)], NAMES)
    assert all(value == 0.0 for value in result.metrics().values())
    assert result.per_class_ap == {}


def test_predictions_for_some_images_only():
    gt = _ground_truth()
    preds = _perfect_predictions(gt)
    preds[1] = np.zeros((0, 6))  # the cat in image 1 is missed
    result = evaluate_detections(preds, gt, SIZES, NAMES)
    assert result.per_class_ap["dog"] == pytest.approx(1.0)
    assert 0.0 < result.per_class_ap["cat"] < 1.0
    assert result.precision == pytest.approx(1.0) and result.recall == pytest.approx(0.75)  # mean of 1/2 and 1


def test_shifted_box_passes_iou50_but_not_stricter():
    gt = [np.array([[0, 0, 0, 40, 40]], dtype=np.float32)]
    shifted = [np.array([[10, 0, 50, 40, 0.9, 0]], dtype=np.float32)]  # IoU = 30*40 / (50*40) = 0.6
    result = evaluate_detections(shifted, gt, [(64, 64)], NAMES)
    assert result.map50 == pytest.approx(1.0)
    assert 0.0 < result.map50_95 < 1.0


def test_confident_false_positive_lowers_map50():
    gt = [np.array([[0, 0, 0, 40, 40]], dtype=np.float32)]
    preds = [np.array([[80, 80, 120, 120, 0.95, 0], [0, 0, 40, 40, 0.6, 0]], dtype=np.float32)]
    result = evaluate_detections(preds, gt, [(128, 128)], NAMES)
    assert result.map50 < 1.0
    assert result.recall == pytest.approx(1.0) and result.precision == pytest.approx(0.5)


def test_two_detections_of_one_object_are_one_tp_and_recall_stays_at_most_one():
    """Issue 20: faster-coco-eval 1.8.0's extended_metrics counted a detection matched at any IoU threshold as a
    TP, so one object found twice (IoU 0.6 at score 0.9, IoU 0.95 at 0.8) gave recall 2.0."""
    gt = [np.array([[0, 100, 100, 200, 200]], float)]
    loose, tight = [100, 100, 200, 267, 0.9, 0], [100, 100, 200, 205, 0.8, 0]
    result = evaluate_detections([np.array([loose, tight], float)], gt, [(400, 400)], ["a"])
    assert result.recall == pytest.approx(1.0)
    assert result.precision == pytest.approx(1.0)  # the best-F1 confidence is 0.9: one detection, one TP


_box = st.tuples(*[st.floats(0, 120, allow_nan=False)] * 4).map(
    lambda v: [min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]) + 1, max(v[1], v[3]) + 1])
_pred = st.tuples(_box, st.floats(0.01, 1), st.integers(0, 2)).map(lambda t: [*t[0], t[1], t[2]])
_gt = st.tuples(st.integers(0, 2), _box).map(lambda t: [t[0], *t[1]])


_echo = st.tuples(st.floats(-20, 20), st.floats(0.01, 1))  # a detection of a ground truth: shift, score


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(_pred, max_size=6), st.lists(st.tuples(_gt, st.lists(_echo, max_size=3)),
                                                                 max_size=4)), min_size=1, max_size=3))
def test_every_metric_stays_in_its_range(images):
    """Whatever the detections (each object found 0-3 times at other IoUs, strays, wrong classes), P, R, mAP50 and
    mAP50-95 lie in [0, 1]."""
    predictions, ground_truth = [], []
    for strays, objects in images:
        echoes = [[x1 + d, y1 + d, x2 + d, y2, score, cls] for (cls, x1, y1, x2, y2), e in objects for d, score in e]
        predictions.append(np.array(strays + echoes, float).reshape(-1, 6))
        ground_truth.append(np.array([g for g, _ in objects], float).reshape(-1, 5))
    result = evaluate_detections(predictions, ground_truth, [(160, 160)] * len(images), NAMES)
    for name, value in result.metrics().items():
        assert 0.0 <= value <= 1.0, (name, value)


def test_mismatched_lengths_and_bad_classes_are_named_errors():
    gt = _ground_truth()
    with pytest.raises(ValueError, match="one entry per image"):
        evaluate_detections(_perfect_predictions(gt)[:2], gt, SIZES, NAMES)
    bad = [np.array([[0, 0, 10, 10, 0.9, 7]])]
    with pytest.raises(ValueError, match="class ids outside"):
        evaluate_detections(bad, [np.zeros((0, 5))], [(32, 32)], NAMES)


def test_confusion_matrix_counts():
    gt = _ground_truth()
    preds = [
        np.array([
            [10, 10, 50, 50, 0.9, 0],  # cat found: (cat, cat)
            [60, 60, 110, 120, 0.8, 2],  # dog called bird: (bird, dog)
            [0, 100, 20, 127, 0.7, 1],  # dog where nothing is: (dog, background)
        ]),  # fmt: skip
        np.array([[20, 30, 90, 100, 0.1, 0]]),  # below conf, so the cat is missed: (background, cat)
        np.array([[5, 5, 30, 30, 0.5, 0]]),  # cat on the background image: (cat, background)
    ]
    matrix = confusion_matrix(preds, gt, num_classes=3, conf=0.25, iou=0.45)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = 1
    expected[2, 1] = 1
    expected[1, 3] = 1
    expected[3, 0] = 1
    expected[0, 3] = 1
    np.testing.assert_array_equal(matrix, expected)
    assert matrix[:3].sum() == 4 and matrix[:, :3].sum() == 3  # every prediction >= conf, every GT counted once


def test_confusion_matrix_empty():
    matrix = confusion_matrix([np.zeros((0, 6))], [np.zeros((0, 5))], num_classes=2)
    np.testing.assert_array_equal(matrix, np.zeros((3, 3)))


def _assert_png(path) -> np.ndarray:
    assert path.exists() and path.stat().st_size > 0
    image = cv2.imread(str(path))
    assert image is not None and image.ndim == 3
    return image


def test_plots_write_readable_pngs(tmp_path):
    gt = _ground_truth()
    preds = _perfect_predictions(gt)
    result: EvalResult = evaluate_detections(preds, gt, SIZES, NAMES)
    _assert_png(plot_pr_curve(result.pr_curve, result.recall_thresholds, NAMES, tmp_path / "pr.png"))
    matrix = confusion_matrix(preds, gt, num_classes=len(NAMES))
    _assert_png(plot_confusion_matrix(matrix, NAMES, tmp_path / "cm.png"))
    images = [np.full((h, w, 3), 40, dtype=np.uint8) for h, w in SIZES]
    images[2] = np.zeros((64, 96, 3), dtype=np.uint8)  # a different size still fits its tile
    grid = _assert_png(save_prediction_grid(images, preds, NAMES, tmp_path / "sub" / "grid.png", tile=64))
    assert grid.shape == (128, 128, 3)  # 3 images -> 2 x 2 tiles


def test_draw_detections_returns_a_drawn_copy():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    dets = np.array([[8, 8, 40, 40, 0.9, 1], [0, 0, 10, 10, 0.1, 0]])
    drawn = draw_detections(image, dets, NAMES, conf=0.25)
    assert image.sum() == 0  # the input is untouched
    assert drawn.shape == image.shape and drawn.sum() > 0
    assert drawn[60, 60].sum() == 0  # nothing drawn away from the box
    assert draw_detections(image, dets[1:], NAMES, conf=0.25).sum() == 0  # low-score box skipped
