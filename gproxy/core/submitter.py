"""The client side of a retry-client connection: submit retry jobs, match gearmand's replies.

Pure: bytes in, events out. gearmand answers submissions in order (JOB_CREATED, or ERROR
when it refuses one), and then sends each job's updates and outcome by handle.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Final, Generic

from .protocol import (
    DEFAULT_MAX_PACKET_SIZE,
    REQ,
    RES,
    Frame,
    Framer,
    Oversized,
    Packet,
    PacketType,
    ProtocolError,
    build_packet,
    build_submission,
)
from .retry import RouteT, Submit

P = PacketType
HELLO: Final = build_packet(REQ, P.OPTION_REQ, option=b"exceptions")
"""Without it gearmand turns a retry's WORK_EXCEPTION into a bare WORK_FAIL for us."""
_ECHO: Final = build_packet(REQ, P.ECHO_REQ, data=b"gproxy")
_JOB_PACKETS: Final = frozenset(
    {P.WORK_DATA, P.WORK_WARNING, P.WORK_STATUS, P.WORK_COMPLETE, P.WORK_FAIL, P.WORK_EXCEPTION}
)


@dataclass(frozen=True, slots=True)
class Created:
    key: int
    handle: bytes


@dataclass(frozen=True, slots=True)
class Refused(Generic[RouteT]):
    """gearmand answered a submission with ERROR; `submit.key` None: a dead letter."""

    submit: Submit[RouteT]
    error: bytes


@dataclass(frozen=True, slots=True)
class JobPacket:
    type: PacketType
    args: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class TooLarge:
    """A retry job's packet over max_packet_size, read and dropped."""

    type: PacketType
    handle: bytes
    size: int


@dataclass(frozen=True, slots=True)
class Broken:
    """gearmand sent bytes that are not Gearman (or a packet of the wrong shape): the
    connection cannot go on. Always the last event; those before it still happened."""

    reason: str
    """A protocol error's reason, for the metric (ProtocolError.reason)."""
    message: str


Event = Created | Refused[RouteT] | JobPacket | TooLarge | Broken
"""`Event[RouteT]`: what a Submitter reads from gearmand."""


class Silence(enum.Enum):
    """What gearmand's silence on a connection that owes an answer calls for."""

    NONE = "none"  # it owes nothing, or has not been silent for long
    ECHO = "echo"  # silent for answer_wait: send ECHO_REQ (once), and wait echo_wait more
    DEAD = "dead"  # silent for answer_wait + echo_wait: up but hung, or gone


class Submitter(Generic[RouteT]):
    """One connection's worth: a new connection gets a new Submitter."""

    def __init__(self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        self._framer = Framer(RES, max_packet_size, skip_oversized=_JOB_PACKETS)
        self._awaiting: deque[Submit[RouteT]] = deque()
        """Submissions sent and not yet answered, oldest first."""
        self._silent_since = 0.0
        """Since when gearmand has said nothing while it owes an answer."""
        self._echoed = False

    def submit(self, action: Submit[RouteT], now: float) -> bytes:
        if not self._awaiting:
            self._silent_since = now
        self._awaiting.append(action)
        return build_submission(action.type, action.function, action.unique, action.payload)

    def silence(self, now: float, answer_wait: float, echo_wait: float) -> tuple[Silence, float | None]:
        """Is gearmand still answering? A gearmand that is up but hung keeps its TCP
        connections open and acknowledges what it is sent (TCP keepalive cannot tell), but
        answers no submission. Returns what to do now, and when to ask again (None: not
        until something is submitted). ECHO is answered once (`echo()` marks it sent)."""
        if not self._awaiting:
            return Silence.NONE, None
        echo_at, dead_at = self._silent_since + answer_wait, self._silent_since + answer_wait + echo_wait
        if now >= dead_at:
            return Silence.DEAD, None
        if now >= echo_at and not self._echoed:
            return Silence.ECHO, dead_at
        return Silence.NONE, dead_at if self._echoed else echo_at

    def echo(self) -> bytes:
        self._echoed = True
        return _ECHO

    def unanswered(self) -> list[Submit[RouteT]]:
        """What was sent and never acknowledged, for when the connection is lost."""
        return list(self._awaiting)

    def receive(self, data: bytes, now: float) -> list[Event[RouteT]]:
        """What `data` completes, in order (gearmand is heard: its silence ends). Bad input ends the list with Broken: whatever
        came before it in the same read is still reported (a JOB_CREATED or a retry's result
        just ahead of garbage happened), and a reply too malformed to read answers nothing,
        so its submission stays unanswered (it is sent again on the next connection)."""
        self._silent_since, self._echoed = now, False
        events: list[Event[RouteT]] = []
        broken: ProtocolError | None = None
        try:
            frames = self._framer.receive(data)
        except ProtocolError as exc:
            frames, broken = exc.frames, exc
        try:
            for frame in frames:
                self._read(frame, events)
        except ProtocolError as exc:
            broken = exc
        if broken is not None:
            events.append(Broken(broken.reason, str(broken)))
        return events

    def _read(self, frame: Frame, events: list[Event[RouteT]]) -> None:
        if type(frame) is Oversized:
            events.append(TooLarge(frame.type, frame.fields[0], frame.size))
        elif type(frame) is not Packet:
            return
        elif frame.type is P.JOB_CREATED or frame.type is P.ERROR:
            args = frame.args()  # (first: a malformed reply is bad input, and answers nothing)
            if not self._awaiting:
                return  # an ERROR about nothing we asked: nothing to match it with
            submit = self._awaiting.popleft()
            if frame.type is P.ERROR:
                events.append(Refused(submit, args["code"] + b": " + args["text"]))
            elif submit.key is not None:
                events.append(Created(submit.key, args["handle"]))
        elif frame.type in _JOB_PACKETS:
            events.append(JobPacket(frame.type, frame.args()))
