"""YOLOv5Loss: padding/empty handling, equivalence with upstream's dynamic algorithm, static shapes, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from yolofps.model import YOLOv5Loss, build_model, preset

NUM_CLASSES = 3


def random_preds(batch: int, size: int = 64, num_classes: int = NUM_CLASSES) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, size // s, size // s, 5 + num_classes, requires_grad=True) for s in (8, 16, 32)]


def padded_targets() -> tuple[torch.Tensor, torch.Tensor]:
    """Image 0 has two boxes, image 1 none, image 2 one; rows past the boxes are padding."""
    targets = torch.zeros(3, 4, 5)
    targets[0, 0] = torch.tensor([1, 0.40, 0.50, 0.30, 0.45])
    targets[0, 1] = torch.tensor([2, 0.71, 0.23, 0.12, 0.10])
    targets[2, 0] = torch.tensor([0, 0.33, 0.62, 0.55, 0.20])
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, :2] = mask[2, 0] = True
    return targets, mask


def test_padded_batch_with_an_empty_image_is_finite_and_trains_detect():
    torch.manual_seed(0)
    spec = preset("tiny", NUM_CLASSES)
    model = build_model(spec).train()
    targets, mask = padded_targets()
    out = YOLOv5Loss(spec, image_size=64)(model(torch.randn(3, 3, 64, 64)), targets, mask)
    assert all(torch.isfinite(v) for v in out.values())
    assert out["box"] > 0 and out["obj"] > 0 and out["cls"] > 0
    torch.testing.assert_close(out["loss"], (out["box"] + out["obj"] + out["cls"]) * 3)
    out["loss"].backward()
    for conv in model.detect.m:
        assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


def test_all_empty_batch_only_pushes_objectness_down():
    torch.manual_seed(0)
    preds = random_preds(2)
    loss_fn = YOLOv5Loss(preset("tiny", NUM_CLASSES), image_size=64)
    out = loss_fn(preds, torch.zeros(2, 5, 5), torch.zeros(2, 5, dtype=torch.bool))
    assert out["box"] == 0 and out["cls"] == 0 and torch.isfinite(out["obj"]) and out["obj"] > 0
    out["loss"].backward()
    for pred in preds:
        assert (pred.grad[..., 4] > 0).all()  # every objectness logit is pushed toward "no object"
        assert (pred.grad[..., :4] == 0).all() and (pred.grad[..., 5:] == 0).all()


def test_padded_rows_do_not_affect_the_loss():
    torch.manual_seed(0)
    loss_fn = YOLOv5Loss(preset("tiny", NUM_CLASSES), image_size=64)
    preds = random_preds(3)
    targets, mask = padded_targets()
    reference = loss_fn(preds, targets, mask)
    garbage = targets.clone()
    garbage[~mask] = torch.rand(int((~mask).sum()), 5) * 4 - 1
    garbage[1, 0] = torch.tensor([float("nan"), float("inf"), 0.5, 0.0, -1.0])
    changed = loss_fn(preds, garbage, mask)
    for key in reference:
        assert torch.equal(reference[key], changed[key]), key
    grads = torch.autograd.grad(changed["loss"], preds)
    assert all(torch.isfinite(g).all() for g in grads)


def test_loss_is_traceable_without_graph_breaks():
    # fullgraph=True fails on .item(), nonzero, boolean-mask indexing or value-dependent Python branches
    loss_fn = YOLOv5Loss(preset("tiny", NUM_CLASSES), image_size=64)
    compiled = torch.compile(loss_fn, backend="eager", fullgraph=True)
    targets, mask = padded_targets()
    preds = random_preds(3)
    torch.testing.assert_close(compiled(preds, targets, mask)["loss"], loss_fn(preds, targets, mask)["loss"])


def _upstream_ciou(box1, box2, eps=1e-7):
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.chunk(4, -1), box2.chunk(4, -1)
    b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter_w = (b1_x2.minimum(b2_x2) - b1_x1.maximum(b2_x1)).clamp(0)
    inter = inter_w * (b1_y2.minimum(b2_y2) - b1_y1.maximum(b2_y1)).clamp(0)
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    cw, ch = b1_x2.maximum(b2_x2) - b1_x1.minimum(b2_x1), b1_y2.maximum(b2_y2) - b1_y1.minimum(b2_y1)
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / (cw**2 + ch**2 + eps) + v * alpha)


def upstream_loss(preds, targets, anchors, num_classes, image_size):
    """Port of yolov5 ComputeLoss (dynamic shapes); only change: colliding objectness targets keep the max IoU."""
    num_anchors, nt = anchors.shape[1], targets.shape[0]
    gain = torch.ones(7)
    ai = torch.arange(num_anchors).float().view(num_anchors, 1).repeat(1, nt)
    targets = torch.cat((targets.repeat(num_anchors, 1, 1), ai[..., None]), 2)
    off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]]).float() * 0.5
    lbox = lobj = lcls = torch.zeros(())
    for i, pi in enumerate(preds):
        gain[2:6] = torch.tensor(pi.shape)[[3, 2, 3, 2]]
        t = targets * gain
        r = t[..., 4:6] / anchors[i][:, None]
        t = t[torch.max(r, 1 / r).max(2)[0] < 4.0]
        gxy, gxi = t[:, 2:4], gain[[2, 3]] - t[:, 2:4]
        j, k = ((gxy % 1 < 0.5) & (gxy > 1)).T
        left, m = ((gxi % 1 < 0.5) & (gxi > 1)).T
        j = torch.stack((torch.ones_like(j), j, k, left, m))
        t = t.repeat((5, 1, 1))[j]
        offsets = (torch.zeros_like(gxy)[None] + off[:, None])[j]
        bc, gxy, gwh, a = t.chunk(4, 1)
        a, (b, c) = a.long().view(-1), bc.long().T
        gij = (gxy - offsets).long()
        gi, gj = gij.T.clone()
        gj, gi = gj.clamp_(0, pi.shape[2] - 1), gi.clamp_(0, pi.shape[3] - 1)
        tbox = torch.cat((gxy - gij, gwh), 1)
        tobj = torch.zeros(pi.shape[:4])
        if len(b):
            pxy, pwh, _, pcls = pi[b, a, gj, gi].split((2, 2, 1, num_classes), 1)
            pbox = torch.cat((pxy.sigmoid() * 2 - 0.5, (pwh.sigmoid() * 2) ** 2 * anchors[i][a]), 1)
            iou = _upstream_ciou(pbox, tbox).squeeze()
            lbox = lbox + (1.0 - iou).mean()
            flat = ((b * num_anchors + a) * pi.shape[2] + gj) * pi.shape[3] + gi
            tobj.view(-1).scatter_reduce_(0, flat, iou.detach().clamp(0), "amax")
            tcls = torch.zeros_like(pcls)
            tcls[range(len(b)), c] = 1.0
            lcls = lcls + F.binary_cross_entropy_with_logits(pcls, tcls)
        lobj = lobj + F.binary_cross_entropy_with_logits(pi[..., 4], tobj) * (4.0, 1.0, 0.4)[i]
    lbox, lobj, lcls = lbox * 0.05, lobj * (image_size / 640) ** 2, lcls * 0.5 * num_classes / 80
    return {"box": lbox, "obj": lobj, "cls": lcls, "loss": (lbox + lobj + lcls) * preds[0].shape[0]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_upstream_dynamic_algorithm(seed):
    torch.manual_seed(seed)
    spec = preset("tiny", NUM_CLASSES)
    loss_fn = YOLOv5Loss(spec, image_size=128)
    batch, max_boxes = 3, 6
    classes = torch.randint(0, NUM_CLASSES, (batch, max_boxes, 1)).float()
    # random floats keep centres off cell borders, where upstream would add a duplicate candidate
    targets = torch.cat((classes, torch.rand(batch, max_boxes, 2), torch.rand(batch, max_boxes, 2) * 0.5 + 0.02), -1)
    mask = torch.rand(batch, max_boxes) < 0.7
    mask[1] = False  # one image without boxes
    preds = random_preds(batch, size=128)
    ours = loss_fn(preds, targets, mask)
    image_index = torch.arange(batch).view(-1, 1, 1).expand(-1, max_boxes, 1).float()
    flat_targets = torch.cat((image_index, targets), -1)[mask]  # upstream's [n, 6] (image, cls, x, y, w, h)
    theirs = upstream_loss(preds, flat_targets, loss_fn.anchors, NUM_CLASSES, 128)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7, msg=key)
    torch.testing.assert_close(torch.autograd.grad(ours["loss"], preds), torch.autograd.grad(theirs["loss"], preds),
                               rtol=1e-4, atol=1e-8)  # fmt: skip


def synthetic_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four 64 px grey images with red/green/blue rectangles (class = colour); one image is empty."""
    colours = torch.eye(3)
    images = torch.full((4, 3, 64, 64), 0.5)
    boxes = [[(0, 8, 8, 30, 28)], [(1, 30, 20, 60, 50), (2, 4, 40, 24, 60)], [], [(2, 20, 10, 44, 40)]]
    targets, mask = torch.zeros(4, 3, 5), torch.zeros(4, 3, dtype=torch.bool)
    for i, image_boxes in enumerate(boxes):
        for j, (c, x1, y1, x2, y2) in enumerate(image_boxes):
            images[i, :, y1:y2, x1:x2] = colours[c][:, None, None]
            targets[i, j] = torch.tensor([c, (x1 + x2) / 128, (y1 + y2) / 128, (x2 - x1) / 64, (y2 - y1) / 64])
            mask[i, j] = True
    return images, targets, mask


def test_tiny_model_overfits_synthetic_rectangles():
    torch.manual_seed(0)
    spec = preset("tiny", NUM_CLASSES)
    model = build_model(spec).train()
    loss_fn = YOLOv5Loss(spec, image_size=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    images, targets, mask = synthetic_batch()
    losses = []
    for _ in range(40):
        loss = loss_fn(model(images), targets, mask)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    assert losses[-1] < 0.5 * losses[0], [round(float(v), 4) for v in losses]
