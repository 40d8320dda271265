"""gproxy running in a thread of the test process, for synchronous tests with real peers.

The real Gearman peers are blocking subprocesses; waiting on them inside a trio test would
stall the proxy that serves them. So the proxy gets its own trio loop in a thread, and the
test reads its state through `trio.from_thread`, in the proxy's own thread, never racing it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio
import trio.testing

from gproxy.config import Address, Config, Route
from gproxy.core.jobs import TrackedJob
from gproxy.control import Proxy
from gproxy.core.policy import Policies, RetryPolicy
from gproxy.core.retry import HeldJob
from gproxy.reload import ConfigSource

R = TypeVar("R")


class ProxyThread:
    """`frozen`: the proxy's clock stands still (trio's MockClock) until the test moves it with
    advance() or lets it run with thaw(): a retry waits exactly as long as the test wants,
    instead of racing a backoff on a loaded machine."""

    def __init__(self, config: Config, frozen: bool = False, source: ConfigSource | None = None) -> None:
        self.config = config
        self.source = source
        """The config file a reload reads (proxy.reloader)."""
        self.clock = trio.testing.MockClock(rate=0.0) if frozen else None
        self.proxy: Proxy | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gproxy", daemon=True)

    @classmethod
    def to(
        cls, upstream: tuple[str, int], policy: RetryPolicy | None = None,
        functions: dict[str, RetryPolicy] | None = None, frozen: bool = False, **settings: Any,
    ) -> ProxyThread:
        """A single route from a free loopback port to `upstream`; with `policy` (and
        per-function `functions`) instead of the shipped retry defaults."""
        if policy is not None:
            named = {name.encode(): p for name, p in (functions or {}).items()}
            settings["policies"] = Policies(policy, named)
        return cls(Config(routes=(Route(Address("127.0.0.1", 0), Address(*upstream)),), **settings), frozen)

    @property
    def address(self) -> tuple[str, int]:
        assert self.proxy is not None
        return self.proxy.listen_addresses[0].host_port

    def __enter__(self) -> ProxyThread:
        self._thread.start()
        if not self._started.wait(10):
            raise TimeoutError("gproxy did not start within 10 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self._cancel_scope.cancel)
        self._thread.join(10)
        assert not self._thread.is_alive(), "gproxy did not stop within 10 s"
        if self._error is not None:
            raise self._error

    def call(self, fn: Callable[..., R], *args: Any) -> R:
        """Run `fn` in the proxy's thread, between its steps."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def tracked_jobs(self) -> list[TrackedJob]:
        assert self.proxy is not None
        return self.call(self.proxy.tracked_jobs)

    def held(self) -> list[HeldJob]:
        """The jobs held for a retry now, oldest first."""
        assert self.proxy is not None
        return self.call(lambda: list(self.proxy.retrier.held.values()))  # type: ignore[union-attr]

    def advance(self, seconds: float) -> None:
        """Move a frozen proxy's clock: timers due by then fire. First every task of the
        proxy settles: a timer it was about to set (posted by the data plane, not yet taken
        by the control plane) is set from the time before the jump, not after it."""
        clock = self.clock
        assert clock is not None, "advance() needs ProxyThread(..., frozen=True)"

        async def settle_and_jump() -> None:
            await trio.testing.wait_all_tasks_blocked()
            clock.jump(seconds)

        trio.from_thread.run(settle_and_jump, trio_token=self._token)

    def thaw(self) -> None:
        """Let a frozen proxy's clock run from now on, at the pace of the real one."""
        assert self.clock is not None
        self.call(setattr, self.clock, "rate", 1.0)

    def sample(self, name: str, **labels: str) -> float | None:
        """A sample of gproxy's own metrics registry, e.g. sample("gproxy_jobs_total", ...)."""
        assert self.proxy is not None
        return self.call(self.proxy.metrics.registry.get_sample_value, name, labels)

    def _run(self) -> None:
        try:
            trio.run(self._main, clock=self.clock)
        except BaseException as exc:  # reported to the test, in the test's thread
            self._error = exc
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel_scope = nursery.cancel_scope
            self.proxy = await nursery.start(Proxy(self.config, source=self.source).serve)
            self._started.set()
