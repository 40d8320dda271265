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
import re
from collections import deque
from dataclasses import dataclass
from typing import Final

from ..config import Route
from .deadlines import Deadlines
from .ejection import Ejection
from .jobs import JobTable, TrackedJob
from .lifecycle import HALF_CLOSE_LINGER, CallLater, Close, Finish, LinkState, Shut, Timer, cause, mid_packet
from .lifecycle import log as pair_log
from .metrics import Metrics
from .policy import DISCONNECTED, TIMED_OUT, Mode
from .protocol import (
    DEFAULT_MAX_PACKET_SIZE,
    HEADER_SIZE,
    REQ,
    RES,
    AdminLine,
    Framer,
    Oversized,
    Packet,
    PacketType,
    ProtocolError,
    build_packet,
    splice,
    split_head,
    text,
)
from .retry import Action, RecheckBudget, Released, Retrier, SendUpstream, Submit, Wakeup
from .uniques import parse_retry_unique

log = logging.getLogger("gproxy.session")
P = PacketType
_GRAB_JOB: Final = build_packet(REQ, P.GRAB_JOB)
_GRAB_JOB_UNIQ: Final = build_packet(REQ, P.GRAB_JOB_UNIQ)
_NO_JOB: Final = build_packet(RES, P.NO_JOB)
_NOOP: Final = build_packet(RES, P.NOOP)
_ASSIGNS: Final = frozenset({P.JOB_ASSIGN, P.JOB_ASSIGN_UNIQ, P.JOB_ASSIGN_ALL})
_GRABS: Final = frozenset({P.GRAB_JOB, P.GRAB_JOB_UNIQ, P.GRAB_JOB_ALL})
_RESULTS: Final = frozenset({P.WORK_COMPLETE, P.WORK_FAIL, P.WORK_EXCEPTION})
_UPDATES: Final = frozenset({P.WORK_DATA, P.WORK_WARNING, P.WORK_STATUS})
_REGISTRATION: Final = frozenset(
    {P.CAN_DO, P.CAN_DO_TIMEOUT, P.CANT_DO, P.RESET_ABILITIES, P.SET_CLIENT_ID, P.OPTION_REQ}
)
_WATCHED_DOWNSTREAM: Final = _GRABS | _RESULTS | _UPDATES | _REGISTRATION
_WATCHED_DRAINING: Final = _WATCHED_DOWNSTREAM | {P.PRE_SLEEP}
_WATCHED_UPSTREAM: Final = _ASSIGNS | {P.NO_JOB, P.ERROR, P.OPTION_RES}
_OPEN: Final = LinkState.OPEN
MAX_SILENCED: Final = 4096
"""Ended handles remembered per connection; a held one is recognised beyond that too."""


@dataclass(slots=True)
class ServerTraits:
    """What gproxy has learned about a route's job server; shared by the route's sessions."""

    grab_uniq: bool = True
    """Answers GRAB_JOB_UNIQ (gearmand does; the Perl Gearman::Server answers ERROR)."""
    exception_ends_job: bool = True
    """WORK_EXCEPTION is final (gearmand); on the Perl Gearman::Server WORK_FAIL ends it."""


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

    @property
    def options(self) -> int:
        return len(self._options)

    def replay(self) -> bytes:
        return self._client_id + b"".join(self._options.values()) + b"".join(self._abilities.values())


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


