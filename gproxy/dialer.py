"""Connecting to a route's gearmand, for every part of the control plane that needs to: a
worker's first connection, a move's fresh one, a readiness probe, the retry clients.

Each connection gets TCP keepalive (a gearmand gone silent ends it), and each failure is
counted where it belongs: gearmand's in gproxy_upstream_up and
gproxy_upstream_connect_errors, gproxy's own (file descriptors, memory) in
gproxy_resource_exhausted, leaving gearmand's metrics as they are.

A route with `upstream_tls` gets a TLS handshake, and then an ECHO round trip before the
connection is anyone's: TLS 1.3 completes the client's handshake before the server has
checked the client's certificate, so a refusal of gproxy's certificate would otherwise
come with the first read, in the middle of a worker's traffic (and a TLS terminator whose
gearmand is gone is found out too). A refusal is counted in
gproxy_tls_handshake_failures_total, and one that lasts holds that gearmand off for a while
(core/tls_refusals.py): not a handshake per worker that tries again.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Final

import trio

from .config import Config, Route
from .connection import Connection, TlsConnection, set_keepalive
from .core.limits import own_exhaustion
from .core.metrics import Metrics
from .core.protocol import REQ, RES, PacketType, build_packet
from .core.tls_refusals import HandshakeFailed, HoldOff, TlsError
from .handshake import Transport, close_with_alert, handshake
from .tls import UpstreamTls

CONNECT_TIMEOUT = 5.0
"""Seconds to reach gearmand (and, with TLS, to shake hands and have an ECHO answered)
before the connection is given up."""
_ECHO_REQ: Final = build_packet(REQ, PacketType.ECHO_REQ, data=b"gproxy: TLS confirmed")
_ECHO_RES: Final = build_packet(RES, PacketType.ECHO_RES, data=b"gproxy: TLS confirmed")


class Dialer:
    """`running`: the config in force (a reload may change a route's TLS)."""

    def __init__(self, metrics: Metrics, running: Callable[[], Config]) -> None:
        self._metrics, self._running = metrics, running
        self._hold_offs: dict[Route, HoldOff] = {}

    def forget_refusals(self) -> None:
        """A reload: the next connection to every gearmand is tried (the config may have
        fixed what was refused)."""
        self._hold_offs.clear()

    async def connect(self, route: Route) -> Connection:
        """A new connection to the route's gearmand for trio code."""
        transport = await self.transport(route)
        if transport.tls is None:
            return Connection(transport.sock)
        return TlsConnection(transport.sock, transport.tls)

    async def transport(self, route: Route) -> Transport:
        """A connected socket for the data plane (with its TLS, if the route has any).
        Raises limits.ResourceExhausted when gproxy's own host, not gearmand, is to blame,
        tls_refusals.HandshakeFailed when TLS is."""
        config = self._running()
        tls = config.tls_of(route).upstream
        hold_off = self._hold_offs.get(route) if tls is not None else None
        if hold_off is not None and (held := hold_off.check(trio.current_time())) is not None:
            raise held
        sock = await self._socket(route, config)
        if tls is None:
            return Transport(sock)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                transport = await self._secure(sock, tls)
        except trio.TooSlowError:
            failure = HandshakeFailed(f"no TLS handshake and ECHO within {CONNECT_TIMEOUT:g}s", lasting=False)
        except HandshakeFailed as exc:
            failure = exc
        except BaseException:  # (cancelled: nobody will close it otherwise)
            sock.close()
            raise
        else:
            self._hold_offs.pop(route, None)
            return transport
        close_with_alert(sock, failure)
        self._refused(route, failure)
        raise failure

    async def _socket(self, route: Route, config: Config) -> socket.socket:
        metrics = self._metrics
        up = metrics.upstream_up.labels(str(route.upstream))
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(route.upstream.host, route.upstream.port)
        except (OSError, trio.TooSlowError) as exc:
            if (own := own_exhaustion(exc)) is not None:
                metrics.resource_exhausted.labels(own.resource).inc()
                raise own from exc
            metrics.upstream_connect_errors.inc()
            up.set(0)
            raise
        up.set(1)
        sock = stream.socket  # TCP_NODELAY, set by trio, stays on
        upstream = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        try:
            set_keepalive(upstream, config.upstream_keepalive)  # a gearmand gone silent ends it
        except OSError:
            upstream.close()
            raise
        return upstream

    async def _secure(self, sock: socket.socket, tls: UpstreamTls) -> Transport:
        """Shake hands, then have gearmand answer an ECHO through it."""
        session = await handshake(sock, tls.context, server_hostname=tls.server_name)
        connection = TlsConnection(sock, session)
        try:
            await connection.send_all(_ECHO_REQ)
            answer = b""
            while len(answer) < len(_ECHO_RES):
                if not (data := await connection.receive(len(_ECHO_RES) - len(answer))):
                    raise HandshakeFailed("closed before answering an ECHO (no gearmand behind it?)", lasting=False)
                answer += data
        except HandshakeFailed:
            raise
        except TlsError as exc:  # (an alert: the terminator refused gproxy's certificate)
            raise HandshakeFailed(str(exc), lasting=True) from None
        except OSError as exc:
            raise HandshakeFailed(f"connection lost before answering an ECHO: {exc}", lasting=False) from None
        if answer != _ECHO_RES:
            raise HandshakeFailed(f"answered an ECHO with something else: {answer[:12]!r}", lasting=False)
        return Transport(sock, session)

    def _refused(self, route: Route, exc: HandshakeFailed) -> None:
        """Count a handshake that failed; hold off a gearmand that refused for good."""
        self._metrics.tls_handshake_failures.labels("upstream", str(route.upstream)).inc()
        self._metrics.upstream_up.labels(str(route.upstream)).set(0)
        if exc.lasting:
            self._hold_offs.setdefault(route, HoldOff()).refused(str(exc), trio.current_time())
