"""params.yaml loading: strict keys and types, -S overrides like `dvc exp run -S`."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import PROJECT_ROOT
from yolofps.config import Config, ConfigError, TransformSpec, load_config, parse_override


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


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
