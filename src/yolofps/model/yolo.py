"""YOLOv5 v6 detector built from an ArchSpec, with state-dict keys identical to ultralytics/yolov5."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from yolofps.model.blocks import C3, SPPF, Concat, Conv
from yolofps.model.spec import ArchSpec, LayerSpec

# yolov5s.yaml "from" column where it is not simply the previous layer
SOURCES: dict[int, tuple[int, ...]] = {12: (-1, 6), 16: (-1, 4), 19: (-1, 14), 22: (-1, 10), 24: (17, 20, 23)}
# (kernel, stride, padding) of each plain Conv; None padding means k // 2
_CONV_GEOMETRY: dict[int, tuple[int, int, int | None]] = {
    0: (6, 2, 2), 1: (3, 2, None), 3: (3, 2, None), 5: (3, 2, None), 7: (3, 2, None),
    10: (1, 1, None), 14: (1, 1, None), 18: (3, 2, None), 21: (3, 2, None),
}  # fmt: skip
_BACKBONE_END = 10  # C3 blocks before this index use residual shortcuts; head C3s do not
_TOPOLOGY_STRIDES = (8, 16, 32)  # strides of layers 17, 20, 23


class Detect(nn.Module):
    """Per-level 1x1 conv to anchors x (xywh, obj, classes); decodes to pixels in eval mode."""

    def __init__(self, num_classes: int, anchors: torch.Tensor, strides: torch.Tensor, in_channels: list[int]) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_outputs = num_classes + 5
        self.num_levels, self.num_anchors = anchors.shape[:2]
        # not in the state dict: upstream keeps stride as a plain attribute
        self.register_buffer("stride", strides.float(), persistent=False)
        # upstream stores anchors in grid units (pixels / stride); keep that so official weights load as-is
        self.register_buffer("anchors", anchors.float() / self.stride.view(-1, 1, 1))  # [L, A, 2]
        self.m = nn.ModuleList(nn.Conv2d(c, self.num_anchors * self.num_outputs, 1) for c in in_channels)
        self._grids: dict[tuple, torch.Tensor] = {}  # cell-corner grids per input shape

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        outputs = []
        for conv, x in zip(self.m, xs):
            batch, _, height, width = x.shape
            y = conv(x).view(batch, self.num_anchors, self.num_outputs, height, width)
            outputs.append(y.permute(0, 1, 3, 4, 2).contiguous())  # [B, A, H, W, 5+nc]
        if self.training:
            return outputs
        return torch.cat([self._decode(level, y) for level, y in enumerate(outputs)], dim=1)  # [B, N, 5+nc]

    def _decode(self, level: int, y: torch.Tensor) -> torch.Tensor:
        batch, _, height, width, _ = y.shape
        grid = self._grid(height, width, y)  # [1, 1, H, W, 2]
        # not cached: anchors may be replaced by load_state_dict after a first forward
        anchor_grid = (self.anchors[level] * self.stride[level]).to(y.dtype).view(1, self.num_anchors, 1, 1, 2)
        y = y.sigmoid()
        xy = (y[..., :2] * 2 + grid) * self.stride[level]  # [B, A, H, W, 2] pixels
        wh = (y[..., 2:4] * 2) ** 2 * anchor_grid  # [B, A, H, W, 2] pixels
        return torch.cat((xy, wh, y[..., 4:]), dim=-1).view(batch, -1, self.num_outputs)

    def _grid(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled/exported graph bakes the grid in; a cache would break it
            return _make_grid(height, width, like)
        # tensors made under inference_mode cannot join autograd later, so the mode is part of the key
        key = (height, width, like.device, like.dtype, torch.is_inference_mode_enabled())
        if key not in self._grids:
            self._grids[key] = _make_grid(height, width, like)
        return self._grids[key]

    def initialize_biases(self) -> None:
        """yolov5's _initialize_biases: objectness prior ~8 objects per 640 image, class prior ~0.6/nc."""
        with torch.no_grad():
            for conv, stride in zip(self.m, self.stride.tolist()):
                bias = conv.bias.view(self.num_anchors, -1)
                bias[:, 4] += math.log(8 / (640 / stride) ** 2)
                bias[:, 5:] += math.log(0.6 / (self.num_classes - 0.99))


