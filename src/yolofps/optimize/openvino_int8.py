"""OpenVINO INT8: NNCF post-training quantization of an exported detector, optionally with accuracy control.

Plain PTQ (`nncf.quantize`) calibrates FakeQuantize ranges on a few hundred images. With accuracy control
(`nncf.quantize_with_accuracy_control`), NNCF then validates the float and the INT8 model with the caller's metric
(COCO mAP) and, while the drop exceeds `max_drop`, reverts the operations that cost the most back to float. That
is slow: each ranking round compiles one candidate per group of quantizers (about 100 in a YOLOv5, ~1 s each on
2 cores) and validates it on up to `subset_size` items.

As in `quantize.py` (onnxruntime#10787), the Detect decode and the three Detect convs stay float by default: the
convs' outputs mix xy, wh, objectness and class logits, and the decode mixes pixel boxes with 0..1 scores. Left to
itself NNCF would quantize the Detect convs (inputs and weights) and the inputs of the wh Power ops, though not the
final Concat (on the tiny test model that cost little: score error 0.0076 vs 0.0073). OpenVINO keeps the ONNX node
names as friendly names (a Conv with bias becomes `<name>/WithoutBiases` + an Add `<name>`), but the final Concat
is renamed after the output and an IR has no ONNX graph, so the decode is found by walking the ov.Model itself.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yolofps.runtime import openvino as ovr
from yolofps.runtime.pipeline import Backend

MAX_LISTED = 50  # reverted operation names kept in the result (the count is always complete)
# NNCF 3.4's accuracy restorer (quantization/algorithms/accuracy_control/algorithm.py) returns only the model; what
# it reverted is in its INFO log: one line per step, and a final report unless it had to revert every group
_STEP = re.compile(r"^Reverted \d+ operations to the floating-point precision")
_REPORT = re.compile(r"^(\d+) out of \d+ were reverted back to the floating-point precision")


@dataclass(frozen=True)
class Int8Result:
    """What an OpenVINO INT8 quantization wrote, and the metrics it was judged by (None without a metric)."""

    folder: Path  # IR folder written (model.xml + model.bin)
    metric_fp32: float | None  # the validation metric of the float model
    metric_int8: float | None  # of the INT8 model that was written
    reverted_layers: int  # operations NNCF reverted to float to meet max_drop (0 with plain PTQ)
    reverted: list[str]  # their names, the first MAX_LISTED
    calibration_images: int
    accuracy_control: bool

    def to_json(self) -> dict:
        """A JSON-ready dict (the folder as a string)."""
        return {**dataclasses.asdict(self), "folder": str(self.folder)}


@dataclass(frozen=True)
class AccuracyControl:
    """NNCF's accuracy control: the items to validate on, the metric (higher is better), the allowed absolute drop."""

    items: Sequence[Any]  # whatever `metric` reads (the quantize stage: its val loader's batches)
    metric: Callable[[Backend, Sequence[Any]], float]  # the quantize stage: COCO mAP50-95 through a runtime pipeline
    max_drop: float


def _nncf() -> Any:
    """NNCF, imported on use (it takes seconds), with its usage telemetry off like the project's other tools."""
    # NNCF sends Google Analytics events unless NNCF_CI is set when it is first imported (telemetry/wrapper.py)
    os.environ.setdefault("NNCF_CI", "1")
    import nncf

    return nncf


def detect_head_ops(model: Any) -> tuple[list[str], list[str]]:
    """(decode ops, Detect convs) of an ov.Model: a walk back from its outputs to the first Convolution on each path."""
    decode: dict[str, Any] = {}
    convs: dict[str, Any] = {}
    pending = [result.input_value(0).get_node() for result in model.get_results()]
    while pending:
        node = pending.pop()
        name = node.get_friendly_name()
        if name in decode or name in convs:
            continue
        if node.get_type_name() == "Convolution":
            convs[name] = node  # the head's 1x1 convs (their bias Add is part of the decode): the walk stops here
            continue
        decode[name] = node
        if node.get_type_name() == "ShapeOf":
            continue  # it reads only its input's shape: what made that input is not part of the decode
        pending.extend(port.get_source_output().get_node() for port in node.inputs())
    # constants are no graph nodes to NNCF: leaving them out lets the ignored scope check every name it gets
    return [n for n, node in decode.items() if node.get_type_name() != "Constant"], list(convs)


