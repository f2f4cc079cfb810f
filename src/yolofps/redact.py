"""Credentials out of params, tags and logs: detect them in a URI, or replace them with ***."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"()<>]+")
_SECRET_WORDS = ("password", "passwd", "token", "secret", "key", "signature", "credential")


def _secret_key(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_WORDS)


def has_secret(uri: str) -> bool:
    """Whether a URI carries a password or a token-like query value."""
    try:
        parts = urllib.parse.urlsplit(uri)
        password = parts.password
    except ValueError:
        return False
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    return password is not None or any(_secret_key(k) for k, _ in pairs)


def redact_uri(uri: str) -> str:
    """The URI with its password and token-like query values replaced by ***."""
    if not has_secret(uri):
        return uri
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username}:***@{netloc.rpartition('@')[2]}"
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = urllib.parse.urlencode([(k, "***" if _secret_key(k) else v) for k, v in pairs], safe="*")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_text(text: str) -> str:
    """Text with every URI in it redacted (error messages quote the URL they failed on)."""
    return _URI.sub(lambda match: redact_uri(match.group()), text)


def redact(data: dict[str, Any]) -> dict[str, Any]:
    """Flat params or tags with their string values redacted, so a credential never reaches MLflow."""
    return {k: redact_text(v) if isinstance(v, str) else v for k, v in data.items()}
