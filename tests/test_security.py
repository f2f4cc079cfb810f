"""Security: nothing a user hands in is unpickled or executed, the UI stays on loopback, no secret is logged.

Two layers: a static scan of the code (one AST pass per file, shown to catch each pattern on a bad snippet), and
behavioural tests that hand in the malicious file or value and look at what happened.
"""

from __future__ import annotations

import ast
import logging
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from configs import write_params
from helpers import PROJECT_ROOT, tool_env
from yolofps.config import ConfigError, MLflowConfig, load_config
from yolofps.engine import checkpoint
from yolofps.engine.checkpoint import CheckpointError
from yolofps.model.spec import preset
from yolofps.model.yolo import build_model
from yolofps.redact import redact_text, redact_uri
from yolofps.registry import TrackingRun

SCANNED = ("src", "flows", "tasks", "benchmarks")
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_CALLS = {"os.system", "os.popen", "eval", "exec", "pd.read_pickle", "pandas.read_pickle",
                "mlflow.pytorch.log_model", "mlflow.pytorch.save_model", "mlflow.pytorch.load_model", "torch.jit.load"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call target (`yaml.load`, `torch.load`), '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _true_keyword(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_uses(source: str) -> list[str]:
    """Every unsafe pattern in one module's source, as 'line: what'."""
    tree = ast.parse(source)
    pyyaml = any(isinstance(n, ast.Import) and any(a.name == "yaml" for a in n.names) for n in ast.walk(tree))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{node.lineno}: import {m}" for m in modules if m.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        if name in UNSAFE_CALLS:
            found.append(f"{node.lineno}: {name}()")
        if _true_keyword(node, "shell"):
            found.append(f"{node.lineno}: shell=True")
        if name.endswith("load") and name.split(".")[-2:-1] == ["np"] and _true_keyword(node, "allow_pickle"):
            found.append(f"{node.lineno}: np.load(allow_pickle=True)")
        if name == "torch.load" and not _true_keyword(node, "weights_only"):
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        if pyyaml and name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"{node.lineno}: {name} (PyYAML: use yaml.safe_load)")
        if name == "YAML" and any(k.arg == "typ" and getattr(k.value, "value", "") in ("unsafe", "full")
                                  for k in node.keywords):
            found.append(f"{node.lineno}: ruamel YAML(typ=unsafe)")
    return found


def test_the_scanner_catches_each_pattern():
    bad = """
import yaml, pickle, subprocess, torch, os
import numpy as np
from ruamel.yaml import YAML
yaml.load(text)
torch.load(path)
torch.load(path, weights_only=False)
subprocess.run(cmd, shell=True)
os.system(cmd)
np.load(path, allow_pickle=True)
YAML(typ="unsafe")
eval(text)
"""
    assert len(unsafe_uses(bad)) == 9, unsafe_uses(bad)
    good = "import yaml, torch\nyaml.safe_load(t)\ntorch.load(p, map_location='cpu', weights_only=True)\n"
    assert unsafe_uses(good) == []
    # ruamel's round-trip loader (tasks/dvc.py) builds only plain data and comments: `yaml` there is not PyYAML
    assert unsafe_uses("from ruamel.yaml import YAML\nyaml = YAML()\nyaml.load(text)\n") == []


def test_no_unsafe_loading_or_shell_anywhere_in_the_code():
    files = [p for folder in SCANNED for p in sorted((PROJECT_ROOT / folder).rglob("*.py"))]
    assert len(files) > 40
    problems = [f"{p.relative_to(PROJECT_ROOT)}:{u}" for p in files for u in unsafe_uses(p.read_text())]
    assert problems == []


class _Payload:
    """Unpickling this runs code: it writes a file (what an attacker's train_state.pt would do)."""

    target = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "owned"))


def test_a_pickled_payload_as_resume_state_is_refused_and_never_runs(tmp_path):
    folder = checkpoint.save_model(tmp_path / "last", build_model(preset("tiny", 2)), {"names": ["a", "b"]})
    marker = tmp_path / "owned.txt"
    _Payload.target = str(marker)
    (folder / checkpoint.STATE).write_bytes(pickle.dumps({"fit": {"epoch": 1}, "x": _Payload()}))
    with pytest.raises(CheckpointError, match="train_state.pt"):
        checkpoint.load_state(folder)
    assert not marker.exists()
    pickle.loads((folder / checkpoint.STATE).read_bytes())  # the payload does work when unpickled unsafely
    assert marker.read_text() == "owned"


