"""Where the control plane's unexpected errors end: no task of it may take the process down.

An error in handling something that concerns some pairs (a retry timer, an operator's
action, a retry's outcome) is logged with those pairs, which close: gearmand requeues their
jobs, and everything else serves on. A task that serves the whole process (a retry client)
is started again instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

import trio

from .core.fields import about
from .core.session import UpstreamLink
from .pair import PairSet

log = logging.getLogger("gproxy.control")

RESTART_PAUSE = 1.0
"""Seconds before a process-wide task that failed unexpectedly is started again."""


class Supervisor:
    """Closes the pairs an unexpected error concerns (found from their connections)."""

    def __init__(self, pairs: PairSet) -> None:
        self._pairs = pairs

    @contextlib.contextmanager
    def supervised(self, what: str, owners: list[UpstreamLink]) -> Iterator[None]:
        """A background task's unexpected error must not take the process down: it is logged
        with the connections it concerns, and their pairs close, so gearmand requeues their
        jobs; everything else serves on."""
        try:
            yield
        except Exception:
            pairs = list(dict.fromkeys(pair for owner in owners if (pair := self._pairs.of(owner)) is not None))
            log.exception(
                "%s: internal error; closing %s", what, "; ".join(p.name for p in pairs) or "no connection",
                extra=about(task=what, peers=[p.name for p in pairs]),
            )
            for pair in pairs:
                pair.fail_internally(f"internal error in the {what}")


async def keep_running(what: str, task: Callable[[], Awaitable[None]]) -> None:
    """Run a task that serves the whole process again whenever it fails unexpectedly."""
    while True:
        try:
            await task()
            return
        except Exception:
            log.exception(
                "%s: internal error; starting it again in %gs", what, RESTART_PAUSE,
                extra=about(task=what, seconds=RESTART_PAUSE),
            )
        await trio.sleep(RESTART_PAUSE)
