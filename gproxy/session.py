"""The pure logic of one proxied connection: downstream peer <-> one upstream gearmand connection.

Bytes in, bytes out, no sockets and no clock (the caller passes `now`). Every frame is
forwarded exactly as received, in order, except:
- GRAB_JOB is sent upstream as GRAB_JOB_UNIQ, and the JOB_ASSIGN_UNIQ that answers it is
  handed to the worker as the plain JOB_ASSIGN it asked for, so the unique id is always known;
- the packets that start or end a job are parsed to keep the connection's JobTable.
- with a Retrier, a worker's failure that it marked retryable is held back (handed to the
  Retrier, whose actions the caller executes) instead of forwarded, and so is the WORK_FAIL
  that some worker libraries send right after a WORK_EXCEPTION (forwarding it would delete
  the held job, or earn the worker an ERROR that kills it);
- a retry job's unique id reaches the worker without gproxy's retry marking, so the worker
  sees the original unique id on every attempt.
Only those few packet types are parsed at all; everything else is passed through unread.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable
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
from .retry import Action, Retrier, parse_retry_unique

P = PacketType
_GRAB_JOB_UNIQ: Final = build_packet(REQ, P.GRAB_JOB_UNIQ)
_ASSIGNS: Final = frozenset({P.JOB_ASSIGN, P.JOB_ASSIGN_UNIQ, P.JOB_ASSIGN_ALL})
_GRABS: Final = frozenset({P.GRAB_JOB, P.GRAB_JOB_UNIQ, P.GRAB_JOB_ALL})
_RESULTS: Final = frozenset({P.WORK_COMPLETE, P.WORK_FAIL, P.WORK_EXCEPTION})
_WATCHED_DOWNSTREAM: Final = _GRABS | _RESULTS | {P.CANT_DO, P.RESET_ABILITIES}
_WATCHED_UPSTREAM: Final = _ASSIGNS | {P.NO_JOB}


class Session:
    """One connection pair. Raises ProtocolError (from the framer) on bytes that are not Gearman."""

    def __init__(
        self,
        upstream_name: str,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        *,
        retrier: Retrier | None = None,
        route: Hashable = None,
        running: Counter[bytes] | None = None,
    ) -> None:
        self.jobs = JobTable(upstream_name, running)
        self.downstream = Framer(REQ, max_packet_size)
        self.upstream = Framer(RES, max_packet_size)
        self.retrier = retrier
        self.route = route
        self.actions: list[Action] = []
        """What the Retrier asked for while this session worked; the caller drains it."""
        # Handles whose failure was held (or was a retry's): a WORK_FAIL that follows their
        # WORK_EXCEPTION is dropped. Libraries send it at once, before grabbing again.
        self._drop_trailing_fail: set[bytes] = set()
        # One entry per GRAB sent upstream and not yet answered, oldest first: True where the
        # worker asked for a plain GRAB_JOB and so must get a plain JOB_ASSIGN back.
        # gearmand answers every GRAB with exactly one JOB_ASSIGN* or NO_JOB, in order.
        self._grabs_pending: deque[bool] = deque()

    def from_downstream(self, data: bytes, now: float) -> bytes:
        """Bytes from the worker or client; returns what to send to gearmand."""
        return b"".join(
            [
                self._downstream_packet(frame, now)
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

    def _downstream_packet(self, packet: Packet, now: float) -> bytes:
        ptype = packet.type
        if ptype in _GRABS:
            self._drop_trailing_fail.clear()
            self._grabs_pending.append(ptype is P.GRAB_JOB)
            return _GRAB_JOB_UNIQ if ptype is P.GRAB_JOB else packet.raw
        if ptype in _RESULTS:
            handle = _handle_of(packet)
            if ptype is P.WORK_FAIL and handle in self._drop_trailing_fail:
                self._drop_trailing_fail.discard(handle)
                return b""
            job = self.jobs.ended(handle)
            if job is not None and ptype is not P.WORK_COMPLETE and self._held(job, packet, now):
                return b""
        elif ptype is P.CANT_DO:
            self.jobs.released_function(packet.args()["function"])
        elif ptype is P.RESET_ABILITIES:
            self.jobs.released_all()
        return packet.raw

    def _held(self, job: TrackedJob, packet: Packet, now: float) -> bool:
        """Hand a failure to the Retrier; True if it holds the job (the failure must not go on)."""
        is_retry = job.unique.startswith(b"gpr:") and parse_retry_unique(job.unique) is not None
        if is_retry:
            # The gproxy that holds the original owns the retry loop: pass the failure on,
            # but spare the worker the ERROR a trailing WORK_FAIL would earn it.
            if packet.type is P.WORK_EXCEPTION:
                self._drop_trailing_fail.add(job.handle)
            return False
        if self.retrier is None:
            return False
        failure = packet.args()["data"] if packet.type is P.WORK_EXCEPTION else b""
        actions = self.retrier.worker_failed(
            owner=self, route=self.route, handle=job.handle, function=job.function,
            unique=job.unique, payload=job.payload, started_at=job.started_at,
            ptype=packet.type, failure=failure, running=self.jobs.running[job.function] + 1,
            now=now,
        )
        if actions is None:
            return False
        self.actions += actions
        if packet.type is P.WORK_EXCEPTION:
            self._drop_trailing_fail.add(job.handle)
        return True

    def _upstream_packet(self, packet: Packet, now: float) -> bytes:
        plain_grab = self._grabs_pending.popleft() if self._grabs_pending else False
        if packet.type is P.NO_JOB:
            return packet.raw
        args = packet.args()
        unique = args.get("unique", b"")
        self.jobs.assigned(args["handle"], args["function"], unique, args["data"], now)
        if plain_grab and packet.type is P.JOB_ASSIGN_UNIQ:
            del args["unique"]
            return build_packet(RES, P.JOB_ASSIGN, **args)
        if unique.startswith(b"gpr:") and (retry := parse_retry_unique(unique)) is not None:
            return build_packet(RES, packet.type, **{**args, "unique": retry[1]})
        return packet.raw


def _handle_of(packet: Packet) -> bytes:
    """The handle of a work result, read without splitting the (possibly large) payload."""
    if packet.type is P.WORK_FAIL:
        return packet.args()["handle"]
    end = packet.raw.find(b"\0", HEADER_SIZE)
    if end < 0:
        raise ProtocolError(f"malformed {packet.type.name} payload: no NUL after the handle")
    return packet.raw[HEADER_SIZE:end]
