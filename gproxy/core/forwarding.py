"""Which packets gproxy reads, and which may go on before it has read them: the rules.

The one source of truth for the forward-first path. The Session parses only the packet types
in the WATCHED_* sets; every other packet passes unread, in order. Of the watched ones,
Forwarding.downstream and .upstream (the Session's passes_downstream and passes_upstream) name
those that go on unchanged and first: a Pair may send such a packet the moment it arrives,
then hand it to the Session (`sent=True`), which only keeps its books (tracking, metrics), off
the job's latency; sent_already checks that the Session agreed. A compiled fast path must be
built on exactly these sets and rules.

Rules of this file:
- pure rules over explicit inputs: the bytes and the framer of the side they came from, the
  session's flags (draining, its Ejection, the server's traits, its links), its Silenced, the
  Retrier and the Deadlines; nothing here changes any of them;
- a packet passes first only if it is one whole packet (Framer.whole) that the Session would
  forward as it is, with no command of its own to go before it; when in doubt, it does not
  (the Session then handles it as any other packet: it is slower, never wrong);
- packet types are tested against the sets below, which are the rules' data: reading an enum
  member (P.X) costs about 90 ns in CPython 3.11, a set lookup about 20, per packet.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final, Generic, Protocol, TypeVar

from ..config import Route
from .deadlines import Deadlines
from .ejection import Ejection
from .jobs import Owner
from .protocol import HEADER_SIZE, REQ, Framer, PacketType, build_packet
from .retry import Retrier
from .silenced import Silenced

P = PacketType


class Link(Owner, Protocol):
    """A gearmand connection as the rules see it (session.UpstreamLink): its framer, and the
    grabs it has yet to answer, oldest first (True where gproxy upgraded the grab)."""

    framer: Framer
    grabs_pending: deque[bool]


LinkT = TypeVar("LinkT", bound=Link)

ASSIGNS: Final = frozenset({P.JOB_ASSIGN, P.JOB_ASSIGN_UNIQ, P.JOB_ASSIGN_ALL})
GRABS: Final = frozenset({P.GRAB_JOB, P.GRAB_JOB_UNIQ, P.GRAB_JOB_ALL})
RESULTS: Final = frozenset({P.WORK_COMPLETE, P.WORK_FAIL, P.WORK_EXCEPTION})
UPDATES: Final = frozenset({P.WORK_DATA, P.WORK_WARNING, P.WORK_STATUS})
REGISTRATION: Final = frozenset(
    {P.CAN_DO, P.CAN_DO_TIMEOUT, P.CANT_DO, P.RESET_ABILITIES, P.SET_CLIENT_ID, P.OPTION_REQ}
)
JOB_PACKETS: Final = RESULTS | UPDATES
"""What the worker sends about a job it runs (Attempts)."""
WATCHED_DOWNSTREAM: Final = GRABS | JOB_PACKETS | REGISTRATION
"""What the Session reads from the worker."""
WATCHED_DRAINING: Final = WATCHED_DOWNSTREAM | {P.PRE_SLEEP}
"""What it reads from the worker while its grabs are answered here (grabs_answered_here)."""
REPLIES: Final = frozenset({P.ERROR, P.OPTION_RES})
"""gearmand's replies the Session reads: they may answer gproxy, not the worker."""
WATCHED_UPSTREAM: Final = ASSIGNS | REPLIES | {P.NO_JOB}
"""What it reads from gearmand."""
ASSIGN_FIELDS: Final = {P.JOB_ASSIGN: 2, P.JOB_ASSIGN_UNIQ: 3, P.JOB_ASSIGN_ALL: 4}
"""NUL-terminated fields before the payload: handle, function (unique, reducer)."""
UNIQUE_ASSIGNS: Final = frozenset({P.JOB_ASSIGN_UNIQ, P.JOB_ASSIGN_ALL})
"""The assignments that carry a unique id (a retry's is shown as the original's)."""
UPGRADED: Final = frozenset({P.GRAB_JOB})
"""The grab that goes to gearmand as GRAB_JOB_UNIQ where it knows that (ServerTraits)."""
GO_FIRST: Final = frozenset({P.GRAB_JOB_UNIQ, P.GRAB_JOB_ALL, P.PRE_SLEEP})
"""Watched from the worker, and yet sent on first, unless its grabs are answered here."""
GO_FIRST_UNLESS_ENDED: Final = frozenset({P.WORK_COMPLETE, P.WORK_DATA, P.WORK_WARNING})
"""The same if their job is neither held nor ended, and the worker was not moved (a failure
is a retry decision, a WORK_STATUS is checked whole)."""


