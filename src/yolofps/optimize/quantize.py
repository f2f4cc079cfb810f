"""CPU INT8: onnxruntime static (post-training) quantization of an exported detector, with the decode kept float.

Naive INT8 of YOLOv5 can drop mAP to 0 (onnxruntime#10787): the Detect decode joins box centres and sizes in pixels
(0..S and beyond) with scores in 0..1 in one Concat, and a single uint8 scale for it rounds the scores away. So the
decode after the three Detect convs stays float, and by default so do those convs: their outputs mix xy, wh,
objectness and class logits under one per-tensor scale, which was half the remaining error. Together they are a few
small ops on the coarse output maps and cost no measurable time.

Settings (ORT's guidance for x86 CPUs, checked here): QDQ, uint8 activations, int8 weights — the combination ORT fuses
into QLinearConv/QLinearSigmoid/QLinearMul and runs in NHWC end to end; per-channel weights (BatchNorm-folded filters
differ per channel) at no speed cost; `reduce_range` (7-bit weights) only where the CPU lacks VNNI, whose AVX2 kernels
saturate int16 sums. Quantizing only the convs and leaving SiLU float is slower: every layer then pays Q/DQ around it.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from yolofps.data import formats
from yolofps.data.dataset import letterbox

CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                       "entropy": CalibrationMethod.Entropy}


class _BatchReader(CalibrationDataReader):
    """Feeds calibration batches to the quantizer's calibration session and counts the images."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self.input_name = input_name
        self._batches = iter(batches)
        self.images = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self.images += len(batch)
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}


def detect_head_nodes(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(decode nodes, Detect convs): a walk back from the graph outputs that stops at the first Conv on each path."""
    producers = {output: node for node in model.graph.node for output in node.output}
    decode: dict[str, onnx.NodeProto] = {}
    convs: dict[str, onnx.NodeProto] = {}
    pending = [producers[o.name] for o in model.graph.output if o.name in producers]
    while pending:
        node = pending.pop()
        if node.name in decode or node.name in convs:
            continue
        if node.op_type == "Conv":
            convs[node.name] = node  # the head's 1x1 convs: the walk stops here
            continue
        decode[node.name] = node
        if node.op_type == "Shape":
            continue  # it reads only the shape of its input, so what made that input is not part of the decode
        pending.extend(producers[i] for i in node.input if i in producers)
    return list(decode), list(convs)


def quantize_static_int8(fp32_path: Path, out_path: Path, calibration: Iterable[np.ndarray], *,
                         per_channel: bool = True, keep_head_float: bool = True, keep_head_convs_float: bool = True,
                         method: str = "minmax", reduce_range: bool | None = None) -> dict:
    """QDQ INT8 (uint8 activations, int8 weights) calibrated on `calibration` batches; returns what was done."""
    # MinMax by default: in a detector the informative activations are rare (a few object cells per image), which
    # is just what a percentile or entropy range clips; reduce_range=None picks it from this CPU (quantize where
    # the model will run)
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {sorted(CALIBRATION_METHODS)}, got {method!r}")
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("quantize_static_int8: calibration gave no images")
    reduce_range = not cpu_has_vnni() if reduce_range is None else reduce_range
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX shape inference + ORT's basic graph optimizations (constant folding, fusions) before placing QDQ
        # pairs; symbolic shape inference is for transformers and trips over the decode's Range/Expand grids
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        decode, head_convs = detect_head_nodes(model)
        excluded = (decode + (head_convs if keep_head_convs_float else [])) if keep_head_float else []
        input_name = model.graph.input[0].name
        reader = _BatchReader(input_name, itertools.chain([first], batches))
        # the input is an 8-bit image scaled to 0..1: a fixed 1/255 step quantizes it losslessly
        overrides = {input_name: [{"rmin": np.float32(0.0), "rmax": np.float32(1.0)}]}
        quantize_static(str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=excluded, calibrate_method=CALIBRATION_METHODS[method],
                        extra_options={"TensorQuantOverrides": overrides})
    return {"format": "QDQ", "activations": "QUInt8", "weights": "QInt8", "per_channel": per_channel,
            "reduce_range": reduce_range, "calibration": method, "calibration_images": reader.images,
            "excluded_nodes": len(excluded), "head_convs_float": keep_head_convs_float and keep_head_float}


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has 8-bit dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8); False if unknown."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags.split()))


def calibration_batches(image_paths: Sequence[Path], image_size: int) -> Iterator[np.ndarray]:
    """Letterboxed RGB float32 [1, 3, S, S] in 0..1, one image per batch: the same preprocessing as evaluation."""
    for path in image_paths:
        image, _, _ = letterbox(cv2.cvtColor(formats.decode_image(path), cv2.COLOR_BGR2RGB), image_size)
        yield (image.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)  # [1, 3, S, S]
