"""The worker's grabs, and gearmand's answers to them and its other replies: the rules.

- GRAB_JOB goes to gearmand as GRAB_JOB_UNIQ, so the unique id of every job is known, and
  the JOB_ASSIGN_UNIQ that answers it is handed to the worker as the plain JOB_ASSIGN it asked
  for. A server that does not know GRAB_JOB_UNIQ (it answers ERROR, as the Perl
  Gearman::Server does) gets the worker's own GRAB_JOB instead, from then on (ServerTraits).
- While the worker's grabs are answered here (draining, or ejected), a grab gets NO_JOB from
  gproxy, and a sleep is not passed on.
- An assignment is tracked in the link's JobTable, and starts its attempt's deadline if its
  function has a timeout. A retry job's unique id reaches the worker without gproxy's retry
  marking, so the worker sees the original unique id on every attempt.
- A job too large for the worker is failed on the connection it came on, and the worker's
  grab gets NO_JOB.
- The replies to the OPTION_REQs gproxy replayed on a fresh connection are kept from the
  worker, who never asked.
gearmand answers every grab with exactly one JOB_ASSIGN*, NO_JOB or ERROR, in order: a link's
`grabs_pending` holds one entry per grab not yet answered, True where gproxy upgraded it.

What only the Session can do is asked for in `asked`, with the Retrier's actions, in order
(Armed, ORPHANED); and `grab` answers ANSWERED for a grab that gproxy answers itself.

Pure: no I/O; the time is passed in.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Final, Generic, NamedTuple, Protocol, TypeVar

from ..config import Route
from . import forwarding
from .deadlines import Deadlines
from .ejection import Ejection
from .fields import about, about_job
from .forwarding import ASSIGN_FIELDS, ASSIGNS, GRAB_JOB_UNIQ_PACKET, REPLIES, UNIQUE_ASSIGNS, UPGRADED
from .metrics import Metrics
from .protocol import (
    HEADER_SIZE,
    REQ,
    RES,
    Oversized,
    Packet,
    PacketType,
    build_packet,
    splice,
    split_head,
    text,
)
from .retry import Action, Retrier, SendUpstream
from .silenced import Silenced
from .uniques import parse_retry_unique

log = logging.getLogger("gproxy.session")
P = PacketType
_GRAB_JOB: Final = build_packet(REQ, P.GRAB_JOB)
_NO_JOB: Final = build_packet(RES, P.NO_JOB)
ANSWERED: Final = None
"""Assignments.grab's answer for a grab that gproxy answers itself: NO_JOB, for the worker."""


@dataclass(slots=True)
class ServerTraits:
    """What gproxy has learned about a route's job server; shared by the route's sessions."""

    grab_uniq: bool = True
    """Answers GRAB_JOB_UNIQ (gearmand does; the Perl Gearman::Server answers ERROR)."""
    exception_ends_job: bool = True
    """WORK_EXCEPTION is final (gearmand); on the Perl Gearman::Server WORK_FAIL ends it."""

    def exception(self, handle: bytes, data: bytes) -> bytes:
        """A WORK_EXCEPTION that ends the job of `handle` on this server: with a WORK_FAIL
        after it where an exception does not."""
        packet = build_packet(REQ, P.WORK_EXCEPTION, handle=handle, data=data)
        if not self.exception_ends_job:
            packet += build_packet(REQ, P.WORK_FAIL, handle=handle)
        return packet


class Link(forwarding.Link, Protocol):
    """A gearmand connection as these rules see it (session.UpstreamLink)."""

    replies_to_swallow: int


LinkT = TypeVar("LinkT", bound=Link)


class Armed(NamedTuple):
    """A deadline started, the earliest: the timer is to go off in `delay` seconds (what the
    Session's ArmTimeout says)."""

    delay: float


class Orphaned(enum.Enum):
    """A job was assigned to a worker that has left since it grabbed: the Session orphans it
    on its connection (Session._orphaned)."""

    JOB = "orphaned"


ORPHANED: Final = Orphaned.JOB
Asked = Action[LinkT, Route] | Armed | Orphaned
"""What an Assignments asks of its caller."""


