"""The accept side: every route's listeners, accepting workers, and opening their pairs.

A worker accepted on a route with `listen_tls` shakes hands first (a worker that fails to
is closed with one WARNING naming it and why, and counted in
gproxy_tls_handshake_failures_total; one that closes before sending a byte, a port probe, is
no failure). It is connected to the route's gearmand before it becomes a pair; a worker
whose gearmand cannot be reached is closed with its reason, as a pair's close line. accept()
failing for want of gproxy's own file descriptors or memory is counted, warned of at most
once a minute, and tried again shortly; workers wait in the backlog meanwhile. A drain stops
accepting and closes the listeners, so new workers are refused at once.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import Final

import trio

from .config import Address, Config, Route
from .core.fields import about, pair_fields, pair_name
from .core.limits import cannot_connect, own_exhaustion
from .core.metrics import Metrics
from .core.tls_refusals import ClosedBeforeHandshake, HandshakeFailed
from .dialer import Dialer
from .handshake import Transport, close_with_alert, handshake

log = logging.getLogger("gproxy.control")
pair_logger = logging.getLogger("gproxy.pair")
"""(The close line of a worker that never became a pair: where every pair's line is.)"""

ACCEPT_CAPACITY_PAUSE = 0.1
"""Seconds to wait when accept() fails for want of file descriptors or memory."""
ACCEPT_WARNING_EVERY = 60.0
"""Seconds between two WARNINGs that accept() fails so (each failure is counted)."""
_ACCEPT_RETRY: Final = {
    errno.ECONNABORTED, errno.EPERM, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
}

StartPair = Callable[[dict[str, str], Transport, str, Transport, Route], None]
"""Make a pair of (its log fields, the worker's connection, its address, gearmand's
connection, route) and start it."""


class Acceptor:
    """Listens on `routes`; each worker accepted, once connected to gearmand, goes to
    `start_pair`."""

    def __init__(
        self, running: Callable[[], Config], metrics: Metrics, dialer: Dialer, start_pair: StartPair,
    ) -> None:
        self._running, self._metrics, self._dialer, self._start_pair = running, metrics, dialer, start_pair
        self._routes = running().routes
        self.addresses: list[Address] = []
        """Where each route listens, in order (its port, if it asked for port 0)."""
        self._bound: list[tuple[Route, list[trio.SocketListener]]] = []
        self._accepting = trio.CancelScope()

    @property
    def bound(self) -> bool:
        return bool(self._bound)

    async def listen(self) -> None:
        """Bind every route's listen address; an OSError here (address in use) is plain, not
        wrapped in an exception group, so the command can report it in one line."""
        for route in self._routes:
            listeners = await trio.open_tcp_listeners(route.listen.port, host=route.listen.host)
            host, port, *_ = listeners[0].socket.getsockname()
            self.addresses.append(Address(host, port))
            log.info(
                "listening on %s, proxying to gearmand %s", Address(host, port), route.upstream,
                extra=about(via=str(Address(host, port)), upstream=str(route.upstream)),
            )
            self._bound.append((route, listeners))

    def stop(self) -> None:
        """No more workers: the listeners close."""
        self._accepting.cancel()

    async def run(self, pairs_nursery: trio.Nursery, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on every route until stopped; each worker is opened in `pairs_nursery`."""
        with self._accepting:
            async with trio.open_nursery() as listeners:
                for route, bound in self._bound:
                    for listener in bound:
                        listeners.start_soon(self._accept_on, listener, route, pairs_nursery)
                task_status.started()

    async def _accept_on(self, listener: trio.SocketListener, route: Route, pairs_nursery: trio.Nursery) -> None:
        """trio.serve_listeners, keeping the peer's address that accept() returns. When
        accepting stops (a drain), the listener closes: new workers are refused at once."""
        with listener.socket:
            await self._accept_loop(listener.socket, route, pairs_nursery)

    async def _accept_loop(self, sock: trio.socket.SocketType, route: Route, pairs_nursery: trio.Nursery) -> None:
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
                self._metrics.resource_exhausted.labels(own.resource).inc()
                now = trio.current_time()
                quiet = warned is not None and now - warned < ACCEPT_WARNING_EVERY
                log.log(
                    logging.DEBUG if quiet else logging.WARNING, "cannot accept on %s for now: %s; trying again every %gs",
                    route.listen, own, ACCEPT_CAPACITY_PAUSE,
                    extra=about(via=str(route.listen), reason=str(own), seconds=ACCEPT_CAPACITY_PAUSE),
                )
                warned = warned if quiet else now
                await trio.sleep(ACCEPT_CAPACITY_PAUSE)
                continue
            someone_waits = False
            accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            worker = socket.socket(accepted.family, accepted.type, accepted.proto, fileno=accepted.detach())
            pairs_nursery.start_soon(self._open_pair, worker, _address(peer), route)

    async def _open_pair(self, worker: socket.socket, peer: str, route: Route) -> None:
        fields = pair_fields(peer, _address(worker.getsockname()), str(route.upstream))
        name = pair_name(fields)
        try:
            await self._open(worker, peer, route, fields, name)
        except Exception:  # (a task of the process's nursery: a bug costs this worker, nothing more)
            pair_logger.exception("%s: closed: internal error", name, extra=about(**fields, reason="internal error"))
            worker.close()

    async def _open(self, worker: socket.socket, peer: str, route: Route, fields: dict[str, str], name: str) -> None:
        """Shake hands (TLS), reach gearmand, start the pair; each failure one close line."""
        try:
            secured = await self._secure(worker, route)
        except HandshakeFailed as exc:
            self._refused(name, fields, route, exc)
            close_with_alert(worker, exc)
            return
        try:
            upstream = await self._dialer.transport(route)
        except (OSError, trio.TooSlowError) as exc:
            pair_logger.warning(
                "%s: closed: %s", name, cannot_connect(exc),
                extra=about(**fields, reason=cannot_connect(exc)),
            )
            worker.close()
            return
        try:
            self._start_pair(fields, secured, peer, upstream, route)
        except Exception:
            upstream.sock.close()
            raise

    async def _secure(self, worker: socket.socket, route: Route) -> Transport:
        """The worker's connection, after its TLS handshake if its route has `listen_tls`."""
        if (tls := self._running().tls_of(route).listen) is None:
            return Transport(worker)
        return Transport(worker, await handshake(worker, tls.context))

    def _refused(self, name: str, fields: dict[str, str], route: Route, exc: HandshakeFailed) -> None:
        """The worker's handshake failed: one line (a WARNING, unless it sent nothing at all)."""
        reason = f"TLS handshake failed: {exc}"
        if isinstance(exc, ClosedBeforeHandshake):
            pair_logger.info("%s: closed: %s", name, exc, extra=about(**fields, reason=str(exc)))
            return
        self._metrics.tls_handshake_failures.labels("downstream", str(route.listen)).inc()
        pair_logger.warning("%s: closed: %s", name, reason, extra=about(**fields, reason=reason))


def _address(peer: tuple[str, int]) -> str:
    host, port, *_ = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
