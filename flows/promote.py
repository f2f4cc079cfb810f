"""The promotion flow: run the registry gates for a version against @champion and move @champion if they pass.

    python -m flows.promote                       # @challenger against @champion
    python -m flows.promote --version 3 --force --reason "rollback after incident 42"

The gates and their thresholds are `register.gates` in params.yaml (the same ones `yolofps promote` uses).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.dvc import io_retries
from tasks.registry import promote_version
from yolofps.config import load_config


@flow(name="yolofps-promote", log_prints=True)
def promote(alias: str = "challenger", version: int | None = None, force: bool = False, reason: str = "",
            dry_run: bool = False, project_dir: str = ".") -> dict[str, Any]:
    """Compare a registered version (by alias or number) with @champion; move @champion when every gate passes."""
    root = Path(project_dir).resolve()
    if force and not reason.strip():
        raise ValueError("force=True needs a reason: the promotion history records who forced what and why")
    retrying = io_retries(load_config(root / "params.yaml").prefect)
    result = promote_version.with_options(**retrying)(str(root), alias, version, force=force, reason=reason,
                                                       dry_run=dry_run)
    rows = "\n".join(f"| {g['gate']} | {'pass' if g['passed'] else 'FAIL'} | {g['detail']} |" for g in result["gates"])
    verdict = "moved @champion" if result["moved"] else "did not move @champion"
    create_markdown_artifact(f"**{result['model_name']} v{result['candidate']}**: {verdict}"
                             f"{' (forced)' if result['forced'] else ''}\n\n| gate | result | detail |\n|---|---|---|\n"
                             f"{rows}\n", key="promotion", description="Promotion gates against @champion")
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m flows.promote [--alias A | --version N] [--dry-run] [--force --reason TEXT]`."""
    parser = argparse.ArgumentParser(description="Promote a registered version to @champion through the gates.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--alias", default="challenger")
    which.add_argument("--version", type=int)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--reason", default="")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--project-dir", default=".")
    args = parser.parse_args(argv)
    result = promote(alias=args.alias, version=args.version, force=args.force, reason=args.reason,
                     dry_run=args.dry_run, project_dir=args.project_dir)
    print(result["table"])
    return 0 if result["moved"] or args.dry_run else 1


if __name__ == "__main__":
    sys.exit(main())
