"""Official ultralytics/yolov5 checkpoints (v6.0 to v7.0 detection models) as yolofps models, without running code.

A yolov5 `.pt` is a torch zip whose pickle rebuilds the repo's own classes (`models.yolo.DetectionModel`,
`models.common.C3`, ... or `yolov5.models.*` from the PyPI package), so it loads only inside that repo, and loading it
with `torch.load(weights_only=False)` runs whatever the file says. Here torch's weights-only unpickler does the
loading: it rebuilds tensors and plain containers and refuses every other global. The yolov5 and `torch.nn` class
names a checkpoint holds are admitted as *stand-ins*: attribute bags (`_Inert`) with none of the original's code.
Before anything is unpickled the file's globals are listed, and a checkpoint naming anything else (`os.system`,
an unknown module) is refused with the names it held.

From the stand-ins we read the weights (every `_parameters` / `_buffers` entry, by the module path the repo uses,
which is also yolofps's) and the architecture: the layer classes and their `from` indices must be the v6 topology
`ArchSpec` expresses; widths come from the weight shapes (so any `width_multiple` / `depth_multiple` works), anchors
and strides from the Detect head's buffers (what training used, autoanchor included), class names from the model.
Then every conv's kernel / stride / padding / groups, every bottleneck's shortcut and the activation are compared
with the yolofps model built from that spec, and the weights load with `strict=True`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from yolofps.errors import YolofpsError
from yolofps.fileio import content_sha256
from yolofps.model.spec import LAYER_KINDS, ArchSpec, LayerSpec
from yolofps.model.yolo import SOURCES, YOLOv5

SUPPORTED = ("ultralytics/yolov5 v6.0-v7.0 anchor-based detection models (P3-P5, Conv 6x6 stem, C3, SPPF, Detect; "
             "any depth/width multiple, class count and anchors)")


class CheckpointImportError(YolofpsError):
    """A yolov5 checkpoint that cannot be imported; the message names the file and what was found."""


class UnsafeCheckpointError(CheckpointImportError):
    """The checkpoint's pickle names globals that are neither tensors nor yolov5 / torch.nn classes: never loaded."""


class UnsupportedArchitectureError(CheckpointImportError):
    """A yolov5-family model yolofps cannot express (Focus stem, segmentation, classification, anchor-free, P6)."""


class _Inert:
    """What a pickled yolov5 object becomes here: its attributes, and none of its code."""

    upstream: ClassVar[str] = ""  # the class the pickle named, e.g. `models.common.C3`

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls the class with the pickled arguments
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"_state": state})


def _ignored(*args: Any) -> None:
    """Stand-in for a call in the pickle whose result is not needed (see `_IGNORED`)."""
    return None


_YOLOV5_CLASSES = ("DetectionModel", "Model", "SegmentationModel", "ClassificationModel", "Detect", "Segment",
                   "Proto", "Classify", "Conv", "C3", "Bottleneck", "SPPF", "SPP", "Focus", "Concat", "DWConv",
                   "BottleneckCSP", "C3TR", "C3SPP", "C3Ghost", "C3x", "GhostConv", "GhostBottleneck", "CrossConv",
                   "Contract", "Expand", "TransformerBlock", "TransformerLayer")
_YOLOV5_MODULES = ("models.yolo", "models.common", "models.experimental")
_TORCH_NN = ("conv.Conv2d", "batchnorm.BatchNorm2d", "activation.SiLU", "activation.ReLU", "activation.LeakyReLU",
             "activation.Hardswish", "activation.Sigmoid", "container.Sequential", "container.ModuleList",
             "pooling.MaxPool2d", "pooling.AdaptiveAvgPool2d", "upsampling.Upsample", "linear.Identity",
             "linear.Linear", "dropout.Dropout", "flatten.Flatten")
_METADATA = ("pathlib.PosixPath", "pathlib.WindowsPath", "pathlib._local.PosixPath", "pathlib._local.WindowsPath",
             "argparse.Namespace", "numpy.dtype", "numpy.ndarray")
# calls whose results are not needed, answered with None instead of being made: numpy scalars in training metadata,
# and the `getattr(Detect, "forward")` a Segment head pickles (refused later anyway; a real getattr is never run)
_IGNORED = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.core.multiarray._reconstruct",
            "numpy._core.multiarray._reconstruct", "_codecs.encode", "builtins.getattr")


