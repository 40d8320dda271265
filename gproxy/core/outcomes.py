"""How a job ends when gproxy stops retrying it: what its client hears, and its dead letter.

A held job given up gets its last failure (`Outcomes.given_up`): a WORK_FAIL as it came, an
exception as its function's `final_exception` says (`final_exception`; `instead` is what a
client hears in place of one). A job given up, or not held for want of attempts or room,
goes to its function's dead letter if it has one (`Outcomes.dead_letter`), in the envelope
of dead_letter.py, under a unique id of its own (uniques.py).

Pure: packets and payloads are built, nothing is sent; the Retrier puts them in its
actions. `Outcomes` counts the endings in the metrics and logs them.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Protocol

from .dead_letter import envelope
from .fields import about_job
from .jobs import Payload
from .metrics import Metrics
from .policy import FinalException, GiveUp, RetryPolicy, exception_text
from .protocol import REQ, PacketType, build_packet, text
from .uniques import dead_letter_unique

log = logging.getLogger("gproxy.retry")
"""(The Retrier's logger: these lines are part of its story.)"""
P = PacketType


class Job(Protocol):
    """What a dead letter needs of a job (a TrackedJob or a HeldJob)."""

    @property
    def function(self) -> bytes: ...
    @property
    def unique(self) -> bytes: ...
    @property
    def handle(self) -> bytes: ...
    @property
    def payload(self) -> Payload: ...


class Held(Job, Protocol):
    """What giving up needs of a held job (retry.HeldJob)."""

    @property
    def policy(self) -> RetryPolicy: ...
    @property
    def attempt(self) -> int: ...
    @property
    def started_at(self) -> float: ...
    @property
    def last_failure(self) -> tuple[PacketType, bytes]: ...
    @property
    def exception_ends_job(self) -> bool: ...


class Letter(NamedTuple):
    """A dead letter: a background job of `function` (the caller submits it)."""

    function: bytes
    unique: bytes
    payload: bytes


def final_exception(policy: RetryPolicy, function: bytes, handle: bytes, failure: bytes, exception_ends_job: bool) -> bytes:
    """What ends a job of `function` with the exception `failure`, as the function's
    final_exception says. (`exception_ends_job` False: on a server where WORK_EXCEPTION
    does not end a job, a WORK_FAIL follows it.)"""
    if policy.final_exception is FinalException.EXCEPTION:
        packet = build_packet(REQ, P.WORK_EXCEPTION, handle=handle, data=failure)
        return packet if exception_ends_job else packet + build_packet(REQ, P.WORK_FAIL, handle=handle)
    return instead(policy, function, handle, failure)


def instead(policy: RetryPolicy, function: bytes, handle: bytes, failure: bytes) -> bytes:
    """WORK_FAIL (after a WORK_WARNING with the text, for "both") in place of a final
    exception: every client understands it, and it ends the job on any server. The
    text is logged, as the client of "fail" never sees it."""
    log.info(
        "%s %s ended by an exception, sent to its client as %s: %s",
        text(function), text(handle),
        "WORK_FAIL" if policy.final_exception is FinalException.FAIL else "WORK_WARNING and WORK_FAIL",
        text(exception_text(failure)),
        extra=about_job(function, handle),
    )
    fail = build_packet(REQ, P.WORK_FAIL, handle=handle)
    if policy.final_exception is FinalException.BOTH:
        return build_packet(REQ, P.WORK_WARNING, handle=handle, data=failure) + fail
    return fail


class Outcomes:
    """The endings of the jobs gproxy stops retrying, counted in `metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def given_up(self, job: Held, now: float, why: GiveUp) -> bytes:
        """What ends held job `job`, given up: its last failure, as its client hears it."""
        ptype, failure = job.last_failure
        self.metrics.job_ended(job.function, "exception" if ptype is P.WORK_EXCEPTION else "fail", now - job.started_at)
        if why is GiveUp.EXHAUSTED:
            self.metrics.count(self.metrics.exhausted, job.function)
            log.warning(
                "retry exhausted: %s %s failed %d attempts, last failure forwarded",
                text(job.function), text(job.handle), job.attempt,
                extra=about_job(job.function, job.handle, attempt=job.attempt, reason="exhausted"),
            )
        elif why is GiveUp.MAX_HOLD_TIME:
            self.metrics.count(self.metrics.cap_rejections, job.function, why.value)
            log.warning(
                "retry of %s %s waited max_hold_time (%gs): last failure forwarded",
                text(job.function), text(job.handle), job.policy.max_hold_time,
                extra=about_job(
                    job.function, job.handle, attempt=job.attempt, reason="max_hold_time",
                    seconds=job.policy.max_hold_time,
                ),
            )
        if ptype is not P.WORK_EXCEPTION:
            return build_packet(REQ, P.WORK_FAIL, handle=job.handle)
        return final_exception(job.policy, job.function, job.handle, failure, job.exception_ends_job)

    def dead_letter(
        self, policy: RetryPolicy, job: Job, attempts: int, failure: tuple[PacketType, bytes]
    ) -> Letter | None:
        """The job, after `attempts` attempts and its last `failure`, in the dead-letter
        envelope for the function's dead letter; None if the function has none."""
        function = policy.dead_letter_function(job.function)
        if function is None:
            return None
        self.metrics.job_outcome(job.function, "dead_lettered")
        unique = dead_letter_unique(job.function, job.unique, job.handle, job.payload)
        ptype, data = failure
        if ptype is P.WORK_EXCEPTION:
            data = exception_text(data)
        return Letter(function, unique, envelope(job.function, job.unique, job.handle, attempts, ptype.name, data, job.payload))
