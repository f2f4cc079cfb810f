"""Where a model comes from: one function opens any model a user can name, for `yolofps predict` and the server.

    models:/NAME@ALIAS, models:/NAME/VERSION   the registered MLflow pyfunc (params' mlflow.tracking_uri)
    quantize/openvino-1t-int8, selected         a row of the project's metrics/bench.json, run as the bench ran it
    DIR with arch.json                          a yolofps checkpoint folder: torch eager fp32
    FILE.onnx                                   ONNX Runtime
    DIR with model.xml, FILE.xml                OpenVINO IR (fp32 unless told; an NNCF INT8 IR is labelled int8)

Every one of them becomes a `serving.detector.Detector` over the one runtime (`runtime.Pipeline`), so its speed is
the speed the bench measures. A string that is none of these is a ModelSourceError that says what was tried.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolofps.errors import YolofpsError
from yolofps.paths import Paths
from yolofps.runtime import Deployment
from yolofps.serving.detector import Detector, ServingConfig

# MLflow's models:/ URI forms (register.model_name's characters; MLflow aliases are letters, digits, _ and -)
MODELS_URI = re.compile(r"models:/(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))")
SELECTED = "selected"  # the bench's chosen row, as register.variant spells it
ONNX_SUFFIX, IR_SUFFIX = ".onnx", ".xml"


class ModelSourceError(YolofpsError, ValueError):
    """A model string that names nothing runnable; the message says what was tried and what to pass instead."""


@dataclass(frozen=True)
class OpenedModel:
    """A detector, and one line saying what runs and where each of its settings came from."""

    detector: Detector
    description: str


def default_model(params: str | Path = "params.yaml") -> str:
    """`models:/<register.model_name>@champion`: what a deployment serves unless told otherwise."""
    from yolofps.config import load_config
    from yolofps.registry import CHAMPION

    return f"models:/{load_config(params).register.model_name}@{CHAMPION}"


def open_detector(model: str, params: str | Path = "params.yaml", *, dtype: str | None = None) -> Detector:
    """The Detector `model` names: a models:/ URI, a bench variant (or `selected`), or a model file or folder.

    `params` locates the project (its folder is the root that bench.json, class names and a relative SQLite
    tracking URI are read from); `dtype` sets the precision of a model given by path (OpenVINO fp32 | bf16 | int8).
    """
    return open_model(model, params, dtype=dtype).detector


def open_model(model: str, params: str | Path = "params.yaml", *, dtype: str | None = None) -> OpenedModel:
    """`open_detector`, with the description of what was opened (for the user: predict prints it)."""
    params = Path(params)
    root = params.parent
    if model.startswith("models:/"):
        return _registered(model, params)
    bench = _bench(root)
    if bench is not None and (model == SELECTED or model in {v["name"] for v in bench["variants"]}):
        return _bench_variant(model, root, bench)
    path = Path(model)
    if path.exists():
        return _from_path(path, root, dtype)
    choices = f"a variant of {Paths(root).metrics('bench')} (`selected`, or e.g. {_examples(bench)})" if bench \
        else f"a bench variant (there is no {Paths(root).metrics('bench')}: run the pipeline first)"
    raise ModelSourceError(f"--model {model!r}: no such file or folder, and not {choices}; pass a registered model "
                           "(models:/NAME@ALIAS or models:/NAME/VERSION), a checkpoint folder, an .onnx file or an "
                           "OpenVINO IR folder")


def row_config(row: dict[str, Any], deployment: Deployment, names: list[str]) -> ServingConfig:
    """How a metrics/bench.json row runs, as a serving config: its runtime, mode, dtype, threads, device, NMS."""
    return ServingConfig(row["runtime"], row["mode"], row["dtype"], deployment.imgsz, list(names), deployment.conf,
                         deployment.iou, deployment.max_det, row["device"], row.get("threads", 0))


def bench_detector(root: Path, row: dict[str, Any], deployment: Deployment, names: list[str] = ()) -> Detector:
    """The Detector of a bench row: its artifact (relative to the project root) run the way the row says."""
    return Detector(Path(root) / row["artifact"], row_config(row, deployment, list(names)))


def _registered(model: str, params: Path) -> OpenedModel:
    """A registered version through the MLflow pyfunc (the way any caller of the registry loads it)."""
    from yolofps import registry
    from yolofps.config import load_config

    found = MODELS_URI.fullmatch(model)
    if not found:
        raise ModelSourceError(f"--model {model!r}: a registered model is models:/NAME@ALIAS or models:/NAME/VERSION")
    cfg = load_config(params)
    uri = registry.resolve_tracking_uri(cfg.mlflow.tracking_uri, params.parent)  # relative to the project
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ModelSourceError(f"--model {model}: there is no MLflow store at {uri} (mlflow.tracking_uri in {params}): "
                               "run the pipeline's register stage first, or pass --params of the project that did")
    mlflow_cfg = dataclasses.replace(cfg.mlflow, tracking_uri=uri)
    name, alias, number = found["name"], found["alias"] or "", found["version"]
    try:
        with warnings.catch_warnings():  # the pyfunc's untyped predict is on purpose (mlflow_model.py): no nagging
            warnings.filterwarnings("ignore", message=".*type hints to the `predict` method", category=UserWarning)
            version, tags, detector = registry.load_detector(
                mlflow_cfg, name, alias, version=int(number) if number else None, retries=cfg.register.retries,
                backoff_s=cfg.register.backoff_s)
    except registry.RegistryUnavailable:
        raise  # transient: its message says to rerun when the tracking server is back
    except registry.RegistryError as err:
        raise ModelSourceError(f"--model {model}: {err}; {_registered_choices(mlflow_cfg, name)}") from None
    what = f"{model} = v{version}, bench variant {tags.get('variant', '?')}"
    return OpenedModel(detector, f"{what}: {settings(detector.config)} (the registered model's config)")


def _registered_choices(cfg, name: str) -> str:
    """What the registry holds under `name`, for an error message (never raises)."""
    from yolofps import registry

    try:
        held = registry.aliases(cfg, name)
    except Exception:  # the message is about the first failure, not this one
        return "check the name and alias in the MLflow UI (`yolofps ui`)"
    if not held:
        return f"no model named {name!r} is registered there (the register stage registers one)"
    listed = ", ".join(f"models:/{name}@{alias} (v{version})" for alias, version in sorted(held.items()))
    return f"registered: {listed}, or models:/{name}/VERSION; `yolofps promote` moves @champion"


def _bench(root: Path) -> dict[str, Any] | None:
    """The project's metrics/bench.json, checked against its contract (None when there is none)."""
    from yolofps.bench import contract

    path = Paths(root).metrics("bench")
    if not path.is_file():
        return None
    try:
        bench = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"{path}: unreadable ({err}); rerun the bench stage (`dvc repro bench`)") from None
    contract.validate(bench, str(path))
    return bench


