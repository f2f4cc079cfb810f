"""The device-side inference path of benchmarks/gpu.py: pre-process, model modes and post-process on the device.

pre    upload of uint8 HWC images (non_blocking), HWC->CHW, to dtype, letterbox (bilinear resize + pad 114; a no-op
       when the source is already imgsz x imgsz), /255
model  the detector in one of the modes (eager, bf16, channels_last, trace, cudagraph, compile)
post   top-k candidates by obj x max class score, then one class-aware NMS call for the whole batch
`args` is gpu.py's parsed command line (imgsz, conf, iou, max_det, max_candidates, compile_mode).
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from yolofps import device as dev
from yolofps.data.dataset import FILL
from yolofps.model.postprocess import xywh2xyxy

try:  # the fused kernel; yolofps' torch-only version has the same semantics (kept indices by decreasing score)
    import torchvision
    from torchvision.ops import batched_nms

    NMS_KERNEL = f"torchvision.ops.batched_nms (torchvision {torchvision.__version__})"
except ImportError:
    from yolofps.model.postprocess import batched_nms

    NMS_KERNEL = "yolofps.model.postprocess.batched_nms (torch only)"


@dataclass(frozen=True)
class Pipeline:
    """One mode's three phases: pre(host uint8 images) -> input, model(input) -> predictions, post(preds) -> dets."""

    pre: Callable[[torch.Tensor], torch.Tensor]
    model: Callable[[torch.Tensor], torch.Tensor]
    post: Callable[[torch.Tensor], list[torch.Tensor]]


def letterbox_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of yolofps.data.dataset.letterbox: gain min(S/h, S/w), centred whole-pixel pads."""
    ratio = size / max(height, width)
    new_w, new_h = max(1, min(size, round(width * ratio))), max(1, min(size, round(height * ratio)))
    return new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def prepare(images: torch.Tensor, dtype: torch.dtype, size: int, channels_last: bool) -> torch.Tensor:
    """uint8 [B, H, W, 3] already on the device -> [B, 3, S, S] letterboxed, in 0..1, on the device."""
    # an HWC batch seen as CHW is already channels_last in memory: the permute is free
    x = images.permute(0, 3, 1, 2).to(dtype)  # [B, 3, H, W], 0..255
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        new_h, new_w, top, left = letterbox_geometry(height, width, size)
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)  # like cv2 INTER_LINEAR
        x = F.pad(x, (left, size - new_w - left, top, size - new_h - top), value=FILL)  # [B, 3, S, S]
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x.div_(255)


def preprocess(images: torch.Tensor, device: torch.device, dtype: torch.dtype, size: int,
               channels_last: bool = False) -> torch.Tensor:
    """Host uint8 [B, H, W, 3] (pinned on CUDA) -> device [B, 3, S, S] model input."""
    return prepare(images.to(device, non_blocking=True), dtype, size, channels_last)


def candidates(pred: torch.Tensor, max_candidates: int) -> tuple[torch.Tensor, ...]:
    """Fixed-shape top-k by obj x max class score: (xyxy [B, k, 4], scores [B, k], labels [B, k], groups [B, k])."""
    num_classes = pred.shape[-1] - 5
    scores, labels = pred[..., 5:].max(-1)  # [B, N]
    scores, index = (scores * pred[..., 4]).topk(min(max_candidates, pred.shape[1]), dim=1)  # [B, k]
    boxes = xywh2xyxy(pred[..., :4].gather(1, index[..., None].expand(-1, -1, 4)))  # [B, k, 4]
    labels = labels.gather(1, index)
    image = torch.arange(len(pred), device=pred.device)[:, None]
    return boxes, scores, labels, labels + image * num_classes  # one NMS call: a group per (image, class)


def nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, *, conf: float,
        iou: float, max_det: int) -> list[torch.Tensor]:
    """Class-aware NMS of the candidates, whole batch in one call -> per image [k, 6] (x1, y1, x2, y2, score, class)."""
    batch, k = scores.shape
    index = (scores > conf).flatten().nonzero().squeeze(1)  # one host sync (a mask per tensor would be four)
    image = index // k
    boxes, scores = boxes.flatten(0, 1)[index].float(), scores.flatten()[index].float()
    labels, groups = labels.flatten()[index], groups.flatten()[index]
    kept = batched_nms(boxes, scores, groups, iou)  # by decreasing score
    kept = kept[torch.sort(image[kept], stable=True).indices]  # grouped by image, still by score within one
    detections = torch.cat((boxes, scores[:, None], labels[:, None].float()), dim=1)[kept]
    counts = torch.bincount(image[kept], minlength=batch).tolist()  # host sync: the list needs its sizes
    return [d[:max_det] for d in detections.split(counts)]


def post_fn(args: argparse.Namespace) -> Callable[..., list[torch.Tensor]]:
    """The NMS half of post-processing with this run's settings."""
    return partial(nms, conf=args.conf, iou=args.iou, max_det=args.max_det)


