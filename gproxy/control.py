"""The control plane: what gproxy does in trio, around a data plane that moves the bytes.

The Proxy accepts workers, opens their first gearmand connection and hands both sockets to
a Pair in the data plane; from then on the pair decides everything about them. Here stays
what is rare and needs trio: retry timers and budget rechecks, the retry client of each
route, connecting a worker that a move sends to a fresh gearmand connection, lingering
pairs, the HTTP endpoint, the drain, and stopping. Pairs post what they need (an action
list, never a call into trio); timers and retry replies answer through the PairSet.

No task here can take the process down: an unexpected error is logged with the pairs it
concerns, which close (gearmand requeues their jobs), and the rest serves on.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from typing import Any, Final

import trio

from .config import Address, Config, Route
from .connection import Connection, set_keepalive
from .core.assignments import ServerTraits
from .core.commands import Timer
from .core.drain import Drain
from .core.held import held_view
from .core.jobs import TrackedJob
from .core.limits import cannot_connect, own_exhaustion
from .core.metrics import Metrics
from .core.retry import Action, RecheckBudget, Released, Retrier, SendUpstream, Submit, Wakeup
from .core.session import Session, UpstreamLink
from .dataplane import DataPlane
from .http_endpoint import bind_http, serve_http
from .memory import Trimmer
from .pair import Connect, Ended, ForAnother, Pair, PairSet, PairTimer, Posted
from .retry_client import RetryClient
from .timers import Timer as TimerHandle
from .timers import Timers

log = logging.getLogger("gproxy.control")
pair_logger = logging.getLogger("gproxy.pair")
"""(The close line of a worker that never became a pair: where every pair's line is.)"""

CONNECT_TIMEOUT = 5.0
"""Seconds to reach gearmand before the downstream connection is refused."""
READY_TIMEOUT = 2.0
"""Seconds a readiness probe waits for gearmand (probes themselves time out quickly)."""
ACCEPT_CAPACITY_PAUSE = 0.1
"""Seconds to wait when accept() fails for want of file descriptors or memory."""
ACCEPT_WARNING_EVERY = 60.0
"""Seconds between two WARNINGs that accept() fails so (each failure is counted)."""
_ACCEPT_RETRY: Final = {
    errno.ECONNABORTED, errno.EPERM, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
}
DRAIN_POLL = 0.05
"""While draining, how often to look whether the last job has finished."""
RESTART_PAUSE = 1.0
"""Seconds before a process-wide task that failed unexpectedly is started again."""


class Proxy:
    """Serves every configured route; `tracked_jobs()` shows what workers hold right now.

    `plane`: the data plane to serve with. Given one that runs as trio's host (production,
    see cli), the proxy uses it as it is; otherwise it makes one and drives it from a task.
    """

    def __init__(self, config: Config, metrics: Metrics | None = None, plane: DataPlane | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics(max_functions=config.metrics_max_functions)
        self.metrics.connections = self._connection_counts
        self.retrier: Retrier[UpstreamLink, Route] = Retrier(config.policies, metrics=self.metrics)
        self.metrics.budget_balance = lambda: self.retrier.budget_balances(
            trio.current_time(), self.metrics.labelled()
        )
        self.pairs = PairSet()
        self.plane = plane
        self.listen_addresses: list[Address] = []
        self.metrics_address: Address | None = None
        self.drain = Drain()
        """Shutting down (shutdown): every Session reads it, so a pair accepted just before serves as draining."""
        self._accepting = trio.CancelScope()
        self._bound: list[tuple[Route, list[trio.SocketListener]]] = []
        self._http: list[trio.SocketListener] = []
        self._retry_clients: dict[Route, RetryClient] = {}
        self._traits: dict[Route, ServerTraits] = {route: ServerTraits() for route in config.routes}
        for route in config.routes:  # (series from the start, for rates and alerts)
            self.metrics.retry_connection_up.labels(str(route.upstream)).set(1)
            self.metrics.retry_reconnects.labels(str(route.upstream))
        self._trimmer = Trimmer()
        self._nursery: trio.Nursery | None = None
        self._posted: collections.deque[Posted] = collections.deque()
        self._token: trio.lowlevel.TrioToken | None = None
        self._wake_due = False
        self._wakeup = trio.Event()
        self._timers = Timers(self._timer_failed)
        self._pair_timers: dict[tuple[Pair, Timer], TimerHandle] = {}
        """What pairs asked to be called back for (PairTimer), until it fires or they end."""
        self.metrics.ejected = self._ejected_workers

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

    def _connection_counts(self) -> dict[str, int]:
        upstream = self.pairs.upstream_connections() + sum(client.connected for client in self._retry_clients.values())
        return {"worker": len(self.pairs), "upstream": upstream}

    # -- the operator's view and hand (http_endpoint.Operator)

    @property
    def admin(self) -> bool:
        return self.config.admin

    def held(self, function: bytes | None) -> dict[str, Any]:
        return held_view(self.retrier, trio.current_time(), function)

    def retry_now(self, key: int) -> bool:
        return self._steer(key, self.retrier.retry_now)

    def give_up_now(self, key: int) -> bool:
        return self._steer(key, self.retrier.give_up_now)

    def _steer(self, key: int, action: Callable[[int, float], list[Action[UpstreamLink, Route]] | None]) -> bool:
        done = False
        with self._supervised(f"operator's action on {self.retrier.describe(key)}", self.retrier.owners(key=key)):
            actions = action(key, trio.current_time())
            if actions is not None:
                self.perform(actions)
                done = True
        return done

    def pause(self, function: bytes) -> None:
        self.retrier.pause(function)

    def resume(self, function: bytes) -> None:
        name = function.decode("utf-8", "replace")
        with self._supervised(f"operator's resume of {name}", self.retrier.owners(function=function)):
            self.perform(self.retrier.resume(function, trio.current_time()))

    def tracked_jobs(self) -> list[TrackedJob]:
        return self.pairs.tracked_jobs()

    async def listen(self) -> None:
        """Bind every route's listen address; an OSError here (address in use) is plain, not
        wrapped in an exception group, so the command can report it in one line."""
        for route in self.config.routes:
            listeners = await trio.open_tcp_listeners(route.listen.port, host=route.listen.host)
            host, port, *_ = listeners[0].socket.getsockname()
            self.listen_addresses.append(Address(host, port))
            log.info("listening on %s, proxying to gearmand %s", Address(host, port), route.upstream)
            self._bound.append((route, listeners))
        if self.config.metrics_listen is not None:
            self._http, self.metrics_address = await bind_http(self.config.metrics_listen)

    async def serve(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (unless `listen()` was awaited already), report `self` as started, serve.
        When this returns (cancelled), every pair has closed."""
        if not self._bound:
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
                    await nursery.start(serve_http, self._http, self.metrics, self.ready, self)
                await nursery.start(self._accept)
                task_status.started(self)
        finally:
            for pair in self.pairs:
                pair.stop()
            if not plane.hosted:
                plane.close()

    async def _accept(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on every route until shutdown."""
        with self._accepting:
            async with trio.open_nursery() as listeners:
                for route, bound in self._bound:
                    for listener in bound:
                        listeners.start_soon(self._accept_on, listener, route)
                task_status.started()

    async def _accept_on(self, listener: trio.SocketListener, route: Route) -> None:
        """trio.serve_listeners, keeping the peer's address that accept() returns. When
        accepting stops (a drain), the listener closes: new workers are refused at once."""
        with listener.socket:
            await self._accept_loop(listener.socket, route)

    async def _accept_loop(self, sock: trio.socket.SocketType, route: Route) -> None:
        assert self._nursery is not None
        warned: float | None = None
        someone_waits = False
        while True:
            try:
                accepted, peer = await sock.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY:  # the peer gave up before we got to it
                    continue
                if (own := own_exhaustion(exc)) is None:
                    raise
                if not someone_waits:  # (accept() fails so even when no one waits: wait for one first)
                    await trio.lowlevel.wait_readable(sock)
                    someone_waits = True
                    continue
                self.metrics.resource_exhausted.labels(own.resource).inc()
                now = trio.current_time()
                quiet = warned is not None and now - warned < ACCEPT_WARNING_EVERY
                log.log(
                    logging.DEBUG if quiet else logging.WARNING, "cannot accept on %s for now: %s; trying again every %gs",
                    route.listen, own, ACCEPT_CAPACITY_PAUSE,
                )
                warned = warned if quiet else now
                await trio.sleep(ACCEPT_CAPACITY_PAUSE)
                continue
            someone_waits = False
            accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            worker = socket.socket(accepted.family, accepted.type, accepted.proto, fileno=accepted.detach())
            self._nursery.start_soon(self._open_pair, worker, _address(peer), route)

    async def shutdown(self, grace_period: float) -> None:
        """Stop accepting and stop handing out jobs, then wait up to `grace_period` seconds
        for running jobs and held retries to finish. What is left when this returns is
        handed back to gearmand when the caller closes the connections: nothing is lost."""
        self.drain.start()
        self._accepting.cancel()
        log.info(
            "draining: no new connections or jobs; waiting up to %gs for %d running and %d held jobs",
            grace_period, self._running_total(), self.retrier.holding,
        )
        with trio.move_on_after(grace_period):
            while self._running_total() or self.retrier.holding:
                await trio.sleep(DRAIN_POLL)
        if self._running_total() or self.retrier.holding:
            log.warning(
                "grace period over: %d running and %d held jobs handed back to gearmand",
                self._running_total(), self.retrier.holding,
            )
        else:
            log.info("drained: every job finished")

    def _running_total(self) -> int:
        return sum(self.metrics.running.values())

    # -- a new worker

    async def _open_pair(self, worker: socket.socket, peer: str, route: Route) -> None:
        name = f"peer {peer} (via {route.listen} to gearmand {route.upstream})"
        try:
            upstream = await self._connect_socket(route)
        except (OSError, trio.TooSlowError) as exc:
            pair_logger.warning("%s: closed: %s", name, cannot_connect(exc))
            worker.close()
            return
        try:
            self._start_pair(name, worker, peer, upstream, route)
        except Exception:  # (a task of the process's nursery: nothing may escape it)
            pair_logger.exception("%s: closed: internal error", name)
            worker.close()
            upstream.close()

    def _start_pair(self, name: str, worker: socket.socket, peer: str, upstream: socket.socket, route: Route) -> None:
        assert self.plane is not None
        session = Session(
            f"{upstream.getsockname()[1]}->{route.upstream}", self.config.max_packet_size,
            retrier=self.retrier, route=route, metrics=self.metrics, traits=self._traits[route], name=name, drain=self.drain,
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
            log.exception("internal error handling %r", item)
            if isinstance(item, Connect | PairTimer | Ended):
                item.pair.fail_internally("internal error in the control plane")

    async def execute(self, actions: Sequence[Action[UpstreamLink, Route]]) -> None:
        """What the Retrier asks for in answer to the retry connection."""
        self.perform(actions)

    def perform(self, items: Sequence[Posted | Action[UpstreamLink, Route]]) -> None:
        assert self._nursery is not None
        for item in items:
            self._perform(item, self._nursery)

    def _perform(self, item: Posted | Action[UpstreamLink, Route], nursery: trio.Nursery) -> None:
        """The control plane's one interpreter: what pairs post, and the Retrier's actions
        outside any pair's own event (its timers, the retry connection, an operator)."""
        if type(item) is Wakeup:
            self._timers.call_later(item.delay, partial(self._retry_timer, item))
        elif type(item) is RecheckBudget:
            self._timers.call_later(item.delay, partial(self._recheck, item))
        elif type(item) is Submit:
            self._retry_client(item.route).submit(item)
        elif type(item) is SendUpstream or type(item) is Released:
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
        it has ended: gearmand requeued what its connections owned)."""
        if (pair := self.pairs.of(action.owner)) is not None:
            pair.execute(pair.session.deliver(action))

    async def _connect_link(self, connect: Connect) -> None:
        """Move a worker to a fresh gearmand connection (see Session: CANT_DO while holding)."""
        pair = connect.pair
        try:
            sock = await self._connect_socket(pair.route)
        except (OSError, trio.TooSlowError) as exc:
            return pair.link_failed(connect.link, cannot_connect(exc, fresh=True))
        with self._supervised("move to a fresh gearmand connection", [connect.link]):
            pair.link_connected(connect.link, sock)

    def _retry_timer(self, wakeup: Wakeup) -> None:
        what = f"retry timer of {self.retrier.describe(wakeup.key)}"
        with self._supervised(what, self.retrier.owners(key=wakeup.key)):
            self.perform(self.retrier.timer_fired(wakeup.key, wakeup.wait, trio.current_time()))

    def _recheck(self, recheck: RecheckBudget) -> None:
        function = recheck.function.decode("utf-8", "replace")
        with self._supervised(f"retry budget of {function}", self.retrier.owners(function=recheck.function)):
            self.perform(self.retrier.budget_recheck(recheck.function, trio.current_time()))

    def _pair_timer_fired(self, key: tuple[Pair, Timer]) -> None:
        del self._pair_timers[key]
        pair, timer = key
        try:
            pair.timer_fired(timer)
        except Exception:  # (a timer of the process: nothing may escape it but this pair)
            log.exception("%s: internal error in its %s timer", pair.name, timer.value)
            pair.fail_internally(f"internal error in its {timer.value} timer")

    def _ejected_workers(self) -> dict[bytes, int]:
        """Workers ejected now, by the function of the failure that ejected them (at scrape
        time, from each Session's Ejection: the step that counts an ejection starts it, so
        no scrape sees one without the other)."""
        ejected: collections.Counter[bytes] = collections.Counter()
        for pair in self.pairs:
            if pair.session.ejection.active:
                ejected[pair.session.ejection.function] += 1
        return ejected

    def _timer_failed(self, exc: Exception) -> None:
        log.error("internal error in a timer", exc_info=exc)

    @contextlib.contextmanager
    def _supervised(self, what: str, owners: list[UpstreamLink]) -> Iterator[None]:
        """A background task's unexpected error must not take the process down: it is logged
        with the connections it concerns, and their pairs close, so gearmand requeues their
        jobs; everything else serves on."""
        try:
            yield
        except Exception:
            pairs = list(dict.fromkeys(pair for owner in owners if (pair := self.pairs.of(owner)) is not None))
            log.exception("%s: internal error; closing %s", what, "; ".join(p.name for p in pairs) or "no connection")
            for pair in pairs:
                pair.fail_internally(f"internal error in the {what}")

    async def _keep_running(self, what: str, task: Callable[[], Awaitable[None]]) -> None:
        """Run a task that serves the whole process again whenever it fails unexpectedly."""
        while True:
            try:
                await task()
                return
            except Exception:
                log.exception("%s: internal error; starting it again in %gs", what, RESTART_PAUSE)
            await trio.sleep(RESTART_PAUSE)

    # -- connecting to gearmand

    async def connect(self, route: Route) -> Connection:
        """A new connection to the route's gearmand for trio code; failures are counted."""
        return Connection(await self._connect_socket(route))

    async def _connect_socket(self, route: Route) -> socket.socket:
        """Raises limits.ResourceExhausted when gproxy's own host, not gearmand, is to blame:
        counted as such, and gearmand's metrics stay as they are."""
        up = self.metrics.upstream_up.labels(str(route.upstream))
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(route.upstream.host, route.upstream.port)
        except (OSError, trio.TooSlowError) as exc:
            if (own := own_exhaustion(exc)) is not None:
                self.metrics.resource_exhausted.labels(own.resource).inc()
                raise own from exc
            self.metrics.upstream_connect_errors.inc()
            up.set(0)
            raise
        up.set(1)
        sock = stream.socket  # TCP_NODELAY, set by trio, stays on
        upstream = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        try:
            set_keepalive(upstream, self.config.upstream_keepalive)  # a gearmand gone silent ends it
        except OSError:
            upstream.close()
            raise
        return upstream

    def _retry_client(self, route: Route) -> RetryClient:
        client = self._retry_clients.get(route)
        if client is None:
            assert self._nursery is not None
            keepalive = self.config.upstream_keepalive  # (a hung gearmand is noticed as soon as a vanished one)
            client = self._retry_clients[route] = RetryClient(
                route, self.retrier, partial(self.connect, route), self.execute, self.config.max_packet_size,
                self.metrics, answer_wait=keepalive.idle, echo_wait=keepalive.interval * keepalive.count,
            )
            self._nursery.start_soon(self._keep_running, f"retry client to gearmand {route.upstream}", client.run)
        return client


def _address(peer: tuple[str, int]) -> str:
    host, port, *_ = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
