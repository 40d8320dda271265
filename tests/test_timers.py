"""The proxy's timers: one task, a heap, on trio's clock (a fake one here)."""

from __future__ import annotations

import trio
import trio.testing

from gproxy.timers import Timers


async def test_timers_fire_in_time_order_and_a_cancelled_one_never(autojump_clock: trio.testing.MockClock) -> None:
    fired: list[tuple[str, float]] = []
    errors: list[Exception] = []
    timers = Timers(errors.append)
    start = trio.current_time()

    def note(name: str) -> None:
        fired.append((name, trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        await trio.testing.wait_all_tasks_blocked()
        timers.call_later(5, lambda: note("five"))
        timers.call_later(1, lambda: note("one"))  # sooner than the one the task sleeps for
        cancelled = timers.call_later(3, lambda: note("three"))
        timers.call_later(2, lambda: 1 / 0)  # a bug in one timer
        timers.call_later(2, lambda: note("two"))
        cancelled.cancel()
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert fired == [("one", 1), ("two", 2), ("five", 5)]
    assert [type(e) for e in errors] == [ZeroDivisionError]
    assert len(timers) == 0


async def test_a_timer_set_while_others_fire_is_not_lost(autojump_clock: trio.testing.MockClock) -> None:
    fired: list[float] = []
    timers = Timers(lambda exc: None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        timers.call_later(1, lambda: timers.call_later(0, lambda: fired.append(trio.current_time())))
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert len(fired) == 1