Command = (
    Action[UpstreamLink, Route] | SendDownstream | OpenUpstream | CloseUpstream | Eject | ArmTimeout
    | Shut | Close | CallLater | Finish
)
"""What a Session asks of its caller, in the order it must happen. (SendUpstream may name
another worker's connection: the retry outcome of a job that connection holds.)"""


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
        name: str | None = None,
    ) -> None:
        self.name = upstream_name if name is None else name
        """The pair's name in log lines (its worker's address and route)."""
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
        self._silenced: dict[bytes, None] = {}
        """Handles whose job is held or ended by a failure: what the worker still sends for
        them is dropped. Oldest first, at most MAX_SILENCED; a new assignment clears one."""
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
        # The pair's lifecycle (see "the connections" below).
        self.reason: str | None = None
        """Why the pair ends: the first reason, unless a graver one follows."""
        self.level = logging.DEBUG
        self.done = False
        self._closings = 0
        """Sides that closed (an EOF): the first starts the other's grace period."""
        self._worker_ended = False
        self._worker_shut = False
        self._worker_lost: str | None = None
        """Why the worker's connection broke (a reset, a failed send), if it did."""
        self._kept_for_retries = False
        """The worker has left, and its connections that hold retries are kept for them."""
        self._finish_sent = False
        """Finish is in the commands given out: nothing of the pair's own follows it."""

    @property
    def links(self) -> list[UpstreamLink]:
        return [self.current, *self.retired]

    def tracked_jobs(self) -> list[TrackedJob]:
        return [job for link in self.links for job in link.jobs]

    # -- events

    def from_downstream(self, data: bytes, now: float, sent: bool = False) -> list[Command]:
        """Bytes from the worker or client (`sent`: sent on already, see passes_downstream)."""
        watched = _WATCHED_DRAINING if self._grabs_answered_here() else _WATCHED_DOWNSTREAM
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
            self._sent_already(self._out, data)
        return self._done()

    def from_upstream(self, link: UpstreamLink, data: bytes, now: float, sent: bool = False) -> list[Command]:
        """Bytes from gearmand on `link` (`sent`: sent on already, see passes_upstream)."""
        for frame in link.framer.receive(data):
            if type(frame) is Packet:
                if frame.type not in _WATCHED_UPSTREAM:
                    self._back.append(frame.raw)
                elif back := self._upstream_packet(link, frame, now):
                    self._back.append(back)
            elif type(frame) is Oversized:
                self._back.append(self._too_large(link, frame))
            elif type(frame) is AdminLine:
                self._back.append(frame.raw)
        if link is not self.current:
            self._close_if_idle(link)
        if sent:
            self._sent_already(self._back, data)
        return self._done()

    # -- the packets that may go on first

    def passes_downstream(self, data: bytes) -> bool:
        """True if `data` from the worker is one whole packet that goes on to the current
        link unchanged, and nothing else the event asks for must go before it. The caller
        may then send it first and hand it to `from_downstream(data, now, sent=True)`:
        what the Session does with it (tracking, metrics) stays off the packet's way, and
        off the job's latency. Only what is common and cheap to be sure of: grabs, sleeps,
        results that end no held job, packets gproxy does not watch."""
        ptype = self.downstream.whole(data)
        if ptype is None:
            return False
        if ptype not in _WATCHED_DRAINING:
            return True
        if self._grabs_answered_here():
            return False
        if ptype is P.GRAB_JOB_UNIQ or ptype is P.GRAB_JOB_ALL or ptype is P.PRE_SLEEP:
            return True
        if ptype is P.GRAB_JOB:
            return not self.traits.grab_uniq  # else sent as GRAB_JOB_UNIQ
        if ptype is P.WORK_COMPLETE or ptype is P.WORK_DATA or ptype is P.WORK_WARNING:
            end = data.find(b"\0", HEADER_SIZE)  # (none: a malformed packet, refused whole)
            return end >= 0 and not self.retired and not self._is_silenced(data[HEADER_SIZE:end])
        return False  # failures (a retry decision), WORK_STATUS (checked whole), registration

    def passes_upstream(self, link: UpstreamLink, data: bytes) -> bool:
        """As passes_downstream, for `data` from gearmand on `link` to the worker: anything
        gproxy does not watch, NO_JOB, and an assignment that is neither rewritten (an
        upgraded grab's, a retry's) nor a held job's."""
        if link is not self.current or self.worker_gone:
            return False
        ptype = link.framer.whole(data)
        if ptype is None:
            return False
        if ptype not in _WATCHED_UPSTREAM or ptype is P.NO_JOB:
            return True
        if ptype is P.ERROR or ptype is P.OPTION_RES:
            return False
        if link.grabs_pending and link.grabs_pending[0]:
            return False  # an upgraded grab's JOB_ASSIGN_UNIQ loses its unique id
        ends = [HEADER_SIZE - 1]
        for _ in range(_ASSIGN_FIELDS[ptype]):
            if (end := data.find(b"\0", ends[-1] + 1)) < 0:
                return False  # malformed: refused whole
            ends.append(end)
        if ptype is not P.JOB_ASSIGN and data.startswith(b"gpr:", ends[2] + 1):
            return False  # a retry's unique id is shown as the original's
        retrier = self.retrier
        if retrier is None:
            return True
        if self.deadlines.any_registered or retrier.policies.for_function(data[ends[1] + 1 : ends[2]]).timeout:
            return False  # its deadline is a command of the event
        return retrier.holder(self.route, data[HEADER_SIZE : ends[1]]) is None

    def _sent_already(self, pieces: list[bytes], data: bytes) -> None:
        """The caller sent `data` before the Session saw it: that must be all the Session
        would have sent for the event, first and unchanged (a disagreement is a bug in
        passes_*, and the pair closes as for any internal error)."""
        if self._commands or len(pieces) != 1 or pieces[0] is not data:
            raise RuntimeError("a packet sent on before the Session saw it was not meant to go on as it was")
        pieces.clear()

    def unfinished(self, link: UpstreamLink | None = None) -> int:
        """Bytes of an unfinished frame from the worker (or from gearmand on `link`): at an
        EOF, non-zero means that side left in the middle of a packet."""
        return self.downstream.buffered if link is None else link.framer.buffered

    def _retire_if_idle(self, link: UpstreamLink) -> bool:
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
        self._worker_left(now)
        return self._done()

    def _worker_left(self, now: float) -> None:
        self.worker_gone = True
        for link in self.links:
            self._command(*self._orphaned(link, now))

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
        self._link_closed(link)
        return self._done()

    def _link_closed(self, link: UpstreamLink) -> None:
        if link in self.retired:
            self.retired.remove(link)
            if not self.worker_gone and link.grabs_pending:
                self._back.append(_NO_JOB * len(link.grabs_pending))
        link.grabs_pending.clear()
        link.jobs.released_all()
        if self.retrier is not None:
            self._command(*self.retrier.owner_lost(link))

    def idle(self, link: UpstreamLink) -> bool:
        """A retired link that owns nothing and is owed nothing: it may close."""
        return (
            link is not self.current
            and not link.jobs
            and not link.grabs_pending
            and not (self.retrier is not None and self.retrier.holds(link))
        )

    # -- the connections: what their sockets did, and what becomes of them

    def worker_ended(self, error: OSError | None, now: float) -> list[Command]:
        """The worker's connection ended: closed, or broken (`error`: it has left as if it had
        closed). Closing its gearmand connections would requeue the jobs gproxy holds, and
        the jobs it was running of functions that retry disconnects: worker_left holds those,
        and the connections that hold retries stay open until they hold nothing."""
        self._worker_ended = True
        if self.done:
            return []
        if error is not None:
            self._worker_lost = f"peer connection lost: {error}"
        elif not self._worker_shut and (unfinished := self.downstream.buffered):
            return self.refuse("mid_packet", mid_packet("peer", unfinished))
        out = self.worker_left(now)  # (carried out first: what it releases settles now)
        if self.done:
            return out
        if self._holds_retries():
            pair_log.info("%s: worker left while retries are held; keeping their gearmand connections", self.name)
            self._kept_for_retries = True
            for link in self.links:
                if link.state is _OPEN and not self._holds(link):
                    self._shut(link)  # its running jobs requeue natively
            self._nothing_held_check()
        else:
            self._left()
        return out + self._done()

    def link_ended(self, link: UpstreamLink, error: OSError | None) -> list[Command]:
        """Gearmand connection `link` ended: closed, or broken (`error`)."""
        if self.done or link.state is LinkState.CLOSED:
            return []
        current = link is self.current and not self.worker_gone
        if error is not None:
            if current:
                self._fail(f"gearmand connection lost: {cause(error)}", logging.INFO)
            else:  # a connection that only holds jobs (the worker moved off it, or left): the
                # pair goes on, so the cause is told here
                pair_log.info("%s: gearmand connection %s lost: %s", self.name, link.name, cause(error))
        elif not link.shut and (unfinished := link.framer.buffered):
            return self.refuse("mid_packet", mid_packet("gearmand", unfinished))
        elif current:
            self._closing("gearmand closed the connection")
            if not self._worker_ended:
                self._shut(None)
        # The connection is gone, so is everything gearmand had assigned through it (it
        # requeues those jobs): their holds end now, not when the pair is done lingering.
        self._detach(link)
        return self._done()

    def link_opened(self, link: UpstreamLink) -> list[Command]:
        """The connection a move asked for (OpenUpstream) is open."""
        if self.done or link.state is not LinkState.CONNECTING:
            return [Close(link)]  # (wanted no more)
        link.state = _OPEN
        pending, link.pending = link.pending, []
        pair_log.info("%s: moved to a fresh gearmand connection; the old one keeps its held jobs", self.name)
        return [SendUpstream(link, b"".join(pending))]

    def link_failed(self, link: UpstreamLink, why: str) -> list[Command]:
        """No connection for a move: `why` says whose fault (gearmand's, or gproxy's own limit)."""
        if not self.done:
            self._fail(why)
        return self._done()

    def deliver(self, action: Released[UpstreamLink] | SendUpstream[UpstreamLink]) -> list[Command]:
        """A Retrier's action for one of this pair's connections, from outside its own events
        (a retry's outcome, a timer, another pair's event)."""
        self._command(action)
        return self._done()

    def timer_fired(self, timer: Timer, now: float) -> list[Command]:
        if self.done:
            return []
        if timer is Timer.LINGER:
            self._finish()
            return self._done()
        if timer is Timer.EJECTION:
            pair_log.warning("%s: worker back from its ejection; it is given jobs again", self.name)
            return self.ejection_over()
        return self.timeouts_due(now)

    def refuse(self, reason: str, message: str) -> list[Command]:
        """Bad input: counted by reason, and the pair ends with one warning. (What the event
        had asked for before the bad bytes is dropped with them.)"""
        self._commands, self._out, self._back = [], [], []
        self.metrics.protocol_errors.labels(reason).inc()
        self._fail(message)
        return self._done()

    def internal_error(self, reason: str = "internal error", logged: bool = False) -> list[Command]:
        """Handling an event of the pair failed: it ends, and gearmand requeues its jobs
        (`logged`: the caller has logged its close line, with the traceback)."""
        self._commands, self._out, self._back = [], [], []
        if self.reason is None or self.level < logging.ERROR:
            self.reason, self.level = reason, logging.ERROR
        self._finish(logged)
        return self._done()

    def stop(self) -> list[Command]:
        """gproxy is stopping: the pair ends now (gearmand requeues what is left)."""
        if self.reason is None:
            self.reason = "gproxy stopped"
        self._finish()
        return self._done()

    def _resolve(self, commands: list[Command]) -> list[Command]:
        """The commands for the caller, in order, with what the connections' lifecycle makes
        of them: bytes for a connection being opened wait in it; a retired connection that
        owns nothing closes; a Released for one of this pair's connections settles it; the
        pair's own commands end with its Finish."""
        out: list[Command] = []
        for command in commands:
            if type(command) is SendUpstream:
                link = command.owner
                if link.session is not self and link is not self.current:
                    out.append(command)  # another pair's connection: the caller hands it over
                elif self._finish_sent:
                    pass
                elif link.state is _OPEN:
                    out.append(command)
                elif link.state is LinkState.CONNECTING:
                    link.pending.append(command.data)
                elif link is self.current and not self.worker_gone:
                    self._fail("gearmand connection lost: closed", logging.INFO)
                    out += self._done()
                # else: a connection that is gone already; its loss was reported
            elif type(command) is SendDownstream:
                if not self._finish_sent and not self.worker_gone:
                    out.append(command)
            elif type(command) is Released:
                if command.owner.session is not self:
                    out.append(command)
                else:
                    self._settle(command.owner)
                    out += self._done()
            elif type(command) is CloseUpstream:
                self._detach(command.link)
                out += self._done()
            elif self._finish_sent:
                if type(command) is Submit or type(command) is Wakeup or type(command) is RecheckBudget:
                    out.append(command)  # (the Retrier's: for the process, not for this pair)
            elif type(command) is OpenUpstream:
                command.link.state = LinkState.CONNECTING
                command.link.pending = [command.replay]
                out.append(command)
            elif type(command) is ArmTimeout:
                out.append(CallLater(Timer.TIMEOUTS, command.delay))
            elif type(command) is Eject:
                pair_log.warning(
                    "%s: worker ejected for %gs: %d failed jobs in a row (the last of %s); its grabs get NO_JOB",
                    self.name, command.delay, command.failures, text(command.function),
                )
                out.append(CallLater(Timer.EJECTION, command.delay))
            else:
                if type(command) is Finish:
                    self._finish_sent = True
                elif type(command) is Shut and command.link is not None and command.link.state is not _OPEN:
                    continue  # (a connection being opened, or gone, has nothing to half-close)
                out.append(command)
        return out

    def _holds(self, link: UpstreamLink) -> bool:
        return self.retrier is not None and self.retrier.holds(link)

    def _holds_retries(self) -> bool:
        return any(self._holds(link) for link in self.links)

    def _shut(self, link: UpstreamLink | None) -> None:
        if link is None:
            self._worker_shut = True
        else:
            link.shut = True
        self._command(Shut(link))

    def _settle(self, link: UpstreamLink) -> None:
        """`link` holds nothing more: a retired link may close; a departed worker's pair may end."""
        if self._retire_if_idle(link) and link.state is not LinkState.CLOSED:
            self._detach(link)
        self._nothing_held_check()

    def _detach(self, link: UpstreamLink) -> None:
        """`link`'s connection closes: gearmand requeues whatever it still owns."""
        if link.state is LinkState.CLOSED:
            return
        link.state, link.pending = LinkState.CLOSED, []
        link.session = None  # (it is nobody's now; and the Session is freed with its pair, no cycle)
        if not self.done:
            self._command(Close(link))
        self._link_closed(link)
        if not self.done:
            self._nothing_held_check()
            self._maybe_finished()

    def _nothing_held_check(self) -> None:
        if self._kept_for_retries and not self.done and not self._holds_retries():
            self._kept_for_retries = False
            self._left()

    def _left(self) -> None:
        """The worker has gone and nothing is held for it."""
        if self._worker_lost is not None:
            return self._fail(self._worker_lost, logging.INFO)
        self._closing("peer closed the connection")
        for link in self.links:
            if link.state is _OPEN:
                self._shut(link)
        self._maybe_finished()

    def _closing(self, reason: str) -> None:
        """One side closed: the other gets a grace period to finish, then the pair is cut."""
        self._closings += 1
        if self._closings == 1:
            if self.reason is None:  # a refusal that came first keeps its reason
                self.reason = reason
            self._command(CallLater(Timer.LINGER, HALF_CLOSE_LINGER))

    def _maybe_finished(self) -> None:
        if (
            self._worker_ended and not self._kept_for_retries and self._closings
            and all(link.state is LinkState.CLOSED for link in self.links)
        ):
            self._finish()

    def _fail(self, reason: str, level: int = logging.WARNING) -> None:
        """End the pair. The first reason is the one logged, unless a graver one follows
        (bad input after the other side closed is still a WARNING, like its metric)."""
        if self.reason is None or level > self.level:
            self.reason, self.level = reason, level
        self._finish()

    def _finish(self, logged: bool = False) -> None:
        if self.done:
            return
        self.done = True
        # The line first: a peer that sees its connection close, and connects again from
        # the same port, comes after it in the log.
        self._command(Finish(self.reason or "both sides finished", self.level, logged))
        for link in self.links:
            self._detach(link)  # (gearmand requeues what they own; Finish closes them)

    # -- from the worker

    def _downstream_packet(self, packet: Packet, now: float) -> bytes:
        ptype = packet.type
        if self._grabs_answered_here() and (ptype in _GRABS or ptype is P.PRE_SLEEP):
            # No new jobs while shutting down or ejected; a sleeping worker is not woken
            # by gearmand (an ejected one is, by gproxy, when its time is up).
            if ptype is P.PRE_SLEEP:
                self.ejection.sleeping = True
            else:
                self._back.append(_NO_JOB)
            return b""
        if ptype in _GRABS:
            upgrade = ptype is P.GRAB_JOB and self.traits.grab_uniq
            self.current.grabs_pending.append(upgrade)
            return _GRAB_JOB_UNIQ if upgrade else packet.raw
        if ptype in _RESULTS or ptype in _UPDATES:
            return self._job_packet(packet, now)
        return self._registration_packet(packet)

    def _job_packet(self, packet: Packet, now: float) -> bytes:
        ptype, handle = packet.type, _handle_of(packet)
        if self._is_silenced(handle):
            log.debug("dropped %s for %s from the worker: that job is held or has ended", ptype.name, text(handle))
            return b""
        ended = ptype in _RESULTS
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
            self._silence(job.handle)  # (what the worker sends after it would not be the job's)
        return b"" if held else packet.raw if instead is None else instead

    def _grabs_answered_here(self) -> bool:
        """Draining or ejected: the worker's grabs get NO_JOB from gproxy, and its sleep is
        not passed on (gearmand would wake it for every new job)."""
        return self.draining or self.ejection.until is not None

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
        self._silence(job.handle)
        self._command(*actions)
        if link is not self.current:
            self._close_if_idle(link)

    def ejection_over(self) -> list[Command]:
        """The time of the worker's ejection is up: a sleeping worker is woken (NOOP)."""
        if self.ejection.over() and not self.worker_gone:
            self._back.append(_NOOP)
        return self._done()

    def _registration_packet(self, packet: Packet) -> bytes:
        ptype = packet.type
        if ptype is P.CAN_DO_TIMEOUT:
            args = packet.args()
            if not _TIMEOUT.fullmatch(args["timeout"]):
                # gearmand 1.1.20 dies of a timeout that does not fit 64 bits.
                raise ProtocolError("malformed CAN_DO_TIMEOUT: the timeout is not a number of milliseconds")
            if self.retrier is not None and self.retrier.policies.for_function(args["function"]).mode is Mode.ENFORCE:
                # gearmand would requeue a timed-out job at once, held or not: gproxy times
                # it out instead, as a retryable failure, and gearmand sees a plain CAN_DO.
                self.deadlines.registered(args["function"], int(args["timeout"] or b"0"))
                packet = Packet(P.CAN_DO, build_packet(REQ, P.CAN_DO, function=args["function"]))
                ptype = P.CAN_DO
            else:
                self.deadlines.unregistered(args["function"])
        elif ptype is P.CAN_DO or ptype is P.CANT_DO:
            if self.deadlines.any_registered:
                self.deadlines.unregistered(packet.args()["function"])
        elif ptype is P.RESET_ABILITIES:
            self.deadlines.unregistered(None)
        self.registration.apply(packet)
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
        old = self.current
        self._flush()  # what came before the move was meant for the old connection
        self._moves += 1
        self.retired.append(old)
        self.current = UpstreamLink(f"{old.name}+{self._moves}", self.max_packet_size, self.metrics, self)
        self.current.replies_to_swallow = self.registration.options
        self._command(OpenUpstream(self.current, self.registration.replay()))

    # -- from gearmand

    def _upstream_packet(self, link: UpstreamLink, packet: Packet, now: float) -> bytes:
        ptype = packet.type
        if ptype is P.ERROR or ptype is P.OPTION_RES:
            return self._upstream_reply(link, packet)
        upgraded = link.grabs_pending.popleft() if link.grabs_pending else False
        if ptype is P.NO_JOB:
            return packet.raw
        raw = packet.raw
        fields, rest = split_head(raw, _ASSIGN_FIELDS[ptype])
        handle, function = fields[0], fields[1]
        unique = fields[2] if ptype is not P.JOB_ASSIGN else b""
        shown = parse_retry_unique(unique) if unique.startswith(b"gpr:") else None
        is_retry = shown is not None or (
            self.retrier is not None and not unique and self.retrier.is_retry_handle(self.route, handle)
        )
        self._silenced.pop(handle, None)
        if self.retrier is not None:
            self._command(*self.retrier.job_assigned(self.route, handle, function, is_retry, now))
        # The payload stays in the packet that brought it: a view, not a copy.
        job = link.jobs.assigned(handle, function, unique, memoryview(raw)[rest:], now, is_retry)
        if self.worker_gone:  # the answer to a grab of a worker that has left since
            self._command(*self._orphaned(link, now, assigned_late=True))
            return b""
        if self.retrier is not None:
            timeout = self.deadlines.timeout_of(function, self.retrier.policies.for_function(function).timeout)
            if timeout is not None:
                self.deadlines.started(link, job, now + timeout)
                self._arm(now)
        unique_at = HEADER_SIZE + len(handle) + len(function) + 2
        if upgraded and ptype is P.JOB_ASSIGN_UNIQ:  # the unique id and its NUL cut out
            return splice(raw, P.JOB_ASSIGN, unique_at, unique_at + len(unique) + 1)
        if shown is not None:
            return splice(raw, ptype, unique_at, unique_at + len(unique), shown[1])
        return raw

    def _too_large(self, link: UpstreamLink, frame: Oversized) -> bytes:
        """A job over max_packet_size: handing it over would cost the worker its connection,
        and gearmand would requeue it to the next worker, in a loop. It is failed on the
        connection it was assigned to, and the worker's grab gets NO_JOB."""
        if link.grabs_pending:
            link.grabs_pending.popleft()
        fields = frame.fields
        if len(fields) < 2:  # no handle within the first kilobyte: nothing to fail
            log.warning("gearmand %s sent a %s of %d bytes with no handle: dropped", route_name(self.route), frame.type.name, frame.size)
            return _NO_JOB
        handle, function = fields[0], fields[1]
        log.warning(
            "job %s %s of %d bytes is over max_packet_size %d: failed, not given to the worker",
            text(function), text(handle), frame.size, self.max_packet_size,
        )
        reason = b"gproxy: a job of %d bytes exceeds max_packet_size %d" % (frame.size, self.max_packet_size)
        if self.retrier is not None:
            packet = self.retrier.final_exception(function, handle, reason, self.traits.exception_ends_job)
        else:
            packet = build_packet(REQ, P.WORK_EXCEPTION, handle=handle, data=reason)
            if not self.traits.exception_ends_job:
                packet += build_packet(REQ, P.WORK_FAIL, handle=handle)
        self.metrics.job_ended(function, "exception", 0.0)
        self._command(SendUpstream(link, packet))
        return _NO_JOB

    def _upstream_reply(self, link: UpstreamLink, packet: Packet) -> bytes:
        """OPTION_RES or ERROR: dropped if it answers gproxy's own replay; an ERROR for a
        GRAB_JOB_UNIQ that gproxy sent in the worker's stead means the server does not know
        it, and the worker's plain GRAB_JOB is sent instead."""
        if link.replies_to_swallow:
            link.replies_to_swallow -= 1
            return b""
        if packet.type is P.OPTION_RES or not link.grabs_pending:
            return packet.raw
        args = packet.args()
        if not _unknown_command(args["code"], args["text"]):
            return packet.raw
        if not link.grabs_pending.popleft():
            return packet.raw  # the worker's own GRAB_JOB_UNIQ or _ALL: its answer
        if self.traits.grab_uniq:
            log.warning(
                "gearmand %s does not know GRAB_JOB_UNIQ (it answered %s: %s), as the Perl "
                "Gearman::Server does: workers' own GRAB_JOB is used; retries of jobs whose "
                "unique id is not known get an empty one",
                route_name(self.route), text(args["code"]), text(args["text"]).strip(),
            )
        self.traits.grab_uniq = False
        self.traits.exception_ends_job = False  # the same server: WORK_FAIL ends jobs there
        link.grabs_pending.appendleft(False)
        self._command(SendUpstream(link, _GRAB_JOB))
        return b""

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
            if self._out and not self._back and self.current.state is _OPEN:
                out, self._out = self._out, []
                return [SendUpstream(self.current, out[0] if len(out) == 1 else b"".join(out))]
            if self._back and not self._out and not self.worker_gone:
                back, self._back = self._back, []
                return [SendDownstream(back[0] if len(back) == 1 else b"".join(back))]
        self._flush()
        commands, self._commands = self._commands, []
        return self._resolve(commands)

    def _is_silenced(self, handle: bytes) -> bool:
        if handle in self._silenced:
            return True
        if self.retrier is None:
            return False
        holder = self.retrier.holder(self.route, handle)
        return holder is not None and (holder is self.current or holder in self.retired)

    def _silence(self, handle: bytes) -> None:
        self._silenced[handle] = None
        if len(self._silenced) > MAX_SILENCED:
            del self._silenced[next(iter(self._silenced))]

    def _disconnected(self, handle: bytes) -> bytes:
        """The failure that tells the owner of a retry job that its worker left."""
        return self._failed_back(handle, DISCONNECTED)

    def _failed_back(self, handle: bytes, why: bytes) -> bytes:
        """A retry job's failure for the gproxy that owns its loop (`why`: DISCONNECTED or
        TIMED_OUT, which it recognises)."""
        packet = build_packet(REQ, P.WORK_EXCEPTION, handle=handle, data=why)
        if not self.traits.exception_ends_job:
            packet += build_packet(REQ, P.WORK_FAIL, handle=handle)
        return packet

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
        if self._retire_if_idle(link):
            self._command(CloseUpstream(link))


_TIMEOUT: Final = re.compile(rb"\d{0,18}")
"""CAN_DO_TIMEOUT's milliseconds, decimal: at most 18 digits fit gearmand's 64-bit long."""
_ASSIGN_FIELDS: Final = {P.JOB_ASSIGN: 2, P.JOB_ASSIGN_UNIQ: 3, P.JOB_ASSIGN_ALL: 4}
"""NUL-terminated fields before the payload: handle, function (unique, reducer)."""
_OUTCOMES: Final = {P.WORK_COMPLETE: "complete", P.WORK_FAIL: "fail", P.WORK_EXCEPTION: "exception"}


def _unknown_command(code: bytes, text: bytes) -> bool:
    """The Perl Gearman::Server's answer to a packet type it cannot even name (GRAB_JOB_UNIQ,
    GRAB_JOB_ALL): `server_error`, `Can't locate object method "CMD_"`. gearmand itself knows
    every grab, so no ERROR of its own is mistaken for this one."""
    return code == b"server_error" and b'"CMD_"' in text


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


def route_name(route: object) -> str:
    """The job server a route leads to, for log lines."""
    upstream = getattr(route, "upstream", None)
    return str(upstream if upstream is not None else route)


