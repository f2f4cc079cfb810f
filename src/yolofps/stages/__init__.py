"""Pipeline stages: one module each, with `run(cfg, paths) -> StageResult` and a thin `main()`.

`run` is the only implementation of a stage: dvc.yaml calls it through the CLI, Prefect through DVC,
tests directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StageResult:
    """What a stage produced: its output paths and its flat metrics."""

    outputs: dict[str, Path]
    metrics: dict[str, float | int] = field(default_factory=dict)
