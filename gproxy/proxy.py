"""The trio shell: listeners, one upstream connection per downstream connection, byte pumps.

All protocol decisions are made by Session (pure); this module only moves bytes, keeps the
two connections of a pair alive and dead together, and turns every failure of one pair into
one log line and a closed pair, never into a crashed proxy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from collections import Counter
from dataclasses import dataclass, field

import trio

from .config import Address, Config, Route
from .connection import Connection
from .jobs import TrackedJob
from .protocol import Framer, PacketType, ProtocolError
from .retry import Action, Released, Retrier, SendUpstream, Submit, Wakeup
from .session import Session
from .submitter import HELLO, Created, JobPacket, Refused, Submitter

log = logging.getLogger("gproxy.proxy")

RECEIVE_SIZE = 65536
CONNECT_TIMEOUT = 5.0
"""Seconds to reach gearmand before the downstream connection is refused."""
HALF_CLOSE_LINGER = 10.0
"""After one side closes, seconds the other may take to finish before the pair is cut."""


@dataclass(slots=True)
class _Pair:
    """One downstream connection and its upstream one; why they ended: the first reason wins,
    and is logged once."""

    name: str
    cancel_scope: trio.CancelScope
    upstream: Connection
    reason: str | None = None
    level: int = logging.DEBUG
    eofs: int = 0
    worker_gone: bool = False
    """The worker left while the upstream connection held retries: it stays open for them."""
    released: trio.Event = field(default_factory=trio.Event)

    def fail(self, reason: str, level: int = logging.WARNING) -> None:
        if self.reason is None:
            self.reason, self.level = reason, level
        self.cancel_scope.cancel()


class Proxy:
    """Serves every configured route; `tracked_jobs()` shows what workers hold right now."""

    def __init__(self, config: Config, retrier: Retrier | None = None) -> None:
        self.config = config
        self.retrier = retrier or Retrier(config.policies)
        self.listen_addresses: list[Address] = []
        self._pairs: dict[Session, _Pair] = {}
        self._bound: list[tuple[Route, list[trio.SocketListener]]] = []
        self._running: Counter[bytes] = Counter()
        self._retry_clients: dict[Route, RetryClient] = {}
        self._nursery: trio.Nursery | None = None

    def tracked_jobs(self) -> list[TrackedJob]:
        return [job for session in self._pairs for job in session.jobs]

    async def listen(self) -> None:
        """Bind every route's listen address; an OSError here (address in use) is plain, not
        wrapped in an exception group, so the command can report it in one line."""
        for route in self.config.routes:
            listeners = await trio.open_tcp_listeners(route.listen.port, host=route.listen.host)
            host, port, *_ = listeners[0].socket.getsockname()
            self.listen_addresses.append(Address(host, port))
            log.info("listening on %s, proxying to gearmand %s", Address(host, port), route.upstream)
            self._bound.append((route, listeners))

    async def serve(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (unless `listen()` was awaited already), report `self` as started, serve."""
        if not self._bound:
            await self.listen()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for route, listeners in self._bound:
                await nursery.start(
                    trio.serve_listeners, lambda stream, r=route: self._handle(stream, r), listeners
                )
            task_status.started(self)

    async def _handle(self, stream: trio.SocketStream, route: Route) -> None:
        downstream = Connection.from_stream(stream)
        name = f"peer {downstream.peer} (via {route.listen} to gearmand {route.upstream})"
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                upstream_stream = await trio.open_tcp_stream(route.upstream.host, route.upstream.port)
        except (OSError, trio.TooSlowError) as exc:
            log.warning("%s: closed: gearmand unreachable: %s", name, exc or "timed out")
            downstream.close()
            return
        upstream = Connection.from_stream(upstream_stream)
        session = Session(
            f"{upstream.sock.getsockname()[1]}->{route.upstream}", self.config.max_packet_size,
            retrier=self.retrier, route=route, running=self._running,
        )
        try:
            with trio.CancelScope() as scope:
                pair = self._pairs[session] = _Pair(name, scope, upstream)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        self._pump, pair, session, downstream, upstream, session.downstream,
                        lambda data: session.from_downstream(data, trio.current_time()), "peer",
                    )
                    nursery.start_soon(
                        self._pump, pair, session, upstream, downstream, session.upstream,
                        lambda data: session.from_upstream(data, trio.current_time()), "gearmand",
                    )
        except Exception:
            log.exception("%s: closed: internal error", name)
        else:
            log.log(pair.level, "%s: closed: %s", name, pair.reason or "both sides finished")
        finally:
            del self._pairs[session]
            session.closed()
            self.retrier.owner_lost(session)
            upstream.close()
            downstream.close()

    async def _pump(
        self,
        pair: _Pair,
        session: Session,
        source: Connection,
        sink: Connection,
        framer: Framer,
        transform: Callable[[bytes], bytes],
        source_name: str,
    ) -> None:
        """Move one direction until EOF; the first failure of either direction ends the pair."""
        sink_name = "gearmand" if source_name == "peer" else "peer"
        while True:
            try:
                data = await source.receive(RECEIVE_SIZE)
            except OSError as exc:
                return pair.fail(f"{source_name} connection lost: {exc}", logging.INFO)
            if not data:
                break
            try:
                out = transform(data)
            except ProtocolError as exc:
                return pair.fail(f"protocol error from {source_name}: {exc}")
            if session.actions:
                actions, session.actions = session.actions, []
                await self.execute(actions)
            if out and not pair.worker_gone:
                try:
                    await sink.send_all(out)
                except OSError as exc:
                    return pair.fail(f"{sink_name} connection lost: {exc}", logging.INFO)
        if framer.buffered:
            return pair.fail(
                f"{source_name} closed mid-packet ({framer.buffered} bytes of an unfinished frame)"
            )
        if source_name == "peer" and self.retrier.holds(session):
            # Closing upstream now would make gearmand requeue the held jobs: keep it open,
            # retry what the worker was still running, and close once nothing is held.
            pair.worker_gone, pair.released = True, trio.Event()
            log.info("%s: worker left while retries are held; keeping its gearmand connection", pair.name)
            await self.execute(
                self.retrier.worker_left(session, session.route, session.jobs.released_all(), trio.current_time())
            )
            await pair.released.wait()
        # Mirror the close as a half-close, so replies already on their way still arrive;
        # the other direction then has a grace period to finish before the pair is cut.
        pair.eofs += 1
        if pair.eofs == 1:
            pair.reason = f"{source_name} closed the connection"
            pair.cancel_scope.deadline = min(
                pair.cancel_scope.deadline, trio.current_time() + HALF_CLOSE_LINGER
            )
        try:
            sink.send_eof()
        except OSError:
            pair.cancel_scope.cancel()

    async def execute(self, actions: list[Action]) -> None:
        """Carry out what the Retrier asked for."""
        for action in actions:
            if type(action) is Wakeup:
                assert self._nursery is not None
                self._nursery.start_soon(self._wake, action.key, action.delay)
            elif type(action) is Submit:
                await self._retry_client(action.route).submit(action)
            elif type(action) is SendUpstream:
                pair = self._pairs.get(action.owner)
                if pair is not None:
                    with contextlib.suppress(OSError):  # the pair's own pump reports a lost link
                        await pair.upstream.send_all(action.data)
            elif type(action) is Released:
                if (pair := self._pairs.get(action.owner)) is not None:
                    pair.released.set()

    async def _wake(self, key: int, delay: float) -> None:
        await trio.sleep(delay)
        await self.execute(self.retrier.timer_fired(key, trio.current_time()))

    def _retry_client(self, route: Route) -> RetryClient:
        if route not in self._retry_clients:
            assert self._nursery is not None
            self._retry_clients[route] = RetryClient(self, route, self._nursery)
        return self._retry_clients[route]


