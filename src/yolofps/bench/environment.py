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


# the instruction sets that decide which runtime and dtype win on a CPU (bf16, INT8 dot products, AMX tiles)
DECISIVE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_flags() -> list[str]:
    """The decisive x86 flags this CPU has (from /proc/cpuinfo; empty where it is not readable)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in DECISIVE_FLAGS if flag in flags]


def environment_stamp(packages: tuple[str, ...] = ("torch", "numpy", "opencv-python-headless", "albumentations",
                                                  "onnxruntime", "openvino", "nncf")) -> dict:
    """CPU/GPU, core count, CPU flags that decide a winner, OS, Python, package versions, time of measurement (UTC)."""
    stamp = {
        "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
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
