"""The `yolofps` command: one subcommand per pipeline stage, plus utilities.

Stage subcommands are what dvc.yaml runs. Every error the user can fix is one line on stderr and a
non-zero exit; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from yolofps import __version__
from yolofps.errors import EXIT_TEMPFAIL, TransientError, YolofpsError

# stage name -> (module, one-line help). Later stages add themselves here and in dvc.yaml.
STAGES: dict[str, tuple[str, str]] = {
    "data": ("yolofps.stages.data", "ingest + validate the data set into data/prepared (DVC stage)"),
    "augment": ("yolofps.stages.augment", "write augmented train copies into data/augmented (DVC stage)"),
    "train": ("yolofps.stages.train", "train the YOLOv5 baseline, evaluate it, track it in MLflow (DVC stage)"),
    "prune": ("yolofps.stages.prune", "structured channel pruning + fine-tuning per ratio (DVC stage)"),
    "distill": ("yolofps.stages.distill", "distill the baseline into the pruned student, no-KD control (DVC stage)"),
    "quantize": ("yolofps.stages.quantize", "ONNX Runtime fp32 + static INT8 (CPU), fp16/bf16 (CUDA) (DVC stage)"),
    "bench": ("yolofps.stages.bench", "end-to-end FPS + mAP of every variant and mode, pick one (DVC stage)"),
    "register": ("yolofps.stages.register", "register the chosen variant as an MLflow pyfunc, @challenger (DVC stage)"),
}


def fraction(text: str) -> float:
    """An option in [0, 0.5): argparse turns the ValueError into a usage error naming the option (exit 2)."""
    value = float(text)
    if not 0 <= value < 0.5:  # nan fails this too
        raise argparse.ArgumentTypeError(f"must be a number in [0, 0.5), got {text!r}")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: `yolofps --help` lists every command with one line each."""
    parser = argparse.ArgumentParser(prog="yolofps", description="Make YOLOv5 detectors fast without losing accuracy.")
    parser.add_argument("--version", action="version", version=f"yolofps {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in STAGES.items():
        stage = commands.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        stage.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a params key, as `dvc exp run -S` (repeatable)")
        stage.set_defaults(handler=_run_stage)
    check = commands.add_parser("validate", help="check a data.yaml or COCO JSON and name every problem",
                                description="Check a YOLO data.yaml or COCO instances JSON; list every problem.")
    check.add_argument("path", help="data.yaml or COCO instances JSON")
    check.add_argument("--strict", action="store_true", help="exit non-zero on any problem, not only fatal ones")
    check.add_argument("--clip-tolerance", type=fraction, default=0.02, help="clip boxes this far outside (normalized)")
    check.add_argument("--json", dest="json_out", help="also write the full report to this JSON file")
    check.set_defaults(handler=_validate)
    promote = commands.add_parser("promote", help="move @champion to a registered version when the gates pass",
                                  description="Compare a registered version with the current @champion under "
                                  "register.gates and move @champion when every gate passes (or with --force).")
    which = promote.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="registered version number")
    which.add_argument("--alias", default="challenger", help="alias of the version to promote (default: challenger)")
    promote.add_argument("--dry-run", action="store_true", help="print the comparison, move nothing")
    promote.add_argument("--force", action="store_true", help="move @champion even if gates fail (needs --reason)")
    promote.add_argument("--reason", default="", help="why (recorded in the promotion history)")
    promote.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    promote.set_defaults(handler=_promote)
    imp = commands.add_parser("import", help="import an official yolov5 .pt (never unpickling code) as a model folder",
                              description="Read an ultralytics/yolov5 v6.0-v7.0 detection checkpoint without "
                              "running any of its pickled code and write it as a yolofps model folder (arch.json + "
                              "weights.safetensors + meta.json), usable as train.weights.")
    imp.add_argument("path", help="the yolov5 checkpoint, e.g. yolov5s.pt")
    imp.add_argument("--out", required=True, help="model folder to write")
    imp.set_defaults(handler=_import)
    ui = commands.add_parser("ui", help="start the MLflow UI on 127.0.0.1 over the project's store",
                             description="Start `mlflow ui` bound to 127.0.0.1 over mlflow.tracking_uri.")
    ui.add_argument("--port", type=port, default=5000)
    ui.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ui.set_defaults(handler=_ui)
    _add_predict(commands)
    _add_serve(commands)
    _add_bench_history(commands.choices["bench"])
    return parser


