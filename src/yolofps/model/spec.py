"""ArchSpec: a complete, explicit description of a YOLOv5 v6 model (so a pruned model is just another spec)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# P3/8, P4/16, P5/32 anchors in input pixels, 3 (w, h) pairs per level (yolov5 v6 default)
DEFAULT_ANCHORS = ((10.0, 13.0, 16.0, 30.0, 33.0, 23.0), (30.0, 61.0, 62.0, 45.0, 59.0, 119.0),
                   (116.0, 90.0, 156.0, 198.0, 373.0, 326.0))  # fmt: skip
DEFAULT_STRIDES = (8, 16, 32)

# yolov5s.yaml (v6) at depth = width = 1.0, layers 0..23 (24 is Detect): (kind, width, repeats)
_BASE_LAYERS = (
    ("Conv", 64, 1), ("Conv", 128, 1), ("C3", 128, 3), ("Conv", 256, 1), ("C3", 256, 6),  # 0-4
    ("Conv", 512, 1), ("C3", 512, 9), ("Conv", 1024, 1), ("C3", 1024, 3), ("SPPF", 1024, 1),  # 5-9
    ("Conv", 512, 1), ("Upsample", 0, 1), ("Concat", 0, 1), ("C3", 512, 3),  # 10-13
    ("Conv", 256, 1), ("Upsample", 0, 1), ("Concat", 0, 1), ("C3", 256, 3),  # 14-17
    ("Conv", 256, 1), ("Concat", 0, 1), ("C3", 512, 3),  # 18-20
    ("Conv", 512, 1), ("Concat", 0, 1), ("C3", 1024, 3),  # 21-23
)  # fmt: skip
LAYER_KINDS: tuple[str, ...] = tuple(kind for kind, _, _ in _BASE_LAYERS)

# official (depth_multiple, width_multiple); 'tiny' exists only for fast tests
PRESETS: dict[str, tuple[float, float]] = {
    "n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25),
    "tiny": (0.33, 0.125),
}  # fmt: skip

# the fields each layer kind carries in its dict form (besides 'kind')
_LAYER_FIELDS: dict[str, tuple[str, ...]] = {
    "Conv": ("out_channels",),
    "C3": ("out_channels", "hidden_channels", "bypass_channels", "bottleneck_channels"),
    "SPPF": ("out_channels", "hidden_channels"),
    "Upsample": (),
    "Concat": (),
}
_SPEC_FIELDS = ("name", "num_classes", "anchors", "strides", "layers", "activation")
# The activation of every Conv block. SiLU is upstream's; ReLU is the CPU deployment choice: ONNX Runtime fuses
# Conv + ReLU into one kernel, while SiLU stays a separate pass over each feature map (yolov5n pruned 0.5 @320,
# 1 thread: 4.6 -> 3.9 ms). Specs written before the field existed mean SiLU.
ACTIVATIONS = ("silu", "relu")


@dataclass(frozen=True)
class LayerSpec:
    """Widths of one layer; fields a kind does not use stay 0 / empty."""

    kind: str  # Conv | C3 | SPPF | Upsample | Concat
    out_channels: int = 0  # 0 for Upsample/Concat: their width follows their inputs
    hidden_channels: int = 0  # C3: cv1 width (= residual width of its bottlenecks); SPPF: cv1 width
    bypass_channels: int = 0  # C3: cv2 width (the cross-stage path that skips the bottlenecks)
    bottleneck_channels: tuple[int, ...] = ()  # C3: inner width of each Bottleneck; len = repeats

    @property
    def repeats(self) -> int:
        """Number of Bottlenecks in a C3."""
        return len(self.bottleneck_channels)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict holding only the fields this kind uses."""
        out: dict[str, Any] = {"kind": self.kind}
        for key in _LAYER_FIELDS[self.kind]:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], index: int) -> LayerSpec:
        """Inverse of to_dict; ValueError on unknown kinds, missing or unknown keys, bad values."""
        kind = data.get("kind")
        if kind not in _LAYER_FIELDS:
            raise ValueError(f"layers[{index}]: unknown kind {kind!r}, expected one of {sorted(_LAYER_FIELDS)}")
        _check_keys(data, ("kind", *_LAYER_FIELDS[kind]), f"layers[{index}]")
        values = {key: data[key] for key in _LAYER_FIELDS[kind]}
        for key, value in values.items():
            where = f"layers[{index}].{key}"
            values[key] = tuple(_int(v, where) for v in value) if key == "bottleneck_channels" else _int(value, where)
        return cls(kind=kind, **values)


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to build a YOLOv5 v6 model: classes, anchors, strides and every layer width."""

    name: str
    num_classes: int
    anchors: tuple[tuple[float, ...], ...]  # per level: (w0, h0, w1, h1, ...) in input pixels
    strides: tuple[int, ...]  # per level, input pixels per grid cell
    layers: tuple[LayerSpec, ...]  # layers[i] describes model.i for i in 0..23
    activation: str = "silu"  # of every Conv block: silu (upstream) | relu (fuses into the conv in ONNX Runtime)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.anchors) != len(self.strides) or len({len(a) for a in self.anchors}) != 1:
            raise ValueError("anchors must have one row per stride, all rows the same length")
        if len(self.anchors[0]) % 2 or not self.anchors[0]:
            raise ValueError("each anchor row must hold (w, h) pairs")
        kinds = tuple(layer.kind for layer in self.layers)
        if kinds != LAYER_KINDS:
            raise ValueError(f"layers must follow the YOLOv5 v6 topology {LAYER_KINDS}, got {kinds}")
        for i, layer in enumerate(self.layers):
            widths = [getattr(layer, key) for key in _LAYER_FIELDS[layer.kind] if key != "bottleneck_channels"]
            if any(w < 1 for w in (*widths, *layer.bottleneck_channels)):
                raise ValueError(f"layers[{i}] ({layer.kind}) has a non-positive width: {layer}")

    @property
    def num_anchors(self) -> int:
        """Anchors per level."""
        return len(self.anchors[0]) // 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; from_dict(to_dict()) == self."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "anchors": [list(row) for row in self.anchors],
            "strides": list(self.strides),
            "layers": [layer.to_dict() for layer in self.layers],
            "activation": self.activation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        """Build from a dict; ValueError on unknown or missing keys and on ill-typed values."""
        if isinstance(data, dict):  # anything else is refused by _check_keys with a named error
            data = {"activation": "silu"} | data  # written before activations were configurable
        _check_keys(data, _SPEC_FIELDS, "ArchSpec")
        if not isinstance(data["name"], str):
            raise ValueError(f"ArchSpec.name must be a string, got {data['name']!r}")
        anchors = tuple(tuple(_float(v, "anchors") for v in row) for row in data["anchors"])
        strides = tuple(_int(v, "strides") for v in data["strides"])
        layers = tuple(LayerSpec.from_dict(layer, i) for i, layer in enumerate(data["layers"]))
        if not isinstance(data["activation"], str):
            raise ValueError(f"ArchSpec.activation must be a string, got {data['activation']!r}")
        return cls(data["name"], _int(data["num_classes"], "num_classes"), anchors, strides, layers,
                   data["activation"])

    def to_json(self, path: str | Path) -> None:
        """Write the spec as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ArchSpec:
        """Read a spec written by to_json."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def make_divisible(x: float, divisor: int = 8) -> int:
    """Round x up to a multiple of divisor (yolov5's channel rounding)."""
    return math.ceil(x / divisor) * divisor


def preset(name: str, num_classes: int) -> ArchSpec:
    """Official YOLOv5 v6 model ('n', 's', 'm', 'l', 'x', or 'yolov5s' etc.) or the test-only 'tiny'."""
    key = name.removeprefix("yolov5")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}, expected one of {sorted(PRESETS)}")
    depth, width = PRESETS[key]
    layers = []
    prev_out = 0
    for kind, base_width, base_repeats in _BASE_LAYERS:
        out = make_divisible(base_width * width)
        if kind == "Conv":
            layers.append(LayerSpec(kind, out))
        elif kind == "C3":
            hidden = out // 2  # upstream e=0.5, and e=1.0 inside its bottlenecks
            repeats = max(round(base_repeats * depth), 1)
            layers.append(LayerSpec(kind, out, hidden, hidden, (hidden,) * repeats))
        elif kind == "SPPF":
            layers.append(LayerSpec(kind, out, hidden_channels=prev_out // 2))
        else:
            layers.append(LayerSpec(kind))
        prev_out = out
    return ArchSpec(f"yolov5{key}", num_classes, DEFAULT_ANCHORS, DEFAULT_STRIDES, tuple(layers))


def _check_keys(data: Any, expected: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown, missing = sorted(set(data) - set(expected)), sorted(set(expected) - set(data))
    problems = ([f"unknown keys {unknown}"] if unknown else []) + ([f"missing keys {missing}"] if missing else [])
    if problems:
        raise ValueError(f"{where}: {', '.join(problems)} (expected exactly {list(expected)})")


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)
