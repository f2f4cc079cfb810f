"""What the registry modules share: the registry errors and retries with backoff (and a redacting short form
of an exception for messages)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from yolofps.errors import TransientError, YolofpsError
from yolofps.redact import redact_text, redact_uri

log = logging.getLogger("yolofps.registry")

CHALLENGER, CHAMPION = "challenger", "champion"
HISTORY_PREFIX = "champion_history."  # registered-model tags, one per @champion move: what was champion when


def _short(err: Exception) -> str:
    """An exception for a log line or message: its type and the start of its text, URIs redacted."""
    return redact_text(f"{type(err).__name__}: {str(err)[:300]}")


class RegistryError(YolofpsError):
    """The model registry could not be reached or refused; the message says what is safe to do next."""


class RegistryUnavailable(RegistryError, TransientError):
    """The tracking server stayed unreachable through every retry: a later run may succeed."""


_PERMANENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED")


def with_retries(what: str, fn: Callable[[], Any], *, uri: str, retries: int, backoff_s: float,
                 then: str = "rerun when the tracking server is back") -> Any:
    """Call `fn` up to `retries` times, waiting backoff_s * 2**n between tries; then a RegistryError.

    Answers that retrying cannot change (a missing model or version, a bad argument) fail at once.
    """
    for attempt in range(1, retries + 1):
        try:
            return fn()
        except YolofpsError:
            raise
        except Exception as err:  # MLflow raises MlflowException, requests errors, SQLAlchemy errors...
            if str(getattr(err, "error_code", "")) in _PERMANENT:
                raise RegistryError(f"{what}: {_short(err)} (tracking URI {redact_uri(uri)})") from None
            if attempt == retries:
                raise RegistryUnavailable(
                    f"{what} failed after {retries} attempts at {redact_uri(uri)}: {_short(err)}. "
                    f"Every file on disk is intact; {then}") from None
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, _short(err), attempt, retries - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _quiet_http_retries() -> None:
    """MLflow's REST client retries for minutes by itself; keep its retries short so ours (with a message) lead."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


