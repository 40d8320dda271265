"""The drain's end: an event set when the last running job and the last held retry are gone.

Nothing polls for it. The owners of those facts say when they change: a draining pair after
each event it handles (Pair.execute: a job of its worker may have ended, or been handed
back), the control plane after each of the Retrier's actions it carries out (a held retry
may have ended). Each of those asks `check`, which costs a set lookup and a length: the pairs
still running jobs are kept in a set, so no scan of every pair follows every event.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from .config import Route
from .core.fields import about
from .core.retry import Retrier
from .core.session import UpstreamLink
from .pair import Pair, PairSet

log = logging.getLogger("gproxy.control")


class DrainWait:
    """Stopping: the jobs left to wait for, and `done`, set when there are none. (Whether
    gproxy drains is core.drain.Drain's; this is how long it takes.)"""

    def __init__(self, pairs: PairSet, retrier: Retrier[UpstreamLink, Route]) -> None:
        self._pairs = pairs
        self._retrier = retrier
        self.done = trio.Event()
        self._busy: set[Pair] = set()
        """The pairs whose workers still run jobs (as of their last event)."""
        self._token: trio.lowlevel.TrioToken | None = None
        """While waiting (and `done` not yet asked for): where to set it."""

    @property
    def running(self) -> int:
        return sum(pair.running_jobs for pair in self._pairs)

    @property
    def held(self) -> int:
        return self._retrier.holding

    async def wait(self, grace_period: float) -> None:
        """Every pair has been told to drain (and reports here from now on): wait up to
        `grace_period` seconds for their running jobs and the held retries to end."""
        log.info(
            "draining: no new connections or jobs; waiting up to %gs for %d running and %d held jobs",
            grace_period, self.running, self.held,
            extra=about(seconds=grace_period, running=self.running, held=self.held),
        )
        with trio.move_on_after(grace_period):
            while True:
                self._busy = {pair for pair in self._pairs if pair.running_jobs}
                self.done, self._token = trio.Event(), trio.lowlevel.current_trio_token()
                self.check()
                await self.done.wait()
                if not (self.running or self.held):  # (not a job assigned since, for a grab sent before)
                    break
        if self.running or self.held:
            log.warning(
                "grace period over: %d running and %d held jobs handed back to gearmand", self.running, self.held,
                extra=about(running=self.running, held=self.held),
            )
        else:
            log.info("drained: every job finished", extra=about())

    def settled(self, pair: Pair) -> None:
        """`pair` has handled an event (from the data plane or trio)."""
        if pair.running_jobs and not pair.done:
            self._busy.add(pair)
        else:
            self._busy.discard(pair)
        self.check()

    def check(self) -> None:
        """Set `done` if nothing is left to wait for. Safe from the data plane, which may be
        trio's host: the event is set from trio's own loop."""
        if self._token is None or self._busy or self._retrier.holding:
            return
        token, self._token = self._token, None  # (once)
        with contextlib.suppress(trio.RunFinishedError):  # (stopping after the run: no one waits)
            token.run_sync_soon(self.done.set)
