"""params section of the Prefect flows: `prefect` (schedule, retries of I/O, the gpu slot).

No stage reads it, so no DVC stage declares it: changing the schedule never reruns a stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from yolofps.config.common import _check


@dataclass(frozen=True)
class PrefectConfig:
    """`prefect` section: how the pipeline deployment is scheduled and how its I/O is retried."""

    cron: str  # the deployment's schedule (flows/serve.py and prefect.yaml)
    timezone: str
    retries: int  # retries of I/O: dvc pull/push, a busy DVC lock, an unreachable tracking server
    retry_delay_s: float  # first wait; it doubles on each retry
    gpu_slots: int  # size of the `gpu` global concurrency limit created at setup

    def __post_init__(self) -> None:
        _check(len(self.cron.split()) == 5, f"prefect.cron must have 5 fields (minute hour day month weekday), "
                                            f"got {self.cron!r}")
        _check(self.retries >= 0 and self.retry_delay_s >= 0, "prefect.retries and prefect.retry_delay_s must be >= 0")
        _check(self.gpu_slots >= 1, "prefect.gpu_slots must be >= 1")
