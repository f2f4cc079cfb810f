"""Orchestration overhead: the Prefect `pipeline` flow vs a plain `dvc repro` of the same stages, same machine.

    python benchmarks/orchestration_overhead.py [--set train.epochs=3 ...] [--out benchmarks/results/...json]

Two fresh copies of the project (git + DVC repos in a temp folder) run the same params, one through each door:
`dvc repro` and `python -m flows.pipeline` (Prefect's ephemeral server, as a user without a server runs it). Both
are timed as the commands a user types, interpreter start-up included. Then each runs again with everything
cached (the no-op cost). The order alternates between repeats so drift hits both alike. Goal: flow ≤ 1.10× dvc.

The demo params take ~43 min per run on 2 cores, so the default overrides shorten training (the stages, data set
and image size stay the demo's); the fixed overhead is then a larger share than in a full demo run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # flows/ and tasks/ are top-level packages of the repo

from tasks.dvc import apply_overrides  # noqa: E402
from yolofps.bench.environment import write_result  # noqa: E402
from yolofps.config import parse_override  # noqa: E402

SHORT = ["train.epochs=3", "prune.finetune_epochs=1", "distill.epochs=1", "bench.runs=10",
         "bench.modes=[eager, onnxruntime]", "bench.batch_sizes=[1]", "mlflow.system_metrics=false"]


def fresh_project(root: Path, overrides: dict) -> Path:
    """A copy of the pipeline files in a new git + DVC repo, with `overrides` applied to params.yaml."""
    root.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    shutil.copytree(PROJECT_ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                    [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    apply_overrides(root / "params.yaml", overrides)
    return root


def timed(command: list[str], cwd: Path) -> float:
    """Wall seconds of one command (it must succeed)."""
    env = dict(os.environ) | {"PYTHONPATH": str(PROJECT_ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                              "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds


DOORS = {"dvc repro": [sys.executable, "-m", "dvc", "repro"],
         "prefect flow": [sys.executable, "-m", "flows.pipeline", "--no-pull", "--project-dir", "."]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                        help=f"params overrides for both runs (default: {' '.join(SHORT)})")
    parser.add_argument("--repeats", type=int, default=1, help="full runs per door (order alternates)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "orchestration_overhead.json"))
    args = parser.parse_args(argv)
    overrides = dict(parse_override(text) for text in (args.overrides if args.overrides is not None else SHORT))
    full: dict[str, list[float]] = {door: [] for door in DOORS}
    noop: dict[str, list[float]] = {door: [] for door in DOORS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = list(DOORS) if repeat % 2 == 0 else list(reversed(DOORS))
            for door in order:
                root = fresh_project(Path(tmp) / f"{door.replace(' ', '-')}-{repeat}", overrides)
                full[door].append(timed(DOORS[door], root))
                noop[door].append(timed(DOORS[door], root))  # everything cached: DVC skips every stage
                print(f"{door:>13}: full {full[door][-1]:7.1f} s, no-op {noop[door][-1]:6.1f} s", flush=True)
    rows = [{"door": door, "full_s": round(min(full[door]), 2), "noop_s": round(min(noop[door]), 2),
             "full_runs_s": [round(x, 2) for x in full[door]], "noop_runs_s": [round(x, 2) for x in noop[door]]}
            for door in DOORS]
    ratio = rows[1]["full_s"] / rows[0]["full_s"]
    print("\n| door | full run (s) | no-op run (s) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['door']} | {row['full_s']:.1f} | {row['noop_s']:.1f} |")
    print(f"\nflow / dvc repro, full run: {ratio:.3f}x (goal <= 1.10); "
          f"no-op flow: {rows[1]['noop_s']:.1f} s vs no-op dvc repro {rows[0]['noop_s']:.1f} s")
    write_result(args.out, "orchestration_overhead", {"overrides": overrides, "repeats": args.repeats}, rows,
                 flow_over_dvc=round(ratio, 3), goal=1.10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
