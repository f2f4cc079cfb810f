"""`register` stage: the bench stage's chosen variant becomes a version of an MLflow registered model.

The version is a pyfunc (MLflow models-from-code: `yolofps/serving/mlflow_model.py`, no pickled classes) with
pre-processing, the model and NMS inside: image files or uint8 RGB arrays in, detections in original pixels out.
Weights stay safetensors (torch variants), ONNX (ONNX Runtime variants) or OpenVINO IR (.xml + .bin, OpenVINO
variants, run with the precision and threads they were timed with); the yolofps package travels
with the model (`code_paths`), so `mlflow.pyfunc.load_model("models:/<name>@challenger")` works without the
project. Tags carry the lineage (git, DVC md5s, params hash, pipeline run id) and the benchmark figures. The
stage sets `@challenger`; `yolofps promote` (or `register.auto_promote`) moves `@champion` through the gates.
Writes `reports/registered_model.json` (the receipt).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yolofps
from yolofps import history
from yolofps.bench import contract
from yolofps.bench.environment import device_name
from yolofps.config import Config, to_dict
from yolofps.data import formats
from yolofps.errors import ConfigError, YolofpsError
from yolofps.fileio import write_json
from yolofps.lineage import dvc_input_hashes, lineage_tags
from yolofps.metric_names import MAP50, MAP50_95
from yolofps.paths import Paths
from yolofps.registry import (
    CardFacts,
    Judge,
    PromotionRequest,
    Submission,
    describe_version,
    model_chain,
    promote,
    register_model,
    render_card,
)
from yolofps.runtime import Deployment
from yolofps.serving.sources import row_config
from yolofps.stages import StageResult

CODE_FILE = Path(yolofps.__file__).parent / "serving" / "mlflow_model.py"
# benchmark figures: a rerun of the bench stage updates them on an already registered version of the same content
BENCH_TAGS = ("fps_b1", "throughput", MAP50_95, MAP50, "speedup_b1", "speedup_vs_reference_b1", "bench_status",
              "bench_device_name", "bench_environment")
PIP_REQUIREMENTS = ["torch", "numpy", "pandas", "opencv-python-headless", "onnxruntime", "safetensors", "pyyaml",
                    "albumentations==2.0.8"]  # what the pyfunc imports (albumentations: the letterbox's module)


def pip_requirements(runtime: str) -> list[str]:
    """The pyfunc's requirements: an OpenVINO variant adds the OpenVINO release it was benchmarked with."""
    if runtime != "openvino":
        return PIP_REQUIREMENTS
    from importlib import metadata

    return PIP_REQUIREMENTS + [f"openvino=={metadata.version('openvino')}"]


def receipt_path(paths: Paths) -> Path:
    return paths.reports / "registered_model.json"


def chosen_variant(bench: dict[str, Any], wanted: str) -> dict[str, Any]:
    """The bench row to register: the selected one, or the one named in `register.variant`."""
    by_name = {v["name"]: v for v in bench["variants"]}
    name = bench["selected"]["name"] if wanted == "selected" else wanted
    if name is None:
        raise YolofpsError(f"metrics/bench.json selected nothing ({bench['selected']['reason']}); nothing to register")
    if name not in by_name:
        raise ConfigError(f"register.variant {name!r} is not in metrics/bench.json; choose from {sorted(by_name)}")
    row = by_name[name]
    if row["status"] == "failed":
        raise YolofpsError(f"variant {name} failed in the benchmark ({row.get('reason')}); it cannot be registered")
    return row


def version_tags(paths: Paths, cfg: Config, row: dict[str, Any], bench: dict[str, Any]) -> dict[str, str]:
    """Lineage and benchmark figures, so a version answers "where from, how fast" without opening anything."""
    env = bench["environment"]
    tags = lineage_tags(paths.root, "register", to_dict(cfg.register))
    tags |= dvc_input_hashes(paths.root, "bench")  # data and every model output the benchmark read
    tags |= {"variant": row["name"], "model": row["model"], "runtime": row["runtime"], "mode": row["mode"],
             "dtype": row["dtype"], "imgsz": str(row["imgsz"]), "device": row["device"],
             "fps_b1": str(row["fps_b1"]), MAP50_95: str(row[MAP50_95]), MAP50: str(row[MAP50]),
             "throughput": json.dumps(row["throughput"]), "speedup_b1": str(row["speedup_b1"]),
             "speedup_vs_reference_b1": str(row.get("speedup_vs_reference_b1")), "threads": str(row.get("threads", 0)),
             "bench_status": row["status"], "size_mb": str(row["size_mb"]),
             "bench_device_name": device_name(env),
             "bench_environment": json.dumps({k: env.get(k) for k in ("cpu", "cpu_cores", "cpu_flags", "gpu", "torch",
                                                                      "onnxruntime", "openvino", "threads",
                                                                      "time_utc")})}
    return {k: v[:5000] for k, v in tags.items()}


