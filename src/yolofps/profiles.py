"""Named profiles: `profiles/<name>.yaml` holds the params keys that differ from params.yaml, run as a DVC experiment.

params.yaml is the short demo; a profile is an experiment on top of it, not a second params file: `make demo-full`
runs `dvc exp run -n <name>-<time> -S key=value ...` with the profile's keys, so the run is tracked, compared
(`dvc exp show`, `dvc metrics diff`) and applied like any other experiment. The keys are checked against the
schema before DVC starts, so a stale profile fails in a second, not after an hour of training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from yolofps.config import flatten, load_config, read_params
from yolofps.errors import ConfigError


def profile_path(root: Path, name: str) -> Path:
    return root / "profiles" / f"{name}.yaml"


def overrides(root: Path, name: str) -> dict[str, Any]:
    """The profile's keys as dotted overrides, validated against params.yaml (unknown keys, types, values)."""
    path = profile_path(root, name)
    if not path.is_file():
        known = sorted(p.stem for p in (root / "profiles").glob("*.yaml"))
        raise ConfigError(f"{path}: no profile {name!r}; profiles: {known}")
    flat = flatten(read_params(path))
    load_config(root / "params.yaml", flat)  # raises ConfigError naming the key
    return flat


def dvc_command(flat: dict[str, Any], run_name: str) -> list[str]:
    """`dvc exp run` with one `-S key=value` per profile key; values as JSON, which DVC parses as the YAML it is."""
    command = ["dvc", "exp", "run", "--name", run_name]
    for key, value in flat.items():
        command += ["--set-param", f"{key}={json.dumps(value)}"]
    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m yolofps.profiles", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a profile under profiles/, e.g. full")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc command, run nothing")
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        flat = overrides(root, args.name)
    except ConfigError as err:
        print(f"yolofps: error: {err}", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    command = dvc_command(flat, f"{args.name}-{stamp}")
    print(" ".join(command), flush=True)
    if args.dry_run:
        return 0
    start = time.monotonic()
    code = subprocess.call(command, cwd=root)
    print(f"\nprofile {args.name}: dvc exp run exited {code} after {time.monotonic() - start:.0f} s wall", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