def _examples(bench: dict[str, Any]) -> str:
    ok = [v["name"] for v in bench["variants"] if v["status"] != "failed"]
    return ", ".join(ok[:3]) + (f" and {len(ok) - 3} more" if len(ok) > 3 else "")


def bench_row(bench: dict[str, Any], model: str) -> dict[str, Any]:
    """The metrics/bench.json row named `model` (`selected`: the bench's choice) that ran (not `failed`)."""
    name = bench["selected"]["name"] if model == SELECTED else model
    if name is None:
        raise ModelSourceError(f"--model selected: the bench selected nothing ({bench['selected']['reason']}); "
                               f"name a variant instead, e.g. {_examples(bench)}")
    row = next((v for v in bench["variants"] if v["name"] == name), None)
    if row is None:
        raise ModelSourceError(f"--model {name}: not a variant of metrics/bench.json; e.g. {_examples(bench)}")
    if row["status"] == "failed":
        raise ModelSourceError(f"--model {name}: this variant failed in the benchmark ({row.get('reason')}); "
                               f"choose another, e.g. {_examples(bench)}")
    return row


def _bench_variant(model: str, root: Path, bench: dict[str, Any]) -> OpenedModel:
    """A bench row run exactly as the bench ran it: its artifact, runtime, mode, dtype, threads and NMS settings."""
    import torch

    row = bench_row(bench, model)
    name = row["name"]
    environment = bench["environment"]
    # threads 0 in a row means "the bench process's setting": set it as the bench did (bench.threads)
    threads = min(int(environment.get("threads") or torch.get_num_threads()), os.cpu_count() or 1)
    torch.set_num_threads(threads)
    names, names_from = project_names(root)
    detector = bench_detector(root, row, Deployment(**environment["deployment"]), names)
    return OpenedModel(detector, f"{name} from {Paths(root).metrics('bench')}: {settings(detector.config)}, "
                                 f"{threads} torch threads (as the bench ran it); class names from {names_from}")


def project_names(root: Path) -> tuple[list[str], str]:
    """The project's class names and where they came from: the trained model's meta.json, else the data.yaml."""
    meta = Paths(root).model_folder("train") / "meta.json"
    names = _meta_names(meta)
    if names:
        return names, str(meta)
    data_yaml = Paths(root).augmented_data / "data.yaml"
    if data_yaml.is_file():
        from yolofps.data import formats

        try:
            return list(formats.load_data_yaml(data_yaml).names), str(data_yaml)
        except YolofpsError:
            pass
    return [], "nowhere (no meta.json or data.yaml found): classes are shown by id"


