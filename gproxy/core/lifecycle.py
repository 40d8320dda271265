"""The words of a pair's lifecycle: the commands a Session gives about its connections (beside
the bytes it sends), the timers it asks for, and the texts of the close line.

A pair is a worker's connection and its gearmand connections. The Session decides when each
is half-closed, closed, opened or given up, when the pair lingers and when it ends; the shell
(gproxy.pair.Pair) carries out these commands and reports what the sockets did. Pure.
"""

from __future__ import annotations

import enum
import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .session import UpstreamLink

log = logging.getLogger("gproxy.pair")
"""The lines about a pair (its worker's address and route first), whoever logs them."""

HALF_CLOSE_LINGER: Final = 10.0
"""After one side closes, seconds the other may take to finish before the pair is cut."""


class LinkState(enum.Enum):
    """A gearmand connection of a pair, as the Session knows it."""

    CONNECTING = "connecting"  # asked for (a move); bytes for it wait in the link
    OPEN = "open"
    CLOSED = "closed"  # gone: gearmand requeues what it owned


class Timer(enum.Enum):
    """What a Session asks to be called back for (`Session.timer_fired`): at most one of each
    at a time, a new request replacing the one before."""

    LINGER = "linger"  # one side closed: the other's grace period is over
    EJECTION = "ejection"  # the worker's ejection is over
    TIMEOUTS = "timeouts"  # the earliest deadline of the attempts it times


@dataclass(frozen=True, slots=True)
class CallLater:
    """Call `timer_fired(timer, now)` after `delay` seconds, instead of any earlier request
    for the same timer."""

    timer: Timer
    delay: float


@dataclass(frozen=True, slots=True)
class Shut:
    """Half-close: gproxy sends nothing more on the worker's connection (`link` None) or on
    gearmand connection `link`, and goes on reading it."""

    link: UpstreamLink | None


@dataclass(frozen=True, slots=True)
class Close:
    """Close gearmand connection `link` now (gearmand requeues whatever it still owns)."""

    link: UpstreamLink


@dataclass(frozen=True, slots=True)
class Finish:
    """The pair is over: log its close line (`reason` at `level`, unless `logged` already),
    close every connection it has, forget it. Nothing of its own follows."""

    reason: str
    level: int
    logged: bool = False


_UNANSWERED: Final = {errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}
"""How the kernel ends an established connection whose peer stopped answering (keepalive,
TCP_USER_TIMEOUT, retransmissions): timed out, or unreachable when the last word it had
about the way there was an ICMP error or a failed ARP."""


def cause(error: OSError) -> str:
    """A gearmand connection's error, and what it means where the kernel's words mislead
    ("No route to host" for a host that merely went silent)."""
    if error.errno in _UNANSWERED:
        return f"{error} (gearmand's host stopped answering)"
    return str(error)


def mid_packet(side: str, buffered: int) -> str:
    return f"{side} closed mid-packet ({buffered} bytes of an unfinished frame)"
