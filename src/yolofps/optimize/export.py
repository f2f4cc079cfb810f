"""Exports of the eval-mode detector: ONNX (ONNX Runtime and OpenVINO read it) and OpenVINO IR."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import torch

from yolofps.model.yolo import YOLOv5

INPUT_NAME = "images"  # float32 [B, 3, S, S] RGB in 0..1
OUTPUT_NAME = "predictions"  # float32 [B, N, 5 + nc]: xywh pixels, objectness, class scores (sigmoid applied)


def export_onnx(model: YOLOv5, path: Path, image_size: int, *, opset: int = 17) -> Path:
    """ONNX of the eval-mode model: 'images' float32 [B, 3, S, S] in 0..1 -> decoded 'predictions' [B, N, 5+nc]."""
    # a CPU fp32 copy: the caller's model keeps its device, dtype and train/eval mode
    model = copy.deepcopy(model).cpu().float().eval()
    example = torch.zeros(1, 3, image_size, image_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        # dynamo=False: the TorchScript exporter needs no onnxscript; in eval mode it folds BatchNorm into the convs
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
    onnx.checker.check_model(str(path))
    return path


def export_openvino(onnx_path: Path, folder: Path) -> Path:
    """OpenVINO IR (folder/model.xml + model.bin, fp32 weights) of an exported ONNX model: the registered artifact."""
    from yolofps.runtime import openvino

    return openvino.save_ir(openvino.read_model(onnx_path), folder)


def artifact_bytes(path: Path) -> int:
    """Size of a model artifact: a checkpoint folder's weights, an ONNX file, or every file of an IR folder."""
    path = Path(path)
    weights = path / "weights.safetensors"
    if weights.is_file():
        return weights.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size

