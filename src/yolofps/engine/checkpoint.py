"""Model artifacts: `arch.json` + `weights.safetensors` + `meta.json`, never a pickled module.

Resume state (optimizer, EMA, epoch) is a separate `train_state.pt` of plain tensors and numbers, loaded
with `torch.load(weights_only=True)`. Every folder is written to a temp folder and renamed into place, so
a killed run never leaves a half-written artifact that a resume would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from yolofps.errors import YolofpsError
from yolofps.model.spec import ArchSpec
from yolofps.model.upstream import ImportedCheckpoint, import_checkpoint
from yolofps.model.yolo import YOLOv5, build_model

ARCH, WEIGHTS, META, STATE = "arch.json", "weights.safetensors", "meta.json", "train_state.pt"


class CheckpointError(YolofpsError):
    """A model artifact that cannot be loaded; the message names the file and what to do."""


def save_model(folder: str | Path, model: YOLOv5, meta: dict[str, Any],
               state: dict[str, Any] | None = None) -> Path:
    """Write a model artifact folder atomically (plus optional resume state); returns the folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.spec.to_json(tmp / ARCH)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if state is not None:
            torch.save(state, tmp / STATE)
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _remove_stale_temps(folder: Path) -> None:
    """Temp folders a killed save left behind (never trusted, only cleaned); a lone `.old` is put back first."""
    recover(folder)
    for stale in folder.parent.glob(f".{folder.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def recover(folder: str | Path) -> Path:
    """Undo a swap cut short between its two renames: `.name.old` (the complete previous artifact) goes back."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and old.is_dir():
        os.replace(old, folder)
    return folder


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` into `target`'s place; the old folder is removed only after the rename succeeded."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


HINT = "delete the folder and rerun the stage that produced it (`dvc repro --force <stage>`)"


def load_model(folder: str | Path, *, hint: str = HINT) -> tuple[YOLOv5, dict[str, Any]]:
    """Rebuild a model from its folder; any damaged file is a CheckpointError naming it and what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found; run the stage that produces it")
    try:  # a garbled spec may fail in parsing or only when the layers are built; both are the file's fault
        model = build_model(ArchSpec.from_json(folder / ARCH))
    except Exception as err:
        raise CheckpointError(f"{folder / ARCH}: unreadable architecture ({str(err)[:200]}); {hint}") from None
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / META}: unreadable metadata ({err}); {hint}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{folder / META}: metadata must be a JSON object; {hint}")
    try:
        weights = load_file(str(folder / WEIGHTS))
        model.load_state_dict(weights, strict=True)
    except (OSError, SafetensorError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{folder / WEIGHTS}: weights do not load ({str(err)[:200]}); {hint}") from None
    return model, meta


def load_weights(path: str | Path) -> tuple[YOLOv5, dict[str, Any]]:
    """A model from a yolofps model folder or an official yolov5 `.pt` (imported safely, `model.upstream`)."""
    path = Path(path)
    if path.is_dir():
        return load_model(path)
    imported = import_checkpoint(path)
    return imported.model, imported_meta(imported)


def imported_meta(imported: ImportedCheckpoint) -> dict[str, Any]:
    """meta.json of an imported checkpoint: its class names, the image size it was trained at, where it came from."""
    return {"job": "import", "model": imported.model.spec.name, "names": imported.names,
            "imgsz": imported.source.get("imgsz") or 640, "imported": imported.source}


def import_to_folder(path: str | Path, folder: str | Path) -> tuple[Path, ImportedCheckpoint]:
    """`yolofps import`: an official yolov5 `.pt` written as a yolofps model folder (arch + safetensors + meta).

    `folder` is the user's path: it must be new or an earlier model folder. save_model swaps whatever is at its
    target, so `--out /etc/passwd` or `--out ~` once replaced that file or directory with the model (issue 20).
    """
    folder = Path(folder)
    if os.path.lexists(folder) and not (folder.is_dir() and (folder / ARCH).is_file()):
        raise CheckpointError(f"{folder}: exists and is not a yolofps model folder; --out must be a new path or a "
                              "model folder to replace (nothing was written)")
    imported = import_checkpoint(path)
    try:
        return save_model(folder, imported.model, imported_meta(imported)), imported
    except (OSError, ValueError) as err:  # ValueError: a NUL in the path
        raise CheckpointError(f"{folder}: cannot write the model folder ({getattr(err, 'strerror', None) or err}); "
                              "choose --out in a writable folder") from None


def load_state(folder: str | Path, *, hint: str = HINT) -> dict[str, Any] | None:
    """Resume state saved next to a model, or None if there is none (weights_only: no unpickling)."""
    path = Path(folder) / STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable resume state ({str(err)[:200]}); {hint}") from None
    if not isinstance(state, dict) or not isinstance(state.get("fit"), dict):
        raise CheckpointError(f"{path}: not a yolofps resume state; {hint}")
    return state
