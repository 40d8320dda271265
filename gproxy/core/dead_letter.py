"""The dead-letter envelope: what a dead letter carries besides the job's payload.

A dead letter is a background job of the `dead_letter` function. Its payload is:

    GPROXY-DEAD-LETTER 1\\n
    {"function": "resize", "unique": "img-42", "handle": "H:host:7", "attempts": 5,
     "failure": {"type": "WORK_EXCEPTION", "data": "RETRY: db busy"}}\\n
    <the job's payload, byte for byte>

The first line names the format and its version; the second is one line of JSON (the job's
function, unique id and handle, the attempts made, and the first FAILURE_KEPT bytes of its
last failure; names that are not UTF-8 keep their bytes as \\udcXX escapes); the rest is the
original payload. `gproxy replay` reads it to submit the job again as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

MAGIC: Final = b"GPROXY-DEAD-LETTER 1\n"
FAILURE_KEPT: Final = 1024
"""Bytes of the last failure kept in the envelope (a worker may send megabytes)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    function: bytes
    unique: bytes
    handle: bytes
    attempts: int
    failure_type: str
    failure: bytes
    payload: bytes


def envelope(
    function: bytes, unique: bytes, handle: bytes, attempts: int, failure_type: str, failure: bytes,
    payload: bytes | memoryview,
) -> bytes:
    metadata = {
        "function": _lossless(function), "unique": _lossless(unique), "handle": _lossless(handle), "attempts": attempts,
        "failure": {"type": failure_type, "data": _lossless(failure[:FAILURE_KEPT])},
    }
    return b"".join((MAGIC, json.dumps(metadata).encode(), b"\n", payload))


def parse(data: bytes) -> DeadLetter | None:
    """The dead letter in `data`, or None if `data` is not in the envelope (a dead letter of
    gproxy 0.1, which carried the bare payload)."""
    if not data.startswith(MAGIC):
        return None
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        return None
    try:
        metadata: Any = json.loads(data[len(MAGIC):end])
        failure = metadata["failure"]
        return DeadLetter(
            _bytes(metadata["function"]), _bytes(metadata["unique"]), _bytes(metadata["handle"]),
            int(metadata["attempts"]), str(failure["type"]), _bytes(failure["data"]), data[end + 1:],
        )
    except (ValueError, KeyError, TypeError):
        return None


def _lossless(value: bytes) -> str:
    """Bytes as text that turns back into the same bytes (surrogateescape), for JSON."""
    return value.decode("utf-8", "surrogateescape")


def _bytes(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value.encode("utf-8", "surrogateescape")