def test_a_pickle_renamed_to_safetensors_is_refused(tmp_path):
    folder = checkpoint.save_model(tmp_path / "m", build_model(preset("tiny", 2)), {"names": ["a", "b"]})
    # a pickle zip, not safetensors
    torch.save(build_model(preset("tiny", 2)).state_dict(), folder / checkpoint.WEIGHTS)
    with pytest.raises(CheckpointError, match="weights.safetensors"):
        checkpoint.load_model(str(folder))  # a str path works as well as a Path


def test_a_password_in_the_tracking_uri_is_refused_by_the_config(tmp_path):
    for uri in ("https://alice:hunter2@mlflow.example.com", "https://mlflow.example.com/?access_token=hunter2"):
        with pytest.raises(ConfigError, match="mlflow.tracking_uri must not contain a password") as err:
            load_config(PROJECT_ROOT / "params.yaml", [f"mlflow.tracking_uri={uri}"])
        assert "hunter2" not in str(err.value) and "MLFLOW_TRACKING_PASSWORD" in str(err.value)
    assert MLflowConfig("https://alice@mlflow.example.com", "yolofps", False).tracking_uri  # a user name alone is fine


def test_redaction_of_uris():
    assert redact_uri("https://alice:hunter2@h:5000/p?token=abc&x=1") == "https://alice:***@h:5000/p?token=***&x=1"
    for uri in ("sqlite:///mlflow.db", "http://127.0.0.1:5000", "s3://bucket/path", "file:///tmp/x"):
        assert redact_uri(uri) == uri
    message = "HTTPSConnectionPool(host='h'): Max retries exceeded with url: https://bob:hunter2@h/api (Caused by x)"
    assert "hunter2" not in redact_text(message) and "https://bob:***@h/api" in redact_text(message)


def test_tracking_never_writes_a_credential_to_params_tags_or_logs(tmp_path, caplog):
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = MLflowConfig(tracking_uri=store, experiment="yolofps", system_metrics=False)
    secret = {"remote": "s3://bucket/data?X-Amz-Signature=hunter2", "db": "postgresql://app:hunter2@db/mlflow"}
    with TrackingRun(cfg, run_name="secrets", params={"data": secret}, tags={"origin": secret["db"]}) as run:
        run_id = run.run_id
    logged = MlflowClient(store).get_run(run_id).data
    assert logged.params["data.db"] == "postgresql://app:***@db/mlflow"
    assert logged.tags["origin"].endswith("***@db/mlflow")
    assert "hunter2" not in str(logged.params) + str(logged.tags)

    closed = _closed_port()  # a server that is down: the warning names it and training goes on
    with caplog.at_level(logging.WARNING, logger="yolofps.registry"):
        down = TrackingRun(MLflowConfig(f"http://127.0.0.1:{closed}", "yolofps", False),
                           run_name="x", params={"data": secret}, tags={})
    assert not down.active and "tracking unavailable" in caplog.text and "hunter2" not in caplog.text


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when the socket is: nothing listens there


def test_dvc_remote_credentials_stay_in_the_git_ignored_local_config(project):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=tool_env(), capture_output=True,
                              text=True, check=True)

    run("remote", "add", "-d", "store", "s3://bucket/yolofps")
    run("remote", "modify", "--local", "store", "secret_access_key", "hunter2")
    assert "hunter2" not in (project / ".dvc" / "config").read_text()
    assert "hunter2" in (project / ".dvc" / "config.local").read_text()
    ignored = subprocess.run(["git", "check-ignore", ".dvc/config.local"], cwd=project, capture_output=True, text=True)
    assert ignored.returncode == 0  # git never sees it: DVC's own .dvc/.gitignore lists it
    assert "hunter2" not in (project / "params.yaml").read_text()


@pytest.mark.slow
def test_mlflow_ui_listens_on_loopback_only(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    port = _closed_port()
    ui = subprocess.Popen([sys.executable, "-m", "yolofps.cli", "ui", "--port", str(port), "--params", str(params)],
                          env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        listening = _wait_for_listener(port, ui)
        assert listening == {"127.0.0.1"}
    finally:
        _stop_group(ui)


def _wait_for_listener(port: int, process: subprocess.Popen, timeout: float = 120) -> set[str]:
    """The addresses something listens on at `port`, once anything does."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
        if found:
            return found
        assert process.poll() is None, "yolofps ui exited"
        time.sleep(0.5)
    raise AssertionError(f"nothing listened on port {port}")


def _stop_group(process: subprocess.Popen) -> None:
    import os
    import signal

    os.killpg(process.pid, signal.SIGTERM)  # the UI and the server workers it started, by their group id
    process.wait(timeout=30)
