"""params.yaml loading: strict keys and types, -S overrides like `dvc exp run -S`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import PROJECT_ROOT
from yolofps.config import Config, ConfigError, TransformSpec, load_config, parse_override, read_params


def write(tmp_path: Path, text: str) -> Path:
    """A params file: the project's with `text` merged over it (section by section), or `text` as it is when it is
    not a YAML mapping (the malformed-file tests)."""
    path = tmp_path / "params.yaml"
    try:
        changes = yaml.safe_load(text)
    except yaml.YAMLError:
        changes = None
    if not isinstance(changes, dict):
        path.write_text(text)
        return path
    path.write_text(yaml.safe_dump(merged(read_params(PROJECT_ROOT / "params.yaml"), changes), sort_keys=False))
    return path


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        both_sections = isinstance(value, dict) and isinstance(out.get(key), dict) and value
        out[key] = merged(out[key], value) if both_sections else value
    return out


def test_project_params_load_with_every_section():
    cfg = load_config(PROJECT_ROOT / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.source == "synthetic"
    assert all(isinstance(t, TransformSpec) for t in cfg.augment.transforms)
    with pytest.raises(AttributeError):  # frozen
        cfg.data.num_train = 3  # type: ignore[misc]


def test_unknown_key_names_key_file_and_accepted_keys(tmp_path):
    path = write(tmp_path, "data:\n  num_trian: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "data.num_trian" in message and str(path) in message and "num_train" in message


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        load_config(write(tmp_path, "trian: {}\n"))


@pytest.mark.parametrize("text, key", [
    ("data:\n  num_train: ten\n", "data.num_train"),
    ("data:\n  num_train: 1.5\n", "data.num_train"),
    ("seed: true\n", "seed"),
    ("device: tpu\n", "device"),
    ("augment:\n  transforms: {HorizontalFlip: {p: 0.5}}\n", "augment.transforms"),
    ("data: 5\n", "data"),
])
def test_wrong_type_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_impossible_value_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="num_train"):
        load_config(write(tmp_path, "data:\n  num_train: -1\n"))


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    assert load_config(write(tmp_path, "data:\n  min_aspect: 1\n")).data.min_aspect == 1.0


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_parse_values_as_yaml_like_dvc(tmp_path):
    path = write(tmp_path, "seed: 1\n")
    cfg = load_config(path, ["data.num_train=7", "seed=3", "data.source=my data.yaml", "augment.copies=0"])
    assert (cfg.data.num_train, cfg.seed, cfg.data.source, cfg.augment.copies) == (7, 3, "my data.yaml", 0)
    cfg = load_config(path, {"augment.transforms": [{"HorizontalFlip": {"p": 1.0}}]})
    assert cfg.augment.transforms == (TransformSpec("HorizontalFlip", {"p": 1.0}),)
    assert parse_override("data.min_aspect=0.5") == ("data.min_aspect", 0.5)


@pytest.mark.parametrize("override, match", [
    ("data.num_trian=3", "num_trian"),
    ("nope=1", "nope"),
    ("seed.x=1", "not a section"),
    ("data.num_train", "KEY=VALUE"),
    ("data.num_train=abc", "data.num_train"),
])
def test_bad_overrides_are_clear_errors(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, "seed: 0\n"), [override])


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "seed: 1\ntrain:\n  epochs: [3,\n  imgsz: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}:5:1:") and "not valid YAML" in message and "line 3" in message
    assert "\n" not in message  # one line, not the parser's excerpt of the file


@pytest.mark.parametrize("override, key", [
    ("train.epochs=-1", "train.epochs"),
    ("train.epochs=0", "train.epochs"),  # 0 only with train.weights
    ("train.weights=/tmp/yolov5s.pt", "train.weights"),  # outside weights/: DVC would not see it change
    ("train.weights=weights/../yolov5s.pt", "train.weights"),
    ("train.imgsz=100", "train.imgsz"),
    ("train.imgsz=0", "train.imgsz"),
    ("train.batch=0", "train.batch"),
    ("train.optim.momentum=1.5", "train.optim.momentum"),
    ("train.optim.weight_decay=-0.1", "train.optim.weight_decay"),
    ("train.resume=1", "train.resume"),
    ("train.optim.optimizer=true", "train.optim.optimizer"),  # a Literal: true is not the string "true"
    ("prune.ratios=[1.0]", "prune.ratios"),
    ("prune.ratios=[0.0]", "prune.ratios"),
    ("prune.ratios=[0.5, 0.5]", "prune.ratios"),
    ("prune.ratios=0.5", "prune.ratios"),
    ("distill.ratio=0.4", "distill.ratio"),
    ("bench.modes=[eager, turbo]", "bench.modes"),
    ("bench.store=benchmarks.db", "bench.store"),  # a path, not a URL
    ("bench.store=postgresql://bench:hunter2@db.example/bench", "bench.store"),  # the password belongs in the env
    ("register.model_name=my model", "register.model_name"),
    ("register.gates.map_tolerance=2", "register.gates.map_tolerance"),
    ("mlflow.tracking_uri=", "mlflow.tracking_uri"),
    ("device=tpu", "device"),
    ("data.val_fraction=1", "data.val_fraction"),
    ("train.optim.lr0=.inf", "train.optim.lr0"),  # non-finite: refused at load, before a NaN loss trains for an hour
    ("train.optim.warmup_bias_lr=.nan", "train.optim.warmup_bias_lr"),
    ("prune.ratios=[.nan]", r"prune.ratios\[0\]"),
    ("seed=-1", "seed"),  # numpy and the loaders take 32-bit seeds: these failed as "unexpected error" (issue 20)
    ("seed=4294967296", "seed"),
])
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(PROJECT_ROOT / "params.yaml", [override])


@pytest.mark.parametrize("text, key", [
    ("train:\n  epochs: -3\n", "train.epochs"),
    ("train:\n  imgsz: 100\n", "train.imgsz"),
    ("train:\n  epocs: 3\n", "train.epocs"),
    ("train: [\n", "params.yaml:2:"),
    ("\x89PNG\r\n\x1a\n\x00\x00", "params.yaml"),
])
def test_the_cli_stops_before_any_work_with_one_message_and_exit_2(tmp_path, monkeypatch, capsys, text, key):
    from yolofps import cli

    if text.isascii():
        write(tmp_path, text)  # a whole params file with this one change
    else:
        (tmp_path / "params.yaml").write_bytes(text.encode("latin-1"))  # not UTF-8 at all
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yolofps: error:") and key in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing was written


def _keys(section: dict, prefix: str = "") -> list[str]:
    """Every dotted key of params.yaml, sections and values alike (a list such as augment.transforms is a value)."""
    keys = []
    for name, value in section.items():
        keys.append(prefix + name)
        if isinstance(value, dict) and not prefix.startswith("augment.transforms"):
            keys += _keys(value, f"{prefix}{name}.")
    return keys


PARAMS_KEYS = _keys(read_params(PROJECT_ROOT / "params.yaml"))


def test_every_config_field_is_a_params_key_and_no_field_has_a_default():
    """One owner per value: params.yaml. A dataclass default would be a second, silent one."""
    import dataclasses

    cfg = load_config(PROJECT_ROOT / "params.yaml")
    stack = [("", cfg)]
    while stack:
        prefix, obj = stack.pop()
        for f in dataclasses.fields(obj):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, prefix + f.name
            assert prefix + f.name in PARAMS_KEYS, f"{prefix}{f.name} has no key in params.yaml"
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, TransformSpec):
                stack.append((f"{prefix}{f.name}.", value))


@pytest.mark.parametrize("key", PARAMS_KEYS)
def test_removing_any_params_key_is_an_error_naming_it(tmp_path, key):
    raw = read_params(PROJECT_ROOT / "params.yaml")
    *parents, name = key.split(".")
    section = raw
    for part in parents:
        section = section[part]
    del section[name]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"missing key {key} " in str(err.value) and str(path) in str(err.value)
