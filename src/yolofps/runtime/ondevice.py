"""The device-side inference path: uint8 host images -> detections in original pixels, every step on the device.

pre    upload of uint8 HWC images (non_blocking from pinned memory), HWC->CHW, to dtype, letterbox (bilinear
       resize + pad 114; a no-op when the source is already imgsz x imgsz), /255
model  the detector in one mode: eager, trace (jit.trace + freeze), compile (torch.compile), cudagraph
post   the top `max_candidates` boxes per image by objectness x best class score, one class-aware NMS call for the
       whole batch, boxes mapped back through each image's letterbox and clipped to it

It gives the host path's answer (`runtime.host`): the same letterbox geometry, score rule, NMS and mapping, so the
same [k, 6] rows (x1, y1, x2, y2, score, class) whenever no more than `max_candidates` boxes per image pass `conf`
(the top-k keeps the shapes fixed, so beyond that the lowest-scored are dropped). The resize differs from cv2's
INTER_LINEAR by at most one grey level (cv2 rounds to uint8 with fixed-point weights; here it stays float).
A pipeline is built for one batch shape [B, H, W, 3]: the CUDA graphs, the trace and compile(dynamic=False) are
specialised to it, and so is its letterbox.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from yolofps import device as dev
from yolofps.data.dataset import FILL
from yolofps.model.postprocess import xywh2xyxy
from yolofps.runtime.host import Deployment, Letterboxed

try:  # the fused kernel; yolofps' torch-only version has the same semantics (kept indices by decreasing score)
    import torchvision
    from torchvision.ops import batched_nms

    NMS_KERNEL = f"torchvision.ops.batched_nms (torchvision {torchvision.__version__})"
except ImportError:
    from yolofps.model.postprocess import batched_nms

    NMS_KERNEL = "yolofps.model.postprocess.batched_nms (torch only)"

MODES = ("eager", "trace", "compile", "cudagraph")
Candidates = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # xyxy, scores, labels, NMS groups


def letterbox_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of yolofps.data.dataset.letterbox: gain min(S/h, S/w), centred whole-pixel pads."""
    ratio = size / max(height, width)
    new_w, new_h = max(1, min(size, round(width * ratio))), max(1, min(size, round(height * ratio)))
    return new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def letterboxes(shape: Sequence[int], size: int) -> list[Letterboxed]:
    """The host path's letterbox records for a uint8 batch of `shape` [B, H, W, 3] (one source size)."""
    batch, height, width = shape[:3]
    _, _, top, left = letterbox_geometry(height, width, size)
    ratio = size / max(height, width)  # the float data.dataset.letterbox returns, so the mapping is the same
    return [Letterboxed(f"array {i}", (height, width), ratio, (float(left), float(top))) for i in range(batch)]


