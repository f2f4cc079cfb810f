"""dvc.yaml's code deps cannot drift from the code: every module a stage can import is a dep of that stage.

A stage `X` runs `yolofps X`: the console script loads `yolofps.cli`, whose `_run_stage` imports the config and
paths, then `yolofps.stages.X` by name (importlib, so no static import shows it). The closure of a stage is
therefore the modules of the package reachable from `yolofps/stages/X.py`, plus those reachable from the
part of `yolofps/cli.py` that a stage command executes: its module-level imports and the functions in
CLI_STAGE_PATH. cli.py's other handlers (validate, promote, import, ui) import what they need inside
themselves; those imports never run for a stage, so a change there must not rerun the pipeline.

Reachable means any `import` statement anywhere in a module, inside functions too (a function-level import runs
when the stage calls that function), and `import a.b.c` reaches the packages `a` and `a.b` as well, since Python
executes their `__init__.py` first. The analysis is static (`ast`) and covers the package only: third-party
code is pinned by the environment, not by dvc.yaml.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import yaml

from helpers import PROJECT_ROOT
from yolofps.cli import STAGES

PACKAGE = "yolofps"
CLI_MODULE = "yolofps.cli"
# what `yolofps <stage>` executes in cli.py: main() -> build_parser() -> the stage handler, _run_stage()
CLI_STAGE_PATH = ("main", "build_parser", "_run_stage")
# folder deps wider than the closure, on purpose (dvc.yaml says why next to each)
COARSE_ON_PURPOSE = {"register": {"src/yolofps"}}  # the whole package is logged as the pyfunc's code_paths


def module_file(src: Path, name: str) -> Path | None:
    """The file of module `name` under src/ (a package is its __init__.py); None for names outside the package."""
    if name.split(".")[0] != PACKAGE:
        return None
    base = src.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None  # `from yolofps.config import Config`: the name is an attribute, not a module


def import_statements(tree: ast.AST, only_functions: tuple[str, ...] | None = None) -> Iterator[ast.stmt]:
    """Every import statement of a module; with only_functions, skip the bodies of all other functions."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if only_functions is None or not function or child.name in only_functions:
                stack.append(child)


