"""The client side of a retry-client connection: submit retry jobs, match gearmand's replies.

Pure: bytes in, events out. gearmand answers submissions in order (JOB_CREATED, or ERROR
when it refuses one), and then sends each job's updates and outcome by handle.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

from .protocol import REQ, RES, Framer, Packet, PacketType, build_packet

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
class Refused:
    key: int
    error: bytes


@dataclass(frozen=True, slots=True)
class JobPacket:
    type: PacketType
    args: dict[str, bytes]


Event = Created | Refused | JobPacket


class Submitter:
    def __init__(self) -> None:
        self._framer = Framer(RES)
        self._awaiting: deque[int | None] = deque()
        """Keys of submissions not yet answered, oldest first (None: a background job)."""

    def submit(self, key: int | None, function: bytes, unique: bytes, payload: bytes) -> bytes:
        """A foreground SUBMIT_JOB, or with key None a background one (dead letters)."""
        self._awaiting.append(key)
        ptype = P.SUBMIT_JOB if key is not None else P.SUBMIT_JOB_BG
        return build_packet(REQ, ptype, function=function, unique=unique, data=payload)

    def receive(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for frame in self._framer.receive(data):
            if type(frame) is not Packet:
                continue
            if frame.type is P.JOB_CREATED or frame.type is P.ERROR:
                key = self._awaiting.popleft() if self._awaiting else None
                if key is None:
                    continue
                args = frame.args()
                if frame.type is P.JOB_CREATED:
                    events.append(Created(key, args["handle"]))
                else:
                    events.append(Refused(key, args["code"] + b": " + args["text"]))
            elif frame.type in _JOB_PACKETS:
                events.append(JobPacket(frame.type, frame.args()))
        return events
