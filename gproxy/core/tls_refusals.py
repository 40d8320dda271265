"""TLS refusals: a handshake that failed, and how long gproxy then leaves that gearmand alone.

A refusal that lasts (a certificate gproxy does not trust, or one gearmand's side does not
accept, a protocol version they do not share) stays until someone changes a certificate or
the config. Trying again for every worker that connects would make as many handshakes, and
WARNING lines, as the workers make tries: so after one, the route's gearmand is not tried
for a while (from INITIAL, doubling, to at most MAXIMUM seconds), and a connection asked for
meanwhile fails at once with the refusal's reason. A handshake that succeeds, or a reload,
ends it. Pure: the caller passes `now`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

INITIAL: Final = 1.0
MAXIMUM: Final = 30.0


class TlsError(OSError):
    """TLS ended a connection; the message says why, as a log line puts it. An OSError, so
    that it ends a connection as any broken one does."""

    def __str__(self) -> str:
        return str(self.args[0])


class HandshakeFailed(TlsError):
    """A TLS handshake that did not complete.

    `lasting`: the peers disagree, and will until one of them is changed; else the
    connection itself failed (closed, timed out)."""

    def __init__(self, reason: str, *, lasting: bool, alert: bytes = b"") -> None:
        super().__init__(reason)
        self.lasting = lasting
        self.alert = alert
        """What TLS would tell the peer of it: sent when it is closed, after the failure is
        logged (so a peer that has heard of it finds it in the log)."""


class ClosedBeforeHandshake(HandshakeFailed):
    """A worker closed before it sent a byte: a port probe (a TCP health check), no failure
    of TLS."""

    def __init__(self) -> None:
        super().__init__("the worker closed before its TLS handshake began", lasting=False)


class HeldOff(HandshakeFailed):
    """No handshake was tried: the last one, `ago` seconds before, was refused."""

    def __init__(self, reason: str, ago: float, wait: float) -> None:
        super().__init__(f"{reason} ({ago:.1f}s ago; tried again in {wait:.1f}s)", lasting=True)


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    at: float
    wait: float

    @property
    def until(self) -> float:
        return self.at + self.wait


class HoldOff:
    """The lasting refusals in a row of one gearmand's TLS (forgotten when one succeeds)."""

    def __init__(self, initial: float = INITIAL, maximum: float = MAXIMUM) -> None:
        self._initial, self._maximum = initial, maximum
        self._last: Refusal | None = None

    def check(self, now: float) -> HeldOff | None:
        """What to raise instead of trying now, or None: try."""
        last = self._last
        if last is None or now >= last.until:
            return None
        return HeldOff(last.reason, now - last.at, last.until - now)

    def refused(self, reason: str, now: float) -> float:
        """A handshake was refused for a lasting reason: the seconds it holds off the next."""
        wait = self._initial if self._last is None else min(self._maximum, 2 * self._last.wait)
        self._last = Refusal(reason, now, wait)
        return wait
