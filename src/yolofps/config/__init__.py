"""Typed, frozen configuration loaded from params.yaml, one dataclass per section.

Unknown keys and wrong types are errors that name the key, the file and the accepted keys, so a typo in
params.yaml fails before any work starts. `-S key=value` overrides use the syntax of `dvc exp run -S`
(the value is parsed as YAML). The sections live in `training`, `optimization`, `delivery` and
`orchestration`; the generic reading machinery in `loader`; this module holds the whole-file `Config` and
`load_config`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from yolofps.config.common import TransformSpec, _check
from yolofps.config.delivery import BENCH_MODES, BenchConfig, GatesConfig, MLflowConfig, RegisterConfig
from yolofps.config.loader import (
    flatten,
    from_dict,
    normalize_overrides,
    parse_override,
    read_params,
    set_dotted,
    to_dict,
)
from yolofps.config.optimization import DistillConfig, PruneConfig, QatConfig, QuantizeConfig
from yolofps.config.orchestration import PrefectConfig
from yolofps.config.training import (
    AugmentConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LoaderConfig,
    LossConfig,
    OptimConfig,
    TrainConfig,
)
from yolofps.errors import ConfigError

__all__ = ["BENCH_MODES", "AugmentConfig", "BenchConfig", "Config", "ConfigError", "DataConfig", "DistillConfig",
           "DistributedConfig", "EvalConfig", "GatesConfig", "LoaderConfig", "LossConfig", "MLflowConfig",
           "OptimConfig", "PrefectConfig", "PruneConfig", "QatConfig", "QuantizeConfig", "RegisterConfig",
           "TrainConfig",
           "TransformSpec", "flatten", "from_dict", "load_config", "normalize_overrides", "parse_override",
           "read_params", "to_dict"]


@dataclass(frozen=True)
class Config:
    """The whole params.yaml."""

    seed: int
    device: Literal["auto", "cpu", "cuda", "xla"]
    data: DataConfig
    augment: AugmentConfig
    train: TrainConfig
    eval: EvalConfig
    prune: PruneConfig
    distill: DistillConfig
    quantize: QuantizeConfig
    bench: BenchConfig
    register: RegisterConfig
    mlflow: MLflowConfig
    prefect: PrefectConfig

    def __post_init__(self) -> None:
        # numpy's and the data loaders' generators take 32-bit seeds; a larger one failed after the work began
        _check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        if self.distill.student == "pruned":
            _check(self.distill.ratio in self.prune.ratios,
                   f"distill.ratio {self.distill.ratio} must be one of prune.ratios {list(self.prune.ratios)}")


def load_config(path: str | Path = "params.yaml",
                overrides: typing.Sequence[str] | typing.Mapping[str, Any] = ()) -> Config:
    """Load params.yaml, apply overrides, and return a validated frozen Config.

    Overrides are `key=value` strings (values parsed as YAML, as `dvc exp run -S`) or a {dotted key: value} dict.
    """
    path = Path(path)
    raw = read_params(path)
    for key, value in normalize_overrides(overrides).items():
        set_dotted(raw, key, value, source=str(path), schema=Config)
    return from_dict(Config, raw, source=str(path))
