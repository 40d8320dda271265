"""Timeouts that gproxy enforces: each timed attempt's deadline, for one worker.

gearmand's own CAN_DO_TIMEOUT requeues a timed-out job at once and with no limit, held by
gproxy or not, and answers the slow worker's late result with ERROR. So a Session sends
such a registration on as a plain CAN_DO, and times attempts out here instead, as it does
for functions with a `timeout` of their own. One timer per worker is enough: it is asked
for at the earliest deadline, and each time it fires, for the next.

Pure: the time is passed in; the caller keeps the timer (Session emits ArmTimeout).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from .jobs import TrackedJob

LinkT = TypeVar("LinkT", bound=Hashable)


def deadline_passed(deadline: float, now: float) -> bool:
    """Has `deadline` come? A timer set for `deadline - t` at `t` may wake a rounding error early."""
    return now >= deadline - 1e-6


class Deadlines(Generic[LinkT]):
    """The worker's own timeouts (from CAN_DO_TIMEOUT), and the deadline of each attempt
    it runs that has one."""

    def __init__(self) -> None:
        self._registered: dict[bytes, float] = {}
        """Seconds, per function the worker registered with CAN_DO_TIMEOUT."""
        self._running: dict[tuple[LinkT, bytes], tuple[float, TrackedJob]] = {}
        self._armed_at: float | None = None
        """The deadline the caller's timer is set for."""

    def __len__(self) -> int:
        return len(self._running)

    def registered(self, function: bytes, milliseconds: int) -> None:
        """CAN_DO_TIMEOUT, read as gearmand reads it: milliseconds, at least a second (0: none)."""
        if milliseconds:
            self._registered[function] = max(milliseconds, 1000) / 1000
        else:
            self._registered.pop(function, None)

    def unregistered(self, function: bytes | None) -> None:
        """CAN_DO without a timeout, or CANT_DO, for `function`; RESET_ABILITIES for None."""
        if function is None:
            self._registered.clear()
        elif self._registered:
            self._registered.pop(function, None)

    def timeout_of(self, function: bytes, configured: float) -> float | None:
        """Seconds an attempt may run: the worker's own timeout, else the function's (0: none)."""
        own = self._registered.get(function) if self._registered else None
        return own if own is not None else configured or None

    @property
    def any_registered(self) -> bool:
        return bool(self._registered)

    def started(self, link: LinkT, job: TrackedJob, deadline: float) -> None:
        self._running[(link, job.handle)] = (deadline, job)

    def ended(self, link: LinkT, handle: bytes) -> None:
        if self._running:
            self._running.pop((link, handle), None)

    def arm(self, now: float) -> float | None:
        """The delay to set the timer for, if the earliest deadline is not armed already."""
        if not self._running:
            return None
        due = min(deadline for deadline, _ in self._running.values())
        if self._armed_at is not None and due >= self._armed_at:
            return None
        self._armed_at = due
        return max(due - now, 0.0)

    def fired(self, now: float, still_running: bool = True) -> Iterator[tuple[LinkT, TrackedJob]]:
        """The timer fired: the attempts past their deadline, forgotten as they are yielded
        (the caller checks each is still the one running). `still_running` False: the
        worker has left, and every deadline is dropped."""
        self._armed_at = None
        if not still_running:
            self._running.clear()
        for key, (deadline, job) in list(self._running.items()):
            if deadline_passed(deadline, now):
                del self._running[key]
                yield key[0], job
