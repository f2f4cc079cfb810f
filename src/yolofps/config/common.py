"""What every params section shares: the value check and the albumentations transform spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from yolofps.errors import ConfigError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class TransformSpec:
    """One albumentations transform: its class name and keyword arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
