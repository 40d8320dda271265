"""Freed memory handed back after connections close: one trim per burst of closes."""

from __future__ import annotations

import trio
import trio.testing

from gproxy.memory import TRIM_DELAY, Trimmer, _malloc_trim


async def here(fn: object) -> object:
    """Run the trim in the trio thread, so that the mock clock sees it."""
    return fn()  # type: ignore[operator]


async def test_closes_in_a_burst_share_one_trim_a_moment_later(autojump_clock: trio.testing.MockClock) -> None:
    trims: list[int] = []
    trimmer = Trimmer(lambda: trims.append(1), here)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trimmer.run)
        for _ in range(5):
            trimmer.soon()
        await trio.sleep(TRIM_DELAY / 2)
        assert trims == []  # not at once: closes come in bursts
        await trio.sleep(TRIM_DELAY * 2)
        assert trims == [1]
        trimmer.soon()
        await trio.sleep(TRIM_DELAY * 2)
        assert trims == [1, 1]
        nursery.cancel_scope.cancel()


async def test_a_trim_that_fails_is_logged_and_the_proxy_goes_on(autojump_clock: trio.testing.MockClock) -> None:
    def broken() -> None:
        raise OSError("no")

    trimmer = Trimmer(broken, here)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trimmer.run)
        trimmer.soon()
        await trio.sleep(TRIM_DELAY * 2)
        trimmer.soon()
        await trio.sleep(TRIM_DELAY * 2)
        nursery.cancel_scope.cancel()


def test_glibc_is_asked_on_this_machine() -> None:
    trim = _malloc_trim()
    assert trim is not None  # Debian: glibc
    trim()
