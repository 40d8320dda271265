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
  sees the original unique id on every attempt;
- a CANT_DO or RESET_ABILITIES that would make gearmand requeue a held job is not sent on
  that connection: the worker moves to a fresh upstream connection (its registration
  replayed there), and the old one stays open only for the jobs it still owns; results for
  those are routed to it by handle.
Only those few packet types are parsed at all; everything else is passed through unread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

from .jobs import JobTable, TrackedJob
from .metrics import Metrics
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
from .retry import Action, Retrier, SendUpstream, parse_retry_unique

P = PacketType
_GRAB_JOB_UNIQ: Final = build_packet(REQ, P.GRAB_JOB_UNIQ)
_ASSIGNS: Final = frozenset({P.JOB_ASSIGN, P.JOB_ASSIGN_UNIQ, P.JOB_ASSIGN_ALL})
_GRABS: Final = frozenset({P.GRAB_JOB, P.GRAB_JOB_UNIQ, P.GRAB_JOB_ALL})
_RESULTS: Final = frozenset({P.WORK_COMPLETE, P.WORK_FAIL, P.WORK_EXCEPTION})
_UPDATES: Final = frozenset({P.WORK_DATA, P.WORK_WARNING, P.WORK_STATUS})
_REGISTRATION: Final = frozenset(
    {P.CAN_DO, P.CAN_DO_TIMEOUT, P.CANT_DO, P.RESET_ABILITIES, P.SET_CLIENT_ID, P.OPTION_REQ}
)
_WATCHED_DOWNSTREAM: Final = _GRABS | _RESULTS | _REGISTRATION
_WATCHED_WITH_RETIRED: Final = _WATCHED_DOWNSTREAM | _UPDATES
_WATCHED_DRAINING: Final = _WATCHED_WITH_RETIRED | {P.PRE_SLEEP}
_NO_JOB: Final = build_packet(RES, P.NO_JOB)
_WATCHED_UPSTREAM: Final = _ASSIGNS | {P.NO_JOB}


class UpstreamLink:
    """One gearmand connection of a session: the jobs assigned through it (only it can
    finish them) and the grabs it has yet to answer. The Retrier's owner of held jobs."""

    def __init__(self, name: str, max_packet_size: int, metrics: Metrics) -> None:
        self.name = name
        self.jobs = JobTable(name, metrics.running)
        self.framer = Framer(RES, max_packet_size, metrics.packets["from_gearmand"])
        # One entry per GRAB sent and not yet answered, oldest first: True where the worker
        # asked for a plain GRAB_JOB and so must get a plain JOB_ASSIGN back. gearmand
        # answers every GRAB with exactly one JOB_ASSIGN* or NO_JOB, in order.
        self.grabs_pending: deque[bool] = deque()

    def __repr__(self) -> str:
        return f"UpstreamLink({self.name})"


class Registration:
    """What the worker told gearmand about itself, to tell a fresh connection again."""

    def __init__(self) -> None:
        self._client_id = b""
        self._options: dict[bytes, bytes] = {}
        self._abilities: dict[bytes, bytes] = {}

    def apply(self, packet: Packet) -> None:
        ptype = packet.type
        if ptype is P.RESET_ABILITIES:
            self._abilities.clear()
        elif ptype is P.SET_CLIENT_ID:
            self._client_id = packet.raw
        elif ptype is P.OPTION_REQ:
            self._options[packet.args()["option"]] = packet.raw
        elif ptype is P.CANT_DO:
            self._abilities.pop(packet.args()["function"], None)
        else:  # CAN_DO, CAN_DO_TIMEOUT
            self._abilities[packet.args()["function"]] = packet.raw

    def replay(self) -> bytes:
        return self._client_id + b"".join(self._options.values()) + b"".join(self._abilities.values())


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """Open a fresh gearmand connection for `session`'s worker, as `link`, and send `replay`."""

    session: Session
    link: UpstreamLink
    replay: bytes


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """A retired connection owns nothing any more."""

    link: UpstreamLink


