"""The pure logic of one proxied connection: downstream peer <-> one upstream gearmand connection.

Bytes in, bytes out, no sockets and no clock (the caller passes `now`). Every frame is
forwarded exactly as received, in order, except:
- GRAB_JOB is sent upstream as GRAB_JOB_UNIQ, and the JOB_ASSIGN_UNIQ that answers it is
  handed to the worker as the plain JOB_ASSIGN it asked for, so the unique id is always known;
- the packets that start or end a job are parsed to keep the connection's JobTable.
Only those few packet types are parsed at all; everything else is passed through unread.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from .jobs import JobTable, TrackedJob
from .protocol import (
    DEFAULT_MAX_PACKET_SIZE,
    HEADER_SIZE,
    REQ,
    RES,
    Framer,
    Packet,
    PacketType,
    ProtocolError,
    build_packet,
)

P = PacketType
_GRAB_JOB_UNIQ: Final = build_packet(REQ, P.GRAB_JOB_UNIQ)
_ASSIGNS: Final = frozenset({P.JOB_ASSIGN, P.JOB_ASSIGN_UNIQ, P.JOB_ASSIGN_ALL})
_GRABS: Final = frozenset({P.GRAB_JOB, P.GRAB_JOB_UNIQ, P.GRAB_JOB_ALL})
_RESULTS: Final = frozenset({P.WORK_COMPLETE, P.WORK_FAIL, P.WORK_EXCEPTION})
_WATCHED_DOWNSTREAM: Final = _GRABS | _RESULTS | {P.CANT_DO, P.RESET_ABILITIES}
_WATCHED_UPSTREAM: Final = _ASSIGNS | {P.NO_JOB}


class Session:
    """One connection pair. Raises ProtocolError (from the framer) on bytes that are not Gearman."""

    def __init__(self, upstream_name: str, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE):
        self.jobs = JobTable(upstream_name)
        self.downstream = Framer(REQ, max_packet_size)
        self.upstream = Framer(RES, max_packet_size)
        # One entry per GRAB sent upstream and not yet answered, oldest first: True where the
        # worker asked for a plain GRAB_JOB and so must get a plain JOB_ASSIGN back.
        # gearmand answers every GRAB with exactly one JOB_ASSIGN* or NO_JOB, in order.
        self._grabs_pending: deque[bool] = deque()

    def from_downstream(self, data: bytes) -> bytes:
        """Bytes from the worker or client; returns what to send to gearmand."""
        return b"".join(
            [
                self._downstream_packet(frame)
                if type(frame) is Packet and frame.type in _WATCHED_DOWNSTREAM
                else frame.raw
                for frame in self.downstream.receive(data)
            ]
        )

    def from_upstream(self, data: bytes, now: float) -> bytes:
        """Bytes from gearmand; returns what to send to the worker or client."""
        return b"".join(
            [
                self._upstream_packet(frame, now)
                if type(frame) is Packet and frame.type in _WATCHED_UPSTREAM
                else frame.raw
                for frame in self.upstream.receive(data)
            ]
        )

    def closed(self) -> list[TrackedJob]:
        """The upstream connection is gone: gearmand requeues whatever it still held."""
        return self.jobs.released_all()

    def _downstream_packet(self, packet: Packet) -> bytes:
        ptype = packet.type
        if ptype is P.GRAB_JOB:
            self._grabs_pending.append(True)
            return _GRAB_JOB_UNIQ
        if ptype in _GRABS:
            self._grabs_pending.append(False)
        elif ptype in _RESULTS:
            self.jobs.ended(_handle_of(packet))
        elif ptype is P.CANT_DO:
            self.jobs.released_function(packet.args()["function"])
        elif ptype is P.RESET_ABILITIES:
            self.jobs.released_all()
        return packet.raw

    def _upstream_packet(self, packet: Packet, now: float) -> bytes:
        plain_grab = self._grabs_pending.popleft() if self._grabs_pending else False
        if packet.type is P.NO_JOB:
            return packet.raw
        args = packet.args()
        self.jobs.assigned(
            args["handle"], args["function"], args.get("unique", b""), args["data"], now
        )
        if plain_grab and packet.type is P.JOB_ASSIGN_UNIQ:
            return build_packet(
                RES,
                P.JOB_ASSIGN,
                handle=args["handle"],
                function=args["function"],
                data=args["data"],
            )
        return packet.raw


def _handle_of(packet: Packet) -> bytes:
    """The handle of a work result, read without splitting the (possibly large) payload."""
    if packet.type is P.WORK_FAIL:
        return packet.args()["handle"]
    end = packet.raw.find(b"\0", HEADER_SIZE)
    if end < 0:
        raise ProtocolError(f"malformed {packet.type.name} payload: no NUL after the handle")
    return packet.raw[HEADER_SIZE:end]