class YOLOv5(nn.Module):
    """YOLOv5 v6: train mode returns 3 raw [B, A, H, W, 5+nc] maps, eval mode decoded [B, N, 5+nc]."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        if tuple(spec.strides) != _TOPOLOGY_STRIDES:
            raise ValueError(f"the YOLOv5 v6 topology has strides {_TOPOLOGY_STRIDES}, spec says {spec.strides}")
        self.spec = spec
        layers: list[nn.Module] = []
        widths: list[int] = []  # output channels of each layer, to size the next one
        for i, layer in enumerate(spec.layers):
            in_channels = [widths[s] for s in SOURCES.get(i, (-1,))] if widths else [3]  # RGB in
            layers.append(_build_layer(i, layer, in_channels[0], spec.activation))
            widths.append(sum(in_channels) if layer.kind in ("Upsample", "Concat") else layer.out_channels)
        anchors = torch.tensor(spec.anchors).view(len(spec.strides), spec.num_anchors, 2)
        detect_in = [widths[s] for s in SOURCES[24]]
        layers.append(Detect(spec.num_classes, anchors, torch.tensor(spec.strides), detect_in))
        self.model = nn.ModuleList(layers)
        self._saved = {s for sources in SOURCES.values() for s in sources if s != -1}
        self.detect.initialize_biases()

    @property
    def detect(self) -> Detect:
        """The Detect head (model.24)."""
        return self.model[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        outputs: list[torch.Tensor | None] = []  # only the layers later routed from are kept
        for i, layer in enumerate(self.model):
            sources = SOURCES.get(i)
            inputs = x if sources is None else [x if s == -1 else outputs[s] for s in sources]
            x = layer(inputs)
            outputs.append(x if i in self._saved else None)
        return x


def _make_grid(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Cell (x, y) indices minus 0.5, so a predicted offset of sigmoid*2 - 0.5 lands in -0.5..1.5."""
    ys = torch.arange(height, device=like.device, dtype=like.dtype)
    xs = torch.arange(width, device=like.device, dtype=like.dtype)
    yv, xv = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xv, yv), dim=-1).view(1, 1, height, width, 2) - 0.5  # [1, 1, H, W, 2]


def _build_layer(index: int, layer: LayerSpec, in_channels: int, act: str) -> nn.Module:
    if layer.kind == "Conv":
        kernel, stride, padding = _CONV_GEOMETRY[index]
        return Conv(in_channels, layer.out_channels, kernel, stride, padding, act=act)
    if layer.kind == "C3":
        return C3(in_channels, layer.out_channels, layer.hidden_channels, layer.bypass_channels,
                  layer.bottleneck_channels, shortcut=index < _BACKBONE_END, act=act)  # fmt: skip
    if layer.kind == "SPPF":
        return SPPF(in_channels, layer.out_channels, layer.hidden_channels, act=act)
    if layer.kind == "Upsample":
        return nn.Upsample(scale_factor=2, mode="nearest")
    return Concat(1)


def build_model(spec: ArchSpec) -> YOLOv5:
    """Build a freshly initialised YOLOv5 from its spec."""
    return YOLOv5(spec)


def model_info(model: nn.Module, image_size: int = 640) -> dict[str, float | int]:
    """Parameter count and GFLOPs (2 x multiply-accumulates) of one square image at batch 1."""
    params = sum(p.numel() for p in model.parameters())
    weight = next(model.parameters())
    image = torch.zeros(1, 3, image_size, image_size, device=weight.device, dtype=weight.dtype)
    was_training = model.training
    model.eval()  # eval so BatchNorm running statistics are left untouched
    try:
        # FlopCounterMode already counts 2 FLOPs per MAC for conv/matmul and nothing for BN/SiLU/pooling
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image)
    finally:
        model.train(was_training)
    return {"params": params, "gflops": counter.get_total_flops() / 1e9}