def _add_predict(commands) -> None:
    """`yolofps predict SOURCE`: a model on images, a folder, a glob, a video or a camera (ultralytics' predict)."""
    predict = commands.add_parser(
        "predict", help="detect objects in images, folders, globs, videos or a camera; annotated outputs + timings",
        description="Run a model on SOURCE through the bench's pipeline: annotated images (an .mp4 per video) and "
        "detections (original pixels, class names) in a new runs/predict/<N>, and the per-image pre / model / "
        "post times. Unreadable files and frames are reported and skipped.")
    predict.add_argument("source", help="an image or video file, a folder, a glob ('images/*.jpg') or a camera index")
    predict.add_argument("--model", help="models:/NAME@ALIAS or models:/NAME/VERSION, a bench variant of "
                         "metrics/bench.json (or `selected`), a checkpoint folder, an .onnx file or an OpenVINO IR "
                         "folder (default: models:/<register.model_name>@champion)")
    predict.add_argument("--out", help="output folder (default: a new numbered folder under runs/predict)")
    predict.add_argument("--format", choices=["csv", "json"], default="csv", help="detections file (default: csv)")
    predict.add_argument("--no-save", action="store_true", help="write no annotated images or videos")
    predict.add_argument("--conf", type=float, help="confidence threshold (default: the model's deployment setting)")
    predict.add_argument("--iou", type=float, help="NMS IoU threshold (default: the model's deployment setting)")
    predict.add_argument("--max-det", type=int, help="most detections per image (default: the deployment setting)")
    predict.add_argument("--dtype", choices=["fp32", "fp16", "bf16", "int8"],
                         help="precision of a model given by path (default fp32; an INT8 ONNX/IR is int8)")
    predict.add_argument("--params", default="params.yaml", help="the project's params file (default: params.yaml)")
    predict.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from yolofps.serving import predict, sources

    source = predict.open_source(args.source)  # a SOURCE that names nothing fails before the model loads
    opened = sources.open_model(args.model or sources.default_model(args.params), args.params, dtype=args.dtype)
    detector = predict.with_nms(opened.detector, args.conf, args.iou, args.max_det)
    description = opened.description
    if (args.conf, args.iou, args.max_det) != (None, None, None):
        c = detector.config
        description += f"; NMS from the command line: conf {c.conf} iou {c.iou} max_det {c.max_det}"
    print(f"predict: {description}", flush=True)
    job = predict.PredictJob(args.source, Path(args.out) if args.out else None, args.format, save=not args.no_save)
    result = predict.predict(detector, job, description=description, source=source)
    print(result.line())
    return 0 if result.images else 1


# --- `yolofps bench history`: an optional sub-command of the bench stage (`yolofps bench` alone runs the stage) ---
def _add_bench_history(bench: argparse.ArgumentParser) -> None:
    """`yolofps bench history [--device TEXT] [--model TEXT] [--limit N] [--params FILE]`."""
    about = "print the benchmark history (bench.store), newest first"
    sub = bench.add_subparsers(dest="bench_command", metavar="[history]", required=False,
                               description="without a sub-command: run the bench stage")
    history = sub.add_parser("history", help=about, description=f"{about}: one row per measurement (bench stage, "
                             "re-bench, load test).")
    history.add_argument("--device", help="part of the device name, e.g. EPYC or H200 (any case)")
    history.add_argument("--model", help="a registered model name, NAME/VERSION, a variant, or a content-hash prefix")
    history.add_argument("--limit", type=int, default=50, help="newest N rows (default 50)")
    history.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    history.set_defaults(handler=_bench_history)


