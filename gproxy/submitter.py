"""The client side of a retry-client connection: submit retry jobs, match gearmand's replies.

Pure: bytes in, events out. gearmand answers submissions in order (JOB_CREATED, or ERROR
when it refuses one), and then sends each job's updates and outcome by handle.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final, Generic

from .protocol import (
    DEFAULT_MAX_PACKET_SIZE,
    REQ,
    RES,
    Framer,
    Oversized,
    Packet,
    PacketType,
    build_packet,
    build_submission,
)
from .retry import RouteT, Submit

P = PacketType
HELLO: Final = build_packet(REQ, P.OPTION_REQ, option=b"exceptions")
"""Without it gearmand turns a retry's WORK_EXCEPTION into a bare WORK_FAIL for us."""
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


Event = Created | Refused[RouteT] | JobPacket | TooLarge
"""`Event[RouteT]`: what a Submitter reads from gearmand."""


class Submitter(Generic[RouteT]):
    """One connection's worth: a new connection gets a new Submitter."""

    def __init__(self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        self._framer = Framer(RES, max_packet_size, skip_oversized=_JOB_PACKETS)
        self._awaiting: deque[Submit[RouteT]] = deque()
        """Submissions sent and not yet answered, oldest first."""

    def submit(self, action: Submit[RouteT]) -> bytes:
        self._awaiting.append(action)
        return build_submission(action.type, action.function, action.unique, action.payload)

    def unanswered(self) -> list[Submit[RouteT]]:
        """What was sent and never acknowledged, for when the connection is lost."""
        return list(self._awaiting)

    def receive(self, data: bytes) -> list[Event[RouteT]]:
        events: list[Event[RouteT]] = []
        for frame in self._framer.receive(data):
            if type(frame) is Oversized:
                events.append(TooLarge(frame.type, frame.fields[0], frame.size))
                continue
            if type(frame) is not Packet:
                continue
            if frame.type is P.JOB_CREATED or frame.type is P.ERROR:
                if not self._awaiting:
                    continue  # an ERROR about nothing we asked: nothing to match it with
                submit = self._awaiting.popleft()
                args = frame.args()
                if frame.type is P.ERROR:
                    events.append(Refused(submit, args["code"] + b": " + args["text"]))
                elif submit.key is not None:
                    events.append(Created(submit.key, args["handle"]))
            elif frame.type in _JOB_PACKETS:
                events.append(JobPacket(frame.type, frame.args()))
        return events
