"""The `yolofps` command: each subcommand's help names its own options; errors are one message, never a traceback."""

from __future__ import annotations

import shutil
import sys

import pytest

from configs import write_params
from helpers import PROJECT_ROOT, run_cmd
from yolofps import cli
from yolofps.cli import STAGES

# each subcommand's own options, written out here (not read back from the parser) so a lost option fails the test
STAGE_OPTIONS = ["--params", "-S KEY=VALUE, --set KEY=VALUE"]
OWN_OPTIONS = {name: STAGE_OPTIONS for name in STAGES} | {
    "validate": ["path", "--strict", "--clip-tolerance", "--json"],
    "promote": ["--version", "--alias", "--dry-run", "--force", "--reason", "--params"],
    "import": ["path", "--out"],
    "ui": ["--port", "--params"],
}


@pytest.mark.parametrize("command", sorted(OWN_OPTIONS))
def test_each_command_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert out.startswith(f"usage: yolofps {command} ")
    for option in OWN_OPTIONS[command]:
        assert option in out, option
    if command in STAGES:
        assert STAGES[command][1] in out  # its description, not the top-level one
    others = {option for name, options in OWN_OPTIONS.items() for option in options} - set(OWN_OPTIONS[command])
    assert not [option for option in others if option.startswith("--") and f"{option} " in out], others


def test_unknown_command_and_option_exit_2_with_usage(tmp_path):
    result = run_cmd(["yolofps", "trian"], tmp_path, check=False)
    assert result.returncode == 2 and "invalid choice: 'trian'" in result.stderr and result.stdout == ""
    assert result.stderr.startswith("usage: yolofps")
    result = run_cmd(["yolofps", "data", "--epochs", "3"], tmp_path, check=False)
    assert result.returncode == 2 and "unrecognized arguments: --epochs 3" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing ran


def test_config_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  num_trian: 3\n")
    result = run_cmd(["yolofps", "data"], tmp_path, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("yolofps: error:") and "num_trian" in result.stderr


def test_bad_override_and_missing_params(tmp_path):
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    result = run_cmd(["yolofps", "augment", "-S", "augment.copies=many"], tmp_path, check=False)
    assert result.returncode == 2 and "augment.copies" in result.stderr and "Traceback" not in result.stderr
    result = run_cmd(["yolofps", "data", "--params", "missing.yaml"], tmp_path, check=False)
    assert result.returncode == 2 and "missing.yaml" in result.stderr


def test_stage_module_main_is_the_cli(tmp_path):
    result = run_cmd([sys.executable, "-m", "yolofps.stages.data", "--help"], tmp_path)
    assert "--params" in result.stdout and "-S" in result.stdout


def test_unreachable_tracking_server_exits_tempfail_for_the_flow_to_retry(tmp_path):
    """A service that stays down after the stage's own retries exits 75 (EX_TEMPFAIL), which the flow retries."""
    import socket

    from yolofps.errors import EXIT_TEMPFAIL

    with socket.socket() as sock:  # a loopback port nothing listens on once the socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    write_params(tmp_path / "params.yaml", {"mlflow.tracking_uri": f"http://127.0.0.1:{port}", "register.retries": 1})
    result = run_cmd(["yolofps", "promote"], tmp_path, check=False)
    assert result.returncode == EXIT_TEMPFAIL, result.stderr
    assert "failed after 1 attempts" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [
    ["train", "-S", "seed=-1"],
    ["train", "-S", "seed=99999999999999999999"],
    ["validate", "data.yaml", "--clip-tolerance", "nan"],
    ["validate", "data.yaml", "--clip-tolerance", "-1"],
    ["ui", "--port", "99999"],
    ["validate", "/dev/null"],
    ["import", "/dev/null", "--out", "model"],
    ["validate", "data.yaml", "--json", "."],  # a folder as the report file
])
def test_bad_values_and_options_are_named_errors_never_unexpected_ones(tmp_path, argv):
    """Issue 20: each of these reached the catch-all ("unexpected error: ValueError ...") or, for the port, exited 0
    after MLflow's traceback; the catch-all is the last resort no test should see."""
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "images").mkdir()  # an empty but valid data set for `validate`
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: [a]\n")
    result = run_cmd(["yolofps", *argv], tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert "unexpected error" not in result.stderr and "Traceback" not in result.stderr
    assert "error:" in result.stderr.splitlines()[-1]
