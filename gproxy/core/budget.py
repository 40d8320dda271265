"""A retry budget: how many retries a function may make, as a rate, not a count of jobs held.

Modelled on Finagle's RetryBudget (Linkerd's retry budget is the same model): over any
window of `ttl` seconds, retries may number at most `ratio` times the first attempts seen in
that window, plus a floor of `min_per_second * ttl` so that a function with little traffic
can still retry. Each first attempt deposits `ratio`, each retry withdraws 1 when it is
about to be submitted, and both expire from the window after `ttl`. A budget that says no
does not fail anything: the Retrier defers the retry until the budget allows it.

Pure: the caller passes `now` (any monotonic clock). The window is kept in ten slices, as
Finagle's WindowedAdder does, so an entry expires between `ttl` and `ttl * 1.1` after it
was made, and each call costs a few float operations.
"""

from __future__ import annotations

import math
from typing import Final

SLICES: Final = 10
_EPSILON: Final = 1e-9
"""Deposits of 0.2 summed in floats fall a hair short of whole numbers."""


class RetryBudget:
    def __init__(self, ratio: float, min_per_second: float, ttl: float) -> None:
        if ratio < 0 or min_per_second < 0 or not ttl > 0:
            raise ValueError(f"bad retry budget: ratio={ratio}, min_per_second={min_per_second}, ttl={ttl}")
        self.ratio = ratio
        self.reserve = min_per_second * ttl
        """Retries allowed in every window whatever the traffic: the floor."""
        self.slice = ttl / SLICES
        """Seconds per slice; also how long a deferred retry waits before the next look."""
        self._slices = [0.0] * SLICES
        self._epoch: int | None = None
        """Number of the slice last written to (time // slice)."""

    def deposit(self, now: float) -> None:
        """A first attempt was seen: it earns `ratio` retries for the next `ttl` seconds."""
        if self.ratio:
            index = self._advance(now)
            self._slices[index] += self.ratio

    def try_withdraw(self, now: float) -> bool:
        """May a retry go now? If so, it is counted against the window."""
        index = self._advance(now)
        if sum(self._slices) + self.reserve < 1 - _EPSILON:
            return False
        self._slices[index] -= 1
        return True

    def idle(self, now: float) -> bool:
        """Nothing in the window: this budget is as good as a new one (and may be dropped)."""
        self._advance(now)
        return not any(self._slices)

    def balance(self, now: float) -> float:
        """Retries the budget would allow right now (a gauge; never below zero)."""
        self._advance(now)
        return max(0.0, sum(self._slices) + self.reserve)

    def _advance(self, now: float) -> int:
        """Clear the slices that expired since the last call; the index of `now`'s slice."""
        epoch = math.floor(now / self.slice)
        last = self._epoch
        if last is None or epoch - last >= SLICES:
            self._slices[:] = [0.0] * SLICES  # in place: callers index the list they hold
        elif epoch > last:
            for passed in range(last + 1, epoch + 1):
                self._slices[passed % SLICES] = 0.0
        if last is None or epoch > last:
            last = self._epoch = epoch
        # A clock that stepped back (it should not) writes to the newest slice, not an old one.
        return last % SLICES
