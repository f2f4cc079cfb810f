"""COCO-protocol evaluation of detections with faster-coco-eval: mAP, ultralytics-style P/R, confusion matrix.

Inputs are plain numpy arrays in original-image pixel coordinates, one array per image:
predictions ``[k, 6]`` (x1, y1, x2, y2, score, class) and ground truth ``[n, 5]`` (class, x1, y1, x2, y2).
The COCO data sets are built in memory (no temp files); category ids are ``class + 1``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from yolofps.metric_names import MAP50, MAP50_95, PRECISION, RECALL

logger = logging.getLogger(__name__)

# Recorded in EvalResult.settings so the P/R figures travel with their definition (see evaluate_detections)
PR_DEFINITION = ("mean over classes with GT at the confidence maximising mean F1; TP = COCO's greedy match at IoU "
                 "0.5, area all, every detection (faster-coco-eval)")


@dataclass(frozen=True)
class EvalResult:
    """Detection accuracy of one model on one data set, COCO protocol."""

    map50_95: float
    map50: float
    precision: float
    recall: float
    per_class_ap: dict[str, float]  # AP50-95 per class name; classes without ground truth are omitted
    per_class_ap50: dict[str, float]
    num_images: int
    num_gt: int
    num_predictions: int
    settings: dict
    pr_curve: np.ndarray | None = field(default=None, repr=False)  # [nc, R] precision at IoU 0.5; nan = no GT
    recall_thresholds: np.ndarray | None = field(default=None, repr=False)  # [R]

    def metrics(self) -> dict[str, float]:
        """All four box metrics under their one name (`yolofps.metric_names`)."""
        return {PRECISION: self.precision, RECALL: self.recall, MAP50: self.map50,
                MAP50_95: self.map50_95}

    def accuracy(self) -> dict[str, float]:
        """The two figures a variant is compared by, rounded for metrics files and tags."""
        return {MAP50_95: round(self.map50_95, 5), MAP50: round(self.map50, 5)}


def _as_rows(array: np.ndarray, width: int, what: str, index: int) -> np.ndarray:
    """One image's boxes as float64 [n, width]; an empty array of any shape is zero rows."""
    array = np.asarray(array, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, width))
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{what}[{index}] must have shape [n, {width}], got {list(array.shape)}")
    return array


def _check_classes(classes: np.ndarray, num_classes: int, what: str, index: int) -> None:
    """Class ids must be whole numbers in [0, num_classes) or COCO would silently drop them."""
    bad = (classes < 0) | (classes >= num_classes) | (classes != np.round(classes))
    if bad.any():
        raise ValueError(f"{what}[{index}] has class ids outside 0..{num_classes - 1}: {classes[bad][:5].tolist()}")


def _to_coco(
    predictions: Sequence[np.ndarray],
    ground_truth: Sequence[np.ndarray],
    image_sizes: Sequence[tuple[int, int]] | None,
    names: Sequence[str],
) -> tuple[COCO, COCO, int, int]:
    """In-memory COCO ground truth and results (boxes xyxy -> xywh); also returns the GT and prediction counts."""
    sizes_given = len(image_sizes) if image_sizes is not None else len(predictions)
    if not len(predictions) == len(ground_truth) == sizes_given:
        raise ValueError(
            f"predictions ({len(predictions)}), ground_truth ({len(ground_truth)}) and image_sizes "
            f"({sizes_given}) must have one entry per image"
        )
    images, annotations, results = [], [], []
    for index, (preds, gts) in enumerate(zip(predictions, ground_truth)):
        preds = _as_rows(preds, 6, "predictions", index)
        gts = _as_rows(gts, 5, "ground_truth", index)
        _check_classes(preds[:, 5], len(names), "predictions", index)
        _check_classes(gts[:, 0], len(names), "ground_truth", index)
        height, width = image_sizes[index] if image_sizes is not None else _covering_size(preds, gts)
        image_id = index + 1  # COCO ids start at 1
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        for cls, x1, y1, x2, y2 in gts.tolist():
            w, h = x2 - x1, y2 - y1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls) + 1,
                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0,
            })  # fmt: skip
        for x1, y1, x2, y2, score, cls in preds.tolist():
            results.append({"image_id": image_id, "category_id": int(cls) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score})  # fmt: skip
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    coco_gt = COCO({"images": images, "annotations": annotations, "categories": categories},
                   print_function=logger.debug)  # fmt: skip
    coco_dt = coco_gt.loadRes(results)
    return coco_gt, coco_dt, len(annotations), len(results)