def graphed(net: torch.nn.Module, host: torch.Tensor, dtype: torch.dtype, args: argparse.Namespace) -> Pipeline:
    """Pre (after the upload), model and candidate selection as three CUDA graphs on static buffers."""
    static_u8 = torch.empty(host.shape, dtype=torch.uint8, device="cuda")
    static_u8.copy_(host)
    prep = partial(prepare, dtype=dtype, size=args.imgsz, channels_last=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: cuDNN autotuning, the Detect grid cache
        for _ in range(3):
            candidates(net(prep(static_u8)), args.max_candidates)
    torch.cuda.current_stream().wait_stream(side)
    # one pool for the three graphs: they are always replayed in capture order
    pool = torch.cuda.graph_pool_handle()
    graphs = [torch.cuda.CUDAGraph() for _ in range(3)]
    with torch.cuda.graph(graphs[0], pool=pool):
        static_x = prep(static_u8)
    with torch.cuda.graph(graphs[1], pool=pool):
        static_pred = net(static_x)
    with torch.cuda.graph(graphs[2], pool=pool):
        static_candidates = candidates(static_pred, args.max_candidates)
    nms_fn = post_fn(args)

    def pre(images: torch.Tensor) -> torch.Tensor:
        static_u8.copy_(images, non_blocking=True)
        graphs[0].replay()
        return static_x

    def model(x: torch.Tensor) -> torch.Tensor:
        graphs[1].replay()
        return static_pred

    def post(pred: torch.Tensor) -> list[torch.Tensor]:
        graphs[2].replay()
        return nms_fn(*static_candidates)

    return Pipeline(pre, model, post)


def build_pipeline(mode: str, model: torch.nn.Module, host: torch.Tensor, dtype: torch.dtype,
                   info: dev.DeviceInfo, args: argparse.Namespace) -> Pipeline:
    """The three phases of `mode` around a copy of `model` in `dtype`."""
    channels_last = info.kind == "cuda" and mode != "eager"
    net = copy.deepcopy(model).to(info.device, dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if mode == "cudagraph":
        return graphed(net, host, dtype, args)
    pre = partial(preprocess, device=info.device, dtype=dtype, size=args.imgsz, channels_last=channels_last)
    nms_fn = post_fn(args)

    def post(pred: torch.Tensor) -> list[torch.Tensor]:
        return nms_fn(*candidates(pred, args.max_candidates))

    if mode == "trace":
        with warnings.catch_warnings():  # TracerWarnings about the Detect grid cache: the shape is fixed here
            warnings.simplefilter("ignore")
            net = torch.jit.freeze(torch.jit.trace(net, pre(host), check_trace=False))
    elif mode == "compile":
        compiled = torch.compile(net, mode=args.compile_mode, dynamic=False)
        graph_trees = "reduce-overhead" in args.compile_mode and info.kind == "cuda"

        def net(x: torch.Tensor) -> torch.Tensor:
            if graph_trees:  # a new step: the previous outputs (already consumed by post) may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            return compiled(x)

    return Pipeline(pre, net, post)