BYPASS_DOWNSTREAM: Final = GRABS
"""Watched from the worker, and yet kept off the Session's event (Session.bypasses_downstream)
unless its grabs are answered here: the grab goes to the current link as Assignments.grab
sends it, and its entry goes on that link's grabs_pending."""
BYPASS_UPSTREAM: Final = frozenset({P.NO_JOB})
"""Watched from gearmand, and yet kept off the Session's event on the current link: the
answer to the oldest grab, taken off grabs_pending as Assignments.received takes it."""
GRAB_JOB_UNIQ_PACKET: Final = build_packet(REQ, P.GRAB_JOB_UNIQ)
"""What an upgraded GRAB_JOB goes to gearmand as (ServerTraits.grab_uniq)."""


def grabs_answered_here(draining: bool, ejection: Ejection) -> bool:
    """Draining or ejected: the worker's grabs get NO_JOB from gproxy, and its sleep is not
    passed on (gearmand would wake it for every new job)."""
    return draining or ejection.until is not None


class Forwarding(Generic[LinkT]):
    """The forward-first rules for one session, over what it is made of: the worker's framer,
    its Ejection and Silenced, the Retrier, the route and the Deadlines. What changes from one
    packet to the next (the session's flags, its links) is passed to each call."""

    def __init__(
        self, framer: Framer, ejection: Ejection, silenced: Silenced[LinkT], retrier: Retrier[LinkT, Route] | None,
        route: Route, deadlines: Deadlines[LinkT],
    ) -> None:
        self._framer = framer
        self._ejection = ejection
        self._silenced = silenced
        self._retrier = retrier
        self._route = route
        self._deadlines = deadlines

    def downstream(
        self, data: bytes, draining: bool, grab_uniq: bool, current: LinkT, retired: Sequence[LinkT]
    ) -> bool:
        """True if `data` from the worker is one whole packet that goes on to the `current`
        link unchanged, and nothing else the event asks for must go before it. Only what is
        common and cheap to be sure of: grabs, sleeps, results that end no held job, packets
        gproxy does not watch. (`grab_uniq`: ServerTraits.grab_uniq; `retired`: the links the
        worker was moved off.)"""
        ptype = self._framer.whole(data)
        if ptype is None:
            return False
        if ptype not in WATCHED_DRAINING:
            return True
        if draining or self._ejection.until is not None:  # grabs_answered_here
            return False
        if ptype in GO_FIRST:
            return True
        if ptype in UPGRADED:
            return not grab_uniq  # else sent as GRAB_JOB_UNIQ
        if ptype in GO_FIRST_UNLESS_ENDED:
            end = data.find(b"\0", HEADER_SIZE)  # (none: a malformed packet, refused whole)
            return end >= 0 and not retired and not self._silenced.drops(data[HEADER_SIZE:end], current, retired)
        return False  # failures (a retry decision), WORK_STATUS (checked whole), registration

    def upstream(self, data: bytes, link: LinkT, current: bool) -> bool:
        """As `downstream`, for `data` from gearmand on `link` to the worker (`current`: it is
        the worker's current link, and the worker is there): anything gproxy does not watch,
        NO_JOB, and an assignment that is neither rewritten (an upgraded grab's, a retry's)
        nor a held job's, and starts no deadline."""
        if not current:
            return False
        ptype = link.framer.whole(data)
        if ptype is None:
            return False
        if ptype not in WATCHED_UPSTREAM:
            return True
        if ptype not in ASSIGNS:
            return ptype not in REPLIES  # NO_JOB goes first; a reply may be to gproxy
        if link.grabs_pending and link.grabs_pending[0]:
            return False  # an upgraded grab's JOB_ASSIGN_UNIQ loses its unique id
        ends = [HEADER_SIZE - 1]
        for _ in range(ASSIGN_FIELDS[ptype]):
            if (end := data.find(b"\0", ends[-1] + 1)) < 0:
                return False  # malformed: refused whole
            ends.append(end)
        if ptype in UNIQUE_ASSIGNS and data.startswith(b"gpr:", ends[2] + 1):
            return False  # a retry's unique id is shown as the original's
        retrier = self._retrier
        if retrier is None:
            return True
        if self._deadlines.any_registered or retrier.policies.for_function(data[ends[1] + 1 : ends[2]]).timeout:
            return False  # its deadline is a command of the event
        return retrier.holder(self._route, data[HEADER_SIZE : ends[1]]) is None


def sent_already(commands: Sequence[object], pieces: list[bytes], data: bytes) -> None:
    """The caller sent `data` before the Session saw it: that must be all the Session would
    have sent for the event (`pieces`, the bytes it has for one side; `commands`, the rest),
    first and unchanged. A disagreement is a bug in passes_*, and the pair closes as for any
    internal error."""
    if commands or len(pieces) != 1 or pieces[0] is not data:
        raise RuntimeError("a packet sent on before the Session saw it was not meant to go on as it was")
    pieces.clear()
