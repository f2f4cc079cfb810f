"""Quantization-aware training (QAT) with NNCF 3.4's torch backend, and its export to an OpenVINO INT8 IR.

`nncf.quantize` on a torch model is the PTQ of `openvino_int8.py` done on the module itself: it deep-copies the
model, traces it (NNCF 3.4 has only the function-hook tracer; NNCFNetwork is gone), calibrates ranges on the
calibration batches, applies fast bias correction, and returns the copy with trainable fake quantizers
(`SymmetricQuantizer` on weights, `AsymmetricQuantizer` on activations under the MIXED preset) attached as
pre/post hooks of named operations. The copy is still a `YOLOv5`: `forward` is replaced per instance by a wrapper
that runs the original one under a `TorchFunctionMode`, and the quantizers live in the `__nncf_hooks` submodule.
So the Detect head still branches on `self.training` (train: raw maps, eval: decoded), `copy.deepcopy` gives an
independent copy (the wrapper pickles to a new one bound to the copy), and `state_dict()` holds the float keys plus
`__nncf_hooks.{pre,post}_hooks.<op>__<port>.0.*` per quantizer (weights: `_num_bits`, `signed_tensor`, `enabled`,
`scale`; activations: `_num_bits`, `enabled`, `input_low`, `input_range`). A quantizer NNCF shares between the
inputs of an add or a concat sits under each of its hook names, so `state_dict()` lists the same tensors twice:
safetensors refuses that, and a loop over `state_dict()` that updates in place (an EMA) visits them twice.

Hooks are keyed by operation name: the names of the modules called on the way down plus a call counter. YOLOv5
and Detect call their layers out of `nn.ModuleList`s that are never called themselves, so the `model.<i>` part
is missing (`cv1/conv/conv2d/3`, the Detect convs are `/conv2d/0..2`): names are unique only by counter, and a
state restores only onto a model whose forward calls the same operations in the same order. `restore_qat` checks
that against a trace rather than trusting it.

The fake-quantize kernels are a C++ extension NNCF compiles on first use (60 s limit, then an error; on CPU a
failed build falls back to slower torch ops, on CUDA it needs nvcc and fails): `QuantizeKernelError` says how out.
The quantizers read their state with `.item()` on every call: a QAT step syncs the host once per quantizer.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolofps.errors import YolofpsError
from yolofps.model.yolo import YOLOv5
from yolofps.optimize.openvino_int8 import _capture_reverts
from yolofps.optimize.openvino_int8 import _nncf as _import_nncf
from yolofps.runtime import openvino as ovr

STATE_FORMAT = "yolofps-qat/1"  # qat_state's "format": bump when the layout changes
_HOOKS = "__nncf_hooks"  # the submodule NNCF adds to a quantized model (function_hook/wrapper.py ATR_HOOK_STORAGE)
_STOP = frozenset({"nncf_model_const", "nncf_model_input", "nncf_model_output"})  # no operations to ignore


class QatError(YolofpsError):
    """Quantization-aware training cannot go on; the message says why and the way out."""


class NncfMissing(QatError, ImportError):
    """NNCF is not installed (it is needed for QAT only)."""


class QuantizeKernelError(QatError):
    """NNCF's fake-quantize kernels (a torch C++/CUDA extension built on first use) did not build or load in time."""


class NotQuantized(QatError, ValueError):
    """A float model where a QAT model (from `prepare_qat` or `restore_qat`) was expected."""


class QatStateError(QatError, ValueError):
    """A QAT state that is not one, or does not fit the float model it is restored onto."""


def _nncf() -> Any:
    """NNCF with its telemetry off (`openvino_int8._nncf`), or `NncfMissing`."""
    try:
        return _import_nncf()
    except ImportError as error:
        raise NncfMissing(f"QAT needs NNCF, which is not importable here ({error}): pip install 'nncf>=3.4'") from error


def _load_kernels(nncf: Any, device: torch.device) -> None:
    """Build/load NNCF's fake-quantize kernels for `device` now, not at the first training step."""
    from nncf.torch.extensions import ExtensionLoaderTimeoutException
    from nncf.torch.quantization.extensions import QuantizedFunctionsCPU, QuantizedFunctionsCUDA

    kernels = QuantizedFunctionsCUDA if device.type == "cuda" else QuantizedFunctionsCPU
    # NNCF's 60 s default is about what the first CPU build takes on 2 busy cores (~55 s); a set value is kept
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "600")
    try:
        kernels.get("Quantize_forward")
    except (ExtensionLoaderTimeoutException, nncf.InstallationError) as error:
        raise QuantizeKernelError(
            f"NNCF's fake-quantize kernels for {device.type} did not load: {error}\nThey are compiled with the "
            "C++ compiler and ninja on first use: on a slow or busy machine set NNCF_EXTENSION_LOAD_TIMEOUT=300 "
            "(and remove a stale lock in the build folder named above); CUDA kernels also need nvcc on PATH."
        ) from error


