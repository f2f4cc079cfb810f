"""Helpers shared by the tests (import as `from helpers import ...`; tests/ is on sys.path)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from yolofps.data.synthetic import SyntheticSpec

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Small enough that a whole `dvc repro` takes seconds on 2 cores.
TINY_PARAMS = {
    "data.num_train": 12, "data.num_val": 4, "data.image_size": 96, "augment.copies": 1,
    "train.model": "tiny", "train.epochs": 2, "train.imgsz": 64, "train.batch": 8, "train.workers": 0,
    "eval.sample_images": 4, "mlflow.system_metrics": False,
    "prune.ratios": [0.5], "prune.finetune_epochs": 1, "distill.epochs": 1, "quantize.calibration_images": 4,
    "quantize.qat.epochs": 1,
    "bench.modes": ["eager", "trace", "onnxruntime", "openvino"], "bench.runs": 3, "bench.warmup": 1,
    "bench.batch_sizes": [1, 2], "bench.throughput_runs": 1, "bench.check_images": 2,
}

# The one tiny pipeline of a test session (tests/conftest.py: `shared_run`). Fewer images, no augmented copies
# (training is the cost), and the bench's agreement floors relaxed: the barely trained model's near-equal scores make
# ties that float noise reorders, and the registered pyfunc needs detections to compare (no deployment threshold).
SHARED_PARAMS = TINY_PARAMS | {"data.num_train": 8, "augment.copies": 0, "bench.conf": 0.0,
                               "bench.min_agreement": 0.5, "bench.min_agreement_int8": 0.0}
SHARED_PIPELINE_RUN_ID = "shared-run"  # the pipeline run id the shared run's stages tag their MLflow runs with
# written by DVC itself, the project's MLflow store (mlflow.tracking_uri: sqlite:///mlflow.db) or its benchmark
# history (bench.store: sqlite:///benchmarks.db): never a stage out
DVC_AND_TRACKING = (".dvc", ".git", "dvc.lock", "mlflow.db", "mlruns", "benchmarks.db")

TINY_SPEC = SyntheticSpec(num_train=6, num_val=3, image_size=96, min_aspect=0.75, max_objects=4,
                          background_fraction=0.2, min_visible=0.3)


def tool_env() -> dict[str, str]:
    """Environment for subprocesses: this interpreter's scripts first (yolofps, dvc), analytics off."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def run_cmd(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, capturing output; on failure the assertion shows what it printed."""
    result = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check:
        assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def make_project(root: Path) -> Path:
    """A copy of the project's pipeline files in a fresh git + DVC repo at `root`, with tiny params."""
    from tasks.dvc import apply_overrides

    root.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):  # .gitignore: what `dvc exp run` commits
        shutil.copy(PROJECT_ROOT / name, root / name)
    shutil.copytree(PROJECT_ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(PROJECT_ROOT / "weights", root / "weights", ignore=shutil.ignore_patterns("*.pt"))  # a train dep
    run_cmd(["git", "init", "-q"], root)
    run_cmd([sys.executable, "-m", "dvc", "init", "-q"], root)
    run_cmd([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], root)
    apply_overrides(root / "params.yaml", TINY_PARAMS)
    return root


@dataclass(frozen=True)
class SharedRun:
    """The session's tiny pipeline, reproduced once by real `dvc repro`, one stage at a time.

    `written[stage]`: the files (relative paths) that stage's `dvc repro --single-item` created or changed, outside
    DVC's own files and the MLflow store; `output[stage]`: what DVC printed. Tests only read `root`; a test that
    changes anything works on `copy_run(...)`.
    """

    root: Path
    written: dict[str, set[str]]
    output: dict[str, str]


def _snapshot(root: Path) -> dict[str, int]:
    """relative path -> mtime of every file outside DVC_AND_TRACKING (and the .gitignore files DVC writes)."""
    found = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.is_file() and relative.parts[0] not in DVC_AND_TRACKING and path.name != ".gitignore":
            found[relative.as_posix()] = path.stat().st_mtime_ns
    return found


def build_shared_run(root: Path) -> SharedRun:
    """make_project + SHARED_PARAMS, then `dvc repro --single-item <stage>` per stage in dvc.yaml's (graph) order."""
    import yaml

    from tasks.dvc import apply_overrides
    from yolofps.lineage import PARENT_RUN_ENV, PIPELINE_RUN_ENV

    make_project(root)
    apply_overrides(root / "params.yaml", SHARED_PARAMS)
    env = tool_env() | {PIPELINE_RUN_ENV: SHARED_PIPELINE_RUN_ID}
    env.pop(PARENT_RUN_ENV, None)
    written, output = {}, {}
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]:
        before = _snapshot(root)
        result = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=root, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, f"shared run: stage {stage} failed:\n{result.stdout}\n{result.stderr}"
        written[stage] = {path for path, mtime in _snapshot(root).items() if before.get(path) != mtime}
        output[stage] = result.stdout
    return SharedRun(root, written, output)


def copy_run(run: SharedRun, dest: Path, *, keep_tracking: bool = False) -> Path:
    """A private copy of the shared run at `dest` (DVC cache, dvc.lock and git repo included).

    Without keep_tracking the copy starts with an empty MLflow store: the copied one's experiment points its
    artifacts at the original's mlruns/, which a copy must not write into.
    """
    shutil.copytree(run.root, dest, symlinks=True)
    if not keep_tracking:
        (dest / "mlflow.db").unlink(missing_ok=True)
        shutil.rmtree(dest / "mlruns", ignore_errors=True)
    return dest


def free_port() -> int:
    """A loopback port nothing listens on (closed again when returned)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_url(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `url` until it answers; fail if `process` (the server) exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, f"{url} did not come up"
            time.sleep(0.5)


def start_mlflow_server(folder: Path, backend_uri: str | None = None,
                        env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on a free loopback port; returns (process, uri).

    Its backend store is `backend_uri` (e.g. postgresql+psycopg2://..., credentials in `env`) or an SQLite file in
    `folder`; artifacts go to `folder`/artifacts, its output to `folder`/mlflow-server.log. It runs in its own process
    group, so `os.killpg(process.pid, ...)` stops it and its workers.
    """
    port = free_port()
    with open(folder / "mlflow-server.log", "w") as log:  # the child keeps its own handle
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             backend_uri or f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env=tool_env() | (env or {}),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    wait_for_url(f"{uri}/health", process, timeout=180)  # a new database: MLflow runs its migrations first
    return process, uri


def lively(model, images):
    """Random weights with a live, smooth signal, and BatchNorm statistics taken from real images.

    With the default init the activations fade layer by layer, every output is ~its bias, and any export or
    quantization error would hide. Zero-mean random weights with data-set BatchNorm go the other way: chaotic,
    1/255 of input noise moves the scores as much as changing the image. A small shared positive weight component
    sits between the two, like a trained network: outputs depend on the image, not on its last bit.
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight)
            module.weight.data += 0.2
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one batch sets the running statistics
    for conv in model.detect.m:
        nn.init.normal_(conv.weight, std=2 / conv.in_channels ** 0.5)
        nn.init.zeros_(conv.bias)  # objectness and class scores spread around 0.5 instead of the ~0 prior
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()
