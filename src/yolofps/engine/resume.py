"""Resume, in one place: what a checkpoint must hold to continue a run, and when a run continues.

`fit` saves `training_state` into `checkpoints/last` after every epoch. A rerun with the same `params_hash`
(`job_hash`) that finds an unfinished `last` continues from it (or any `last` when forced), after `check_compatible`
made sure the saved tensors fit this run's model. `mark_finished` records that a job completed, so a rerun starts over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolofps.config import Config, TrainConfig, to_dict
from yolofps.engine import checkpoint
from yolofps.fileio import write_json
from yolofps.lineage import params_hash


def job_hash(cfg: Config, train: TrainConfig, extra: Any = None) -> str:
    """What must match for an interrupted job to be resumed automatically.

    A starting checkpoint (`train.weights`) counts by its content, passed in `extra` by the train stage, not by its
    path: the same file under another name resumes, another file at the same name does not."""
    settings = {k: v for k, v in to_dict(train).items() if k != "weights"}
    return params_hash({"seed": cfg.seed, "train": settings, "eval": to_dict(cfg.eval), "augment": to_dict(cfg.augment),
                        "extra": extra})


def resume_point(checkpoints: Path, section_hash: str, *, force: bool, verbose: bool = True) -> dict[str, Any] | None:
    """The saved state to continue from: when forced, or when the last run with the same params stopped early."""
    checkpoint.recover(checkpoints / "best")  # undo a kill between the two renames of a save
    last = checkpoint.recover(checkpoints / "last")
    if not (last / checkpoint.STATE).is_file():
        return None
    # never resume from (nor silently discard) a damaged checkpoint: the error names the file and the way out
    hint = f"delete {last} to start this stage over from epoch 0 (rm -r {last}), or restore it from a backup"
    _, meta = checkpoint.load_model(last, hint=hint)
    state = checkpoint.load_state(last, hint=hint)
    if force or (not meta.get("finished", False) and meta.get("params_hash") == section_hash):
        if verbose:
            print(f"resuming from {last} after epoch {state['fit']['epoch']}", flush=True)
        return state
    return None


def check_compatible(state: dict[str, Any], model: nn.Module, last: Path) -> None:
    """A forced resume into a different architecture is a named error, not a tensor-shape traceback."""
    saved = state.get("model") or {}
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    found = {name: tuple(getattr(value, "shape", ())) for name, value in saved.items()}
    if found != expected:
        differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise checkpoint.CheckpointError(
            f"{last / checkpoint.STATE}: saved for a different architecture than this run's model ({len(differ)} "
            f"tensors differ, e.g. {differ[0]}); rerun without -S train.resume=true to start over, or restore the "
            "params the checkpoint was trained with")


def training_state(parts: dict[str, nn.Module | None], optimizer_state: dict | None, fit: dict[str, Any]) -> dict:
    """Resume state as plain tensors/numbers (loadable with weights_only=True).

    `parts`: "model", "ema" (or None) and "objective" (its learned adapters, or None) -> their state dicts.
    """
    state = {name: _state_dict(module) for name, module in parts.items()}
    return state | {"optimizer": _to_cpu(optimizer_state), "fit": fit, "torch_rng": torch.get_rng_state()}


def restore(saved: dict[str, Any], parts: dict[str, nn.Module | None], optimizer: torch.optim.Optimizer) -> dict:
    """Load a `training_state` into this run's modules and optimizer; returns the saved loop counters."""
    for name, module in parts.items():
        if module is None:
            continue
        values = saved.get(name)
        if values is None and name == "ema":
            values = saved["model"]  # saved without EMA, resumed with it: start the average at the weights
        if values is not None:
            module.load_state_dict(values)
    if saved.get("optimizer"):
        optimizer.load_state_dict(saved["optimizer"])
    if saved.get("torch_rng") is not None:
        torch.set_rng_state(saved["torch_rng"])
    return saved["fit"]


def mark_finished(checkpoints: Path, meta: dict[str, Any]) -> None:
    """Record that the job completed, so a later rerun starts over instead of resuming."""
    path = checkpoints / "last" / checkpoint.META
    write_json(path, json.loads(path.read_text()) | meta | {"finished": True})


def _state_dict(module: nn.Module | None) -> dict[str, torch.Tensor] | None:
    return None if module is None else {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _to_cpu(value: Any) -> Any:
    """Optimizer state with every tensor on the host (XLA tensors cannot be saved as they are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