def _graph(model: nn.Module, example: torch.Tensor) -> Any:
    """NNCF's graph of the eval-mode model (decode included) as NNCF traces it, from a copy."""
    from nncf.torch.function_hook import wrap_model
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph

    traced = copy.deepcopy(model).eval()
    with torch.no_grad():
        return build_nncf_graph(wrap_model(traced), example.to(next(traced.parameters()).device))


def detect_head_nodes(graph: Any) -> tuple[list[str], list[str]]:
    """(decode ops, Detect convs) of an NNCF graph: a walk back from its outputs to the first conv2d on each path.

    The torch twin of `openvino_int8.detect_head_ops` (which walks an ov.Model: other names, the same cut).
    """
    decode: list[str] = []
    convs: list[str] = []
    seen: set[str] = set()
    pending = [previous for node in graph.get_output_nodes() for previous in graph.get_previous_nodes(node)]
    while pending:
        node = pending.pop()
        if node.node_name in seen or node.node_type in _STOP:
            continue
        seen.add(node.node_name)
        if node.node_type == "conv2d":
            convs.append(node.node_name)  # the head's 1x1 convs: the walk stops here, like the ov.Model walk
            continue
        decode.append(node.node_name)
        pending.extend(graph.get_previous_nodes(node))
    return decode, sorted(convs)


def _settings(nncf: Any, model: nn.Module, example: torch.Tensor, keep_head_float: bool,
              subset_size: int) -> dict[str, Any]:
    """The settings of `openvino_int8._options` (why: see there), with the head found in the torch graph."""
    ignored = None
    if keep_head_float:
        decode, convs = detect_head_nodes(_graph(model, example))
        ignored = nncf.IgnoredScope(names=decode + convs)  # validate=True: a name that matches nothing is an error
    return dict(preset=nncf.QuantizationPreset.MIXED, target_device=nncf.TargetDevice.CPU, subset_size=subset_size,
                ignored_scope=ignored)


def prepare_qat(model: YOLOv5, calibration: Sequence[torch.Tensor], *, keep_head_float: bool = True) -> YOLOv5:
    """A QAT copy of `model`: NNCF PTQ ranges as the start, fake quantizers that train; `model` is left as it was.

    `calibration`: float [B, 3, S, S] batches in 0..1 at the model's image size. The copy has `model`'s device and
    train/eval mode; its quantizer ranges are parameters (see `quantizer_parameters`).
    """
    if len(calibration) == 0:
        raise ValueError("prepare_qat: calibration gave no batches (float [B, 3, S, S] tensors in 0..1 expected)")
    nncf = _nncf()
    device = next(model.parameters()).device
    _load_kernels(nncf, device)
    batches = [torch.as_tensor(batch, dtype=torch.float32).to(device) for batch in calibration]
    was_training = model.training
    # traced and calibrated in eval mode, so the decode is in the graph (to be left float) and BatchNorm statistics
    # stay; NNCF quantizes a deep copy, and train mode runs the same operations up to the Detect convs
    model.eval()
    try:
        options = _settings(nncf, model, batches[0], keep_head_float, subset_size=len(batches))
        # NNCF's own handlers print warnings only meanwhile (at INFO: a line per ignored operation, ~50 here)
        with _capture_reverts(logging.getLogger("nncf")):
            quantized = nncf.quantize(model, nncf.Dataset(batches), **options)
    finally:
        model.train(was_training)
    return quantized.train(was_training)


def _quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Hook name -> NNCF quantizer of a QAT model (empty for a float one)."""
    from nncf.torch.function_hook import get_hook_storage, is_wrapped
    from nncf.torch.quantization.layers import BaseQuantizer

    if not is_wrapped(model):
        return {}
    return {name: hook for name, hook in get_hook_storage(model).named_hooks()
            if isinstance(hook, BaseQuantizer)}


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable quantizer ranges (scales; input_low/input_range) of a QAT model, for an optimizer group.

    They belong to no module with a `weight` or `bias`, so an optimizer built from those alone leaves them at
    their calibrated values.
    """
    return [p for name, p in model.named_parameters() if name.startswith(f"{_HOOKS}.") and p.requires_grad]


def _require_quantized(model: nn.Module, what: str) -> None:
    _nncf()
    if not _quantizers(model):
        raise NotQuantized(f"{what}: the model has no NNCF quantizers; make a QAT model with prepare_qat "
                           "(or restore_qat from a saved state) first")


def _json_config(config: dict[str, Any]) -> dict[str, Any]:
    """NNCF's config as JSON types: the quantizer mode enum as its string, shapes as lists."""
    import json

    return json.loads(json.dumps(config))


