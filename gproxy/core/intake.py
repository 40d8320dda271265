"""What becomes of a failure of an original job: held for a retry, or ended now.

An original is a job gproxy does not hold (yet), whose worker failed it (WORK_EXCEPTION or
WORK_FAIL), vanished in the middle of it, or let it run past its timeout. It is held for a
retry (the Retrier holds it, with the `Verdict` returned here) when the failure is
retryable, its function enforces retries (observe mode only counts what it would have
retried), has an attempt left and holds fewer than `max_held` jobs. Otherwise it ends now,
as the `Ending` returned here says: the worker's failure is forwarded (or what its client
hears instead, as `final_exception` says), or gproxy fails the job when the worker gave no
result; and the job goes to its dead letter, if its function has one.

Pure: the caller passes `now` and how many jobs the function holds. `Intake` counts in the
metrics and logs, as the Retrier (whose decisions these are).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from .fields import about_job
from .jobs import TrackedJob
from .outcomes import Letter, Outcomes, instead
from .policy import FinalException, GiveUp, Mode, OnDisconnect, Policies, Reason, RetryPolicy, Verdict, classify
from .protocol import REQ, PacketType, build_packet, text

log = logging.getLogger("gproxy.retry")
"""(The Retrier's logger: these lines are part of its story.)"""
P = PacketType
_LOST: Final = {Reason.DISCONNECT: "its worker vanished", Reason.TIMEOUT: "it ran past its timeout"}


@dataclass(frozen=True, slots=True)
class Ending:
    """An original that is not held, and what ends it."""

    letter: Letter | None = None
    """Its dead letter, if its function has one."""
    fail: bytes | None = None
    """The WORK_FAIL gproxy sends for it (its worker gave no result); None: the worker's
    own failure is forwarded."""
    instead: bytes | None = None
    """What is forwarded in place of the worker's exception (see outcomes.instead)."""


class Intake:
    """The Retrier's decisions about the failures of originals."""

    def __init__(self, policies: Policies, outcomes: Outcomes) -> None:
        self.policies = policies
        self.outcomes = outcomes
        self.metrics = outcomes.metrics

    def failed(self, job: TrackedJob, ptype: PacketType, failure: bytes, held: int) -> Verdict | Ending:
        """A worker failed original `job` (its function holds `held` jobs now)."""
        function, handle = job.function, job.handle
        policy = self.policies.for_function(function)
        verdict = classify(policy, ptype, failure)

        def forwarded(letter: Letter | None = None) -> Ending:
            if ptype is not P.WORK_EXCEPTION or policy.final_exception is FinalException.EXCEPTION:
                return Ending(letter)
            return Ending(letter, instead=instead(policy, function, handle, failure))

        if verdict is None:
            return forwarded()
        name = text(function)
        if policy.mode is Mode.OBSERVE:
            self._observed(job, verdict.why)
            return forwarded()
        if policy.max_attempts <= 1:
            log.info(
                "retry exhausted: %s %s after 1 attempt, failure forwarded", name, text(handle),
                extra=about_job(function, handle, attempt=1, reason="exhausted"),
            )
            self.metrics.count(self.metrics.exhausted, function)
            return forwarded(self.outcomes.dead_letter(policy, job, 1, (ptype, failure)))
        if held >= policy.max_held:
            self.metrics.count(self.metrics.cap_rejections, function, GiveUp.MAX_HELD.value)
            log.warning(
                "%s already holds %d jobs (max_held): %s failure forwarded", name, policy.max_held, text(handle),
                extra=about_job(function, handle, reason="max_held"),
            )
            return forwarded(self.outcomes.dead_letter(policy, job, 1, (ptype, failure)))
        return verdict

    def left(self, job: TrackedJob, now: float, ran: bool, held: int) -> Verdict | Ending:
        """The worker running original `job` left, and gearmand cannot requeue the job (see
        Retrier.worker_left). A function that retries disconnects: a retryable failure. Any
        other: retried at once, as gearmand would have requeued it (with room under max_held)."""
        policy = self.policies.for_function(job.function)
        if ran and self.retries_disconnects(job.function):
            return self._lost(job, policy, now, Reason.DISCONNECT, held)
        if held < policy.max_held:
            return Verdict(Reason.DISCONNECT, 0.0)
        self.metrics.count(self.metrics.cap_rejections, job.function, GiveUp.MAX_HELD.value)
        log.warning(
            "%s already holds %d jobs (max_held): %s, whose worker left, fails",
            text(job.function), policy.max_held, text(job.handle),
            extra=about_job(job.function, job.handle, reason="max_held"),
        )
        return self._failed(job, policy, now, b"gproxy: its worker left")

    def timed_out(self, job: TrackedJob, now: float, held: int) -> Verdict | Ending | None:
        """Original `job` ran past its function's timeout: a retryable failure (reason
        timeout). None in observe mode: only counted, and the attempt runs on."""
        policy = self.policies.for_function(job.function)
        if policy.mode is Mode.OBSERVE:
            self._observed(job, "timeout")
            return None
        return self._lost(job, policy, now, Reason.TIMEOUT, held)

    def retries_disconnects(self, function: bytes) -> bool:
        """Is a job of `function` whose worker vanishes retried as a failure (on_disconnect
        = "retry", enforced), rather than requeued by gearmand?"""
        policy = self.policies.for_function(function)
        return policy.on_disconnect is OnDisconnect.RETRY and policy.mode is Mode.ENFORCE

    def disconnects_observed(self, running: Iterable[TrackedJob]) -> None:
        """The worker left jobs running that gearmand requeues: counted as observed where
        on_disconnect = "retry" is only observed."""
        for job in running:
            policy = self.policies.for_function(job.function)
            if policy.on_disconnect is OnDisconnect.RETRY and policy.mode is Mode.OBSERVE and not job.is_retry:
                self._observed(job, "disconnect")

    def _lost(self, job: TrackedJob, policy: RetryPolicy, now: float, reason: Reason, held: int) -> Verdict | Ending:
        """An attempt that ended with no result of the worker's (it vanished, or ran out of
        time): a failure like a retryable WORK_FAIL (a poison job that kills its workers
        runs max_attempts times with backoff, then goes to the dead letter); with no
        attempt or room left, failed."""
        name, why = text(job.function), _LOST[reason]
        if policy.max_attempts > 1 and held < policy.max_held:
            return Verdict(reason)
        if policy.max_attempts <= 1:
            self.metrics.count(self.metrics.exhausted, job.function)
            log.warning(
                "retry exhausted: %s %s after 1 attempt (%s), failed", name, text(job.handle), why,
                extra=about_job(job.function, job.handle, attempt=1, reason=why),
            )
        else:
            self.metrics.count(self.metrics.cap_rejections, job.function, GiveUp.MAX_HELD.value)
            log.warning(
                "%s already holds %d jobs (max_held): %s (%s) fails", name, policy.max_held, text(job.handle), why,
                extra=about_job(job.function, job.handle, reason=why),
            )
        return self._failed(job, policy, now, b"gproxy: " + why.encode())

    def _failed(self, job: TrackedJob, policy: RetryPolicy, now: float, why: bytes) -> Ending:
        """Gone with no result and not held: failed (a WORK_FAIL, as gearmand's
        --job-retries would end it), and dead-lettered with `why` as its failure."""
        self.metrics.job_ended(job.function, "fail", now - job.started_at)
        letter = self.outcomes.dead_letter(policy, job, 1, (P.WORK_FAIL, why))
        return Ending(letter, build_packet(REQ, P.WORK_FAIL, handle=job.handle))

    def _observed(self, job: TrackedJob, why: str) -> None:
        log.info(
            "observe: would retry %s %s (%s)", text(job.function), text(job.handle), why,
            extra=about_job(job.function, job.handle, reason=why),
        )
        self.metrics.count(self.metrics.observed, job.function)
