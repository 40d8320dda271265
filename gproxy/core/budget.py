"""A retry budget: how many retries a function may make, as a rate, not a count of jobs held.

Modelled on Finagle's RetryBudget (Linkerd's retry budget is the same model): over any
window of `ttl` seconds, retries may number at most `ratio` times the first attempts seen in
that window, plus a floor of `min_per_second * ttl` so that a function with little traffic
can still retry. Each first attempt deposits `ratio`, each retry withdraws 1 when it is
about to be submitted, and both expire from the window after `ttl`. A budget that says no
does not fail anything: the retry waits in its function's line until the budget allows it.

`RetryBudget` is one function's window; `Budgets` is every function's, with the lines of
retries deferred for them (the Retrier decides what happens to a job, Budgets only which
key's turn it is).

Pure: the caller passes `now` (any monotonic clock). The window is kept in ten slices, as
Finagle's WindowedAdder does, so an entry expires between `ttl` and `ttl * 1.1` after it
was made, and each call costs a few float operations.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Final

from .policy import Policies

SLICES: Final = 10
BUDGETS_SWEPT_FROM: Final = 256
"""Idle retry budgets are dropped once there are this many (see Budgets.budget)."""
_EPSILON: Final = 1e-9
"""Deposits of 0.2 summed in floats fall a hair short of whole numbers."""


class RetryBudget:
    def __init__(self, ratio: float, min_per_second: float, ttl: float, generation: int = 0) -> None:
        self.generation = generation
        """Of the policies it was tuned to (Budgets.reconfigure)."""
        self.slice = 0.0
        """Seconds per slice; also how long a deferred retry waits before the next look."""
        self._slices: list[float] = []
        self._epoch: int | None = None
        """Number of the slice last written to (time // slice)."""
        self.retune(ratio, min_per_second, ttl)

    def retune(self, ratio: float, min_per_second: float, ttl: float) -> None:
        """New settings (a reload): the window goes on, unless its length changed."""
        if ratio < 0 or min_per_second < 0 or not ttl > 0:
            raise ValueError(f"bad retry budget: ratio={ratio}, min_per_second={min_per_second}, ttl={ttl}")
        self.ratio = ratio
        self.reserve = min_per_second * ttl
        """Retries allowed in every window whatever the traffic: the floor."""
        if self.slice != ttl / SLICES:
            self.slice = ttl / SLICES
            self._slices = [0.0] * SLICES
            self._epoch = None

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


class Budgets:
    """The retry budget of every function, and per function the line of retries that wait
    for it: a retry whose backoff is over takes from the budget (`withdraw`), or, if the
    budget says no or older retries of the function are in line, joins the line (`defer`).
    A function has a line exactly while a look at its budget (the caller's RecheckBudget,
    after the delay `defer` returned) is outstanding; each look (`recheck`) lets go as many
    as the budget allows, oldest first. A line holds keys only: whether a key still waits
    is the caller's to say."""

    def __init__(self, policies: Policies) -> None:
        self.policies = policies
        self._generation = 0
        """Bumped by reconfigure: a budget of an older generation is retuned when next used."""
        self._budgets: dict[int, RetryBudget] = {}
        """By hash(function name): see budget()."""
        self._sweep_at = BUDGETS_SWEPT_FROM
        self._lines: dict[bytes, deque[int]] = {}
        """Per function, the deferred keys, oldest first; a function is here exactly
        while a RecheckBudget for it is outstanding."""

    def __len__(self) -> int:
        """Budgets kept."""
        return len(self._budgets)

    def __contains__(self, function: bytes) -> bool:
        """Is a budget kept for `function` (one not idle since the last sweep)?"""
        return hash(function) in self._budgets

    def budget(self, function: bytes, now: float) -> RetryBudget:
        """The function's budget. Function names come from the network (any client may
        submit under any name): budgets are keyed by the name's hash, not the name, and
        those with nothing in their window are dropped (a new one would be the same), swept
        whenever their number doubles, so that each new name costs O(1) on average. A
        function with a line keeps its budget."""
        key = hash(function)
        budget = self._budgets.get(key)
        if budget is None:
            if len(self._budgets) >= self._sweep_at:
                deferred = {hash(name) for name in self._lines}
                for other, idle in list(self._budgets.items()):
                    if other not in deferred and idle.idle(now):
                        del self._budgets[other]
                self._sweep_at = max(BUDGETS_SWEPT_FROM, 2 * len(self._budgets))
            policy = self.policies.for_function(function)
            budget = self._budgets[key] = RetryBudget(
                policy.budget_ratio, policy.budget_min_per_second, policy.budget_ttl, self._generation
            )
        elif budget.generation != self._generation:
            policy = self.policies.for_function(function)
            budget.retune(policy.budget_ratio, policy.budget_min_per_second, policy.budget_ttl)
            budget.generation = self._generation
        return budget

    def reconfigure(self, policies: Policies) -> None:
        """New policies (a reload): each budget takes its new settings when next used."""
        self.policies = policies
        self._generation += 1

    def balances(self, now: float, functions: Iterable[bytes]) -> dict[bytes, float]:
        """The balance of each of `functions` (a gauge): what its budget allows now."""
        return {function: self.budget(function, now).balance(now) for function in functions}

    def withdraw(self, function: bytes, now: float) -> bool:
        """May a retry of `function` go now? Only if no older one is in line and the budget
        allows it; if so, it is counted against the budget."""
        budget = self.budget(function, now)
        return function not in self._lines and budget.try_withdraw(now)

    def defer(self, function: bytes, key: int, now: float) -> float | None:
        """`key` joins the end of `function`'s line. If the line is new: the delay after
        which to look at the budget (`recheck`); else None (a look is outstanding)."""
        line = self._lines.get(function)
        if line is not None:
            line.append(key)
            return None
        self._lines[function] = deque([key])
        return self.budget(function, now).slice

    @property
    def lines(self) -> Collection[bytes]:
        """The functions with a line (each with a look at its budget outstanding)."""
        return self._lines.keys()

    def deferred(self, function: bytes) -> Sequence[int]:
        """The keys in `function`'s line, oldest first (a key may be there after its job
        stopped waiting: it is dropped when its turn comes)."""
        return self._lines.get(function, ())

    def drop(self, function: bytes) -> Sequence[int]:
        """`function`'s line is given up (its retries wait elsewhere): its keys, oldest first."""
        return self._lines.pop(function, ())

    def recheck(
        self, function: bytes, now: float, waits: Callable[[int], bool], go: Callable[[int], None]
    ) -> float | None:
        """The look at `function`'s budget: walk its line, oldest first. A key leaves the
        line when `waits(key)` says it waits no more (the caller may end its job there), or
        when the budget grants it a retry: `go(key)`. The walk stops at the first key the
        budget cannot grant. The delay after which to look again, or None: the line is
        empty, and gone (the callbacks must not touch the lines)."""
        line = self._lines.get(function)
        if line is None:
            return None
        budget = self.budget(function, now)
        while line:
            if not waits(line[0]):
                line.popleft()
            elif budget.try_withdraw(now):
                go(line.popleft())
            else:
                break
        if line:
            return budget.slice
        del self._lines[function]
        return None
