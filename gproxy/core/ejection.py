"""Outlier ejection: a worker that fails job after job stops getting jobs for a while.

A broken worker (bad config, a full disk, a lost credential) keeps grabbing jobs and
failing them, faster than the healthy ones take theirs, so it fails most of the queue.
Envoy ejects such a backend; here, after `eject_after` failures in a row (of any kind: a
completion resets the count), the worker's grabs are answered NO_JOB by gproxy for
`eject_for` seconds, twice as long at each ejection that follows without a completion
between, up to `eject_for_max`. The jobs stay in gearmand's queue for other workers
(when every worker fails, a dependency is down, and the jobs wait rather than burn).

Pure: the time is passed in, and the caller keeps the timer that ends an ejection.
"""

from __future__ import annotations

from dataclasses import dataclass

from .policy import RetryPolicy


@dataclass(slots=True)
class Ejection:
    """One worker's run of failures, and its ejection if it is ejected."""

    failures: int = 0
    """Failures in a row since its last completion (or its last ejection)."""
    until: float | None = None
    """Ejected until then: its grabs get NO_JOB, and it sleeps unwoken by gearmand."""
    function: bytes = b""
    """The function of the failure that ejected it (a metrics label)."""
    repeats: int = 0
    """Ejections since its last completion: each lasts twice as long as the one before."""
    sleeping: bool = False
    """It sent PRE_SLEEP while ejected: it must be woken (NOOP) when the time is up."""

    @property
    def active(self) -> bool:
        return self.until is not None

    def completed(self) -> None:
        self.failures = self.repeats = 0

    def failed(self, policy: RetryPolicy, function: bytes, now: float) -> float | None:
        """A job of `function` failed: the length of the ejection this starts, if any."""
        self.failures += 1
        if self.until is not None or not policy.eject_after or self.failures < policy.eject_after:
            return None
        duration: float = min(policy.eject_for * 2.0**self.repeats, policy.eject_for_max)
        self.failures, self.repeats = 0, self.repeats + 1
        self.until, self.function = now + duration, function
        return duration

    def over(self) -> bool:
        """The time is up: True if the worker sleeps, and must be woken to grab again."""
        wake = self.until is not None and self.sleeping
        self.until, self.sleeping = None, False
        return wake
