"""When to reach gearmand again, and what an outage is: for a connection gproxy keeps itself.

Pure: the caller passes `now`. A connection that gearmand accepts and then drops at once
(a gearmand that resets it, a load balancer whose backend is gone) must not reset the
backoff, or gproxy reconnects in a tight loop. So a connection counts as up only once it
has *proved itself*: gearmand answered on it and it stayed up PROVEN_AFTER seconds. Until
then every loss is one more failed try, and the wait before the next doubles, capped.

An outage starts with the first failure after a proven connection (or before the first
one), and ends when a connection proves itself: one WARNING at its start, DEBUG while it
lasts, one INFO at its end with how long it took and how many tries. A proven connection
that gearmand closes cleanly (a load balancer's idle timeout does that, and so does a
gearmand that stops) is no outage yet: it is tried again at once, and only if that try
fails does the outage start, counted from the close.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

INITIAL: Final = 0.1
MAXIMUM: Final = 5.0
"""Seconds between tries: from INITIAL, doubling, to at most MAXIMUM."""
PROVEN_AFTER: Final = 5.0
"""Seconds a connection gearmand has answered on must stay up before it counts as up."""


class Report(enum.Enum):
    """How the caller logs a failure: the one that starts an outage, or one during it."""

    OUTAGE_STARTS = "starts"
    OUTAGE_GOES_ON = "goes on"
    CLOSED = "closed"  # a proven connection closed cleanly: no outage (yet)


@dataclass(frozen=True, slots=True)
class Recovered:
    """A connection proved itself after an outage of `seconds` and `tries` tries."""

    seconds: float
    tries: int


@dataclass(frozen=True, slots=True)
class Failure:
    """A try failed or a connection was lost: wait `wait` seconds before the next try.
    `recovered`: a lost connection had proved itself just before, ending an outage."""

    wait: float
    report: Report
    recovered: Recovered | None = None


class Reconnects:
    """The tries of one connection gproxy keeps (the retry connection of a route)."""

    def __init__(self, initial: float = INITIAL, maximum: float = MAXIMUM, proven_after: float = PROVEN_AFTER) -> None:
        self._initial, self._maximum, self._proven_after = initial, maximum, proven_after
        self._delay = initial
        self.outage_since: float | None = None
        """When the outage began; None while the connection is up or was never needed."""
        self.tries = 0
        """Tries since the outage began (every connection opened, and every failed try)."""
        self._connected_at: float | None = None
        self._answered = False
        self._proven = False
        self._closed_at: float | None = None
        """When a proven connection was closed cleanly: an outage that follows began then."""

    @property
    def up(self) -> bool:
        """No outage now (a connection that was never needed is not down)."""
        return self.outage_since is None

    def trying(self) -> None:
        """A try begins (counted while an outage lasts)."""
        if self.outage_since is not None:
            self.tries += 1

    def failed(self, now: float) -> Failure:
        """The try failed: no connection."""
        return self._failure(now, lost_proven=False)

    def connected(self, now: float) -> None:
        self._connected_at, self._answered, self._proven = now, False, False

    def answered(self, now: float) -> Recovered | None:
        """gearmand sent something on the connection."""
        self._answered = True
        return self.check(now)

    def proof_due(self) -> float | None:
        """When `check` may find the connection proven (None: not before gearmand answers,
        or proven already)."""
        if self._connected_at is None or self._proven or not self._answered:
            return None
        return self._connected_at + self._proven_after

    def check(self, now: float) -> Recovered | None:
        """Has the connection proved itself by now? If that ends an outage, its figures."""
        due = self.proof_due()
        if due is None or now < due:
            return None
        self._proven, self._delay, self._closed_at = True, self._initial, None
        if self.outage_since is None:
            return None
        recovered = Recovered(now - self.outage_since, self.tries)
        self.outage_since, self.tries = None, 0
        return recovered

    def lost(self, now: float, closed: bool = False) -> Failure:
        """The connection broke (or was closed for bad input, or found dead; `closed`:
        gearmand closed it cleanly). A proven one is tried again at once: it lasted, so
        this is no storm; closed cleanly, it is no outage either unless that try fails."""
        recovered = self.check(now)
        proven, self._connected_at = self._proven, None
        if proven and closed and self.outage_since is None:
            self._closed_at = now
            return Failure(0.0, Report.CLOSED, recovered)
        return self._failure(now, lost_proven=proven, recovered=recovered)

    def _failure(self, now: float, lost_proven: bool, recovered: Recovered | None = None) -> Failure:
        if self.outage_since is None:
            since = self._closed_at if self._closed_at is not None else now
            self.outage_since, self.tries, self._closed_at = since, 0 if lost_proven else 1, None
            report = Report.OUTAGE_STARTS
        else:
            report = Report.OUTAGE_GOES_ON
        if lost_proven:
            return Failure(0.0, report, recovered)
        wait, self._delay = self._delay, min(self._delay * 2, self._maximum)
        return Failure(wait, report, recovered)
