"""DVC experiment commands on a committed copy of the session's tiny pipeline: `dvc exp run -S`, `dvc exp show`
(the invocation the README gives), `dvc metrics diff`, `dvc plots diff`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import PROJECT_ROOT, copy_run, run_cmd

pytestmark = pytest.mark.slow

# What a user reads first: the selected variant, its FPS and mAP next to the baseline's, then the params that differ
# between the rows. --drop removes every column that is not a param (a negative lookahead over the params.yaml
# sections), --keep brings the headline metrics back (DVC keeps its own column order: metrics files in dvc.yaml
# order, keys in file order, then params), --only-changed hides the params equal in every row.
# The README gives this command (checked below).
HEADLINE = ("selected.name", "summary.selected/fps_b1", "summary.selected/metrics/mAP50-95B",
            "summary.baseline/fps_b1", "summary.baseline/metrics/mAP50-95B", "summary.selected/speedup_b1")
DROP = r"^(?!(seed|device)$|(data|augment|train|eval|prune|distill|quantize|bench|register|mlflow|prefect)\.).*"
KEEP = r"^(Experiment|Created|selected\.name|summary\.(selected|baseline)/(fps_b1|metrics/mAP50-95B)" \
       r"|summary\.selected/speedup_b1)$"
EXP_SHOW = ["exp", "show", "--no-pager", "--md", "--only-changed", "--drop", DROP, "--keep", KEEP]


def dvc(project: Path, *args: str) -> str:
    return run_cmd([sys.executable, "-m", "dvc", *args], project).stdout


@pytest.fixture(scope="module")
def experiment(shared_run, tmp_path_factory) -> Path:
    """A copy of the shared run committed to git, then one real experiment: bench.runs 3 -> 4 (bench, register)."""
    project = copy_run(shared_run, tmp_path_factory.mktemp("experiments") / "project")
    run_cmd(["git", "add", "-A"], project)
    run_cmd(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "baseline"],
            project)
    out = dvc(project, "exp", "run", "-n", "runs4", "-S", "bench.runs=4")
    assert "Running stage 'bench'" in out and "Running stage 'train'" not in out, out  # only bench and after
    return project


def test_exp_run_records_the_experiment_with_its_param_and_metrics(experiment):
    workspace, baseline = json.loads(dvc(experiment, "exp", "show", "--json"))
    assert workspace["rev"] == "workspace"
    (exp,) = [e for e in baseline["experiments"] if e["name"] == "runs4"]
    data = exp["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["bench"]["runs"] == 4
    assert baseline["data"]["params"]["params.yaml"]["data"]["bench"]["runs"] == 3
    bench = data["metrics"]["metrics/bench.json"]["data"]
    assert bench["selected"]["name"] and bench["summary"]["selected/fps_b1"] > 0


def test_metrics_diff_shows_the_remeasured_fps_and_no_accuracy_change(experiment):
    diff = json.loads(dvc(experiment, "metrics", "diff", "--json"))  # HEAD (baseline) vs workspace (the experiment)
    bench = diff["metrics/bench.json"]
    assert "summary.selected/fps_b1" in bench or "summary.baseline/fps_b1" in bench, bench  # timed again
    assert "summary.baseline/metrics/mAP50-95B" not in bench  # same models, same evaluation: mAP unchanged
    assert not {"metrics/train.json", "metrics/data.json"} & set(diff)  # stages that did not rerun


def test_plots_diff_has_both_revisions_of_the_bench_scatter(experiment, tmp_path):
    plots = json.loads(dvc(experiment, "plots", "diff", "--json", "-o", str(tmp_path / "plots")))
    (scatter,) = plots["data"]["plots/bench.csv"]
    assert set(scatter["revisions"]) == {"HEAD", "workspace"}
    rows = scatter["content"]["data"]["values"]
    assert {row["rev"] for row in rows} == {"HEAD", "workspace"} and all("fps_b1" in row for row in rows)
    assert (tmp_path / "plots").is_dir()


def headline_columns(markdown: str) -> list[str]:
    return [cell.strip() for cell in markdown.splitlines()[0].strip().strip("|").split("|")]


def test_the_readme_exp_show_leads_with_the_variant_fps_and_map(experiment):
    columns = headline_columns(dvc(experiment, *EXP_SHOW))
    assert columns[:2] == ["Experiment", "Created"]
    assert columns[2:2 + len(HEADLINE)] == list(HEADLINE), columns
    assert columns[2 + len(HEADLINE):] == ["bench.runs"]  # the one param the experiment changed


def test_the_readme_gives_this_exp_show_invocation():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert f"--drop '{DROP}'" in readme and f"--keep '{KEEP}'" in readme and "--only-changed" in readme