class Session:
    """One downstream connection and its upstream links. Raises ProtocolError (from a framer)
    on bytes that are not Gearman."""

    def __init__(
        self,
        upstream_name: str,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        *,
        retrier: Retrier | None = None,
        route: Hashable = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.max_packet_size = max_packet_size
        self.metrics = metrics if metrics is not None else Metrics()
        self.current = UpstreamLink(upstream_name, max_packet_size, self.metrics)
        """The connection new requests go to."""
        self.retired: list[UpstreamLink] = []
        """Older connections, kept open only for the jobs they still own."""
        self.downstream = Framer(REQ, max_packet_size, self.metrics.packets["to_gearmand"])
        self.registration = Registration()
        self.retrier = retrier
        self.route = route
        self.actions: list[Action | OpenUpstream | CloseUpstream] = []
        """What this session asked for while it worked; the caller drains and executes it."""
        # Handles whose failure was held (or was a retry's): a WORK_FAIL that follows their
        # WORK_EXCEPTION is dropped. Libraries send it at once, before grabbing again.
        self._drop_trailing_fail: set[bytes] = set()
        self._moves = 0
        self.draining = False
        """Shutting down: the worker's grabs get NO_JOB from gproxy, its jobs finish."""
        self.replies: list[bytes] = []
        """Packets gproxy answers the downstream peer itself; the caller sends and clears them."""

    @property
    def links(self) -> list[UpstreamLink]:
        return [self.current, *self.retired]

    def tracked_jobs(self) -> list[TrackedJob]:
        return [job for link in self.links for job in link.jobs]

    def from_downstream(self, data: bytes, now: float) -> bytes:
        """Bytes from the worker or client; returns what to send on `self.current` (which a
        CANT_DO may have replaced: what was due before it goes out as an action)."""
        watched = (
            _WATCHED_DRAINING if self.draining
            else _WATCHED_WITH_RETIRED if self.retired
            else _WATCHED_DOWNSTREAM
        )
        out: list[bytes] = []
        for frame in self.downstream.receive(data):
            if type(frame) is Packet and frame.type in watched:
                link = self.current
                forward = self._downstream_packet(frame, now)
                if link is not self.current and out:  # moved: the earlier bytes were for `link`
                    self.actions.insert(-1, SendUpstream(link, b"".join(out)))
                    out = []
                out.append(forward)
            else:
                out.append(frame.raw)
        return b"".join(out)

    def from_upstream(self, link: UpstreamLink, data: bytes, now: float) -> bytes:
        """Bytes from gearmand on `link`; returns what to send to the worker or client."""
        return b"".join(
            [
                self._upstream_packet(link, frame, now)
                if type(frame) is Packet and frame.type in _WATCHED_UPSTREAM
                else frame.raw
                for frame in link.framer.receive(data)
            ]
        )

    def idle(self, link: UpstreamLink) -> bool:
        """A retired link that owns nothing and is owed nothing: it may close."""
        return (
            link is not self.current
            and not link.jobs
            and not link.grabs_pending
            and not (self.retrier is not None and self.retrier.holds(link))
        )

    def link_closed(self, link: UpstreamLink) -> list[TrackedJob]:
        """`link`'s connection is gone: gearmand requeues whatever it still held."""
        if link in self.retired:
            self.retired.remove(link)
        return link.jobs.released_all()

    def _downstream_packet(self, packet: Packet, now: float) -> bytes:
        ptype = packet.type
        if self.draining and (ptype in _GRABS or ptype is P.PRE_SLEEP):
            # No new jobs while shutting down; a sleeping worker is simply never woken.
            if ptype is not P.PRE_SLEEP:
                self.replies.append(_NO_JOB)
            return b""
        if ptype in _GRABS:
            self._drop_trailing_fail.clear()
            self.current.grabs_pending.append(ptype is P.GRAB_JOB)
            return _GRAB_JOB_UNIQ if ptype is P.GRAB_JOB else packet.raw
        if ptype in _RESULTS:
            handle = _handle_of(packet)
            if ptype is P.WORK_FAIL and handle in self._drop_trailing_fail:
                self._drop_trailing_fail.discard(handle)
                return b""
            link, job = self._owner_of(handle, ended=True)
            if job is not None:
                self.metrics.attempt_ended(job.function, now - job.started_at)
                retry = _is_retry(job)
                if ptype is not P.WORK_COMPLETE and self._held(link, job, retry, packet, now):
                    return b""
                if not retry:  # a retry's outcome is the original's, counted where it is held
                    self.metrics.job_ended(job.function, _OUTCOMES[ptype], now - job.started_at)
            return self._route(link, packet.raw)
        if ptype in _UPDATES:
            return self._route(self._owner_of(_handle_of(packet), ended=False)[0], packet.raw)
        return self._registration_packet(packet, now)

    def _registration_packet(self, packet: Packet, now: float) -> bytes:
        self.registration.apply(packet)
        ptype = packet.type
        if ptype is not P.CANT_DO and ptype is not P.RESET_ABILITIES:
            return packet.raw
        function = packet.args()["function"] if ptype is P.CANT_DO else None
        if self.retrier is not None and self.retrier.holds(self.current, function):
            # Sent here, it would make gearmand requeue the held jobs: move the worker.
            self._move()
            return b""
        if function is None:
            self.current.jobs.released_all()
        else:
            self.current.jobs.released_function(function)
        return packet.raw

    def _move(self) -> None:
        self._moves += 1
        old = self.current
        self.retired.append(old)
        self.current = UpstreamLink(f"{old.name}+{self._moves}", self.max_packet_size, self.metrics)
        self.actions.append(OpenUpstream(self, self.current, self.registration.replay()))

    def _owner_of(self, handle: bytes, ended: bool) -> tuple[UpstreamLink, TrackedJob | None]:
        """The link that owns `handle` (the current one if none does) and the job, which is
        forgotten if `ended`."""
        for link in self.links:
            job = link.jobs.ended(handle) if ended else link.jobs.get(handle)
            if job is not None:
                return link, job
        return self.current, None

    def _route(self, link: UpstreamLink, raw: bytes) -> bytes:
        """`raw` for `link`: returned if it is the current link, else sent as an action."""
        if link is self.current:
            return raw
        self.actions.append(SendUpstream(link, raw))
        if self.idle(link):
            self.retired.remove(link)
            self.actions.append(CloseUpstream(link))
        return b""

    def _held(
        self, link: UpstreamLink, job: TrackedJob, is_retry: bool, packet: Packet, now: float
    ) -> bool:
        """Hand a failure to the Retrier; True if it holds the job (the failure must not go on)."""
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
            owner=link, route=self.route, job=job, ptype=packet.type, failure=failure,
            running=link.jobs.running[job.function] + 1,
        )
        if actions is None:
            return False
        self.actions += actions
        if packet.type is P.WORK_EXCEPTION:
            self._drop_trailing_fail.add(job.handle)
        return True

    def _upstream_packet(self, link: UpstreamLink, packet: Packet, now: float) -> bytes:
        plain_grab = link.grabs_pending.popleft() if link.grabs_pending else False
        if packet.type is P.NO_JOB:
            return packet.raw
        args = packet.args()
        unique = args.get("unique", b"")
        link.jobs.assigned(args["handle"], args["function"], unique, args["data"], now)
        if plain_grab and packet.type is P.JOB_ASSIGN_UNIQ:
            del args["unique"]
            return build_packet(RES, P.JOB_ASSIGN, **args)
        if unique.startswith(b"gpr:") and (retry := parse_retry_unique(unique)) is not None:
            return build_packet(RES, packet.type, **{**args, "unique": retry[1]})
        return packet.raw


_OUTCOMES: Final = {P.WORK_COMPLETE: "complete", P.WORK_FAIL: "fail", P.WORK_EXCEPTION: "exception"}


def _is_retry(job: TrackedJob) -> bool:
    return job.unique.startswith(b"gpr:") and parse_retry_unique(job.unique) is not None


def _handle_of(packet: Packet) -> bytes:
    """The handle of a work packet, read without splitting the (possibly large) payload."""
    if packet.type is P.WORK_FAIL:
        return packet.args()["handle"]
    end = packet.raw.find(b"\0", HEADER_SIZE)
    if end < 0:
        raise ProtocolError(f"malformed {packet.type.name} payload: no NUL after the handle")
    return packet.raw[HEADER_SIZE:end]