def _covering_size(predictions: np.ndarray, ground_truth: np.ndarray) -> tuple[int, int]:
    """(height, width) of the smallest image at the origin that holds every box; bbox IoU never reads it."""
    corners = np.concatenate([predictions[:, :4], ground_truth[:, 1:], np.ones((1, 4))])  # 1s: empty image is 1 x 1
    return int(np.ceil(corners[:, [1, 3]].max())), int(np.ceil(corners[:, [0, 2]].max()))


@contextlib.contextmanager
def _quiet_faster_coco_eval() -> Iterator[None]:
    """Keep faster-coco-eval's INFO chatter out of a training progress display; warnings still pass."""
    library_logger = logging.getLogger("faster_coco_eval")
    previous = library_logger.level
    library_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        library_logger.setLevel(previous)


def _settings(params) -> dict:
    """The COCOeval parameters that define the numbers, as JSON-safe values."""
    return {
        "iou_type": "bbox",
        "iou_thresholds": [round(float(t), 2) for t in params.iouThrs],
        "num_recall_thresholds": len(params.recThrs),
        "max_dets": [int(m) for m in params.maxDets],
        "area_ranges": {label: [float(lo), float(hi)] for label, (lo, hi) in zip(params.areaRngLbl, params.areaRng)},
        "precision_recall": PR_DEFINITION,
    }


def _per_class_ap(precision: np.ndarray, iou50: int, names: Sequence[str]) -> tuple[dict, dict, np.ndarray]:
    """AP50-95 and AP50 per class name and the IoU-0.5 PR curve [nc, R] from COCOeval's precision [T,R,K,A,M]."""
    per_class, per_class50 = {}, {}
    all_area = precision[:, :, :, 0, -1]  # area 'all', largest maxDets (100), like stats[0] and stats[1]
    for k, name in enumerate(names):
        valid = all_area[:, :, k] > -1  # -1 marks a class without ground truth
        if valid.any():
            per_class[name] = float(all_area[:, :, k][valid].mean())
            per_class50[name] = float(all_area[iou50, :, k].mean())
    curve = all_area[iou50].T.astype(np.float64)  # [nc, R]
    curve[curve < 0] = np.nan
    return per_class, per_class50, curve


def _precision_recall(coco_gt: COCO, coco_dt: COCO, predictions: Sequence[np.ndarray]) -> tuple[float, float]:
    """P and R at the max-mean-F1 confidence from an evaluator that matches at IoU 0.5 only, area 'all'.

    faster-coco-eval 1.8.0's ``extended_metrics`` counts a detection as a TP when it was matched at *any* of the
    evaluator's IoU thresholds and area ranges, so two detections of one object (one matched at 0.5, the other at
    0.95) were both TPs and recall reached 1.5 or 2.0 (issue 20). With one IoU threshold and one area range there is
    one greedy matching: each ground truth has at most one TP, and P and R stay in [0, 1]. maxDets covers every
    detection of an image, as P counts them all.
    """
    evaluator = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=logger.debug, extra_calc=True)
    evaluator.params.iouThrs = np.array([0.5])
    evaluator.params.areaRng, evaluator.params.areaRngLbl = evaluator.params.areaRng[:1], ["all"]
    evaluator.params.maxDets = [max(1, max((len(p) for p in predictions), default=0))]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()  # extended_metrics reads its stats
    extended = evaluator.extended_metrics
    return float(extended["precision"]), float(extended["recall"])