def _stand_ins() -> dict[str, Any]:
    """Every admitted global name -> its inert stand-in (a class per name, so a bag says what it was)."""
    names = [f"{prefix}{module}.{cls}" for prefix in ("", "yolov5.") for module in _YOLOV5_MODULES
             for cls in _YOLOV5_CLASSES]
    names += [f"torch.nn.modules.{path}" for path in _TORCH_NN] + list(_METADATA)
    admitted: dict[str, Any] = {name: type(name.rsplit(".", 1)[1], (_Inert,), {"upstream": name}) for name in names}
    return admitted | dict.fromkeys(_IGNORED, _ignored)


STAND_INS = _stand_ins()


@dataclass
class ImportedCheckpoint:
    """A yolofps model made from an official checkpoint, with what the checkpoint said about itself."""

    model: YOLOv5
    names: list[str]
    source: dict[str, Any] = field(default_factory=dict)  # file, sha256, upstream class, epoch, date, weights_from


def import_checkpoint(path: str | Path) -> ImportedCheckpoint:
    """Read an official yolov5 `.pt` safely and return the equivalent yolofps model (fp32, eval mode)."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    root, weights_from = _model_object(checkpoint, path)
    try:  # the stand-ins hold whatever the file said: a missing or ill-typed attribute is the file's fault
        model, stored = _rebuild(path, root)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointImportError(f"{path}: not a well-formed yolov5 model ({type(err).__name__}: "
                                    f"{_first_line(err)}); supported: {SUPPORTED}") from None
    names = _names(root, model.spec.num_classes)
    meta = checkpoint if isinstance(checkpoint, dict) else {}
    options = meta.get("opt") if isinstance(meta.get("opt"), dict) else {}
    imgsz = options.get("imgsz", options.get("img_size"))
    imgsz = imgsz[0] if isinstance(imgsz, (list, tuple)) and imgsz else imgsz
    source = {"imgsz": imgsz if isinstance(imgsz, int) and imgsz >= 32 else None, "file": path.name,
              "sha256": content_sha256(path), "upstream_class": type(root).upstream,
              "weights_from": weights_from, "epoch": meta.get("epoch"), "date": meta.get("date"),
              "dtype": str(next(iter(stored.values())).dtype).removeprefix("torch."),
              "yaml": _plain(getattr(root, "yaml", None))}
    return ImportedCheckpoint(model.eval(), names, source)


def _rebuild(path: Path, root: _Inert) -> tuple[YOLOv5, dict[str, torch.Tensor]]:
    """The yolofps model equivalent to the stand-in tree, weights loaded (fp32); also the weights as stored."""
    layers = _layers(root, path)
    model = YOLOv5(_spec(path, root, layers))
    _check_same_build(path, root, model)
    stored = _state_dict(root)
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in stored.items()}, strict=True)
    except RuntimeError as err:
        raise UnsupportedArchitectureError(f"{path}: its weights do not fit the architecture read from it: "
                                           f"{_first_line(err)}; supported: {SUPPORTED}") from None
    return model, stored


def read_checkpoint(path: Path) -> Any:
    """The checkpoint's object tree, yolov5 classes as stand-ins; refuses foreign globals before unpickling."""
    if not path.is_file():
        raise CheckpointImportError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise CheckpointImportError(f"{path}: not a torch zip checkpoint (yolov5 v6.0+ saves them with torch >= "
                                    "1.6); re-save it with torch.save in the yolov5 repo, or it is damaged")
    # an untrusted file: whatever the reader raises on it (a truncated zip, a garbled pickle) is the file's fault
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:
        raise CheckpointImportError(f"{path}: unreadable checkpoint ({_first_line(err)})") from None
    foreign = sorted(g for g in found if g not in STAND_INS)
    if any(g.startswith("ultralytics.") for g in foreign):
        raise UnsupportedArchitectureError(
            f"{path}: a model of the `ultralytics` package (anchor-free yolov5*u, YOLOv8 and later: "
            f"{', '.join(foreign[:4])}, ...); supported: {SUPPORTED}")
    if foreign:
        raise UnsafeCheckpointError(f"{path}: refused without unpickling anything: it names globals that are not "
                                    f"tensors or yolov5 / torch.nn classes: {', '.join(foreign)}")
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in STAND_INS.items()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointImportError(f"{path}: could not be read safely: {_first_line(err)}") from None


