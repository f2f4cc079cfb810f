"""The `gpu` global concurrency limit: accelerator stages hold one slot, so runs never share a GPU by accident.

The limit is created at setup (`ensure_gpu_limit`, called by the flows and flows/serve.py) when it is missing;
an operator may resize it later (`prefect gcl update gpu --limit 2`) and setup leaves it alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

GPU_LIMIT = "gpu"


def ensure_gpu_limit(slots: int) -> bool:
    """Create the `gpu` global concurrency limit with `slots` slots unless it exists; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            return False
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))
            return True


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