class RetryClient:
    """gproxy's own client connection to a route's gearmand, for retry jobs; opened on first
    use, and opened again after a loss (the Retrier then resubmits what was in flight)."""

    def __init__(self, proxy: Proxy, route: Route, nursery: trio.Nursery) -> None:
        self.proxy = proxy
        self.route = route
        self._nursery = nursery
        self._connection: Connection | None = None
        self._submitter = Submitter()
        self._connecting = trio.Lock()

    async def submit(self, action: Submit) -> None:
        try:
            connection = await self._connected()
            await connection.send_all(
                self._submitter.submit(action.key, action.function, action.unique, action.payload)
            )
        except (OSError, trio.TooSlowError) as exc:
            log.warning("retry client to gearmand %s: cannot submit: %s", self.route.upstream, exc or "timed out")
            if action.key is not None:
                await self.proxy.execute(self.proxy.retrier.retry_rejected(action.key, b"gearmand unreachable"))

    async def _connected(self) -> Connection:
        async with self._connecting:
            if self._connection is None:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await trio.open_tcp_stream(self.route.upstream.host, self.route.upstream.port)
                connection = Connection.from_stream(stream)
                self._submitter = Submitter()
                await connection.send_all(HELLO)
                self._connection = connection
                self._nursery.start_soon(self._read, connection)
            return self._connection

    async def _read(self, connection: Connection) -> None:
        retrier, route = self.proxy.retrier, self.route
        try:
            while data := await connection.receive(RECEIVE_SIZE):
                for event in self._submitter.receive(data):
                    if type(event) is JobPacket:
                        actions = retrier.retry_packet(route, event.type, event.args)
                    elif type(event) is Created:
                        actions = retrier.retry_created(event.key, event.handle)
                    else:
                        assert type(event) is Refused
                        actions = retrier.retry_rejected(event.key, event.error)
                    await self.proxy.execute(actions)
            reason = "gearmand closed it"
        except (OSError, ProtocolError) as exc:
            reason = str(exc)
        self._connection = None
        connection.close()
        log.warning("retry client to gearmand %s lost (%s); resubmitting retries in flight", route.upstream, reason)
        await self.proxy.execute(retrier.retry_connection_lost(route))
