"""Global concurrency limits the flows hold.

- `gpu`: accelerator stages hold one slot, so runs never share a GPU by accident. Created at setup
  (`ensure_gpu_limit`, called by the pipeline flow and flows/serve.py) when missing; an operator may resize it
  later (`prefect gcl update gpu --limit 2`) and setup leaves it alone.
- `workspace-<hash>`: one slot per project folder, held for a whole pipeline run, so a second run on the same
  workspace waits for the first instead of failing on DVC's lock.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

GPU_LIMIT = "gpu"


def ensure_limit(name: str, slots: int) -> bool:
    """Create a global concurrency limit with `slots` slots unless it exists; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            return True


def ensure_gpu_limit(slots: int) -> bool:
    """Create the `gpu` limit with `slots` slots unless it exists; True when created."""
    return ensure_limit(GPU_LIMIT, slots)


def workspace_limit(project_dir: Path) -> str:
    """The name of a project folder's one-slot limit (a hash: limit names allow no slashes)."""
    return "workspace-" + hashlib.sha256(str(project_dir.resolve()).encode()).hexdigest()[:12]


@contextlib.contextmanager
def workspace_slot(project_dir: Path) -> Iterator[None]:
    """Hold the project folder's single slot: a second pipeline run on it waits here (DVC allows one at a time)."""
    from prefect.concurrency.sync import concurrency

    name = workspace_limit(project_dir)
    ensure_limit(name, 1)
    with concurrency(name, occupy=1, strict=True):
        yield


def needs_gpu(device: str) -> bool:
    """Whether the configured device (`auto` resolved here) is an accelerator."""
    from yolofps.device import resolve

    return resolve(device, amp=False).kind != "cpu"


@contextlib.contextmanager
def gpu_slot(needed: bool) -> Iterator[None]:
    """Hold one `gpu` slot while the block runs (strict: a missing limit is an error, not a warning)."""
    if not needed:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        yield