def pyfunc_arguments(paths: Paths, row: dict[str, Any], names: list[str], deployment: dict[str, Any]
                     ) -> dict[str, Any]:
    """mlflow.pyfunc.log_model's keyword arguments: the code file, the artifact, how it runs, an input example."""
    import pandas as pd

    # how the bench ran it, except the device: a torch variant takes the GPU of whoever loads it
    serving = dataclasses.replace(row_config(row, Deployment(**deployment), names), device="auto")
    model_config = dataclasses.asdict(serving)
    example = formats.list_images(paths.augmented_data / "images" / "val")[:1]
    return {"python_model": str(CODE_FILE), "artifacts": {"model": str(paths.root / row["artifact"])},
            "model_config": model_config, "code_paths": [str(CODE_FILE.parents[1])],
            "pip_requirements": pip_requirements(row["runtime"]),
            "input_example": pd.DataFrame({"image": [str(p) for p in example]})}


def run(cfg: Config, paths: Paths = Paths()) -> StageResult:
    """Register the chosen variant (once per content), set @challenger, optionally promote; write the receipt."""
    r = cfg.register
    store = history.open_store(cfg.bench.store, root=paths.root)  # before registering: a bad URL stops it here
    bench = json.loads(paths.metrics("bench").read_text())
    contract.validate(bench, str(paths.metrics("bench")))
    row = chosen_variant(bench, r.variant)
    artifact = paths.root / row["artifact"]
    meta = json.loads((paths.models("train") / "best" / "meta.json").read_text())
    log_model = pyfunc_arguments(paths, row, list(meta["names"]), bench["environment"]["deployment"])
    tags = version_tags(paths, cfg, row, bench)
    # a baseline started from train.weights carries where it came from
    tags |= {k: str(meta[k]) for k in ("start_weights", "start_weights_sha256") if meta.get(k)}
    numbers = {"fps_b1": row["fps_b1"], MAP50_95: row[MAP50_95], MAP50: row[MAP50]}
    content = history.content_hash(artifact, row)
    submission = Submission(content, log_model, version_tags=tags, run_tags=tags,
                            run_metrics={k: float(v) for k, v in numbers.items() if v is not None},
                            run_artifacts=[(paths.reports / "bench", "bench"), (paths.metrics("bench"), "bench")],
                            refresh=BENCH_TAGS)
    registration = register_model(cfg.mlflow, r.model_name, submission, retries=r.retries, backoff_s=r.backoff_s)
    lineage = {key: tags.get(key, "") for key in ("git_commit", "params_hash", "pipeline_run_id")}
    card = CardFacts(r.model_name, registration.version, row, bench, model_chain(paths, row["model"]),
                     list(meta["names"]), lineage)
    # a reused version gets the card of today's figures, as its refreshed bench tags
    describe_version(cfg.mlflow, r.model_name, registration.version, render_card(card), retries=r.retries,
                     backoff_s=r.backoff_s)
    verb = "reused" if registration.reused else "registered"
    print(f"register: {verb} {r.model_name} v{registration.version} ({row['name']}) as @challenger", flush=True)
    history.mark_or_warn(store, content, r.model_name, registration.version)  # the bench rows of this content
    receipt = {"model_name": r.model_name, "version": registration.version, "run_id": registration.run_id,
               "model_uri": registration.model_uri, "alias_uri": f"models:/{r.model_name}@challenger",
               "variant": row["name"], "reused": registration.reused, "promoted": False}
    if r.auto_promote:
        request = PromotionRequest(version=registration.version, user="register stage", reason="register.auto_promote")
        result = promote(cfg.mlflow, r.model_name, Judge(r.gates, store.paired_fps), request, retries=r.retries,
                         backoff_s=r.backoff_s)
        print(result.table(), flush=True)
        receipt["promoted"] = result.moved
    write_json(receipt_path(paths), receipt)
    metrics = {"version": registration.version, "reused": int(registration.reused),
               "promoted": int(receipt["promoted"]),
               "fps_b1": row["fps_b1"], MAP50_95: row[MAP50_95]}
    write_json(paths.metrics("register"), metrics)
    return StageResult(outputs={"receipt": receipt_path(paths), "metrics": paths.metrics("register")}, metrics=metrics)


def main(argv: list[str] | None = None) -> int:
    """`python -m yolofps.stages.register`: the same as `yolofps register`."""
    from yolofps import cli

    return cli.main(["register", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
