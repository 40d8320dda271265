"""The pure logic of one proxied connection: downstream peer <-> its upstream gearmand connections.

Bytes in, bytes out, no sockets and no clock (the caller passes `now`). Every frame is
forwarded exactly as received, in order, except:
- GRAB_JOB is sent upstream as GRAB_JOB_UNIQ, and the JOB_ASSIGN_UNIQ that answers it is
  handed to the worker as the plain JOB_ASSIGN it asked for, so the unique id is always known
  (unless the server does not know GRAB_JOB_UNIQ: then the worker's own grab is used);
- the packets that start or end a job are parsed to keep each connection's JobTable, and
  every job packet (result or update) goes to the connection that owns its handle;
- with a Retrier, a worker's failure that it marked retryable is held back (handed to the
  Retrier, whose actions the caller executes) instead of forwarded;
- once a job is held, or its WORK_EXCEPTION has ended it, or a retry job has failed, nothing
  more the worker sends for that handle is forwarded: libraries send a WORK_FAIL, and some a
  WORK_COMPLETE or WORK_DATA, after an exception; forwarded, they would finish the held job,
  or earn the worker an ERROR JOB_NOT_FOUND (which kills a Perl worker);
- a retry job's unique id reaches the worker without gproxy's retry marking, so the worker
  sees the original unique id on every attempt;
- a CANT_DO or RESET_ABILITIES that would make gearmand requeue a held job is not sent on
  that connection: the worker moves to a fresh upstream connection (its registration
  replayed there, and the replies to that replay kept from the worker), and the old one stays
  open only for the jobs it still owns, and closes once it owns none.
Only those few packet types are parsed at all; everything else is passed through unread.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ..config import Route
from .assignments import ANSWERED, ORPHANED, Armed, Assignments, Orphaned
from .assignments import ServerTraits as ServerTraits
from .assignments import route_name as route_name
from .deadlines import Deadlines
from .ejection import Ejection
from .forwarding import ASSIGNS as _ASSIGNS
from .forwarding import (
    GRABS,
    RESULTS,
    UPDATES,
    WATCHED_DOWNSTREAM,
    WATCHED_DRAINING,
    WATCHED_UPSTREAM,
    Forwarding,
    grabs_answered_here,
    sent_already,
)
from .jobs import JobTable, TrackedJob
from .metrics import Metrics
from .protocol import (
    DEFAULT_MAX_PACKET_SIZE,
    HEADER_SIZE,
    REQ,
    RES,
    AdminLine,
    Framer,
    Packet,
    PacketType,
    ProtocolError,
    build_packet,
    text,
)
from .registration import MOVE, Registration
from .retry import DISCONNECTED, TIMED_OUT, Action, Mode, Retrier, SendUpstream
from .silenced import MAX_SILENCED as MAX_SILENCED
from .silenced import Silenced

log = logging.getLogger("gproxy.session")
P = PacketType
_NO_JOB: Final = build_packet(RES, P.NO_JOB)
_NOOP: Final = build_packet(RES, P.NOOP)


class UpstreamLink:
    """One gearmand connection of a session: the jobs assigned through it (only it can
    finish them) and the grabs it has yet to answer. The Retrier's owner of held jobs."""

    def __init__(self, name: str, max_packet_size: int, metrics: Metrics) -> None:
        self.name = name
        self.jobs = JobTable(name, metrics.running)
        self.framer = Framer(RES, max_packet_size, metrics.packets["from_gearmand"], skip_oversized=_ASSIGNS)
        """A job too large to hand the worker is failed instead (see Session._too_large)."""
        # One entry per GRAB sent and not yet answered, oldest first: True where gproxy sent
        # GRAB_JOB_UNIQ for the worker's plain GRAB_JOB, which must get a plain JOB_ASSIGN.
        # The server answers every GRAB with exactly one JOB_ASSIGN*, NO_JOB or ERROR, in order.
        self.grabs_pending: deque[bool] = deque()
        self.replies_to_swallow = 0
        """Replies still due to the OPTION_REQs gproxy replayed here: the worker never asked."""

    def __repr__(self) -> str:
        return f"UpstreamLink({self.name})"


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
class ArmTimeout:
    """Call `timeouts_due(now)` after `delay` seconds (it replaces any earlier request)."""

    delay: float