class Assignments(Generic[LinkT]):
    """The rules above, for one worker: `grab` for what it sends, `received` for what gearmand
    sends it. The route's ServerTraits, the Retrier, and the worker's Deadlines and Silenced
    are shared with the Session."""

    def __init__(
        self, route: Route, traits: ServerTraits, retrier: Retrier[LinkT, Route] | None, deadlines: Deadlines[LinkT],
        silenced: Silenced[LinkT], metrics: Metrics,
    ) -> None:
        self._route = route
        self._traits = traits
        self._retrier = retrier
        self._deadlines = deadlines
        self._silenced = silenced
        self._metrics = metrics
        self.asked: list[Asked[LinkT]] = []
        """What the packets handled since the last `take` ask of the caller, in order."""

    def take(self) -> list[Asked[LinkT]]:
        asked, self.asked = self.asked, []
        return asked

    def grab(self, link: LinkT, packet: Packet, draining: bool, ejection: Ejection) -> bytes | None:
        """A GRAB_JOB* or PRE_SLEEP from the worker: what goes to `link`, its current
        connection, or ANSWERED. (A PRE_SLEEP is read only while grabs are answered here.)"""
        ptype = packet.type
        if draining or ejection.until is not None:  # forwarding.grabs_answered_here
            # No new jobs while shutting down or ejected; a sleeping worker is not woken
            # by gearmand (an ejected one is, by gproxy, when its time is up).
            if ptype is P.PRE_SLEEP:
                ejection.sleeping = True
                return b""
            return ANSWERED
        upgrade = ptype in UPGRADED and self._traits.grab_uniq
        link.grabs_pending.append(upgrade)
        return GRAB_JOB_UNIQ_PACKET if upgrade else packet.raw

    def received(self, link: LinkT, frame: Packet | Oversized, now: float, worker_gone: bool) -> bytes:
        """A watched packet from gearmand on `link`, or one too large: what goes to the
        worker for it."""
        if isinstance(frame, Oversized):
            return self._too_large(link, frame)
        ptype = frame.type
        if ptype in REPLIES:
            return self._reply(link, frame)
        upgraded = link.grabs_pending.popleft() if link.grabs_pending else False
        if ptype not in ASSIGNS:  # NO_JOB
            return frame.raw
        raw = frame.raw
        fields, rest = split_head(raw, ASSIGN_FIELDS[ptype])
        handle, function = fields[0], fields[1]
        unique = fields[2] if ptype in UNIQUE_ASSIGNS else b""
        shown = parse_retry_unique(unique) if unique.startswith(b"gpr:") else None
        retrier = self._retrier
        is_retry = shown is not None or (
            retrier is not None and not unique and retrier.is_retry_handle(self._route, handle)
        )
        self._silenced.pop(handle, None)
        if retrier is not None and (actions := retrier.job_assigned(self._route, handle, function, is_retry, now)):
            self.asked += actions
        # The payload stays in the packet that brought it: a view, not a copy.
        job = link.jobs.assigned(handle, function, unique, memoryview(raw)[rest:], now, is_retry)
        if worker_gone:  # the answer to a grab of a worker that has left since
            self.asked.append(ORPHANED)
            return b""
        if retrier is not None:
            timeout = self._deadlines.timeout_of(function, retrier.policies.for_function(function).timeout)
            if timeout is not None:
                self._deadlines.started(link, job, now + timeout)
                if (delay := self._deadlines.arm(now)) is not None:
                    self.asked.append(Armed(delay))
        unique_at = HEADER_SIZE + len(handle) + len(function) + 2
        if upgraded and ptype is P.JOB_ASSIGN_UNIQ:  # the unique id and its NUL cut out
            return splice(raw, P.JOB_ASSIGN, unique_at, unique_at + len(unique) + 1)
        if shown is not None:
            return splice(raw, ptype, unique_at, unique_at + len(unique), shown[1])
        return raw

    def _too_large(self, link: LinkT, frame: Oversized) -> bytes:
        """A job over max_packet_size: handing it over would cost the worker its connection,
        and gearmand would requeue it to the next worker, in a loop. It is failed on the
        connection it was assigned to, and the worker's grab gets NO_JOB."""
        if link.grabs_pending:
            link.grabs_pending.popleft()
        fields = frame.fields
        if len(fields) < 2:  # no handle within the first kilobyte: nothing to fail
            log.warning(
                "gearmand %s sent a %s of %d bytes with no handle: dropped",
                route_name(self._route), frame.type.name, frame.size,
                extra=about(upstream=route_name(self._route), packet=frame.type.name, size=frame.size),
            )
            return _NO_JOB
        handle, function = fields[0], fields[1]
        log.warning(
            "job %s %s of %d bytes is over max_packet_size %d: failed, not given to the worker",
            text(function), text(handle), frame.size, link.framer.max_packet_size,
            extra=about_job(function, handle, size=frame.size, reason="max_packet_size"),
        )
        reason = b"gproxy: a job of %d bytes exceeds max_packet_size %d" % (frame.size, link.framer.max_packet_size)
        if self._retrier is not None:
            packet = self._retrier.final_exception(function, handle, reason, self._traits.exception_ends_job)
        else:
            packet = self._traits.exception(handle, reason)
        self._metrics.job_ended(function, "exception", 0.0)
        self.asked.append(SendUpstream(link, packet))
        return _NO_JOB

    def _reply(self, link: LinkT, packet: Packet) -> bytes:
        """OPTION_RES or ERROR: dropped if it answers gproxy's own replay; an ERROR for a
        GRAB_JOB_UNIQ that gproxy sent in the worker's stead means the server does not know
        it, and the worker's plain GRAB_JOB is sent instead."""
        if link.replies_to_swallow:
            link.replies_to_swallow -= 1
            return b""
        if packet.type is P.OPTION_RES or not link.grabs_pending:
            return packet.raw
        args = packet.args()
        if not unknown_command(args["code"], args["text"]):
            return packet.raw
        if not link.grabs_pending.popleft():
            return packet.raw  # the worker's own GRAB_JOB_UNIQ or _ALL: its answer
        if self._traits.grab_uniq:
            log.warning(
                "gearmand %s does not know GRAB_JOB_UNIQ (it answered %s: %s), as the Perl "
                "Gearman::Server does: workers' own GRAB_JOB is used; retries of jobs whose "
                "unique id is not known get an empty one",
                route_name(self._route), text(args["code"]), text(args["text"]).strip(),
                extra=about(upstream=route_name(self._route)),
            )
        self._traits.grab_uniq = False
        self._traits.exception_ends_job = False  # the same server: WORK_FAIL ends jobs there
        link.grabs_pending.appendleft(False)
        self.asked.append(SendUpstream(link, _GRAB_JOB))
        return b""


def unknown_command(code: bytes, text: bytes) -> bool:
    """The Perl Gearman::Server's answer to a packet type it cannot even name (GRAB_JOB_UNIQ,
    GRAB_JOB_ALL): `server_error`, `Can't locate object method "CMD_"`. gearmand itself knows
    every grab, so no ERROR of its own is mistaken for this one."""
    return code == b"server_error" and b'"CMD_"' in text


def route_name(route: object) -> str:
    """The job server a route leads to, for log lines."""
    upstream = getattr(route, "upstream", None)
    return str(upstream if upstream is not None else route)