def imported_names(tree: ast.AST, module: str, is_package: bool, only_functions=None) -> set[str]:
    """Module names the imports may load; `from a import b` gives `a` and `a.b` (b may be a submodule)."""
    names: set[str] = set()
    for node in import_statements(tree, only_functions):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: `from . import x` in a/b.py is a.x; in a/__init__.py it is a.x too
            package = module.split(".") if is_package else module.split(".")[:-1]
            anchor = ".".join(package[: len(package) - (node.level - 1)])
            base = f"{anchor}.{base}" if base else anchor
        names.add(base)
        names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_closure(src: Path, entries: Iterable[str]) -> set[Path]:
    """The package files that importing `entries` can execute (cli.py: only its stage path, CLI_STAGE_PATH)."""
    seen: set[Path] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        path = module_file(src, name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parents run their __init__.py first
        scope = CLI_STAGE_PATH if name == CLI_MODULE else None
        todo.extend(imported_names(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", scope))
    return seen


def stage_closure(project: Path, stage: str) -> set[str]:
    """Project-relative paths of every package file `yolofps <stage>` can import."""
    src = project / "src"
    files = import_closure(src, [CLI_MODULE, f"{PACKAGE}.stages.{stage}"])
    return {path.relative_to(project).as_posix() for path in files}


def covered(path: str, deps: Iterable[str]) -> bool:
    """A dep covers a file when it is the file or a folder above it."""
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def uncovered_code(project: Path) -> dict[str, list[str]]:
    """stage -> the files of its import closure that none of its dvc.yaml deps covers (stages with none left out)."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    missing = {}
    for stage, spec in stages.items():
        deps = spec.get("deps", [])
        files = sorted(f for f in stage_closure(project, stage) if not covered(f, deps))
        if files:
            missing[stage] = files
    return missing


def test_every_stage_lists_its_import_closure_as_deps():
    missing = uncovered_code(PROJECT_ROOT)
    assert not missing, "dvc.yaml deps miss code the stage imports (stage: files): " + "; ".join(
        f"{stage}: {', '.join(files)}" for stage, files in missing.items())


def files_of(project: Path, dep: str) -> set[str]:
    """The .py files a code dep stands for: itself, or every one under the folder."""
    if dep.endswith(".py"):
        return {dep}
    return {path.relative_to(project).as_posix() for path in (project / dep).rglob("*.py")}


def test_no_stage_lists_code_it_cannot_import():
    """The other direction: a dep holding a file outside the closure reruns the stage for nothing.

    A folder dep is exact when the stage imports every file in it; COARSE_ON_PURPOSE names the exceptions.
    """
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    extra = {}
    for stage, spec in stages.items():
        closure = stage_closure(PROJECT_ROOT, stage)
        for dep in spec["deps"]:
            outside = files_of(PROJECT_ROOT, dep) - closure
            if dep.startswith("src/") and outside and dep not in COARSE_ON_PURPOSE.get(stage, set()):
                extra[f"{stage}: {dep}"] = sorted(outside)
    assert not extra, f"deps that hold code the stage never imports: {extra}"


def test_the_cli_stage_path_exists():
    """CLI_STAGE_PATH names real functions of cli.py: a rename must not silently empty the CLI's share."""
    tree = ast.parse((PROJECT_ROOT / "src" / "yolofps" / "cli.py").read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert set(CLI_STAGE_PATH) <= functions


@pytest.fixture
def copy_of_project(tmp_path: Path) -> Path:
    """src/ and dvc.yaml copied to tmp_path, so a test can add an import without touching the real tree."""
    shutil.copytree(PROJECT_ROOT / "src" / PACKAGE, tmp_path / "src" / PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


def add_line(path: Path, line: str, after: str) -> None:
    """Insert `line` right after the first line that starts with `after` (keeps __future__ imports first)."""
    lines = path.read_text().splitlines(keepends=True)
    index = next(i for i, text in enumerate(lines) if text.startswith(after))
    lines.insert(index + 1, line + "\n")
    path.write_text("".join(lines))


def test_the_check_names_the_stage_and_the_file_of_a_new_import(copy_of_project):
    """A module-level `import yolofps.lineage` in the data stage, which does not list lineage.py."""
    assert uncovered_code(copy_of_project) == {}
    add_line(copy_of_project / "src/yolofps/stages/data.py", "import yolofps.lineage", "from __future__")
    assert uncovered_code(copy_of_project) == {"data": ["src/yolofps/lineage.py"]}


def test_the_check_follows_relative_imports_inside_functions(copy_of_project):
    """A relative import inside a function, one module away: data and augment import data/formats.py."""
    formats = copy_of_project / "src/yolofps/data/formats.py"
    formats.write_text(formats.read_text() + "\n\ndef _late():\n    from ..lineage import lineage_tags  # noqa\n")
    missing = uncovered_code(copy_of_project)
    assert missing == {"data": ["src/yolofps/lineage.py"], "augment": ["src/yolofps/lineage.py"]}, missing


def test_the_check_sees_a_submodule_imported_by_from_and_its_package(copy_of_project):
    """`from yolofps.bench import environment` loads bench/__init__.py and bench/environment.py."""
    add_line(copy_of_project / "src/yolofps/stages/augment.py", "from yolofps.bench import environment",
             "from __future__")
    assert uncovered_code(copy_of_project)["augment"] == ["src/yolofps/bench/__init__.py",
                                                          "src/yolofps/bench/environment.py"]


def test_cli_handlers_off_the_stage_path_are_not_in_the_closure(copy_of_project):
    """An import in cli.py's `_promote` runs only for `yolofps promote`; one in `_run_stage` runs for every stage."""
    (copy_of_project / "src/yolofps/extra.py").write_text('"""A new module."""\n')
    cli = copy_of_project / "src/yolofps/cli.py"
    add_line(cli, "    import yolofps.extra", "def _promote(")
    assert uncovered_code(copy_of_project) == {}
    add_line(cli, "    import yolofps.extra", "def _run_stage(")
    missing = uncovered_code(copy_of_project)
    # register's deps hold the whole package (COARSE_ON_PURPOSE), so the new file is covered there
    assert missing == {stage: ["src/yolofps/extra.py"] for stage in STAGES if stage != "register"}, missing