@dataclass(frozen=True, slots=True)
class Eject:
    """The worker failed `failures` jobs in a row (the last one of `function`): it gets no
    job for `delay` seconds; then call `ejection_over()`."""

    delay: float
    function: bytes
    failures: int


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """A retired connection owns nothing any more."""

    link: UpstreamLink


Command = Action[UpstreamLink, Route] | SendDownstream | OpenUpstream | CloseUpstream | Eject | ArmTimeout
"""What a Session asks of its caller, in the order it must happen. (SendUpstream may name
another worker's connection: the retry outcome of a job that connection holds.)"""

Asked = Action[UpstreamLink, Route] | Armed | Orphaned
"""What the Session's collaborators ask of it (see Session._asked)."""


class Session:
    """One downstream connection and its upstream links. Every event returns one ordered
    list of commands; bytes that are not Gearman raise ProtocolError (from a framer)."""

    def __init__(
        self,
        upstream_name: str,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        *,
        route: Route,
        retrier: Retrier[UpstreamLink, Route] | None = None,
        metrics: Metrics | None = None,
        traits: ServerTraits | None = None,
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
        self.traits = traits if traits is not None else ServerTraits()
        self._commands: list[Command] = []
        """What the event being handled asks for so far, in order."""
        self.silenced: Silenced[UpstreamLink] = Silenced(retrier, route)
        """Handles whose job is held or has ended: what the worker still sends for them is dropped."""
        self._out: list[bytes] = []
        """Bytes for the current link not yet in `_commands` (consecutive ones go as one)."""
        self._back: list[bytes] = []
        """Bytes for the worker not yet in `_commands`."""
        self._moves = 0
        self.draining = False
        """Shutting down: the worker's grabs get NO_JOB from gproxy, its jobs finish."""
        self.worker_gone = False
        """The worker left; connections that hold retries stay open for them (worker_left)."""
        self.ejection = Ejection()
        self.deadlines: Deadlines[UpstreamLink] = Deadlines()
        self.assignments = Assignments(route, self.traits, retrier, self.deadlines, self.silenced, self.metrics)
        self.forwarding = Forwarding(self.downstream, self.ejection, self.silenced, retrier, route, self.deadlines)

    @property
    def links(self) -> list[UpstreamLink]:
        return [self.current, *self.retired]

    def tracked_jobs(self) -> list[TrackedJob]:
        return [job for link in self.links for job in link.jobs]

    # -- events

    def from_downstream(self, data: bytes, now: float, sent: bool = False) -> list[Command]:
        """Bytes from the worker or client (`sent`: sent on already, see passes_downstream)."""
        watched = WATCHED_DRAINING if grabs_answered_here(self.draining, self.ejection) else WATCHED_DOWNSTREAM
        for frame in self.downstream.receive(data):
            if type(frame) is Packet:
                if frame.type not in watched:
                    self._out.append(frame.raw)
                elif forward := self._downstream_packet(frame, now):
                    self._out.append(forward)
            elif type(frame) is AdminLine:
                self._out.append(frame.raw)
            # (no Oversized: this framer refuses a packet over the cap)
        if sent:
            sent_already(self._commands, self._out, data)
        return self._done()

    def from_upstream(self, link: UpstreamLink, data: bytes, now: float, sent: bool = False) -> list[Command]:
        """Bytes from gearmand on `link` (`sent`: sent on already, see passes_upstream)."""
        for frame in link.framer.receive(data):
            if (type(frame) is Packet and frame.type not in WATCHED_UPSTREAM) or isinstance(frame, AdminLine):
                self._back.append(frame.raw)
                continue
            back = self.assignments.received(link, frame, now, self.worker_gone)  # (an Oversized too)
            if self.assignments.asked:
                self._asked(self.assignments.take(), link, now)
            if back:
                self._back.append(back)
        if link is not self.current:
            self._close_if_idle(link)
        if sent:
            sent_already(self._commands, self._back, data)
        return self._done()

    # -- the packets that may go on first

    def passes_downstream(self, data: bytes) -> bool:
        """May `data` from the worker go on before the Session sees it? (Forwarding.downstream)"""
        return self.forwarding.downstream(data, self.draining, self.traits.grab_uniq, self.current, self.retired)

    def passes_upstream(self, link: UpstreamLink, data: bytes) -> bool:
        """May `data` from gearmand on `link` go on before the Session sees it? (Forwarding.upstream)"""
        return self.forwarding.upstream(data, link, link is self.current and not self.worker_gone)

    def unfinished(self, link: UpstreamLink | None = None) -> int:
        """Bytes of an unfinished frame from the worker (or from gearmand on `link`): at an
        EOF, non-zero means that side left in the middle of a packet."""
        return self.downstream.buffered if link is None else link.framer.buffered

    def released(self, link: UpstreamLink) -> bool:
        """The Retrier holds nothing more on `link`: True if it is a retired link that may
        close now (it is forgotten here)."""
        if link in self.retired and self.idle(link):
            self.retired.remove(link)
            return True
        return False

    def worker_left(self, now: float) -> list[Command]:
        """The worker disconnected. A connection stays open if it holds retries, or runs a
        job whose function retries disconnects (on_disconnect = "retry"): gearmand cannot
        requeue the jobs the worker was still running there, so originals are retried here
        (reason disconnect), and retry jobs are failed back to the gproxy that owns their
        loop, which retries them the same way. Its other connections may simply close
        (gearmand requeues their jobs), once the retry jobs of functions that retry
        disconnects are failed back from them too: the loop's owner counts that attempt.
        The caller carries out the commands before it closes anything."""
        self.worker_gone = True
        for link in self.links:
            self._command(*self._orphaned(link, now))
        return self._done()

    def _orphaned(self, link: UpstreamLink, now: float, assigned_late: bool = False) -> list[Command]:
        """The jobs running on `link` whose worker has left: if `link` stays open, retry
        jobs failed back to their loop's owner and originals retried here. `assigned_late`:
        a job assigned after the worker left, which never ran: no attempt of its failed."""
        retrier = self.retrier
        if retrier is None:
            return []
        kept = retrier.holds(link) or (not assigned_late and any(
            not job.is_retry and retrier.retries_disconnects(job.function) for job in link.jobs
        ))
        if not kept and assigned_late:
            return []  # the connection closes, and gearmand requeues the job
        if not kept:
            failed_back = [job for job in link.jobs if job.is_retry and retrier.retries_disconnects(job.function)]
            for job in failed_back:
                link.jobs.ended(job.handle)
            retrier.disconnects_observed(link.jobs)
            return [SendUpstream(link, self._disconnected(job.handle)) for job in failed_back]
        running = link.jobs.released_all()
        actions: list[Command] = [
            SendUpstream(link, self._disconnected(job.handle)) for job in running if job.is_retry
        ]
        originals = [job for job in running if not job.is_retry]
        actions += retrier.worker_left(link, self.route, originals, now, ran=not assigned_late)
        return actions

    def link_closed(self, link: UpstreamLink) -> list[Command]:
        """`link`'s connection is gone: gearmand requeues whatever it still held. The worker
        is owed what will not come now: NO_JOB for each grab still open on a connection it
        was moved off."""
        if link in self.retired:
            self.retired.remove(link)
            if not self.worker_gone and link.grabs_pending:
                self._back.append(_NO_JOB * len(link.grabs_pending))
        link.grabs_pending.clear()
        link.jobs.released_all()
        if self.retrier is not None:
            self._command(*self.retrier.owner_lost(link))
        return self._done()

    def idle(self, link: UpstreamLink) -> bool:
        """A retired link that owns nothing and is owed nothing: it may close."""
        return (
            link is not self.current
            and not link.jobs
            and not link.grabs_pending
            and not (self.retrier is not None and self.retrier.holds(link))
        )

    # -- from the worker

    def _downstream_packet(self, packet: Packet, now: float) -> bytes:
        ptype = packet.type
        if ptype in GRABS or ptype is P.PRE_SLEEP:
            if (grab := self.assignments.grab(self.current, packet, self.draining, self.ejection)) is ANSWERED:
                self._back.append(_NO_JOB)
            return grab or b""
        if ptype in RESULTS or ptype in UPDATES:
            return self._job_packet(packet, now)
        return self._registration_packet(packet)

    def _job_packet(self, packet: Packet, now: float) -> bytes:
        ptype, handle = packet.type, _handle_of(packet)
        if self.silenced.drops(handle, self.current, self.retired):
            log.debug("dropped %s for %s from the worker: that job is held or has ended", ptype.name, text(handle))
            return b""
        ended = ptype in RESULTS
        link, job = self._owner_of(handle, ended)
        if ended and job is not None:
            self.deadlines.ended(link, handle)
            self.metrics.attempt_ended(job.function, now - job.started_at)
            self._count_for_ejection(job, ptype is P.WORK_COMPLETE, now)
            if ptype is not P.WORK_COMPLETE:
                forward = self._failed(link, job, packet, now)
                return self._route(link, forward) if forward else b""
            if not job.is_retry:
                self.metrics.job_ended(job.function, "complete", now - job.started_at)
        return self._route(link, packet.raw)

    def _failed(self, link: UpstreamLink, job: TrackedJob, packet: Packet, now: float) -> bytes:
        """A worker's WORK_FAIL or WORK_EXCEPTION: what goes on to gearmand for it (nothing
        if the Retrier holds the job)."""
        ptype = packet.type
        held, instead = False, None
        if self.retrier is not None and not job.is_retry:
            # (A retry's failure goes on: the gproxy that holds the original owns the loop.)
            decision = self.retrier.worker_failed(
                owner=link, route=self.route, job=job, ptype=ptype,
                failure=packet.args()["data"] if ptype is P.WORK_EXCEPTION else b"",
                now=now, exception_ends_job=self.traits.exception_ends_job,
            )
            self._command(*decision.actions)
            held = decision.held
            instead = decision.instead  # (a WORK_FAIL, which ends the job on any server)
        if not held and not job.is_retry:  # a retry's outcome is counted where it is held
            self.metrics.job_ended(job.function, _OUTCOMES[ptype], now - job.started_at)
        if held or instead is not None or (ptype is P.WORK_EXCEPTION and self.traits.exception_ends_job) or (
            job.is_retry and ptype is P.WORK_FAIL
        ):
            self.silenced.add(job.handle)  # (what the worker sends after it would not be the job's)
        return b"" if held else packet.raw if instead is None else instead

    def _count_for_ejection(self, job: TrackedJob, completed: bool, now: float) -> None:
        if completed:
            return self.ejection.completed()
        if self.retrier is None:
            return None
        policy = self.retrier.policies.for_function(job.function)
        duration = self.ejection.failed(policy, job.function, now)
        if duration is not None:
            self.metrics.count(self.metrics.ejections, job.function)
            self._command(Eject(duration, job.function, policy.eject_after))
        return None

    def _asked(self, asked: Sequence[Asked], link: UpstreamLink, now: float) -> None:
        """What a collaborator asked for, in order: the Retrier's actions, and what only the Session does."""
        for one in asked:
            if one is ORPHANED:
                self._command(*self._orphaned(link, now, assigned_late=True))
            elif isinstance(one, Armed):
                self._command(ArmTimeout(one.delay))
            else:
                self._command(one)

    def _arm(self, now: float) -> None:
        if (delay := self.deadlines.arm(now)) is not None:
            self._command(ArmTimeout(delay))

    def timeouts_due(self, now: float) -> list[Command]:
        """The timer ArmTimeout asked for: every attempt past its deadline is over. An
        original is retried (reason timeout), a retry job failed back to the gproxy that
        owns its loop; what the worker still sends for it is dropped."""
        for link, job in self.deadlines.fired(now, still_running=not self.worker_gone):
            if link.jobs.get(job.handle) is job:  # (not ended, or handed back, meanwhile)
                self._timed_out(link, job, now)
        self._arm(now)
        return self._done()

    def _timed_out(self, link: UpstreamLink, job: TrackedJob, now: float) -> None:
        retrier = self.retrier
        assert retrier is not None  # (no timeout without policies)
        if job.is_retry:
            if retrier.policies.for_function(job.function).mode is Mode.OBSERVE:
                return
            actions: list[Command] = [SendUpstream(link, self._failed_back(job.handle, TIMED_OUT))]
        else:
            lost = retrier.worker_timed_out(link, self.route, job, now)
            if lost is None:
                return  # observe mode: it runs on
            actions = list(lost)
        log.warning(
            "job %s %s ran past its timeout (%.3gs): %s; what its worker still sends for it is dropped",
            text(job.function), text(job.handle), now - job.started_at,
            "failed back to the gproxy that retries it" if job.is_retry else "retried",
        )
        link.jobs.ended(job.handle)
        self.metrics.attempt_ended(job.function, now - job.started_at)
        self._count_for_ejection(job, False, now)
        self.silenced.add(job.handle)
        self._command(*actions)
        if link is not self.current:
            self._close_if_idle(link)

    def ejection_over(self) -> list[Command]:
        """The time of the worker's ejection is up: a sleeping worker is woken (NOOP)."""
        if self.ejection.over() and not self.worker_gone:
            self._back.append(_NOOP)
        return self._done()

    def _registration_packet(self, packet: Packet) -> bytes:
        if (registered := self.registration.received(packet, self.current, self.retrier, self.deadlines)) is MOVE:
            self._move()  # sent here, it would make gearmand requeue a held job
        return registered or b""

    def _move(self) -> None:
        old = self.current
        self._flush()  # what came before the move was meant for the old connection
        self._moves += 1
        self.retired.append(old)
        self.current = UpstreamLink(f"{old.name}+{self._moves}", self.max_packet_size, self.metrics)
        self.current.replies_to_swallow = self.registration.options
        self._command(OpenUpstream(self.current, self.registration.replay()))

    # -- helpers

    def _command(self, *commands: Command) -> None:
        """Add commands after everything asked for so far (bytes pending included)."""
        if commands:
            self._flush()
            self._commands += commands

    def _flush(self) -> None:
        if self._out:
            self._commands.append(SendUpstream(self.current, b"".join(self._out)))
            self._out = []
        if self._back:
            self._commands.append(SendDownstream(b"".join(self._back)))
            self._back = []

    def _done(self) -> list[Command]:
        """The event's commands, in order; the next event starts afresh."""
        if not self._commands:  # the usual event: bytes to forward one way, nothing else
            if self._out and not self._back:
                out, self._out = self._out, []
                return [SendUpstream(self.current, out[0] if len(out) == 1 else b"".join(out))]
            if self._back and not self._out:
                back, self._back = self._back, []
                return [SendDownstream(back[0] if len(back) == 1 else b"".join(back))]
        self._flush()
        commands, self._commands = self._commands, []
        return commands

    def _disconnected(self, handle: bytes) -> bytes:
        """The failure that tells the owner of a retry job that its worker left."""
        return self._failed_back(handle, DISCONNECTED)

    def _failed_back(self, handle: bytes, why: bytes) -> bytes:
        """A retry job's failure for the gproxy that owns its loop (`why`: DISCONNECTED or
        TIMED_OUT, which it recognises)."""
        return self.traits.exception(handle, why)

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
        self._command(SendUpstream(link, raw))
        self._close_if_idle(link)
        return b""

    def _close_if_idle(self, link: UpstreamLink) -> None:
        if self.released(link):
            self._command(CloseUpstream(link))


_OUTCOMES: Final = {P.WORK_COMPLETE: "complete", P.WORK_FAIL: "fail", P.WORK_EXCEPTION: "exception"}


def _handle_of(packet: Packet) -> bytes:
    """The handle of a work packet, read without splitting the (possibly large) payload.
    A WORK_STATUS is small and checked whole: one short of a NUL (Perl Gearman::Worker
    2.004's send_work_status drops the denominator) makes gearmand read the next packet as
    its last field, and the connection is out of step from there on."""
    if packet.type is P.WORK_FAIL or packet.type is P.WORK_STATUS:
        return packet.args()["handle"]
    end = packet.raw.find(b"\0", HEADER_SIZE)
    if end < 0:
        raise ProtocolError(f"malformed {packet.type.name} payload: no NUL after the handle")
    return packet.raw[HEADER_SIZE:end]
