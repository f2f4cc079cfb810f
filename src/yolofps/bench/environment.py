"""The environment stamp: what a figure was measured on (a figure without it is not a figure)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, else what platform reports."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_stamp(packages: tuple[str, ...] = ("torch", "numpy", "opencv-python-headless", "albumentations",
                                                  "onnxruntime")) -> dict:
    """CPU/GPU, core count, OS, Python and package versions, and the time of measurement (UTC)."""
    stamp = {
        "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for package in packages:
        try:
            stamp[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            stamp[package] = None
    try:
        import torch

        stamp["torch_threads"] = torch.get_num_threads()
        stamp["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        stamp["gpu"] = None
    return stamp


def device_name(stamp: dict[str, Any]) -> str:
    """The device a figure belongs to, as the registry's gates compare it: the GPU, else CPU model x cores."""
    return stamp.get("gpu") or f"{stamp.get('cpu')} x{stamp.get('cpu_cores')}"


def write_result(path: str | Path, benchmark: str, settings: dict, rows: list[dict], **extra: Any) -> Path:
    """Write a benchmark's JSON: its name, the environment stamp, its settings and its result rows."""
    path = Path(path)
    result = {"benchmark": benchmark, "environment": environment_stamp(), "settings": settings, "results": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result | extra, indent=2) + "\n")
    print(f"wrote {path}")
    return path
