"""Giving freed memory back to the operating system after connections close.

glibc's malloc keeps what Python frees below the top of its heap: after a burst of large
packets (or of long function names) the process's RSS stays at its peak, though the
memory is free, until malloc_trim(3) is asked to hand it back. A sidecar under a memory
limit must not look like it leaks, so gproxy trims shortly after connections close, at
most once per TRIM_DELAY. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from .core.fields import about

log = logging.getLogger("gproxy.memory")
TRIM_DELAY: Final = 1.0
"""Seconds after a close before trimming (closes in a burst share one trim)."""


def _malloc_trim() -> Callable[[], object] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class Trimmer:
    """`soon()` after a connection closes; `run()` in the proxy's nursery does the trims."""

    def __init__(
        self,
        trim: Callable[[], object] | None = None,
        offload: Callable[[Callable[[], object]], Awaitable[object]] = trio.to_thread.run_sync,
    ) -> None:
        self._trim = trim if trim is not None else _malloc_trim()
        self._offload = offload
        """Where the trim runs: a thread, as on a large heap malloc_trim takes milliseconds."""
        self._due = trio.Event()

    def soon(self) -> None:
        self._due.set()

    async def run(self) -> None:
        if self._trim is None:
            return
        while True:
            await self._due.wait()
            await trio.sleep(TRIM_DELAY)
            self._due = trio.Event()
            try:
                await self._offload(self._trim)
            except Exception as exc:  # noqa: BLE001 - memory hygiene must never take the proxy down
                log.warning("cannot give freed memory back (%s): no more trims", exc, extra=about(reason=str(exc)))
                return