def _meta_names(meta: Path) -> list[str]:
    """`names` of a meta.json ([] when the file is missing or has none)."""
    try:
        names = json.loads(meta.read_text()).get("names")
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


def settings(config: ServingConfig) -> str:
    """`openvino eager int8, 1 thread, 224 px, conf 0.25 iou 0.45 max_det 300`: how a detector runs."""
    threads = f"{config.threads} thread{'s' if config.threads != 1 else ''}" if config.threads else "default threads"
    return (f"{config.runtime} {config.mode} {config.dtype}, {threads}, {config.imgsz} px, conf {config.conf} "
            f"iou {config.iou} max_det {config.max_det}")


def _from_path(path: Path, root: Path, dtype: str | None) -> OpenedModel:
    """A model file or folder: checkpoint (torch), .onnx (ONNX Runtime) or OpenVINO IR, its size from the model."""
    from yolofps.engine import checkpoint

    if path.is_dir() and (path / checkpoint.ARCH).is_file():
        return _checkpoint(path, dtype)
    if path.suffix == ONNX_SUFFIX and path.is_file():
        return _exported(path, root, "onnxruntime", dtype)
    if (path.is_dir() and (path / "model.xml").is_file()) or (path.suffix == IR_SUFFIX and path.is_file()):
        return _exported(path, root, "openvino", dtype)
    hint = " (import an official yolov5 .pt first: `yolofps import FILE.pt --out DIR`)" if path.suffix == ".pt" else ""
    raise ModelSourceError(f"--model {path}: not a yolofps checkpoint folder (arch.json + weights.safetensors + "
                           f"meta.json), an .onnx file or an OpenVINO IR folder (model.xml + model.bin){hint}")


def _checkpoint(folder: Path, dtype: str | None) -> OpenedModel:
    """A yolofps checkpoint folder in torch eager (fp32 unless told), image size and classes from its meta.json."""
    from yolofps.engine import checkpoint

    meta_path = folder / checkpoint.META
    try:
        meta = json.loads(meta_path.read_text())
        imgsz, names = int(meta["imgsz"]), [str(n) for n in meta["names"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelSourceError(f"{meta_path}: no image size and class names ({type(err).__name__}: {err}); "
                               f"{checkpoint.HINT}") from None
    config = ServingConfig("torch", "eager", dtype or "fp32", imgsz, names)
    detector = Detector(folder, config)
    return OpenedModel(detector, f"{folder}: {settings(config)} on {detector.pipeline.info.kind}; image size and "
                                 f"class names from {meta_path}")


def _exported(path: Path, root: Path, runtime: str, dtype: str | None) -> OpenedModel:
    """An ONNX file or OpenVINO IR: image size from its input shape, classes from a meta.json or the project."""
    imgsz, int8 = _input_size(path, runtime)
    chosen = dtype or ("int8" if int8 else "fp32")
    names, names_from = _names_near(path, root)
    config = ServingConfig(runtime, "eager", chosen, imgsz, names)
    detector = Detector(path, config)
    how = "as told" if dtype else ("its graph holds quantized ops" if int8 else "the default")
    return OpenedModel(detector, f"{path}: {settings(config)} ({chosen}: {how}); {imgsz} px from the model's input "
                                 f"shape; class names from {names_from}")


def _names_near(path: Path, root: Path) -> tuple[list[str], str]:
    """Class names of an exported model: a meta.json beside it (or one folder up), else the project's."""
    folder = path if path.is_dir() else path.parent
    for meta in (folder / "meta.json", folder.parent / "meta.json"):
        names = _meta_names(meta)
        if names:
            return names, str(meta)
    return project_names(root)


def _input_size(path: Path, runtime: str) -> tuple[int, bool]:
    """The square input size of an ONNX file or IR (its [B, 3, S, S] input), and whether it is quantized (INT8)."""
    if runtime == "onnxruntime":
        import onnx

        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as err:  # a truncated or foreign file: onnx raises DecodeError and friends
            raise ModelSourceError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from None
        dims = [d.dim_value or None for d in graph.input[0].type.tensor_type.shape.dim]
        int8 = any(node.op_type in ("QuantizeLinear", "QLinearConv") for node in graph.node)
    else:
        from yolofps.runtime import openvino

        try:
            model = openvino.read_model(path)
        except Exception as err:  # openvino raises RuntimeError for a damaged IR
            raise ModelSourceError(f"{path}: not a readable OpenVINO model ({str(err).strip()[:200]})") from None
        shape = model.input(0).get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        int8 = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
    if len(dims) != 4 or dims[2] is None or dims[2] != dims[3]:
        raise ModelSourceError(f"{path}: input shape {dims} is not a fixed square [B, 3, S, S]; export it with a "
                               "fixed image size (the bench stage's exports have one)")
    return int(dims[2]), int8