class _RevertLog(logging.Handler):
    """Collects the operation names NNCF's accuracy restorer logs as reverted to float."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.steps: list[str] = []  # every step's names, including steps it later undid
        self.report: tuple[int, list[str]] | None = None  # the final report: exactly what the returned model kept

    def emit(self, record: logging.LogRecord) -> None:
        first, *rest = record.getMessage().split("\n")
        names = [line.strip() for line in rest if line.strip()]
        if _STEP.match(first):
            self.steps.extend(n for n in names if n not in self.steps)
        elif match := _REPORT.match(first):
            self.report = int(match.group(1)), names

    def reverted(self) -> tuple[int, list[str]]:
        """(how many, names): no final report means nothing was reverted, or every group was (each in a step)."""
        return self.report if self.report is not None else (len(self.steps), self.steps)


@contextmanager
def _capture_reverts(nncf_logger: logging.Logger) -> Iterator[_RevertLog]:
    """NNCF's logger with a `_RevertLog` attached (and at INFO at least) for the duration; NNCF's own handlers
    print warnings only meanwhile (at INFO they print a line per ignored or quantized operation, ~200 for yolov5n)."""
    handler, level = _RevertLog(), nncf_logger.level
    own = [(h, h.level) for h in nncf_logger.handlers]
    for h, _ in own:
        h.setLevel(max(h.level, logging.WARNING))
    nncf_logger.addHandler(handler)
    nncf_logger.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield handler
    finally:
        nncf_logger.removeHandler(handler)
        nncf_logger.setLevel(level)
        for h, was in own:
            h.setLevel(was)


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextmanager
def _keep_signal_stack() -> Iterator[None]:
    """Restore this thread's alternate signal stack after NNCF has created and dropped its own OpenVINO Cores.

    OpenVINO's CPU plugin installs an alternate signal stack per Core and, when the Core goes, puts back the one it
    found and unmaps its own. NNCF compiles through throw-away Cores (`ov.compile_model`) that end out of order,
    so the last one puts back a stack already unmapped, and the next signal Python handles (SIGCHLD, SIGINT)
    kills the process with SIGSEGV (seen in the test suite; reproduced with two `ov.compile_model` calls deleted
    first-in first-out). The runtime itself keeps one Core for the process, which never goes.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        saved = _SignalStack()
        libc.sigaltstack(None, ctypes.byref(saved))
    except (OSError, AttributeError):  # no sigaltstack here (not Linux): nothing to protect
        yield
        return
    try:
        yield
    finally:
        gc.collect()  # NNCF's compiled models and Cores go now, each putting back what it found
        libc.sigaltstack(ctypes.byref(saved), None)


def _validation_fn(validate: Callable[[Backend, Sequence[Any]], float]) -> Callable[[Any, Any], float]:
    """NNCF's validation_fn(compiled model, items) -> float over the project's validate(backend, items)."""
    # NNCF compiles each candidate itself (CPU, f32 inference precision) and hands over an iterable of items; it
    # also calls this with one item at a time (a one-image mAP) to choose the items it ranks the groups on
    return lambda compiled, items: float(validate(ovr.OpenVinoBackend.from_compiled(compiled), list(items)))


def _options(nncf: Any, model: Any, keep_head_float: bool, keep_float: Sequence[str], subset_size: int) -> dict:
    """The quantization settings shared by plain PTQ and accuracy control."""
    decode, head_convs = detect_head_ops(model)
    names = decode + head_convs if keep_head_float else []
    # validate=True (the default): a name or pattern matching nothing is an error, not a decode silently quantized
    ignored = nncf.IgnoredScope(names=names, patterns=list(keep_float)) if names or keep_float else None
    # preset MIXED: symmetric int8 weights, asymmetric activations. Most activations here are SiLU outputs
    # (-0.28 .. +x) and the input is 0..1: a symmetric signed scale would waste about half of the 256 levels on
    # negatives that barely occur (POT/NNCF docs: "useful for ... non-ReLU based CNN"; on the tiny test model
    # PERFORMANCE's score error was slightly larger, 0.0076 vs 0.0073). model_type stays None: the only other
    # choice, ModelType.TRANSFORMER, adds attention patterns. target_device CPU: the rules of the CPU plugin.
    return dict(preset=nncf.QuantizationPreset.MIXED, target_device=nncf.TargetDevice.CPU, subset_size=subset_size,
                ignored_scope=ignored)


def quantize_openvino_int8(fp32_model: Path, out_folder: Path, calibration: Sequence[np.ndarray],
                           control: AccuracyControl | None = None, *, keep_head_float: bool = True,
                           subset_size: int = 300, keep_float: Sequence[str] = ()) -> Int8Result:
    """INT8 IR of `fp32_model` (ONNX or IR) in `out_folder`; with `control`, at most `control.max_drop` below float.

    `keep_float`: regular expressions of more operation names to leave float (e.g. the stem, `^/model\\.0/`).
    """
    if len(calibration) == 0:
        raise ValueError("quantize_openvino_int8: calibration gave no images (float32 [1, 3, S, S] arrays expected)")
    if control is not None and not control.items:
        raise ValueError("quantize_openvino_int8: accuracy control needs validation items, got none")
    nncf = _nncf()
    model = ovr.read_model(fp32_model)
    options = _options(nncf, model, keep_head_float, keep_float, subset_size)
    calibration_set = nncf.Dataset(list(calibration))
    with _keep_signal_stack(), _capture_reverts(logging.getLogger("nncf")) as log:  # plain PTQ reverts nothing
        if control is None:
            quantized = nncf.quantize(model, calibration_set, **options)
        else:
            quantized = nncf.quantize_with_accuracy_control(
                model, calibration_dataset=calibration_set, validation_dataset=nncf.Dataset(list(control.items)),
                validation_fn=_validation_fn(control.metric), max_drop=control.max_drop,
                drop_type=nncf.DropType.ABSOLUTE, **options)
    count, reverted = log.reverted()
    # NNCF already stores the quantized weights as int8; save_ir keeps the float ones fp32 (no fp16 compression)
    folder = ovr.save_ir(quantized, out_folder)
    metric_fp32 = metric_int8 = None
    if control is not None:
        # measured again on the files, as the bench runs them (NNCF's own figures are of its in-memory copies)
        metric_fp32 = float(control.metric(ovr.OpenVinoBackend(fp32_model, dtype="fp32"), control.items))
        metric_int8 = float(control.metric(ovr.OpenVinoBackend(folder, dtype="int8"), control.items))
    return Int8Result(folder=folder, metric_fp32=metric_fp32, metric_int8=metric_int8, reverted_layers=count,
                      reverted=reverted[:MAX_LISTED], calibration_images=min(len(calibration), subset_size),
                      accuracy_control=control is not None)
