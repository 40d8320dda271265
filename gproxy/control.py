"""The control plane: what gproxy does in trio, around a data plane that moves the bytes.

The Proxy accepts workers (accept.py), opens their first gearmand connection (dialer.py)
and hands both sockets to a Pair in the data plane; from then on the pair decides
everything about them. Here stays what is rare and needs trio: retry timers and budget
rechecks, the retry client of each route, connecting a worker that a move sends to a fresh
gearmand connection, lingering pairs, the HTTP endpoint with the operator's view
(steering.py), the drain's end (drain_wait.py), and stopping. Pairs post what they need (an action
list, never a call into trio); timers and retry replies answer through the PairSet.

No task here can take the process down (supervision.py): an unexpected error is logged with
the pairs it concerns, which close (gearmand requeues their jobs), and the rest serves on.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from functools import partial

import trio

from . import __version__
from .accept import Acceptor
from .config import Address, Config, Route
from .connection import Connection
from .core.assignments import ServerTraits
from .core.commands import Timer
from .core.drain import Drain
from .core.fields import about, pair_name
from .core.jobs import TrackedJob
from .core.limits import cannot_connect
from .core.metrics import Metrics
from .core.retry import Action, NothingHeld, RecheckBudget, Retrier, SendUpstream, Submit, Wakeup
from .core.session import Session, UpstreamLink
from .dataplane import DataPlane, fast_path
from .dialer import Dialer
from .drain_wait import DrainWait
from .handshake import Transport
from .http_endpoint import bind_http, serve_http
from .memory import Trimmer
from .pair import Connect, Ended, ForAnother, Pair, PairSet, PairTimer, Posted
from .reload import ConfigSource, Reloader
from .retry_client import RetryClient
from .scrape import ProxyState
from .steering import Steering
from .supervision import Supervisor, keep_running
from .timers import Timer as TimerHandle
from .timers import Timers

log = logging.getLogger("gproxy.control")

READY_TIMEOUT = 2.0
"""Seconds a readiness probe waits for gearmand (probes themselves time out quickly)."""


class Proxy:
    """Serves every configured route; `tracked_jobs()` shows what workers hold right now.

    `plane`: the data plane to serve with. Given one that runs as trio's host (production,
    see cli), the proxy uses it as it is; otherwise it makes one and drives it from a task.
    """

    def __init__(
        self, config: Config, metrics: Metrics | None = None, plane: DataPlane | None = None,
        source: ConfigSource | None = None,
    ) -> None:
        self.config = config
        """In force now: a reload replaces it (reconfigure)."""
        self.metrics = metrics if metrics is not None else Metrics(max_functions=config.metrics_max_functions)
        self.retrier: Retrier[UpstreamLink, Route] = Retrier(config.policies, metrics=self.metrics)
        self.pairs = PairSet()
        self.plane = plane
        self.metrics_address: Address | None = None
        self.drain = Drain()
        """Shutting down (shutdown): every Session reads it, so a pair accepted just before serves as draining."""
        self._retry_clients: dict[Route, RetryClient] = {}
        self.scraped = ProxyState(self.pairs, self.retrier, self._retry_clients, trio.current_time)
        """What a scrape reads: the pairs, the Retrier and the retry clients, never a copy."""
        self.metrics.read_from(self.scraped)
        self.metrics.build_info.labels(__version__, fast_path()).set(1)
        self.dialer = Dialer(self.metrics, lambda: self.config)
        self.acceptor = Acceptor(lambda: self.config, self.metrics, self.dialer, self._start_pair)
        self.supervisor = Supervisor(self.pairs)
        self.reloader = Reloader(source or ConfigSource(), lambda: self.config, self.reconfigure, self.metrics)
        self.operator = Steering(config.admin, self.retrier, self.perform, self.supervisor, self.reloader.reload)
        self._drain_wait = DrainWait(self.pairs, self.retrier)
        self._http: list[trio.SocketListener] = []
        self._traits: dict[Route, ServerTraits] = {route: ServerTraits() for route in config.routes}
        for route in config.routes:  # (series from the start, for rates and alerts)
            self.metrics.retry_connection_up.labels(str(route.upstream)).set(1)
            self.metrics.retry_reconnects.labels(str(route.upstream))
            if config.tls_of(route).listen is not None:
                self.metrics.tls_handshake_failures.labels("downstream", str(route.listen))
            if config.tls_of(route).upstream is not None:
                self.metrics.tls_handshake_failures.labels("upstream", str(route.upstream))
        self._trimmer = Trimmer()
        self._nursery: trio.Nursery | None = None
        self._posted: collections.deque[Posted] = collections.deque()
        self._token: trio.lowlevel.TrioToken | None = None
        self._wake_due = False
        self._wakeup = trio.Event()
        self._timers = Timers(self._timer_failed)
        self._pair_timers: dict[tuple[Pair, Timer], TimerHandle] = {}
        """What pairs asked to be called back for (PairTimer), until it fires or they end."""

    def reconfigure(self, config: Config) -> None:
        """`config` in force from the next decision on (Reloader: only what may change live
        differs from the running one)."""
        self.retrier.reconfigure(config.policies)
        self.config = config
        self.dialer.forget_refusals()

    @property
    def listen_addresses(self) -> list[Address]:
        return self.acceptor.addresses

    async def ready(self) -> tuple[bool, str]:
        """Ready when every route's gearmand accepts a connection now (and not shutting down)."""
        if self.drain.started:
            return (False, "draining: shutting down")
        problems = []
        for route in self.config.routes:
            try:
                with trio.fail_after(READY_TIMEOUT):
                    (await self.connect(route)).close()
            except (OSError, trio.TooSlowError) as exc:
                problems.append(cannot_connect(exc, f"gearmand {route.upstream}"))
        return (not problems, "; ".join(problems) or "ready")

    def tracked_jobs(self) -> list[TrackedJob]:
        return self.pairs.tracked_jobs()

    async def listen(self) -> None:
        """Bind every route's listen address (and the HTTP endpoint's); an OSError here
        (address in use) is plain, so the command can report it in one line."""
        await self.acceptor.listen()
        if self.config.metrics_listen is not None:
            self._http, self.metrics_address = await bind_http(self.config.metrics_listen)

    async def serve(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (unless `listen()` was awaited already), report `self` as started, serve.
        When this returns (cancelled), every pair has closed."""
        if not self.acceptor.bound:
            await self.listen()
        self._token = trio.lowlevel.current_trio_token()
        plane = self.plane
        if plane is None:
            plane = self.plane = DataPlane(trio.current_time)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if not plane.hosted:
                    nursery.start_soon(plane.drive)
                nursery.start_soon(self._dispatch)
                nursery.start_soon(self._timers.run)
                nursery.start_soon(self._trimmer.run)
                if self._http:
                    await nursery.start(serve_http, self._http, self.metrics, self.ready, self.operator)
                await nursery.start(self.acceptor.run, nursery)
                task_status.started(self)
        finally:
            for pair in self.pairs:
                pair.stop()
            if not plane.hosted:
                plane.close()

    async def shutdown(self, grace_period: float) -> None:
        """Stop accepting and stop handing out jobs, then wait up to `grace_period` seconds
        for running jobs and held retries to finish. What is left when this returns is
        handed back to gearmand when the caller closes the connections: nothing is lost."""
        self.drain.start()
        self.acceptor.stop()
        await self._drain_wait.wait(grace_period)

    def _start_pair(self, fields: dict[str, str], worker: Transport, peer: str, upstream: Transport, route: Route) -> None:
        assert self.plane is not None
        name = pair_name(fields)
        session = Session(
            f"{upstream.sock.getsockname()[1]}->{route.upstream}", self.config.max_packet_size,
            retrier=self.retrier, route=route, metrics=self.metrics, traits=self._traits[route], name=name, drain=self.drain,
            log_fields=fields,
        )
        pair = Pair(name, session, self.plane, self, self.pairs)
        pair.start(worker, peer, upstream)

    # -- what the data plane posts

    def post(self, item: Posted) -> None:
        """From the data plane (or trio): queued, and the dispatcher woken by trio itself."""
        self._posted.append(item)
        if not self._wake_due and self._token is not None:
            self._wake_due = True
            self._token.run_sync_soon(self._wake_dispatcher)

    def _wake_dispatcher(self) -> None:
        self._wakeup.set()

    async def _dispatch(self) -> None:
        assert self._nursery is not None
        nursery = self._nursery
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            self._wake_due = False
            while self._posted:
                self._take_next(nursery)  # (holds no item between items: an ended pair is let go)

    def _take_next(self, nursery: trio.Nursery) -> None:
        item = self._posted.popleft()
        try:
            self._perform(item, nursery)
        except Exception:  # one item lost to a bug; the dispatcher serves on
            log.exception("internal error handling %r", item, extra=about(item=repr(item)))
            if isinstance(item, Connect | PairTimer | Ended):
                item.pair.fail_internally("internal error in the control plane")

    def settled(self, pair: Pair) -> None:
        """A draining pair has handled an event: the drain may be over."""
        self._drain_wait.settled(pair)

    async def execute(self, actions: Sequence[Action[UpstreamLink, Route]]) -> None:
        """What the Retrier asks for in answer to the retry connection."""
        self.perform(actions)

    def perform(self, items: Sequence[Posted | Action[UpstreamLink, Route]]) -> None:
        """The Retrier's actions outside any pair's own event; after them, the drain may be
        over (a held retry ended)."""
        assert self._nursery is not None
        for item in items:
            self._perform(item, self._nursery)
        if self.drain.started:
            self._drain_wait.check()

    def _perform(self, item: Posted | Action[UpstreamLink, Route], nursery: trio.Nursery) -> None:
        """The control plane's one interpreter: what pairs post, and the Retrier's actions
        outside any pair's own event (its timers, the retry connection, an operator)."""
        if type(item) is Wakeup:
            self._timers.call_later(item.delay, partial(self._retry_timer, item))
        elif type(item) is RecheckBudget:
            self._timers.call_later(item.delay, partial(self._recheck, item))
        elif type(item) is Submit:
            self._retry_client(item.route).submit(item)
        elif type(item) is SendUpstream or type(item) is NothingHeld:
            self.deliver(item)
        elif type(item) is Connect:
            nursery.start_soon(self._connect_link, item)
        elif type(item) is PairTimer:
            key = (item.pair, item.timer)
            if (earlier := self._pair_timers.pop(key, None)) is not None:
                earlier.cancel()
            self._pair_timers[key] = self._timers.call_later(item.delay, partial(self._pair_timer_fired, key))
        elif type(item) is Ended:
            for timer in Timer:
                if (pending := self._pair_timers.pop((item.pair, timer), None)) is not None:
                    pending.cancel()  # and the pair is let go of now, not when it would have run out
            self._trimmer.soon()  # what the pair's buffers and jobs held is free now

    def deliver(self, action: ForAnother) -> None:
        """A Retrier's action for a pair's connection, carried out by that pair now (none if
        it has ended: gearmand requeued what its connections owned). The receiving pair is
        supervised here: should carrying it out fail, that pair closes (gearmand requeues
        its jobs) and whoever delivered it, another pair's event or the control plane, goes
        on."""
        if (pair := self.pairs.of(action.owner)) is None:
            return
        try:
            pair.execute(pair.session.deliver(action))
        except Exception:
            kind = "a retry's outcome" if type(action) is SendUpstream else "the end of its last held retry"
            log.exception(
                "%s: internal error carrying out %s; closing it", pair.name, kind,
                extra=about(**pair.session.log_fields, reason=f"internal error carrying out {kind}"),
            )
            pair.fail_internally(f"internal error carrying out {kind}")

    async def _connect_link(self, connect: Connect) -> None:
        """Move a worker to a fresh gearmand connection (see Session: CANT_DO while holding)."""
        pair = connect.pair
        with self.supervisor.supervised("move to a fresh gearmand connection", [connect.link]):
            try:
                upstream = await self.dialer.transport(pair.route)
            except (OSError, trio.TooSlowError) as exc:
                pair.link_failed(connect.link, cannot_connect(exc, fresh=True))
                return
            pair.link_connected(connect.link, upstream)

    def _retry_timer(self, wakeup: Wakeup) -> None:
        what = f"retry timer of {self.retrier.describe(wakeup.key)}"
        with self.supervisor.supervised(what, self.retrier.owners(key=wakeup.key)):
            self.perform(self.retrier.timer_fired(wakeup.key, wakeup.wait, trio.current_time()))

    def _recheck(self, recheck: RecheckBudget) -> None:
        function = recheck.function.decode("utf-8", "replace")
        with self.supervisor.supervised(f"retry budget of {function}", self.retrier.owners(function=recheck.function)):
            self.perform(self.retrier.budget_recheck(recheck.function, trio.current_time()))

    def _pair_timer_fired(self, key: tuple[Pair, Timer]) -> None:
        del self._pair_timers[key]
        pair, timer = key
        try:
            pair.timer_fired(timer)
        except Exception:  # (a timer of the process: nothing may escape it but this pair)
            log.exception(
                "%s: internal error in its %s timer", pair.name, timer.value,
                extra=about(**pair.session.log_fields, timer=timer.value),
            )
            pair.fail_internally(f"internal error in its {timer.value} timer")

    def _timer_failed(self, exc: Exception) -> None:
        log.error("internal error in a timer", exc_info=exc, extra=about())

    async def connect(self, route: Route) -> Connection:
        """A new connection to the route's gearmand for trio code; failures are counted."""
        return await self.dialer.connect(route)

    def _retry_client(self, route: Route) -> RetryClient:
        client = self._retry_clients.get(route)
        if client is None:
            assert self._nursery is not None
            keepalive = self.config.upstream_keepalive  # (a hung gearmand is noticed as soon as a vanished one)
            client = self._retry_clients[route] = RetryClient(
                route, self.retrier, partial(self.connect, route), self.execute, self.config.max_packet_size,
                self.metrics, answer_wait=keepalive.idle, echo_wait=keepalive.interval * keepalive.count,
            )
            self._nursery.start_soon(keep_running, f"retry client to gearmand {route.upstream}", client.run)
        return client
