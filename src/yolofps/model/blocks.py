"""YOLOv5 v6 building blocks (ultralytics/yolov5 models/common.py), with every width explicit.

Attribute names (conv, bn, act, cv1, cv2, cv3, m) match upstream so official state dicts load by key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU}  # spec.ACTIVATIONS


def make_activation(name: str) -> nn.Module:
    """The activation module named `name` (one of spec.ACTIVATIONS: why ReLU exists is explained there)."""
    if name not in _ACTIVATION_MODULES:
        raise ValueError(f"unknown activation {name!r}, expected one of {sorted(_ACTIVATION_MODULES)}")
    return _ACTIVATION_MODULES[name]()


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + activation (SiLU by default), 'same' padding by default."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        act: str = "silu",
    ) -> None:
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        # yolov5's initialize_weights() sets these BN hyper-parameters; we bake them in
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.03)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 conv -> 3x3 conv, with a residual add when shapes allow it."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, shortcut: bool = True,
                 act: str = "silu") -> None:
        super().__init__()
        self.cv1 = Conv(in_channels, hidden_channels, 1, 1, act=act)
        self.cv2 = Conv(hidden_channels, out_channels, 3, 1, act=act)
        self.add = shortcut and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with 3 convs: cv1 -> bottlenecks, cv2 bypass, concat, cv3.

    Upstream uses one hidden width c_ = out/2 for cv1, cv2 and the bottlenecks; we keep them separate
    (hidden, bypass, per-bottleneck inner width) so a structured pruner can shrink each independently.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int,
        bypass_channels: int,
        bottleneck_channels: Sequence[int],
        shortcut: bool = True,
        act: str = "silu",
    ) -> None:
        super().__init__()
        self.cv1 = Conv(in_channels, hidden_channels, 1, 1, act=act)
        self.cv2 = Conv(in_channels, bypass_channels, 1, 1, act=act)
        self.cv3 = Conv(hidden_channels + bypass_channels, out_channels, 1, 1, act=act)
        self.m = nn.Sequential(
            *(Bottleneck(hidden_channels, hidden_channels, inner, shortcut, act) for inner in bottleneck_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools equal SPP's 5/9/13 pools."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int = 5,
                 act: str = "silu") -> None:
        super().__init__()
        self.cv1 = Conv(in_channels, hidden_channels, 1, 1, act=act)
        self.cv2 = Conv(hidden_channels * 4, out_channels, 1, 1, act=act)
        self.m = nn.MaxPool2d(kernel_size=kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), dim=1))


class Concat(nn.Module):
    """Concatenate a list of feature maps along channels."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.d = dim

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, dim=self.d)