def _model_object(checkpoint: Any, path: Path) -> tuple[_Inert, str]:
    """upstream's choice: the EMA weights when the checkpoint has them, else `model` (or a bare pickled model)."""
    if isinstance(checkpoint, _Inert):
        return checkpoint, "model"
    if not isinstance(checkpoint, dict):
        raise CheckpointImportError(f"{path}: expected a yolov5 checkpoint dict with 'model', got "
                                    f"{type(checkpoint).__name__}")
    for key in ("ema", "model"):
        if isinstance(checkpoint.get(key), _Inert):
            return checkpoint[key], key
    raise CheckpointImportError(f"{path}: no model in it (keys: {sorted(map(str, checkpoint))}); a yolov5 "
                                "checkpoint holds one under 'model' or 'ema'")


def _kind(obj: Any) -> str:
    return type(obj).__name__


def _children(obj: _Inert) -> dict[str, Any]:
    return dict(getattr(obj, "_modules", None) or {})


def _layers(root: _Inert, path: Path) -> list[_Inert]:
    """The model's layer list, refused with a named reason unless it is the v6 detection topology."""
    root_kind = _kind(root)
    if root_kind in ("SegmentationModel", "ClassificationModel"):
        raise UnsupportedArchitectureError(f"{path}: a yolov5 {root_kind} ({type(root).upstream}); yolofps imports "
                                           f"detection models only; supported: {SUPPORTED}")
    sequence = _children(root).get("model")
    if root_kind not in ("DetectionModel", "Model") or sequence is None:
        raise UnsupportedArchitectureError(f"{path}: the model is a {type(root).upstream or root_kind}; "
                                           f"supported: {SUPPORTED}")
    layers = list(_children(sequence).values())
    kinds = tuple(_kind(layer) for layer in layers)
    expected = (*LAYER_KINDS, "Detect")
    if kinds == expected:
        _check_routing(path, layers)
        return layers
    if kinds and kinds[0] == "Focus":
        reason = "a Focus stem (yolov5 v5.0 and earlier; v6.0 replaced it with a 6x6 Conv)"
    elif "Segment" in kinds:
        reason = "a segmentation head (Segment)"
    elif "SPP" in kinds:
        reason = "SPP instead of SPPF (yolov5 v5.0 and earlier)"
    elif len(kinds) != len(expected):
        reason = f"{len(kinds)} layers, not the {len(expected)} of the P3-P5 topology (a P6 model has four outputs)"
    else:
        diff = [f"{i}: {k} (expected {e})" for i, (k, e) in enumerate(zip(kinds, expected)) if k != e]
        reason = f"layers that differ from the v6 topology: {', '.join(diff)}"
    raise UnsupportedArchitectureError(f"{path}: {reason}; supported: {SUPPORTED}")


def _check_routing(path: Path, layers: list[_Inert]) -> None:
    """Each layer's `from` (upstream's routing) must be the one yolofps's YOLOv5 wires."""
    for i, layer in enumerate(layers):
        got = getattr(layer, "f", -1)
        got = tuple(got) if isinstance(got, (list, tuple)) else (got,)
        if got != SOURCES.get(i, (-1,)):
            raise UnsupportedArchitectureError(f"{path}: layer {i} ({_kind(layer)}) takes its input from {list(got)}, "
                                               f"the v6 topology from {list(SOURCES.get(i, (-1,)))}; "
                                               f"supported: {SUPPORTED}")


def _out(layer: _Inert, *names: str) -> int:
    """Output channels of the conv at `layer.<names...>.conv` (its weight's first dimension)."""
    node: Any = layer
    for name in names:
        node = _children(node)[name]
    return int(node._parameters["weight"].shape[0])


def _layer_spec(layer: _Inert) -> LayerSpec:
    kind = _kind(layer)
    if kind == "Conv":
        return LayerSpec(kind, _out(layer, "conv"))
    if kind == "C3":
        bottlenecks = _children(_children(layer)["m"]).values()
        return LayerSpec(kind, _out(layer, "cv3", "conv"), _out(layer, "cv1", "conv"), _out(layer, "cv2", "conv"),
                         tuple(_out(b, "cv1", "conv") for b in bottlenecks))
    if kind == "SPPF":
        return LayerSpec(kind, _out(layer, "cv2", "conv"), hidden_channels=_out(layer, "cv1", "conv"))
    return LayerSpec(kind)


