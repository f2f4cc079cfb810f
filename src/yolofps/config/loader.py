"""Reading params.yaml into typed dataclasses: overrides, strict field checks, coercion; generic in the schema.

params.yaml owns every value (the dataclasses declare no defaults), so a missing key, an unknown key and a wrong
type are all errors that name the key, the file and the accepted keys. `-S key=value`
overrides use the syntax of `dvc exp run -S` (the value is parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from yolofps.config.common import TransformSpec
from yolofps.errors import ConfigError


def normalize_overrides(overrides: typing.Sequence[str] | typing.Mapping[str, Any]) -> dict[str, Any]:
    """Overrides as a {dotted key: value} dict, whichever form they came in."""
    if isinstance(overrides, typing.Mapping):
        return dict(overrides)
    return dict(parse_override(text) for text in overrides)


def read_params(path: Path) -> dict[str, Any]:
    """Read a params file as a plain dict, with a clear error for a missing file or bad YAML."""
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (pass --params PATH or run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{_where(path, err)}: not valid YAML: {_yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err.reason} at byte {err.start})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _where(path: Path, err: yaml.YAMLError) -> str:
    """`file:line:column` of a YAML error (1-based, as editors count), or the file alone."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The parser's own words, without its multi-line excerpt of the file."""
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    text = ", ".join(p for p in parts if p) or str(err).splitlines()[0]
    context, problem = getattr(err, "context_mark", None), getattr(err, "problem_mark", None)
    if context is not None and problem is not None and context.line != problem.line:
        text += f" (the construct opened at line {context.line + 1})"  # an unclosed bracket is reported later
    return text


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value` (as `dvc exp run -S`) into the dotted key and the YAML-parsed value."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. -S data.num_train=100")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from None
    return key.strip(), parsed


def set_dotted(raw: dict[str, Any], key: str, value: Any, *, source: str, schema: Any) -> None:
    """Set `raw[a][b] = value` for key `a.b`; the key must name a field of `schema` (a dataclass)."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(schema)}
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"override {key!r}: unknown key {part!r} in {where}; accepted: {sorted(names)}")
        ftype = _field_types(schema)[part]
        if i == len(parts) - 1:
            node[part] = value
        elif dataclasses.is_dataclass(ftype):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {'.'.join(parts[: i + 1])} must be a mapping, got {child!r}")
            node, schema = child, ftype
        else:
            raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a section ({source})")


def from_dict(cls: type, raw: Any, *, source: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(raw).__name__}")
    types_by_name = _field_types(cls)
    unknown = sorted(set(raw) - set(types_by_name))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]!s} in {where}; accepted keys: {sorted(types_by_name)}"
        )
    # the present keys first: a typo (`num_trian`) is reported as the unknown key it is, not as the key it misses
    values = {name: _coerce(types_by_name[name], raw[name], source, prefix + name) for name in raw}
    missing = [name for name in types_by_name if name not in raw]
    if missing:  # params.yaml owns every value: the dataclasses have no defaults to fall back on silently
        raise ConfigError(f"{source}: missing key {prefix}{missing[0]} in {where} (every value lives in params.yaml; "
                          f"missing here: {', '.join(prefix + name for name in missing)})")
    try:
        return cls(**values)
    except ConfigError as err:  # value checks in __post_init__ don't know the file
        raise ConfigError(f"{source}: {err}") from None


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert lists to tuples and ints to floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key} must be {expected}, got {value!r} ({type(value).__name__})")

    if tp is TransformSpec:
        return _transform(value, source, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=key + ".")
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):  # 1 == True must not pass for true
            fail(f"one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None) and value is None:
                return None
        return _coerce(next(a for a in args if a is not type(None)), value, source, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail("a list")
        return tuple(_coerce(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        if not math.isfinite(value):  # .inf / .nan parse as floats and pass every `>= 0` check they meet
            fail("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config schema: unsupported annotation {tp!r} for {key}")


def _transform(value: Any, source: str, key: str) -> TransformSpec:
    """A transform is written as a one-key mapping: `- Name: {arg: value}`."""
    if isinstance(value, TransformSpec):
        return value
    if isinstance(value, str):
        return TransformSpec(value, {})
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"{source}: {key} must be a one-key mapping like `- HorizontalFlip: {{p: 0.5}}`, "
                          f"got {value!r}")
    (name, args), = value.items()
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ConfigError(f"{source}: {key}.{name} arguments must be a mapping, got {args!r}")
    return TransformSpec(str(name), dict(args))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'optim': {'lr0': 0.01}}} -> {'train.optim.lr0': 0.01}; lists are kept as one value."""
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat |= flatten(value, f"{prefix}{key}.")
    return flat


def to_dict(cfg: Any) -> Any:
    """Plain-data view of a config (for logging, hashing and JSON)."""
    if isinstance(cfg, TransformSpec):
        return {cfg.name: dict(cfg.args)}
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg
