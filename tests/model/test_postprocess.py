"""NMS against a plain Python reference, non_max_suppression filters, letterbox box mapping."""

from __future__ import annotations

import pytest
import torch

from yolofps.model import batched_nms, non_max_suppression, scale_boxes, xywh2xyxy, xyxy2xywh


def reference_nms(boxes: list[list[float]], scores: list[float], classes: list[int], iou_threshold: float):
    """Textbook greedy NMS, one box at a time, per class."""

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    kept: list[int] = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if all(classes[k] != classes[i] or iou(boxes[k], boxes[i]) <= iou_threshold for k in kept):
            kept.append(i)
    return kept


def random_boxes(n: int, canvas: float, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xy = torch.rand(n, 2) * canvas
    wh = torch.rand(n, 2) * canvas / 8 + 1
    return torch.cat((xy, xy + wh), 1), torch.rand(n), torch.randint(0, num_classes, (n,))


@pytest.mark.parametrize(("seed", "n", "canvas"), [(0, 200, 100.0), (1, 500, 60.0), (2, 50, 30.0), (3, 2500, 400.0)])
def test_batched_nms_matches_reference(seed, n, canvas):
    torch.manual_seed(seed)
    boxes, scores, classes = random_boxes(n, canvas, num_classes=4)
    kept = batched_nms(boxes, scores, classes, iou_threshold=0.45)
    expected = reference_nms(boxes.tolist(), scores.tolist(), classes.tolist(), 0.45)
    assert 0 < len(expected) < n  # the case actually suppresses something
    assert kept.tolist() == expected


def test_batched_nms_is_class_aware_and_handles_edge_cases():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10], [-50, -50, -40, -40]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    kept = batched_nms(boxes, scores, torch.tensor([0, 1, 0, 1]), 0.5)
    assert kept.tolist() == [0, 1, 3]  # the other class's duplicate survives, same-class overlap does not
    assert batched_nms(boxes, scores, torch.zeros(4, dtype=torch.long), 0.5).tolist() == [0, 3]
    assert batched_nms(boxes, scores, torch.zeros(4, dtype=torch.long), 0.5, max_candidates=2).tolist() == [0]
    assert batched_nms(boxes[:0], scores[:0], torch.zeros(0, dtype=torch.long), 0.5).numel() == 0


def make_pred(rows: list[list[float]], num_classes: int = 3) -> torch.Tensor:
    """[1, N, 5+nc] decoded predictions from (cx, cy, w, h, obj, class, class_prob) rows."""
    pred = torch.zeros(1, len(rows), 5 + num_classes)
    for i, (cx, cy, w, h, obj, cls, prob) in enumerate(rows):
        pred[0, i, :5] = torch.tensor([cx, cy, w, h, obj])
        pred[0, i, 5 + int(cls)] = prob
    return pred


def test_non_max_suppression_scores_filters_and_formats():
    pred = make_pred([
        [50, 50, 20, 20, 0.9, 0, 0.9],  # score 0.81, kept
        [51, 50, 20, 20, 0.9, 0, 0.8],  # duplicate of the first, suppressed
        [51, 50, 20, 20, 0.9, 1, 0.8],  # same place, other class, kept
        [10, 10, 4, 4, 0.6, 2, 0.3],  # obj passes, obj * cls = 0.18 < 0.25: dropped
        [90, 90, 4, 4, 0.2, 2, 1.0],  # obj below threshold: dropped
    ])  # fmt: skip
    (det,) = non_max_suppression(pred, conf_threshold=0.25, iou_threshold=0.45)
    assert det.shape == (2, 6)
    torch.testing.assert_close(det[0], torch.tensor([40.0, 40, 60, 60, 0.81, 0]))
    assert det[1, 5] == 1 and det[1, 4] == pytest.approx(0.72)
    (agnostic,) = non_max_suppression(pred, agnostic=True)
    assert len(agnostic) == 1
    (nothing,) = non_max_suppression(pred, conf_threshold=0.95)
    assert nothing.shape == (0, 6)


def test_non_max_suppression_max_det_and_multi_label():
    torch.manual_seed(0)
    rows = [[x * 10.0 + 5, y * 10.0 + 5, 6, 6, torch.rand(()).item() * 0.5 + 0.5, (x + y) % 3, 0.9]
            for x in range(20) for y in range(20)]  # fmt: skip
    pred = make_pred(rows)  # 400 disjoint boxes
    few = pred.clone()
    few[0, 7:, 4] = 0.0  # second image: only 7 boxes pass the confidence filter
    dets = non_max_suppression(torch.cat((pred, few)), max_det=50)
    assert [len(d) for d in dets] == [50, 7]
    torch.testing.assert_close(dets[0][:, 4], (pred[0, :, 4] * 0.9).topk(50).values)  # the 50 best, in order
    two_labels = make_pred([[50, 50, 20, 20, 0.9, 0, 0.9]])
    two_labels[0, 0, 6] = 0.5
    assert len(non_max_suppression(two_labels)[0]) == 1
    (multi,) = non_max_suppression(two_labels, multi_label=True)
    assert sorted(multi[:, 5].tolist()) == [0.0, 1.0]


def test_box_format_round_trip():
    torch.manual_seed(0)
    xywh = torch.rand(10, 4) * 100
    torch.testing.assert_close(xyxy2xywh(xywh2xyxy(xywh)), xywh)
    torch.testing.assert_close(xywh2xyxy(torch.tensor([10.0, 20, 4, 6])), torch.tensor([8.0, 17, 12, 23]))


@pytest.mark.parametrize(("original", "letterboxed"), [((480, 640), (640, 640)), ((300, 200), (320, 320))])
def test_scale_boxes_undoes_a_centred_letterbox(original, letterboxed):
    gain = min(letterboxed[0] / original[0], letterboxed[1] / original[1])
    pad_w, pad_h = (letterboxed[1] - original[1] * gain) / 2, (letterboxed[0] - original[0] * gain) / 2
    boxes = torch.tensor([[10.0, 20, 150, 120, 0.9, 2], [0, 0, original[1], original[0], 0.5, 0]])
    lb = boxes.clone()
    lb[:, [0, 2]] = boxes[:, [0, 2]] * gain + pad_w
    lb[:, [1, 3]] = boxes[:, [1, 3]] * gain + pad_h
    torch.testing.assert_close(scale_boxes(lb, letterboxed, original), boxes)
    ratio_pad = ((gain, gain), (pad_w, pad_h))
    torch.testing.assert_close(scale_boxes(lb, letterboxed, original, ratio_pad), boxes)
    outside = scale_boxes(torch.tensor([[-30.0, -30, 1000, 1000]]), letterboxed, original)
    assert outside.tolist() == [[0.0, 0.0, original[1], original[0]]]  # clipped to the image
