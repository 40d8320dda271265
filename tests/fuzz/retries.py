"""What the fake gearmand sees of gproxy's retry connections.

Every retry connection gproxy opens to the fake (served by the fake's model, dropped at once
in a storm, or claimed by a script) is a `RetryConnection`: when it was accepted, each
SUBMIT_JOB that arrived on it, and when it was lost. A retried job is known by what gproxy's
retry unique id keeps of the original (`gpr:<n>[.<tag>]` then `:<unique>`, `@<hash of the
handle>` or `#<hash of the unique>`); the fake notes every job it (or a script acting as
it) assigns (`Jobs`), so that its handle can be found.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field

from tests.fuzz import wire

STORM_MIN, STORM_MAX = 2.0, 6.0
"""Seconds an accept_and_drop storm of the fake lasts (it resets every new retry connection)."""
_RETRY_UNIQUE = re.compile(rb"gpr:\d{1,9}(?:\.[0-9a-z]{1,16})?([:@#])(.*)", re.DOTALL)


@dataclass(eq=False)
class RetryConnection:
    """One of gproxy's retry connections to the fake (wall-clock times, as gproxy's log)."""

    opened: float
    how: str = "model"
    """model (the fake's gearmand model answered it), dropped (reset at once in a storm) or
    scripted (a script's actor played the fake)."""
    submissions: list[tuple[float, bytes, bytes]] = field(default_factory=list)
    """(when it arrived, function, unique) of each SUBMIT_JOB*."""
    lost: float | None = None
    """When it ended: the fake reset or closed it, or gproxy closed it."""
    attack: str | None = None

    def saw(self, frames: list[wire.Frame]) -> None:
        now = time.time()
        for frame in frames:
            if frame.name.startswith("SUBMIT_JOB"):
                args = frame.args()
                if args:
                    self.submissions.append((now, args[0], args[1]))

    def end(self) -> None:
        if self.lost is None:
            self.lost = time.time()


def retry_identity(unique: bytes) -> bytes | None:
    """What a retry's unique id keeps of the original job (None: not a retry's)."""
    match = _RETRY_UNIQUE.fullmatch(unique)
    return match[1] + match[2] if match else None


def job_identities(handle: bytes, unique: bytes) -> list[bytes]:
    """Every form `retry_identity` may find for a job assigned with `handle` and `unique`."""
    forms = [b"@" + hashlib.sha1(handle).hexdigest()[:32].encode(), b"#" + hashlib.sha1(unique).hexdigest().encode()]
    return [b":" + unique, *forms] if unique else forms


class Jobs:
    """Every job the fake's side assigned, by identity: their handles (a unique id may be
    used by several jobs)."""

    def __init__(self) -> None:
        self.handles: dict[bytes, set[str]] = defaultdict(set)

    def note_sent(self, data: bytes) -> None:
        """Bytes the fake's side sent a gproxy connection: each assignment in them is noted."""
        if len(data) > 1 << 20:
            return  # oversized assignments are no job gproxy holds
        for frame in wire.RefFramer(wire.RES).feed(data):
            if frame.number in wire.ASSIGNS:
                args = frame.args()
                if args:
                    unique = args[2] if frame.name != "JOB_ASSIGN" else b""
                    for form in job_identities(args[0], unique):
                        self.handles[form].add(args[0].decode("utf-8", "backslashreplace"))
