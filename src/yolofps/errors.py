"""Errors meant for the user: the CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations


class YolofpsError(Exception):
    """Base of every error whose message is written for the user."""


class ConfigError(YolofpsError, ValueError):
    """A params.yaml problem the user must fix; the message names key, file and the fix."""


class DataSetError(YolofpsError, ValueError):
    """A data set that cannot be used at all (fatal validation problem); the message says what to fix."""


class TransientError(YolofpsError):
    """A failure that a later attempt may not meet (a service down); the CLI exits with EX_TEMPFAIL (75)."""


EXIT_TEMPFAIL = 75  # sysexits.h: "temporary failure; the user is invited to retry" (the flow retries these)


class StoreError(YolofpsError):
    """The benchmark store (`bench.store`) cannot be used: a bad URL, a missing driver, or a failed migration."""


class StoreUnavailable(StoreError, TransientError):
    """The benchmark store's database server did not answer: a later attempt may succeed."""