def _nncf_config(config: dict[str, Any]) -> dict[str, Any]:
    """Back from JSON types, so each restored quantizer's spec equals the saved one: `PTQuantizerSpec` sets its
    `per_channel` by `scale_shape != (1,)`, which a list [1] would turn True (NNCF 3.4's forward reads the shape
    itself, but a later NNCF or strip step may not)."""
    from nncf.common.quantization.structs import QuantizationScheme

    config = copy.deepcopy(config)
    for command in config["compression_state"]:
        module_config = command["module_config"]
        if "scale_shape" in module_config:
            module_config["scale_shape"] = tuple(module_config["scale_shape"])
        if "mode" in module_config:
            module_config["mode"] = QuantizationScheme(module_config["mode"])
    return config


def _aliases(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(hook name kept, hook name sharing its quantizer): NNCF gives the inputs of an add or a concat one
    quantizer (a unified scale) hooked under each name, so `state_dict()` has its tensors once per name."""
    return [(names[0], other) for command in config["compression_state"]
            for names in [command["hook_names_in_model"]] for other in names[1:]]


def qat_state(model: nn.Module) -> dict[str, Any]:
    """Everything `restore_qat` needs besides the float model: NNCF's placement config (JSON types) + state dict.

    Plain strings, numbers, lists and CPU tensors: `torch.load(weights_only=True)` reads it back; so do
    `json` (the "nncf" part) + safetensors (the "state_dict" part: a shared quantizer's tensors appear under
    their first hook name only, since safetensors refuses tensors that share memory).
    """
    _require_quantized(model, "qat_state")
    nncf = _nncf()
    config = _json_config(nncf.torch.get_config(model))
    aliases = tuple(f"{_HOOKS}.{other}." for _, other in _aliases(config))
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                  if not k.startswith(aliases)}
    return {"format": STATE_FORMAT, "nncf_version": nncf.__version__, "nncf": config, "state_dict": state_dict}


def _full_state_dict(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`qat_state`'s state dict with every shared quantizer's tensors under each of its hook names again."""
    state_dict = dict(state["state_dict"])
    for kept, other in _aliases(state["nncf"]):
        prefix = f"{_HOOKS}.{kept}."
        state_dict.update({f"{_HOOKS}.{other}.{k[len(prefix):]}": v
                           for k, v in state["state_dict"].items() if k.startswith(prefix)})
    return state_dict


def restore_qat(float_model: YOLOv5, state: dict[str, Any], example: torch.Tensor) -> YOLOv5:
    """A QAT model from `qat_state`'s output on a copy of `float_model` (the same ArchSpec).

    `example` ([1, 3, S, S]) is traced to check that every quantizer sits on an operation the model has.
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise QatStateError(f"restore_qat: not a QAT state (format {found!r}, expected {STATE_FORMAT!r}); "
                            "save one with qat_state")
    nncf = _nncf()
    _load_kernels(nncf, next(float_model.parameters()).device)
    operations = {node.node_name for node in _graph(float_model, example).get_all_nodes()}
    model = copy.deepcopy(float_model)
    try:
        model = nncf.torch.load_from_config(model, _nncf_config(state["nncf"]))
        model.load_state_dict(_full_state_dict(state))
    except (KeyError, RuntimeError, nncf.InternalError) as error:
        raise QatStateError(f"restore_qat: the state does not fit this model ({error}); restore it onto the "
                            "float model it was prepared from (the same ArchSpec)") from error
    _check_placement(model, operations)
    return model.train(float_model.training)


def _check_placement(model: nn.Module, operations: set[str]) -> None:
    """A hook on an operation the float model never runs is a quantizer that never quantizes: refuse it."""
    from nncf.torch.function_hook.hook_storage import decode_hook_name

    stray = [hook for hook in _quantizers(model) if decode_hook_name(hook)[1] not in operations]
    if stray:
        raise QatStateError(f"restore_qat: {len(stray)} quantizers sit on operations this model does not run "
                            f"(e.g. {stray[:3]}); the state was saved from another architecture")


def export_openvino_int8(model: nn.Module, folder: Path, imgsz: int) -> Path:
    """INT8 OpenVINO IR (folder/model.xml + model.bin) of a QAT model, as the runtime's openvino int8 loads it.

    `ov.convert_model` traces the module (TorchScript); NNCF's quantizers export as FakeQuantize there, and
    OpenVINO stores the fake-quantized weights as int8 constants. The caller's model keeps its device and mode.
    """
    _require_quantized(model, "export_openvino_int8")
    import openvino as ov

    from yolofps.optimize.export import INPUT_NAME, OUTPUT_NAME

    exported = copy.deepcopy(model).cpu().float().eval()
    example = torch.zeros(1, 3, imgsz, imgsz)
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about the quantizers' .item() and that the FakeQuantize export rounds a few elements
        # differently from the training kernels (both known, both harmless here)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        ov_model = ov.convert_model(exported, example_input=example)
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})  # the names the ONNX-derived IRs have
    ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    return ovr.save_ir(ov_model, folder)