def _spec(path: Path, root: _Inert, layers: list[_Inert]) -> ArchSpec:
    """The ArchSpec of the checkpoint: widths from the weights, anchors and strides from the Detect head."""
    detect = layers[-1]
    strides = [int(s) for s in detect.stride.tolist()]
    anchors = detect._buffers["anchors"].float() * detect.stride.float().view(-1, 1, 1)  # grid units -> pixels
    activations = {_kind(_children(conv)["act"]) for conv in _modules_of(root, "Conv")}
    if len(activations) != 1 or not activations <= {"SiLU", "ReLU"}:
        raise UnsupportedArchitectureError(f"{path}: Conv activations {sorted(activations)}; yolofps builds SiLU "
                                           f"(upstream's) or ReLU in every Conv; supported: {SUPPORTED}")
    name = Path(str(getattr(root, "yaml_file", "") or path.stem)).stem or "yolov5"
    try:
        return ArchSpec(name=name, num_classes=int(detect.nc),
                        anchors=tuple(tuple(round(v, 4) for v in row.flatten().tolist()) for row in anchors),
                        strides=tuple(strides), layers=tuple(_layer_spec(layer) for layer in layers[:-1]),
                        activation=activations.pop().lower())
    except (ValueError, KeyError, AttributeError) as err:
        raise UnsupportedArchitectureError(f"{path}: {err}; supported: {SUPPORTED}") from None


def _modules_of(root: _Inert, kind: str) -> Iterator[_Inert]:
    """Every stand-in of one class in the tree, depth first."""
    return (module for _, module in _named_modules(root) if _kind(module) == kind)


def _check_same_build(path: Path, root: _Inert, model: YOLOv5) -> None:
    """The built model runs what the checkpoint ran: conv geometry, shortcuts and upsampling agree module by module."""
    theirs = dict(_named_modules(root))
    for name, module in model.named_modules():
        other = theirs.get(name)
        if isinstance(module, nn.Conv2d) and other is not None:
            ours = (module.kernel_size, module.stride, module.padding, module.groups)
            got = tuple(tuple(v) if isinstance(v, (list, tuple)) else v
                        for v in (other.kernel_size, other.stride, other.padding, other.groups))
            if ours != got:
                raise UnsupportedArchitectureError(f"{path}: {name} is a conv with (kernel, stride, padding, groups) "
                                                   f"{got}, yolofps builds {ours}; supported: {SUPPORTED}")
        elif hasattr(module, "add") and other is not None and bool(getattr(other, "add", None)) != module.add:
            raise UnsupportedArchitectureError(f"{path}: {name} has shortcut={getattr(other, 'add', None)}, yolofps "
                                               f"builds shortcut={module.add}; supported: {SUPPORTED}")
        elif isinstance(module, nn.MaxPool2d) and other is not None and (
                (module.kernel_size, module.stride, module.padding)
                != (other.kernel_size, other.stride, other.padding)):
            raise UnsupportedArchitectureError(f"{path}: {name} pools with kernel {other.kernel_size}, yolofps's SPPF "
                                               f"with {module.kernel_size}; supported: {SUPPORTED}")
        elif isinstance(module, nn.Upsample) and other is not None and (
                float(other.scale_factor or 0) != 2.0 or other.mode != "nearest"):
            raise UnsupportedArchitectureError(f"{path}: {name} upsamples x{other.scale_factor} {other.mode}; yolofps "
                                               f"builds x2 nearest; supported: {SUPPORTED}")


def _named_modules(node: _Inert, prefix: str = "") -> Iterator[tuple[str, _Inert]]:
    for name, child in _children(node).items():
        if isinstance(child, _Inert):
            full = f"{prefix}{name}"
            yield full, child
            yield from _named_modules(child, full + ".")


def _state_dict(root: _Inert) -> dict[str, torch.Tensor]:
    """What `root.state_dict()` would have been in the repo: parameters and persistent buffers by module path."""
    state: dict[str, torch.Tensor] = {}
    for prefix, node in [("", root), *((f"{n}.", m) for n, m in _named_modules(root))]:
        skip = set(getattr(node, "_non_persistent_buffers_set", ()) or ())
        for group in ("_parameters", "_buffers"):
            for key, tensor in (getattr(node, group, None) or {}).items():
                if tensor is not None and key not in skip:
                    state[prefix + key] = tensor.detach()
    return state


def _names(root: _Inert, num_classes: int) -> list[str]:
    """Class names as a list (upstream stores a list or {index: name}); numbered names when it has none."""
    names = getattr(root, "names", None)
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, (list, tuple)) or len(names) != num_classes:
        return [f"class{i}" for i in range(num_classes)]
    return [str(n) for n in names]


def _first_line(err: BaseException) -> str:
    return (str(err).strip() or type(err).__name__).splitlines()[0][:300]


def _plain(value: Any) -> Any:
    """The checkpoint's model yaml as plain JSON-able values (for meta.json)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