def _bench_history(args: argparse.Namespace) -> int:
    from yolofps import history
    from yolofps.config import load_config
    from yolofps.errors import ConfigError

    if args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    cfg = load_config(args.params)
    store = history.open_store(cfg.bench.store, root=Path(args.params).resolve().parent)
    rows = store.query(device=args.device, model=args.model, limit=args.limit)
    print(history.table(rows) if rows else f"no measurements in {store.url} match")
    return 0
# --- end of `yolofps bench history` ---


def _promote(args: argparse.Namespace) -> int:
    import getpass

    from yolofps.config import load_config
    from yolofps.errors import ConfigError
    from yolofps.history import same_run_fps
    from yolofps.registry import Judge, PromotionRequest, promote

    if args.force and not args.reason.strip():
        raise ConfigError("--force needs --reason TEXT: the promotion history records who forced what and why")
    cfg = load_config(args.params)
    r = cfg.register
    judge = Judge(r.gates, same_run_fps(cfg.bench.store, Path(args.params).resolve().parent))  # FPS from one run
    request = PromotionRequest(version=args.version, alias=args.alias if args.version is None else "",
                               dry_run=args.dry_run, force=args.force, reason=args.reason, user=getpass.getuser())
    result = promote(cfg.mlflow, r.model_name, judge, request, retries=r.retries, backoff_s=r.backoff_s)
    print(result.table())
    return 0 if result.moved or args.dry_run or result.champion == result.candidate else 1


