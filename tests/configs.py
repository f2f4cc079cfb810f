"""Config sections for unit tests, built from the project's params.yaml through the real loader.

params.yaml owns every value (the dataclasses have no defaults), so a test states only what it depends on and
gets everything else, validated, from the file a user runs: `train_config({"epochs": 4, "optim.lr0": 0.02})`.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from helpers import PROJECT_ROOT
from yolofps.config import Config, LoaderConfig, TrainConfig, load_config

# no train-time augmentation: tests of the optimizer, loss and evaluation compare like with like
PLAIN_LOADER = {"max_boxes": 8, "mosaic": 0.0, "close_mosaic": 0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0,
                "translate": 0.0, "scale": 0.0, "degrees": 0.0, "shear": 0.0, "fliplr": 0.0, "flipud": 0.0}


def project_config(overrides: Mapping[str, Any] | None = None) -> Config:
    """params.yaml with `{dotted key: value}` overrides applied, as `yolofps <stage> -S key=value` would."""
    return load_config(PROJECT_ROOT / "params.yaml", dict(overrides or {}))


def train_config(changes: Mapping[str, Any] | None = None) -> TrainConfig:
    """The train section with changes keyed below it: {"epochs": 3, "optim.optimizer": "SGD"}."""
    return project_config({f"train.{key}": value for key, value in (changes or {}).items()}).train


def loader_config(changes: Mapping[str, Any] | None = None) -> LoaderConfig:
    """train.loader with changes: {"max_boxes": 4}."""
    return train_config({f"loader.{key}": value for key, value in (changes or {}).items()}).loader


def replaced(section: Any, changes: Mapping[str, Any]) -> Any:
    """`dataclasses.replace` by dotted key, for sections nested below `section`: {"optim.lr0": 0.1}."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    flat |= {head: replaced(getattr(section, head), inner) for head, inner in nested.items()}
    return dataclasses.replace(section, **flat)


def write_params(path: Path, changes: Mapping[str, Any]) -> Path:
    """The project's params.yaml with `{dotted key: value}` changes written to `path` (for a command run elsewhere)."""
    from tasks.dvc import apply_overrides

    shutil.copy(PROJECT_ROOT / "params.yaml", path)
    apply_overrides(path, dict(changes))  # as `dvc exp run -S` writes them: validated, comments kept
    return path
