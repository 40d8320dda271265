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

The rules are the Session's collaborators', each a pure module of its own: forwarding (what
passes unread, and what may go on first), registration, assignments (grabs, and gearmand's
answers), attempts (how a job's attempt ends, and what the worker sends after it), silenced.
The Session keeps the worker's links, and turns what they ask for into its commands, in order;
its Connections (connections.py) keep the pair's lifecycle: what the sockets did, and when the
pair ends. Both answer every event with one ordered list of commands for the shell.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final

from ..config import Route
from .assignments import ANSWERED, ORPHANED, Armed, Assignments, Orphaned
from .assignments import ServerTraits as ServerTraits
from .assignments import route_name as route_name
from .attempts import Attempts, Ejected
from .commands import (
    ArmTimeout,
    CallLater,
    Close,
    CloseUpstream,
    Eject,
    Finish,
    OpenUpstream,
    SendDownstream,
    Shut,
    Timer,
)
from .connections import Connections, LinkState
from .deadlines import Deadlines
from .drain import Drain
from .ejection import Ejection
from .forwarding import ASSIGNS as _ASSIGNS
from .forwarding import (
    BYPASS_DOWNSTREAM,
    BYPASS_UPSTREAM,
    JOB_PACKETS,
    REGISTRATION,
    WATCHED_DOWNSTREAM,
    WATCHED_DRAINING,
    WATCHED_UPSTREAM,
    Forwarding,
    grabs_answered_here,
    sent_already,
)
from .jobs import JobTable, TrackedJob
from .metrics import Metrics
from .policy import DISCONNECTED
from .protocol import DEFAULT_MAX_PACKET_SIZE, REQ, RES, AdminLine, Framer, Packet, PacketType, build_packet
from .registration import MOVE, Registration
from .retry import Action, NothingHeld, Retrier, SendUpstream
from .silenced import MAX_SILENCED as MAX_SILENCED

P = PacketType
_NO_JOB: Final = build_packet(RES, P.NO_JOB)
_NOOP: Final = build_packet(RES, P.NOOP)
_OPEN: Final = LinkState.OPEN


class UpstreamLink:
    """One gearmand connection of a session: the jobs assigned through it (only it can
    finish them) and the grabs it has yet to answer. The Retrier's owner of held jobs."""

    def __init__(self, name: str, max_packet_size: int, metrics: Metrics, session: Session | None = None) -> None:
        self.name = name
        self.session = session
        """The Session whose connection this is, while it is open (None in tests)."""
        self.state = LinkState.OPEN
        self.pending: list[bytes] = []
        """What is to be sent once the connection is open (while CONNECTING)."""
        self.shut = False
        """gproxy has half-closed it: a close mid-frame after that answers gproxy's."""
        self.jobs = JobTable(name)
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


Command = (
    Action[UpstreamLink, Route] | SendDownstream | OpenUpstream | CloseUpstream | Eject | ArmTimeout
    | Shut | Close | CallLater | Finish
)
"""What a Session asks of its caller, in the order it must happen (see commands.py).
(SendUpstream may name another worker's connection: the retry outcome of a job it holds.)"""

Asked = Action[UpstreamLink, Route] | Armed | Orphaned | Ejected
"""What the Session's collaborators ask of it (see Session._asked)."""


class Session:
    """One downstream connection and its upstream links: every event returns one ordered list of
    commands (ProtocolError for bytes that are not Gearman). The rules are its collaborators'."""

    def __init__(
        self,
        upstream_name: str,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        *,
        route: Route,
        retrier: Retrier[UpstreamLink, Route] | None = None,
        metrics: Metrics | None = None,
        traits: ServerTraits | None = None,
        name: str | None = None,
        drain: Drain | None = None,
        log_fields: dict[str, str] | None = None,
    ) -> None:
        self.name = upstream_name if name is None else name
        """The pair's name in log lines (its worker's address and route)."""
        self.log_fields = log_fields if log_fields is not None else {}
        """The same as fields of the log lines (peer, via, upstream: see core.fields)."""
        self.max_packet_size = max_packet_size
        self.metrics = metrics if metrics is not None else Metrics()
        self.current = UpstreamLink(upstream_name, max_packet_size, self.metrics, self)
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
        self._out: list[bytes] = []
        """Bytes for the current link not yet in `_commands` (consecutive ones go as one)."""
        self._back: list[bytes] = []
        """Bytes for the worker not yet in `_commands`."""
        self._moves = 0
        self.drain = drain if drain is not None else Drain()
        """The process's (Proxy owns it): while draining, grabs get NO_JOB from gproxy."""
        self.worker_gone = False
        """The worker left; connections that hold retries stay open for them (worker_left)."""
        self.ejection = Ejection()
        self.deadlines: Deadlines[UpstreamLink] = Deadlines()
        self.attempts = Attempts(route, self.traits, retrier, self.deadlines, self.ejection, self.metrics)
        silenced = self.attempts.silenced
        self.assignments = Assignments(route, self.traits, retrier, self.deadlines, silenced, self.metrics)
        self.forwarding = Forwarding(self.downstream, self.ejection, silenced, retrier, route, self.deadlines)
        self.connections = Connections(self)

    # -- what the pair's sockets did (see Connections)

    def worker_ended(self, error: OSError | None, now: float) -> list[Command]:
        return self.connections.worker_ended(error, now)

    def link_ended(self, link: UpstreamLink, error: OSError | None) -> list[Command]:
        return self.connections.link_ended(link, error)

    def link_opened(self, link: UpstreamLink) -> list[Command]:
        return self.connections.link_opened(link)

    def link_failed(self, link: UpstreamLink, why: str) -> list[Command]:
        return self.connections.link_failed(link, why)

    def timer_fired(self, timer: Timer, now: float) -> list[Command]:
        return self.connections.timer_fired(timer, now)

    def refuse(self, reason: str, message: str) -> list[Command]:
        return self.connections.refuse(reason, message)

    def internal_error(self, reason: str = "internal error", logged: bool = False) -> list[Command]:
        return self.connections.internal_error(reason, logged)

    def stop(self) -> list[Command]:
        return self.connections.stop()

    def deliver(self, action: NothingHeld[UpstreamLink] | SendUpstream[UpstreamLink]) -> list[Command]:
        """A Retrier's action for one of this pair's connections, from outside its own events
        (a retry's outcome, a timer, another pair's event)."""
        self.command(action)
        return self.event_done()

    @property
    def done(self) -> bool:
        return self.connections.done

    @property
    def reason(self) -> str | None:
        return self.connections.reason

    @property
    def level(self) -> int:
        return self.connections.level

    # -- the packet rules

    @property
    def links(self) -> list[UpstreamLink]:
        return [self.current, *self.retired]

    def tracked_jobs(self) -> list[TrackedJob]:
        return [job for link in self.links for job in link.jobs]

    def from_downstream(self, data: bytes, now: float, sent: bool = False) -> list[Command]:
        """Bytes from the worker or client (`sent`: sent on already, see passes_downstream)."""
        watched = WATCHED_DRAINING if grabs_answered_here(self.drain.started, self.ejection) else WATCHED_DOWNSTREAM
        for frame in self.downstream.receive(data):  # (no Oversized: this framer refuses a packet over the cap)
            if type(frame) is Packet:
                if frame.type not in watched:
                    self._out.append(frame.raw)
                elif forward := self._downstream_packet(frame, now):
                    self._out.append(forward)
            elif type(frame) is AdminLine:
                self._out.append(frame.raw)
        if sent:
            sent_already(self._commands, self._out, data)
        return self.event_done()

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
        return self.event_done()

    def bypasses_downstream(self, data: bytes) -> bytes | None:
        """What to send to the current link for `data` from the worker, without calling
        from_downstream, or None (the Session must see it): for one whole packet of a type
        the Session does not watch now (sent as it is), or a grab while grabs are not
        answered here (sent as Assignments.grab sends it, its entry put on the link's
        grabs_pending), while the current link is open. It is counted here. (The compiled
        data plane's Gate decides the same in C; tests/test_gate.py holds the two to each
        other.)"""
        ptype = self.downstream.whole(data)
        if ptype is None or self.current.state is not _OPEN:
            return None
        if grabs_answered_here(self.drain.started, self.ejection):
            if ptype in WATCHED_DRAINING:
                return None
        elif ptype in BYPASS_DOWNSTREAM:  # (Assignments.grab: its entry on grabs_pending, maybe upgraded)
            if (grab := self.assignments.grab(self.current, Packet(ptype, data), False, self.ejection)) is None:
                return None  # (answered here: not while grabs go to gearmand)
            data = grab
        elif ptype in WATCHED_DOWNSTREAM:
            return None
        self.downstream.counts[ptype] += 1
        return data

    def bypasses_upstream(self, link: UpstreamLink, data: bytes) -> bool:
        """As bypasses_downstream, for `data` from gearmand on `link`, to the worker as it is:
        only on the current link, while the worker is there; a NO_JOB takes its grab off
        grabs_pending."""
        if link is not self.current or self.worker_gone:
            return False
        ptype = link.framer.whole(data)
        if ptype is None or (ptype in WATCHED_UPSTREAM and ptype not in BYPASS_UPSTREAM):
            return False
        if ptype in BYPASS_UPSTREAM and link.grabs_pending:
            link.grabs_pending.popleft()
        link.framer.counts[ptype] += 1
        return True

    def passes_downstream(self, data: bytes) -> bool:
        """May `data` from the worker go on before the Session sees it? (Forwarding.downstream)"""
        return self.forwarding.downstream(data, self.drain.started, self.traits.grab_uniq, self.current, self.retired)

    def passes_upstream(self, link: UpstreamLink, data: bytes) -> bool:
        """May `data` from gearmand on `link` go on before the Session sees it? (Forwarding.upstream)"""
        return self.forwarding.upstream(data, link, link is self.current and not self.worker_gone)

    def retire_if_idle(self, link: UpstreamLink) -> bool:
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
            self.command(*self._orphaned(link, now))
        return self.event_done()

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
        running = link.jobs.take_all()
        actions: list[Command] = [
            SendUpstream(link, self._disconnected(job.handle)) for job in running if job.is_retry
        ]
        originals = [job for job in running if not job.is_retry]
        actions += retrier.worker_left(link, self.route, originals, now, ran=not assigned_late)
        return actions

    def forget(self, link: UpstreamLink) -> None:
        """`link`'s connection is gone (Connections): gearmand requeues whatever it still
        held. The worker is owed what will not come now: NO_JOB for each grab still open on
        a connection it was moved off."""
        if link in self.retired:
            self.retired.remove(link)
            if not self.worker_gone and link.grabs_pending:
                self._back.append(_NO_JOB * len(link.grabs_pending))
        link.grabs_pending.clear()
        link.jobs.take_all()
        if self.retrier is not None:
            self.command(*self.retrier.owner_lost(link))

    def idle(self, link: UpstreamLink) -> bool:
        """A retired link that owns nothing and is owed nothing: it may close."""
        return (
            link is not self.current
            and not link.jobs
            and not link.grabs_pending
            and not (self.retrier is not None and self.retrier.holds(link))
        )

    def ejection_over(self) -> list[Command]:
        """The time of the worker's ejection is up: a sleeping worker is woken (NOOP)."""
        if self.ejection.over() and not self.worker_gone:
            self._back.append(_NOOP)
        return self.event_done()

    def timeouts_due(self, now: float) -> list[Command]:
        """The timer ArmTimeout asked for: every attempt past its deadline is over (Attempts.timed_out)."""
        for link in self.attempts.timeouts_due(now, still_running=not self.worker_gone):
            self._asked(self.attempts.take(), link, now)
            self._close_if_idle(link)
        self._asked(self.attempts.take(), self.current, now)  # the timer, for the next deadline
        return self.event_done()

    def _downstream_packet(self, packet: Packet, now: float) -> bytes:
        ptype = packet.type
        if ptype in JOB_PACKETS:
            link, forward = self.attempts.job_packet(packet, now, self.current, self.retired)
            if self.attempts.asked:
                self._asked(self.attempts.take(), link, now)
            if link is not self.current:  # the job's: a connection the worker was moved off
                self._close_if_idle(link)
            return forward
        if ptype in REGISTRATION:
            if (registered := self.registration.received(packet, self.current, self.retrier, self.deadlines)) is MOVE:
                self._move()  # sent here, it would make gearmand requeue a held job
            return registered or b""
        if (grab := self.assignments.grab(self.current, packet, self.drain.started, self.ejection)) is ANSWERED:
            self._back.append(_NO_JOB)  # (a grab, or a sleep while grabs are answered here)
        return grab or b""

    def _move(self) -> None:
        self._flush()  # what came before the move was meant for the old connection
        self._moves += 1
        self.retired.append(self.current)
        self.current = UpstreamLink(f"{self.retired[-1].name}+{self._moves}", self.max_packet_size, self.metrics, self)
        self.current.replies_to_swallow = self.registration.options
        self.command(OpenUpstream(self.current, self.registration.replay()))

    def _asked(self, asked: Sequence[Asked], link: UpstreamLink, now: float) -> None:
        """What a collaborator asked for, in order: the Retrier's actions, and what only the Session does."""
        for one in asked:
            if one is ORPHANED:
                self.command(*self._orphaned(link, now, assigned_late=True))
            elif isinstance(one, Armed):
                self.command(ArmTimeout(one.delay))
            else:
                self.command(Eject(*one) if isinstance(one, Ejected) else one)

    def command(self, *commands: Command) -> None:
        """Add commands after everything asked for so far (bytes pending included)."""
        if commands:
            self._flush()
            self._commands += commands

    def discard_pending(self) -> None:
        """Drop what the event has asked for so far (its input was bad, or handling it failed)."""
        self._commands, self._out, self._back = [], [], []

    def _flush(self) -> None:
        if self._out:
            self._commands.append(SendUpstream(self.current, b"".join(self._out)))
            self._out = []
        if self._back:
            self._commands.append(SendDownstream(b"".join(self._back)))
            self._back = []

    def event_done(self) -> list[Command]:
        """The event's commands, in order, as the pair's Connections resolve them; the next
        event starts afresh."""
        if not self._commands:  # the usual event: bytes to forward one way, nothing else
            if self._out and not self._back and self.current.state is _OPEN:
                out, self._out = self._out, []
                return [SendUpstream(self.current, out[0] if len(out) == 1 else b"".join(out))]
            if self._back and not self._out and not self.worker_gone:
                back, self._back = self._back, []
                return [SendDownstream(back[0] if len(back) == 1 else b"".join(back))]
        self._flush()
        commands, self._commands = self._commands, []
        return self.connections.resolve(commands)

    def _disconnected(self, handle: bytes) -> bytes:
        """The failure that tells the owner of a retry job that its worker left."""
        return self.traits.exception(handle, DISCONNECTED)  # (which that gproxy recognises)

    def _close_if_idle(self, link: UpstreamLink) -> None:
        if self.retire_if_idle(link):
            self.command(CloseUpstream(link))
