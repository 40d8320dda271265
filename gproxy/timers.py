"""Every timer of the proxy in one trio task: a heap, not a task per timer.

A held job always has a timer (its backoff, or its max_hold_time), and a lingering pair has
one: at the 10,000 held jobs a sidecar may carry, a sleeping trio task each cost more memory
than the jobs themselves. Here a timer is a heap entry, and one task sleeps until the
earliest is due. A cancelled timer stays in the heap until it comes up, and is skipped.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import trio


class Timer:
    """A scheduled call; `cancel()` before it is due and it never happens."""

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback: Callable[[], object] | None = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = None  # what it would have touched is let go now


class Timers:
    """`call_at()` from trio code; `run()` in a nursery makes the calls, in time order.
    `on_error` hears of a callback that raised (the task itself never fails)."""

    def __init__(self, on_error: Callable[[Exception], None]) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._sooner = trio.Event()
        self._on_error = on_error

    def __len__(self) -> int:
        return len(self._heap)

    def call_at(self, deadline: float, callback: Callable[[], object]) -> Timer:
        timer = Timer(callback)
        if not self._heap or deadline < self._heap[0][0]:
            self._sooner.set()
        heapq.heappush(self._heap, (deadline, next(self._order), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        return self.call_at(trio.current_time() + delay, callback)

    async def run(self) -> None:
        heap = self._heap
        while True:
            self._sooner = trio.Event()
            with trio.move_on_at(heap[0][0] if heap else float("inf")):
                await self._sooner.wait()
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, timer = heapq.heappop(heap)
                callback = timer.callback
                if callback is None or timer.cancelled:
                    continue
                timer.callback = None
                try:
                    callback()
                except Exception as exc:  # noqa: BLE001 - one timer's bug is not every timer's
                    self._on_error(exc)
            await trio.lowlevel.checkpoint()