def _import(args: argparse.Namespace) -> int:
    from yolofps.engine.checkpoint import import_to_folder
    from yolofps.model.yolo import model_info

    folder, imported = import_to_folder(args.path, args.out)
    spec, source = imported.model.spec, imported.source
    size = model_info(imported.model, 640)
    c3 = [layer.repeats for layer in spec.layers if layer.kind == "C3"]
    print(f"imported {source['file']} ({source['upstream_class']}, {source['dtype']}, weights from "
          f"'{source['weights_from']}', epoch {source['epoch']}, sha256 {source['sha256'][:12]}) -> {folder}")
    print(f"  spec: {spec.name}, {spec.activation}, widths {[layer.out_channels for layer in spec.layers[:10]]} "
          f"(backbone), C3 repeats {c3}, strides {list(spec.strides)}, anchors {[list(a) for a in spec.anchors]}")
    print(f"  parameters: {size['params']:,} ({size['gflops']:.2f} GFLOPs at 640)")
    print(f"  classes ({spec.num_classes}): {', '.join(imported.names)}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    import subprocess

    from yolofps.config import load_config

    cfg = load_config(args.params)
    # 127.0.0.1 only: the UI has no authentication; expose it through `mlflow server --allowed-hosts` instead
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", cfg.mlflow.tracking_uri,
               "--host", "127.0.0.1", "--port", str(args.port)]
    print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    return subprocess.call(command, env=os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"})  # offline by design


# --- serve: the model server (yolofps.serving.server) ---

def _add_serve(commands) -> None:
    """`yolofps serve`: the HTTP model server over the one inference runtime, with request batching."""
    # defaults stay None here (ServeOptions owns them; the help text is checked against it by tests/test_serve.py):
    # importing the server module would put it on the path of every stage command
    serve = commands.add_parser("serve", help="serve a model over HTTP on 127.0.0.1 (POST /predict, GET /health)",
                                description="Serve a model over HTTP: POST an image file's bytes to /predict, get "
                                "its detections as JSON; concurrent requests are batched. No authentication.")
    serve.add_argument("--model", default="models:/yolofps-detector@champion",
                       help="models:/NAME@ALIAS or models:/NAME/VERSION, a model folder or file (default: "
                       "models:/yolofps-detector@champion)")
    serve.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else is "
                       "reachable from the network without authentication)")
    serve.add_argument("--port", type=port, default=8000)
    serve.add_argument("--max-batch", type=int, help="most requests run as one batch (default: the batch size "
                       "with the best throughput in the project's metrics/bench.json, else 1)")
    serve.add_argument("--max-wait-ms", type=float, help="longest wait for a batch to fill while requests are "
                       "still arriving (default 2.0 ms)")
    serve.add_argument("--max-bytes", type=int, help="largest request body, else 413 (default 16777216)")
    serve.add_argument("--max-pixels", type=int, help="largest image width x height, else 413 (default 40000000)")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from yolofps.errors import ConfigError
    from yolofps.serving.server import ServeOptions, bench_row, best_batch, serve
    from yolofps.serving.sources import open_detector

    given = {key: getattr(args, key) for key in ("max_batch", "max_wait_ms", "max_bytes", "max_pixels")
             if getattr(args, key) is not None}
    if any(value <= 0 for key, value in given.items() if key != "max_wait_ms") or given.get("max_wait_ms", 0) < 0:
        raise ConfigError("--max-batch, --max-bytes and --max-pixels must be > 0, --max-wait-ms >= 0")
    detector = open_detector(args.model, args.params)
    row = bench_row(Path(args.params).parent / "metrics" / "bench.json", detector.config)
    source = "--max-batch" if "max_batch" in given else f"bench row {row['name']}" if row else "no bench figures"
    given.setdefault("max_batch", best_batch(row and row.get("throughput")))
    options = ServeOptions(**given)
    about = {"model": args.model, "variant": row["name"] if row else None, "max_batch_from": source}
    c = detector.config
    print(f"yolofps serve: {args.model} ({about['variant'] or 'variant not in metrics/bench.json'}: {c.runtime} "
          f"{c.mode} {c.dtype} @{c.imgsz}), max batch {options.max_batch} ({source}); warming up", flush=True)
    serve(detector, options, host=args.host, port=args.port, about=about,
          ready=lambda url: print(f"yolofps serve: POST images to {url}/predict, GET {url}/health (Ctrl-C stops)",
                                  flush=True))
    return 0


def _run_stage(args: argparse.Namespace) -> int:
    from yolofps.config import load_config
    from yolofps.paths import Paths

    cfg = load_config(args.params, args.overrides)  # config errors surface before any work
    module = importlib.import_module(STAGES[args.command][0])
    result = module.run(cfg, Paths())
    if not result.outputs and not result.metrics:  # a torchrun rank other than 0: rank 0 reports
        return 0
    for label, path in result.outputs.items():
        print(f"{args.command}: {label} -> {path}")
    print(f"{args.command}: metrics {json.dumps(result.metrics)}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from yolofps.config import ConfigError
    from yolofps.data.validate import validate_source
    from yolofps.fileio import write_json

    validated = validate_source(args.path, clip_tolerance=args.clip_tolerance)
    print(validated.report.summary())
    if args.json_out:
        try:
            write_json(Path(args.json_out), validated.report.to_dict())
        except (OSError, ValueError) as err:  # a folder, an unwritable place, a NUL: the summary above still stands
            reason = getattr(err, "strerror", None) or err
            raise ConfigError(f"--json {args.json_out}: cannot write the report there ({reason})") from None
    return 1 if args.strict and validated.report.issues else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `yolofps` console script."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except YolofpsError as err:
        if args.debug:
            raise
        print(f"yolofps: error: {err}", file=sys.stderr)
        return EXIT_TEMPFAIL if isinstance(err, TransientError) else 2
    except KeyboardInterrupt:
        print("yolofps: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the last line of defence: a message, not a traceback, unless --debug
        if args.debug:
            raise
        print(f"yolofps: unexpected error: {err.__class__.__name__}: {err} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