@dataclass(frozen=True)
class Geometry:
    """A batch's letterboxes as device tensors: x_orig = (x_in - pad) / ratio, clipped to the original image."""

    pad: torch.Tensor  # [B, 4] (left, top, left, top)
    ratio: torch.Tensor  # [B, 1]
    limit: torch.Tensor  # [B, 4] (width, height, width, height)

    @classmethod
    def of(cls, metas: Sequence[Letterboxed], device: torch.device) -> Geometry:
        """From the host path's records (one upload, made once per pipeline, not per call)."""
        pad = torch.tensor([[*m.pad, *m.pad] for m in metas], dtype=torch.float32)
        ratio = torch.tensor([[m.ratio] for m in metas], dtype=torch.float32)
        limit = torch.tensor([[m.orig_shape[1], m.orig_shape[0]] * 2 for m in metas], dtype=torch.float32)
        return cls(pad.to(device), ratio.to(device), limit.to(device))

    def unletterbox(self, boxes: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """xyxy [n, 4] in input pixels of images `image` [n] -> their original pixels, clipped (host's rule)."""
        return ((boxes - self.pad[image]) / self.ratio[image]).clamp(min=0).minimum(self.limit[image])


def prepare(images: torch.Tensor, size: int, dtype: torch.dtype, *, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, H, W, 3] already on the device -> [B, 3, S, S] letterboxed, in 0..1."""
    # an HWC batch seen as CHW is already channels_last in memory: the permute is free
    x = images.permute(0, 3, 1, 2).to(dtype)  # [B, 3, H, W], 0..255
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        new_h, new_w, top, left = letterbox_geometry(height, width, size)
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)  # cv2 INTER_LINEAR's grid
        x = F.pad(x, (left, size - new_w - left, top, size - new_h - top), value=FILL)  # [B, 3, S, S]
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x.div_(255)


def preprocess(images: torch.Tensor, device: torch.device, dtype: torch.dtype, size: int, *,
               channels_last: bool = False) -> torch.Tensor:
    """Host uint8 [B, H, W, 3] (pinned on CUDA) -> device [B, 3, S, S] model input."""
    return prepare(images.to(device, non_blocking=True), size, dtype, channels_last=channels_last)


def host_batch(images: Sequence[np.ndarray], info: dev.DeviceInfo) -> torch.Tensor:
    """uint8 RGB HWC arrays of one shape -> a [B, H, W, 3] host batch, pinned on CUDA for a non-blocking upload."""
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(images)))
    return batch.pin_memory() if info.kind == "cuda" else batch


def candidates(pred: torch.Tensor, max_candidates: int) -> Candidates:
    """Fixed-shape top-k by obj x max class score, in prediction order: (xyxy [B, k, 4], scores, labels, groups)."""
    num_classes = pred.shape[-1] - 5
    # max then multiply equals the host's multiply then max: scaling by objectness > 0 keeps order, rounding too;
    # and score = obj x class score <= obj, so the host's objectness pre-filter drops nothing this keeps
    scores, labels = pred[..., 5:].max(-1)  # [B, N]
    scores = scores * pred[..., 4]
    # back in prediction order, so NMS's stable sort breaks ties as the host's does (uniform padding gives many)
    index = scores.topk(min(max_candidates, pred.shape[1]), dim=1).indices.sort(dim=1).values  # [B, k]
    scores = scores.gather(1, index)
    boxes = xywh2xyxy(pred[..., :4].gather(1, index[..., None].expand(-1, -1, 4)))  # [B, k, 4]
    labels = labels.gather(1, index)
    image = torch.arange(len(pred), device=pred.device)[:, None]
    return boxes, scores, labels, labels + image * num_classes  # one NMS call: a group per (image, class)


def nms(found: Candidates, geometry: Geometry, deployment: Deployment) -> list[torch.Tensor]:
    """Class-aware NMS of the candidates, whole batch in one call -> per image [k, 6] in original pixels."""
    if deployment.multi_label:
        raise ValueError("the device post-process is the deployed single-label NMS; measure mAP (multi-label, "
                         "ultralytics val's) through runtime.host")
    boxes, scores, labels, groups = found
    batch, k = scores.shape
    index = (scores > deployment.conf).flatten().nonzero().squeeze(1)  # one host sync (a mask per tensor: four)
    image = index // k
    boxes, scores = boxes.flatten(0, 1)[index].float(), scores.flatten()[index].float()
    labels, groups = labels.flatten()[index], groups.flatten()[index]
    kept = batched_nms(boxes, scores, groups, deployment.iou)  # by decreasing score
    kept = kept[torch.sort(image[kept], stable=True).indices]  # grouped by image, still by score within one
    image = image[kept]
    # mapped after NMS, as the host does: IoU is not scale-invariant once boxes are clipped
    detections = torch.cat((geometry.unletterbox(boxes[kept], image), scores[kept, None],
                            labels[kept, None].float()), dim=1)
    counts = torch.bincount(image, minlength=batch).tolist()  # host sync: the split needs its sizes
    return [d[: deployment.max_det] for d in detections.split(counts)]


def postprocess(pred: torch.Tensor, geometry: Geometry, deployment: Deployment, *,
                max_candidates: int) -> list[torch.Tensor]:
    """Decoded predictions [B, N, 5+nc] on the device -> per image [k, 6] (x1, y1, x2, y2, score, class)."""
    return nms(candidates(pred, max_candidates), geometry, deployment)


@dataclass(frozen=True)
class DevicePipeline:
    """One mode's three phases: pre(host uint8 [B, H, W, 3]) -> input, model(input) -> predictions, post -> dets."""

    pre: Callable[[torch.Tensor], torch.Tensor]
    model: Callable[[torch.Tensor], torch.Tensor]
    post: Callable[[torch.Tensor], list[torch.Tensor]]

    def detect(self, images: torch.Tensor) -> list[np.ndarray]:
        """Per image [k, 6] float32 on the host, like `runtime.Pipeline.detect`, for a batch of the built shape."""
        with torch.inference_mode():
            return [d.cpu().numpy() for d in self.post(self.model(self.pre(images)))]


def _warm_up(net: Callable, prep: Callable, static_u8: torch.Tensor, max_candidates: int) -> None:
    """Three passes on a side stream before capture, as the CUDA graphs docs require."""
    # cuDNN autotuning, the Detect grid cache and the allocator must settle outside the captured graph
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            candidates(net(prep(static_u8)), max_candidates)
    torch.cuda.current_stream().wait_stream(side)


@torch.inference_mode()
def graphed(net: torch.nn.Module, sample: torch.Tensor, dtype: torch.dtype, geometry: Geometry,
            deployment: Deployment, *, max_candidates: int) -> DevicePipeline:
    """Pre (after the upload), model and candidate selection as three CUDA graphs on static buffers."""
    static_u8 = torch.empty(sample.shape, dtype=torch.uint8, device=geometry.pad.device)
    static_u8.copy_(sample)

    def prep(images: torch.Tensor) -> torch.Tensor:
        return prepare(images, deployment.imgsz, dtype, channels_last=True)

    _warm_up(net, prep, static_u8, max_candidates)
    pool = torch.cuda.graph_pool_handle()  # one pool for the three: they are always replayed in capture order
    graphs = [torch.cuda.CUDAGraph() for _ in range(3)]
    with torch.cuda.graph(graphs[0], pool=pool):
        static_x = prep(static_u8)
    with torch.cuda.graph(graphs[1], pool=pool):
        static_pred = net(static_x)
    with torch.cuda.graph(graphs[2], pool=pool):
        static_found = candidates(static_pred, max_candidates)

    def pre(images: torch.Tensor) -> torch.Tensor:
        static_u8.copy_(images, non_blocking=True)
        graphs[0].replay()
        return static_x

    def model(x: torch.Tensor) -> torch.Tensor:  # reads static_x, which pre filled
        graphs[1].replay()
        return static_pred

    def post(pred: torch.Tensor) -> list[torch.Tensor]:  # reads static_pred, which model filled
        graphs[2].replay()
        return nms(static_found, geometry, deployment)

    return DevicePipeline(pre, model, post)


def _compiled(net: torch.nn.Module, compile_mode: str, info: dev.DeviceInfo) -> Callable:
    """torch.compile with static shapes; under CUDA graph trees each call starts a new step."""
    compiled = torch.compile(net, mode=compile_mode, dynamic=False)
    if "reduce-overhead" not in compile_mode or info.kind != "cuda":
        return compiled

    def step(x: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # the previous outputs (consumed by post) may be overwritten
        return compiled(x)

    return step


@dataclass(frozen=True)
class DeviceMode:
    """How the device path runs a model: torch mode, dtype, memory format, NMS candidates, torch.compile mode."""

    mode: str = "eager"  # one of MODES
    dtype: torch.dtype = torch.float32
    channels_last: bool = False  # the cudagraph mode always is
    max_candidates: int = 100  # per image, by obj x best class score, before NMS (fixed shape: graph-capturable)
    compile_mode: str = "reduce-overhead"


def build(how: DeviceMode, model: torch.nn.Module, sample: torch.Tensor, info: dev.DeviceInfo,
          deployment: Deployment) -> DevicePipeline:
    """The three phases of `how.mode` around a copy of `model` in `how.dtype`, for host batches shaped like `sample`."""
    mode, dtype, max_candidates = how.mode, how.dtype, how.max_candidates
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {list(MODES)}")
    if mode == "cudagraph" and info.kind != "cuda":
        raise ValueError(f"the cudagraph mode needs CUDA (device is {info.kind})")
    channels_last = how.channels_last or mode == "cudagraph"
    net = copy.deepcopy(model).eval().requires_grad_(False).to(info.device, dtype)  # inference only
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    geometry = Geometry.of(letterboxes(sample.shape, deployment.imgsz), info.device)
    if mode == "cudagraph":
        return graphed(net, sample, dtype, geometry, deployment, max_candidates=max_candidates)

    def pre(images: torch.Tensor) -> torch.Tensor:
        return preprocess(images, info.device, dtype, deployment.imgsz, channels_last=channels_last)

    def post(pred: torch.Tensor) -> list[torch.Tensor]:
        return postprocess(pred, geometry, deployment, max_candidates=max_candidates)

    if mode == "trace":
        with warnings.catch_warnings(), torch.no_grad():  # TracerWarnings about the Detect grid cache: shape fixed
            warnings.simplefilter("ignore")
            net = torch.jit.freeze(torch.jit.trace(net, pre(sample), check_trace=False))
    elif mode == "compile":
        net = _compiled(net, how.compile_mode, info)
    return DevicePipeline(pre, net, post)
