"""What a scrape of a proxy's metrics reads, from the owner of each fact, at scrape time.

Jobs running, ejected workers and gearmand connections are the pairs' (their JobTables,
Ejections and sockets); jobs held and budget balances are the Retrier's; the retry
connections are the retry clients'. Nothing counts them a second time for the metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .config import Route
from .core.metrics import LiveState
from .core.retry import Retrier
from .core.session import UpstreamLink
from .pair import PairSet
from .retry_client import RetryClient


class ProxyState(LiveState):
    """A proxy's LiveState: reads `pairs`, `retrier` and `retry_clients` (a route's client is
    made when its first retry is submitted, so the mapping is read as it is then).
    `clock`: the time the budgets' balances are taken at."""

    def __init__(
        self, pairs: PairSet, retrier: Retrier[UpstreamLink, Route], retry_clients: Mapping[Route, RetryClient],
        clock: Callable[[], float],
    ) -> None:
        self._pairs, self._retrier, self._retry_clients, self._clock = pairs, retrier, retry_clients, clock

    def running(self) -> Mapping[bytes, int]:
        return self._pairs.running_jobs()

    def held(self) -> Mapping[bytes, int]:
        return self._retrier.held_per_function

    def budget_balance(self, functions: list[bytes]) -> Mapping[bytes, float]:
        return self._retrier.budget_balances(self._clock(), functions)

    def connections(self) -> Mapping[str, int]:
        retry = sum(client.connected for client in self._retry_clients.values())
        return {"worker": len(self._pairs), "upstream": self._pairs.upstream_connections() + retry}

    def ejected(self) -> Mapping[bytes, int]:
        return self._pairs.ejected_workers()
