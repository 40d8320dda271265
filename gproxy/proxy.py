"""The trio shell: listeners, upstream connections per downstream connection, byte pumps.

All protocol decisions are made by Session and Retrier (pure); this module only moves bytes,
executes their actions, keeps a downstream connection and its upstream ones alive and dead
together, and turns every failure of one pair into one log line and a closed pair, never
into a crashed proxy.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import trio

from .config import Address, Config, Route
from .connection import Connection
from .http_endpoint import bind_http, serve_http
from .jobs import TrackedJob
from .memory import Trimmer
from .metrics import Metrics
from .protocol import ProtocolError
from .retry import RecheckBudget, Released, Retrier, SendUpstream, Submit, Wakeup
from .retry_client import RetryClient
from .session import CloseUpstream, Command, OpenUpstream, SendDownstream, ServerTraits, Session, UpstreamLink

log = logging.getLogger("gproxy.proxy")

RECEIVE_SIZE = 65536
CONNECT_TIMEOUT = 5.0
"""Seconds to reach gearmand before the downstream connection is refused."""
READY_TIMEOUT = 2.0
"""Seconds a readiness probe waits for gearmand (probes themselves time out quickly)."""
ACCEPT_CAPACITY_PAUSE = 0.1
"""Seconds to wait when accept() fails for want of file descriptors or memory."""
_ACCEPT_CAPACITY: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY: Final = {
    errno.ECONNABORTED, errno.EPERM, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
}
HALF_CLOSE_LINGER = 10.0
"""After one side closes, seconds the other may take to finish before the pair is cut."""
DRAIN_POLL = 0.05
"""While draining, how often to look whether the last job has finished."""
RESTART_PAUSE = 1.0
"""Seconds before a process-wide task that failed unexpectedly is started again."""


@dataclass(slots=True)
class _Upstream:
    connection: Connection
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass(slots=True, eq=False)
class _Pair:
    """A downstream connection with its upstream ones, and why they ended: the first reason
    wins, and is logged once."""

    name: str
    session: Session
    downstream: Connection
    cancel_scope: trio.CancelScope
    nursery: trio.Nursery | None = None
    upstreams: dict[UpstreamLink, _Upstream] = field(default_factory=dict)
    reason: str | None = None
    level: int = logging.DEBUG
    eofs: int = 0
    released: trio.Event = field(default_factory=trio.Event)
    worker_lost: str | None = None
    """Why the worker's connection broke (a reset, a failed send), if it did: it has left,
    as if it had closed, and its connections that hold retries stay open for them."""

    @property
    def worker_gone(self) -> bool:
        """The worker left while retries were held: their connections stay open for them."""
        return self.session.worker_gone

    def fail(self, reason: str, level: int = logging.WARNING) -> None:
        """Close the pair. The first reason is the one logged, unless a graver one follows
        (bad input after the other side closed is still a WARNING, like its metric)."""
        if self.reason is None or level > self.level:
            self.reason, self.level = reason, level
        self.cancel_scope.cancel()

    def closing(self, reason: str) -> None:
        """One side closed: the other gets a grace period to finish, then the pair is cut."""
        self.eofs += 1
        if self.eofs == 1:
            if self.reason is None:  # a refusal that came first keeps its reason
                self.reason = reason
            self.cancel_scope.deadline = min(
                self.cancel_scope.deadline, trio.current_time() + HALF_CLOSE_LINGER
            )


class Proxy:
    """Serves every configured route; `tracked_jobs()` shows what workers hold right now."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics(max_functions=config.metrics_max_functions)
        self.metrics.connections = self._connection_counts
        self.retrier: Retrier[UpstreamLink, Route] = Retrier(config.policies, metrics=self.metrics)
        self.metrics.budget_balance = lambda: self.retrier.budget_balances(
            trio.current_time(), self.metrics.labelled()
        )
        self.listen_addresses: list[Address] = []
        self.metrics_address: Address | None = None
        self.draining = False
        self._accepting = trio.CancelScope()
        self._bound: list[tuple[Route, list[trio.SocketListener]]] = []
        self._http: list[trio.SocketListener] = []
        self._pairs: set[_Pair] = set()
        self._owners: dict[UpstreamLink, _Pair] = {}
        self._retry_clients: dict[Route, RetryClient] = {}
        self._traits: dict[Route, ServerTraits] = {route: ServerTraits() for route in config.routes}
        self._trimmer = Trimmer()
        self._nursery: trio.Nursery | None = None

    async def ready(self) -> tuple[bool, str]:
        """Ready when every route's gearmand accepts a connection now (and not shutting down)."""
        if self.draining:
            return (False, "draining: shutting down")
        problems = []
        for route in self.config.routes:
            try:
                with trio.fail_after(READY_TIMEOUT):
                    (await self.connect(route)).close()
            except (OSError, trio.TooSlowError) as exc:
                problems.append(f"gearmand {route.upstream} unreachable: {exc or 'timed out'}")
        return (not problems, "; ".join(problems) or "ready")

    def _connection_counts(self) -> dict[str, int]:
        upstream = len(self._owners) + sum(client.connected for client in self._retry_clients.values())
        return {"worker": len(self._pairs), "upstream": upstream}

    def tracked_jobs(self) -> list[TrackedJob]:
        return [job for pair in self._pairs for job in pair.session.tracked_jobs()]

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
        """Listen (unless `listen()` was awaited already), report `self` as started, serve."""
        if not self._bound:
            await self.listen()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._trimmer.run)
            if self._http:
                await nursery.start(serve_http, self._http, self.metrics, self.ready)
            await nursery.start(self._accept)
            task_status.started(self)

    async def _accept(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on every route until shutdown; connections live on in the outer nursery."""
        with self._accepting:
            async with trio.open_nursery() as listeners:
                for route, bound in self._bound:
                    for listener in bound:
                        listeners.start_soon(self._accept_on, listener, route)
                task_status.started()

    async def _accept_on(self, listener: trio.SocketListener, route: Route) -> None:
        """trio.serve_listeners, keeping the peer's address that accept() returns. When
        accepting stops (a drain), the listener closes: new workers are refused at once."""
        assert self._nursery is not None
        with listener.socket:
            await self._accept_loop(listener.socket, route)

    async def _accept_loop(self, sock: trio.socket.SocketType, route: Route) -> None:
        assert self._nursery is not None
        while True:
            try:
                accepted, peer = await sock.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY:  # the peer gave up before we got to it
                    continue
                if exc.errno not in _ACCEPT_CAPACITY:
                    raise
                log.warning("cannot accept on %s for now (%s): trying again shortly", route.listen, exc)
                await trio.sleep(ACCEPT_CAPACITY_PAUSE)
                continue
            self._nursery.start_soon(self._handle, Connection.accepted(accepted, peer), route)

    async def shutdown(self, grace_period: float) -> None:
        """Stop accepting and stop handing out jobs, then wait up to `grace_period` seconds
        for running jobs and held retries to finish. What is left when this returns is
        handed back to gearmand when the caller closes the connections: nothing is lost."""
        self.draining = True
        self._accepting.cancel()
        for pair in self._pairs:
            pair.session.draining = True
        log.info(
            "draining: no new connections or jobs; waiting up to %gs for %d running and %d held jobs",
            grace_period, self._running_total(), len(self.retrier.held),
        )
        with trio.move_on_after(grace_period):
            while self._running_total() or self.retrier.held:
                await trio.sleep(DRAIN_POLL)
        if self._running_total() or self.retrier.held:
            log.warning(
                "grace period over: %d running and %d held jobs handed back to gearmand",
                self._running_total(), len(self.retrier.held),
            )
        else:
            log.info("drained: every job finished")

    def _running_total(self) -> int:
        return sum(self.metrics.running.values())

    # -- one downstream connection

    async def _handle(self, downstream: Connection, route: Route) -> None:
        name = f"peer {downstream.peer} (via {route.listen} to gearmand {route.upstream})"
        try:
            upstream = await self.connect(route)
        except (OSError, trio.TooSlowError) as exc:
            log.warning("%s: closed: gearmand unreachable: %s", name, exc or "timed out")
            downstream.close()
            return
        session = Session(
            f"{upstream.sock.getsockname()[1]}->{route.upstream}", self.config.max_packet_size,
            retrier=self.retrier, route=route, metrics=self.metrics, traits=self._traits[route],
        )
        session.draining = self.draining  # accepted before a drain began, served after
        pair = _Pair(name, session, downstream, trio.CancelScope())
        self._pairs.add(pair)
        try:
            with pair.cancel_scope:
                async with trio.open_nursery() as nursery:
                    pair.nursery = nursery
                    self._attach(pair, session.current, upstream)
                    nursery.start_soon(self._downstream_pump, pair)
        except Exception:
            log.exception("%s: closed: internal error", name)
        else:
            log.log(pair.level, "%s: closed: %s", name, pair.reason or "both sides finished")
        finally:
            self._pairs.discard(pair)
            for link in list(pair.upstreams):
                self._detach(pair, link)
            downstream.close()
            self._trimmer.soon()  # what the pair's buffers and jobs held is free now

    def _attach(self, pair: _Pair, link: UpstreamLink, connection: Connection) -> None:
        assert pair.nursery is not None
        upstream = pair.upstreams[link] = _Upstream(connection)
        self._owners[link] = pair
        pair.nursery.start_soon(self._upstream_pump, pair, link, upstream)

    def _detach(self, pair: _Pair, link: UpstreamLink) -> None:
        """`link`'s connection closes: gearmand requeues whatever it still owns."""
        upstream = pair.upstreams.pop(link, None)
        if upstream is None:
            return
        self._owners.pop(link, None)
        owed = pair.session.link_closed(link)
        upstream.connection.close()
        if owed and pair.nursery is not None and not pair.cancel_scope.cancel_called:
            pair.nursery.start_soon(self._run, pair, owed)
        if pair.worker_gone and not self._holds_retries(pair):
            pair.released.set()  # nothing left to wait for, even if it was lost, not finished

    async def _downstream_pump(self, pair: _Pair) -> None:
        """Worker to gearmand, until the worker leaves; then what it left behind is settled."""
        session, source = pair.session, pair.downstream
        while pair.worker_lost is None:
            try:
                data = await source.receive(RECEIVE_SIZE)
            except OSError as exc:
                self._lose_worker(pair, exc)
                break
            if not data:
                break
            try:
                commands = session.from_downstream(data, trio.current_time())
            except ProtocolError as exc:
                return self._refuse(pair, exc.reason, f"protocol error from peer: {exc}")
            await self._run(pair, commands)
        if pair.worker_lost is None and session.downstream.buffered:
            return self._refuse(pair, "mid_packet", _mid_packet("peer", session.downstream.buffered))
        if self._holds_retries(pair):
            await self._keep_for_held_retries(pair)
        if pair.worker_lost is not None:
            return pair.fail(pair.worker_lost, logging.INFO)
        pair.closing("peer closed the connection")
        for upstream in list(pair.upstreams.values()):
            with contextlib.suppress(OSError):
                upstream.connection.send_eof()

    def _lose_worker(self, pair: _Pair, exc: BaseException) -> None:
        """The worker's connection broke. It has left, as much as if it had closed, and is
        handled the same way (by the downstream pump, which this wakes): connections that
        hold retries stay open; only then does the pair close."""
        if pair.worker_lost is None:
            pair.worker_lost = f"peer connection lost: {exc}"
            with contextlib.suppress(OSError):
                pair.downstream.sock.shutdown(socket.SHUT_RD)

    def _holds_retries(self, pair: _Pair) -> bool:
        return any(self.retrier.holds(link) for link in pair.session.links)

    def _refuse(self, pair: _Pair, reason: str, message: str) -> None:
        """Bad input: counted by reason, and the pair closes with one warning."""
        self.metrics.protocol_errors.labels(reason).inc()
        pair.fail(message)

    async def _keep_for_held_retries(self, pair: _Pair) -> None:
        """The worker left, but closing its gearmand connections would requeue the jobs gproxy
        holds for retries: keep those open, retry what the worker was still running on them
        (as gearmand would have), and return once nothing is held."""
        session = pair.session
        pair.released = trio.Event()
        log.info("%s: worker left while retries are held; keeping their gearmand connections", pair.name)
        commands = session.worker_left(trio.current_time())
        for link in session.links:
            if not self.retrier.holds(link) and (upstream := pair.upstreams.get(link)) is not None:
                with contextlib.suppress(OSError):
                    upstream.connection.send_eof()  # its running jobs requeue natively
        await self._run(pair, commands)
        await pair.released.wait()

    async def _upstream_pump(self, pair: _Pair, link: UpstreamLink, upstream: _Upstream) -> None:
        """gearmand to the worker on one of the pair's upstream connections."""
        session, connection = pair.session, upstream.connection
        try:
            with upstream.scope:
                while True:
                    try:
                        data = await connection.receive(RECEIVE_SIZE)
                    except OSError as exc:
                        if link is session.current and not pair.worker_gone:
                            pair.fail(f"gearmand connection lost: {exc}", logging.INFO)
                        return
                    if not data:
                        break
                    try:
                        commands = session.from_upstream(link, data, trio.current_time())
                    except ProtocolError as exc:
                        return self._refuse(pair, exc.reason, f"protocol error from gearmand: {exc}")
                    await self._run(pair, commands)
                if link.framer.buffered:
                    return self._refuse(pair, "mid_packet", _mid_packet("gearmand", link.framer.buffered))
                if link is session.current and not pair.worker_gone:
                    pair.closing("gearmand closed the connection")
                    with contextlib.suppress(OSError):
                        pair.downstream.send_eof()
        finally:
            # The connection is gone, so is everything gearmand had assigned through it (it
            # requeues those jobs): their holds end now, not when the pair is done lingering.
            self._detach(pair, link)

    # -- what the pure parts ask for

    async def execute(self, actions: Sequence[Command]) -> None:
        """What the Retrier asks for outside any pair's own events (timers, retry replies)."""
        await self._run(None, actions)

    async def _run(self, pair: _Pair | None, commands: Sequence[Command]) -> None:
        """Carry out commands in order; `pair`: the one whose event they answer, if any."""
        for action in commands:
            if type(action) is SendDownstream:
                assert pair is not None
                if pair.worker_lost is None and not pair.worker_gone:
                    try:
                        await pair.downstream.send_all(action.data)
                    except OSError as exc:
                        self._lose_worker(pair, exc)  # its links go on for their held jobs
            elif type(action) is Wakeup:
                assert self._nursery is not None
                self._nursery.start_soon(self._wake, action)
            elif type(action) is RecheckBudget:
                assert self._nursery is not None
                self._nursery.start_soon(self._recheck, action)
            elif type(action) is SendUpstream:
                owner = self._owners.get(action.owner)
                upstream = owner.upstreams.get(action.owner) if owner is not None else None
                try:
                    if upstream is None:
                        raise OSError("closed")
                    await upstream.connection.send_all(action.data)
                except OSError as exc:
                    # The worker's own link lost: the pair ends. Any other loss is that
                    # link's own pump's to report.
                    if pair is not None and action.owner is pair.session.current and not pair.worker_gone:
                        pair.fail(f"gearmand connection lost: {exc}", logging.INFO)
            elif type(action) is Released:
                if (pair := self._owners.get(action.owner)) is not None:
                    self._settle(pair, action.owner)
            elif type(action) is Submit:
                self._retry_client(action.route).submit(action)
            elif type(action) is OpenUpstream:
                assert pair is not None
                await self._open_upstream(pair, action)
            elif type(action) is CloseUpstream and (pair := self._owners.get(action.link)) is not None:
                pair.upstreams[action.link].scope.cancel()

    def _settle(self, pair: _Pair, link: UpstreamLink) -> None:
        """`link` holds nothing more: a retired link may close; a departed worker's pair may end."""
        if pair.session.released(link) and link in pair.upstreams:
            pair.upstreams[link].scope.cancel()
        if pair.worker_gone and not self._holds_retries(pair):
            pair.released.set()

    async def _open_upstream(self, pair: _Pair, action: OpenUpstream) -> None:
        """Move a worker to a fresh gearmand connection (see Session: CANT_DO while holding)."""
        try:
            connection = await self.connect(pair.session.route)
            await connection.send_all(action.replay)
        except (OSError, trio.TooSlowError) as exc:
            return pair.fail(f"gearmand unreachable for a fresh connection: {exc or 'timed out'}")
        log.info("%s: moved to a fresh gearmand connection; the old one keeps its held jobs", pair.name)
        self._attach(pair, action.link, connection)

    async def _wake(self, wakeup: Wakeup) -> None:
        await trio.sleep(wakeup.delay)
        what = f"retry timer of {self.retrier.describe(wakeup.key)}"
        with self._supervised(what, self.retrier.owners(key=wakeup.key)):
            await self.execute(self.retrier.timer_fired(wakeup.key, wakeup.wait, trio.current_time()))

    async def _recheck(self, recheck: RecheckBudget) -> None:
        await trio.sleep(recheck.delay)
        function = recheck.function.decode("utf-8", "replace")
        with self._supervised(f"retry budget of {function}", self.retrier.owners(function=recheck.function)):
            await self.execute(self.retrier.budget_recheck(recheck.function, trio.current_time()))

    @contextlib.contextmanager
    def _supervised(self, what: str, owners: list[UpstreamLink]) -> Iterator[None]:
        """A background task's unexpected error must not take the process down: it is logged
        with the connections it concerns, and their pairs close, so gearmand requeues their
        jobs; everything else serves on."""
        try:
            yield
        except Exception:
            pairs = list(dict.fromkeys(pair for owner in owners if (pair := self._owners.get(owner)) is not None))
            log.exception("%s: internal error; closing %s", what, "; ".join(p.name for p in pairs) or "no connection")
            for pair in pairs:
                pair.fail(f"internal error in the {what}", logging.ERROR)

    async def _keep_running(self, what: str, task: Callable[[], Awaitable[None]]) -> None:
        """Run a task that serves the whole process again whenever it fails unexpectedly."""
        while True:
            try:
                await task()
                return
            except Exception:
                log.exception("%s: internal error; starting it again in %gs", what, RESTART_PAUSE)
            await trio.sleep(RESTART_PAUSE)

    async def connect(self, route: Route) -> Connection:
        """A new connection to the route's gearmand; failures are counted and raised."""
        up = self.metrics.upstream_up.labels(str(route.upstream))
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(route.upstream.host, route.upstream.port)
        except (OSError, trio.TooSlowError):
            self.metrics.upstream_connect_errors.inc()
            up.set(0)
            raise
        up.set(1)
        return Connection.from_stream(stream)

    def _retry_client(self, route: Route) -> RetryClient:
        client = self._retry_clients.get(route)
        if client is None:
            assert self._nursery is not None
            client = self._retry_clients[route] = RetryClient(
                route, self.retrier, partial(self.connect, route), self.execute, self.config.max_packet_size,
                bad_input=lambda reason: self.metrics.protocol_errors.labels(reason).inc(),
            )
            self._nursery.start_soon(self._keep_running, f"retry client to gearmand {route.upstream}", client.run)
        return client


def _mid_packet(side: str, buffered: int) -> str:
    return f"{side} closed mid-packet ({buffered} bytes of an unfinished frame)"
