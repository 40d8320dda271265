"""What a Session asks of the shell that runs it, beside the Retrier's actions: bytes for the
worker, gearmand connections to open, half-close or close, timers, and the pair's end.

A pair is a worker's connection and its gearmand connections. The Session decides everything
about them; the shell (gproxy.pair.Pair) carries these commands out, in order, and reports
what the sockets did. ArmTimeout, Eject and CloseUpstream are what the packet rules ask the
pair's Connections for; the shell sees what Connections makes of them (CallLater, Close).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import UpstreamLink


class Timer(enum.Enum):
    """What a Session asks to be called back for (`Session.timer_fired`): at most one of each
    at a time, a new request replacing the one before."""

    LINGER = "linger"  # one side closed: the other's grace period is over
    EJECTION = "ejection"  # the worker's ejection is over
    TIMEOUTS = "timeouts"  # the earliest deadline of the attempts it times


@dataclass(slots=True)
class SendDownstream:
    """Bytes for the worker (or client): what gearmand sent, and gproxy's own answers.
    (Not frozen, like SendUpstream: one is made for nearly every read from gearmand.)"""

    data: bytes


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """Open a fresh gearmand connection for the worker, as `link`, and send `replay` first."""

    link: UpstreamLink
    replay: bytes


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


# What the packet rules ask of the pair's Connections (never seen by the shell) ------------------


@dataclass(frozen=True, slots=True)
class ArmTimeout:
    """The earliest deadline of the attempts timed is `delay` seconds away (Timer.TIMEOUTS)."""

    delay: float


@dataclass(frozen=True, slots=True)
class Eject:
    """The worker failed `failures` jobs in a row (the last one of `function`): it gets no
    job for `delay` seconds (Timer.EJECTION)."""

    delay: float
    function: bytes
    failures: int


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """A connection the worker was moved off owns nothing any more: it may close."""

    link: UpstreamLink
