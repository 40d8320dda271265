"""How the worker's attempts at its jobs end, and what becomes of what it sends: the rules.

- Every job packet from the worker, a result (WORK_COMPLETE, WORK_FAIL, WORK_EXCEPTION) or
  an update (WORK_DATA, WORK_WARNING, WORK_STATUS), goes to the connection that owns its
  handle: only that connection can finish the job.
- A result ends the attempt. With a Retrier, a failure the worker marked retryable is held
  back (the Retrier holds the job; its actions are asked for) instead of forwarded; a retry
  job's failure goes on, to the gproxy that holds the original and owns its loop.
- An attempt past its deadline is over: an original is retried (reason timeout), a retry
  job failed back to the gproxy that owns its loop.
- Once a job is held, or its WORK_EXCEPTION or timeout has ended it, or a retry job has
  failed, what the worker still sends for it is dropped: the Attempts keep the Silenced.
- Every ended attempt counts for the worker's Ejection: a run of failures ejects it.

What only the Session can do is asked for in `asked`, with the Retrier's actions and what
goes to a connection the worker was moved off, in order: an Ejected, an Armed.

Pure: no I/O; the time is passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Final, Generic, NamedTuple, TypeVar

from ..config import Route
from .assignments import Armed, ServerTraits
from .deadlines import Deadlines
from .ejection import Ejection
from .fields import about, about_job
from .forwarding import RESULTS
from .jobs import Owner, TrackedJob
from .metrics import Metrics
from .policy import TIMED_OUT, Mode
from .protocol import HEADER_SIZE, Packet, PacketType, ProtocolError, text
from .retry import Action, Retrier, SendUpstream
from .silenced import Silenced

log = logging.getLogger("gproxy.session")
P = PacketType
LinkT = TypeVar("LinkT", bound=Owner)
_OUTCOMES: Final = {P.WORK_COMPLETE: "complete", P.WORK_FAIL: "fail", P.WORK_EXCEPTION: "exception"}
_READ_WHOLE: Final = frozenset({P.WORK_FAIL, P.WORK_STATUS})
"""Job packets small enough to parse whole (see handle_of)."""


class Ejected(NamedTuple):
    """The worker is ejected for `delay` seconds: `failures` failures in a row, the last of
    `function` (what the Session's Eject command says)."""

    delay: float
    function: bytes
    failures: int


class Attempts(Generic[LinkT]):
    """The rules above, for one worker. The route's ServerTraits, the Retrier, and the worker's
    Deadlines and Ejection are shared with the Session."""

    def __init__(
        self, route: Route, traits: ServerTraits, retrier: Retrier[LinkT, Route] | None, deadlines: Deadlines[LinkT],
        ejection: Ejection, metrics: Metrics,
    ) -> None:
        self._route = route
        self._traits = traits
        self._retrier = retrier
        self._deadlines = deadlines
        self.silenced: Silenced[LinkT] = Silenced(retrier, route)
        """What the worker still sends for these handles is dropped (a new assignment clears one)."""
        self._ejection = ejection
        self._metrics = metrics
        self.asked: list[Action[LinkT, Route] | Ejected | Armed] = []
        """What the packets and timeouts handled since the last `take` ask of the caller."""

    def take(self) -> list[Action[LinkT, Route] | Ejected | Armed]:
        asked, self.asked = self.asked, []
        return asked

    def job_packet(self, packet: Packet, now: float, current: LinkT, retired: Sequence[LinkT]) -> tuple[LinkT, bytes]:
        """A result or update from the worker: the link that owns its handle (else `current`),
        and what goes to `current` for it (b"": nothing). What goes to a link the worker was
        moved off (one of `retired`) is asked for."""
        ptype, handle = packet.type, handle_of(packet)
        if self.silenced.drops(handle, current, retired):
            log.debug(
                "dropped %s for %s from the worker: that job is held or has ended", ptype.name, text(handle),
                extra=about(handle=text(handle), packet=ptype.name),
            )
            return current, b""
        ended = ptype in RESULTS
        link, job = current, current.jobs.ended(handle) if ended else current.jobs.get(handle)
        if job is None and retired:  # a link the worker was moved off may own it
            for link in retired:
                if (job := link.jobs.ended(handle) if ended else link.jobs.get(handle)) is not None:
                    break
            else:
                link = current
        forward = packet.raw
        if ended and job is not None:
            self._deadlines.ended(link, handle)
            self._metrics.attempt_ended(job.function, now - job.started_at)
            if ptype is P.WORK_COMPLETE:
                self._ejection.completed()
                if not job.is_retry:
                    self._metrics.job_ended(job.function, "complete", now - job.started_at)
            else:
                self._failure_counted(job, now)
                forward = self._failed(link, job, packet, now)
        if link is current or not forward:
            return link, forward
        self.asked.append(SendUpstream(link, forward))  # only that connection can finish the job
        return link, b""

    def timeouts_due(self, now: float, still_running: bool) -> Iterator[LinkT]:
        """The timer fired: every attempt past its deadline ends (`timed_out`). Yields the
        link of each one ended once what that takes is asked for (the caller carries it out
        before it goes on); then asks for the timer of the next deadline. `still_running`
        False: the worker has left, and the deadlines are dropped."""
        for link, job in self._deadlines.fired(now, still_running):
            if self.timed_out(link, job, now):
                yield link
        if (delay := self._deadlines.arm(now)) is not None:
            self.asked.append(Armed(delay))

    def timed_out(self, link: LinkT, job: TrackedJob, now: float) -> bool:
        """`job`'s attempt on `link` is past its deadline: True if that ended it (the retry or
        the failure it takes is asked for); False if the attempt runs on (it ended or was
        handed back meanwhile, or its function only observes)."""
        if link.jobs.get(job.handle) is not job:  # (not ended, or handed back, meanwhile)
            return False
        retrier = self._retrier
        assert retrier is not None  # (no timeout without policies)
        if job.is_retry:
            if retrier.policies.for_function(job.function).mode is Mode.OBSERVE:
                return False
            # Failed back to the gproxy that owns its loop, which recognises TIMED_OUT.
            actions: list[Action[LinkT, Route]] = [SendUpstream(link, self._traits.exception(job.handle, TIMED_OUT))]
        else:
            lost = retrier.worker_timed_out(link, self._route, job, now)
            if lost is None:
                return False  # observe mode: it runs on
            actions = list(lost)
        log.warning(
            "job %s %s ran past its timeout (%.3gs): %s; what its worker still sends for it is dropped",
            text(job.function), text(job.handle), now - job.started_at,
            "failed back to the gproxy that retries it" if job.is_retry else "retried",
            extra=about_job(job.function, job.handle, seconds=round(now - job.started_at, 3), reason="timeout"),
        )
        link.jobs.ended(job.handle)
        self._metrics.attempt_ended(job.function, now - job.started_at)
        self._failure_counted(job, now)
        self.silenced.add(job.handle)
        self.asked += actions
        return True

    def _failed(self, link: LinkT, job: TrackedJob, packet: Packet, now: float) -> bytes:
        """A worker's WORK_FAIL or WORK_EXCEPTION: what goes on to gearmand for it (nothing
        if the Retrier holds the job)."""
        ptype = packet.type
        held, instead = False, None
        if self._retrier is not None and not job.is_retry:
            # (A retry's failure goes on: the gproxy that holds the original owns the loop.)
            decision = self._retrier.worker_failed(
                owner=link, route=self._route, job=job, ptype=ptype,
                failure=packet.args()["data"] if ptype is P.WORK_EXCEPTION else b"",
                now=now, exception_ends_job=self._traits.exception_ends_job,
            )
            self.asked += decision.actions
            held = decision.held
            instead = decision.instead  # (a WORK_FAIL, which ends the job on any server)
        if not held and not job.is_retry:  # a retry's outcome is counted where it is held
            self._metrics.job_ended(job.function, _OUTCOMES[ptype], now - job.started_at)
        if held or instead is not None or (ptype is P.WORK_EXCEPTION and self._traits.exception_ends_job) or (
            job.is_retry and ptype is P.WORK_FAIL
        ):
            self.silenced.add(job.handle)  # (what the worker sends after it would not be the job's)
        return b"" if held else packet.raw if instead is None else instead

    def _failure_counted(self, job: TrackedJob, now: float) -> None:
        """An attempt failed: it counts for the worker's ejection, under its function's policy."""
        if self._retrier is None:
            return
        policy = self._retrier.policies.for_function(job.function)
        duration = self._ejection.failed(policy, job.function, now)
        if duration is not None:
            self._metrics.count(self._metrics.ejections, job.function)
            self.asked.append(Ejected(duration, job.function, policy.eject_after))


def handle_of(packet: Packet) -> bytes:
    """The handle of a work packet, read without splitting the (possibly large) payload.
    A WORK_STATUS is small and checked whole: one short of a NUL (Perl Gearman::Worker
    2.004's send_work_status drops the denominator) makes gearmand read the next packet as
    its last field, and the connection is out of step from there on."""
    if packet.type in _READ_WHOLE:
        return packet.args()["handle"]
    end = packet.raw.find(b"\0", HEADER_SIZE)
    if end < 0:
        raise ProtocolError(f"malformed {packet.type.name} payload: no NUL after the handle")
    return packet.raw[HEADER_SIZE:end]