def evaluate_detections(
    predictions: list[np.ndarray],
    ground_truth: list[np.ndarray],
    image_sizes: list[tuple[int, int]],
    names: Sequence[str],
) -> EvalResult:
    """COCO 'bbox' mAP50-95 / mAP50 (stats[0], stats[1]) and ultralytics-style precision / recall.

    Precision and recall come from faster-coco-eval's ``COCOeval_faster.extended_metrics``: for a confidence t, a
    class's P is TP / (its detections with score >= t) and R is TP / (its ground truth), where a TP is a detection
    that COCO's greedy matching paired with a ground truth at IoU >= 0.5. P and R are averaged over the classes that
    have ground truth, at the single t (one of the detection scores) that maximises the mean per-class F1; the
    lowest such t wins ties. This is ultralytics' definition without its 1000-point curve interpolation and smoothing.
    They are computed by a second evaluator that matches at IoU 0.5 only (see `_precision_recall`).

    predictions[i]: float [k, 6] (x1, y1, x2, y2, score, class) for image i; ground_truth[i]: float [n, 5]
    (class, x1, y1, x2, y2); image_sizes[i]: (height, width). Pixel coordinates of the original image.
    Metrics that COCO leaves undefined (no ground truth at all) are reported as 0.0, never nan.
    """
    coco_gt, coco_dt, num_gt, num_predictions = _to_coco(predictions, ground_truth, image_sizes, names)
    evaluator = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=logger.debug)  # P/R: _precision_recall
    settings = _settings(evaluator.params)
    if num_gt == 0:  # COCO has nothing to average over; every number is 0 by convention
        return EvalResult(0.0, 0.0, 0.0, 0.0, {}, {}, len(image_sizes), 0, num_predictions, settings)
    with _quiet_faster_coco_eval():
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        precision, recall = _precision_recall(coco_gt, coco_dt, predictions)
    iou50 = int(np.flatnonzero(np.isclose(evaluator.params.iouThrs, 0.5))[0])
    per_class, per_class50, curve = _per_class_ap(evaluator.eval["precision"], iou50, names)
    return EvalResult(
        map50_95=max(float(evaluator.stats[0]), 0.0),
        map50=max(float(evaluator.stats[1]), 0.0),
        precision=precision,
        recall=recall,
        per_class_ap=per_class,
        per_class_ap50=per_class50,
        num_images=len(image_sizes),
        num_gt=num_gt,
        num_predictions=num_predictions,
        settings=settings,
        pr_curve=curve,
        recall_thresholds=np.asarray(evaluator.params.recThrs, dtype=np.float64),
    )


def confusion_matrix(
    predictions: list[np.ndarray],
    ground_truth: list[np.ndarray],
    num_classes: int,
    conf: float = 0.25,
    iou: float = 0.45,
) -> np.ndarray:
    """Counts [nc + 1, nc + 1]: rows predicted class, columns true class, last index background (ultralytics layout).

    Uses faster-coco-eval's PreviewResults: detections with score >= conf are matched class-agnostically to ground
    truth with COCO's greedy matching (by descending score, IoU >= iou); a match counts at (predicted, true), an
    unmatched detection at (predicted, background), an unmatched ground truth at (background, true).
    """
    from faster_coco_eval.extra import PreviewResults  # the extra module is only needed here

    names = [str(i) for i in range(num_classes)]
    coco_gt, coco_dt, _, _ = _to_coco(predictions, ground_truth, None, names)
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    if not coco_gt.anns and not coco_dt.anns:
        return matrix
    with _quiet_faster_coco_eval():
        preview = PreviewResults(coco_gt, coco_dt, iouType="bbox", min_score=conf, iou_tresh=iou, useCats=False)
        counts = preview.compute_confusion_matrix()  # [nc, nc + 2]: rows true, cols predicted, then FP, FN
    matrix[:num_classes, :num_classes] = counts[:, :num_classes].T
    matrix[:num_classes, num_classes] = counts[:, -2]  # unmatched detections, by predicted class
    matrix[num_classes, :num_classes] = counts[:, -1]  # missed ground truth, by true class
    return matrix

