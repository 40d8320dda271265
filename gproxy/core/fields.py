"""What a log line is about, as values: passed to the logging call as `extra=`, so that a
JSON log line (gproxy.logs) carries them as fields beside its text. Pure.

The names are the same on every line: peer, via, upstream (a worker's connection), function,
handle, attempt, reason, seconds, and a few of their own where a line needs one.
"""

from __future__ import annotations

from typing import Any

from .protocol import text


def about(**values: Any) -> dict[str, dict[str, Any]]:
    """`extra=` for a logging call (None values left out)."""
    return {"fields": {key: value for key, value in values.items() if value is not None}}


def about_job(function: bytes, handle: bytes, **more: Any) -> dict[str, dict[str, Any]]:
    """`extra=` for a line about one job."""
    return about(function=text(function), handle=text(handle), **more)


def pair_fields(peer: str, via: str, upstream: str) -> dict[str, str]:
    """A worker's connection, as its lines name it."""
    return {"peer": peer, "via": via, "upstream": upstream}


def pair_name(fields: dict[str, str]) -> str:
    """A worker's connection, as its lines begin."""
    return f"peer {fields['peer']} (via {fields['via']} to gearmand {fields['upstream']})"
