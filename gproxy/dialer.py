"""Connecting to a route's gearmand, for every part of the control plane that needs to: a
worker's first connection, a move's fresh one, a readiness probe, the retry clients.

Each connection gets TCP keepalive (a gearmand gone silent ends it), and each failure is
counted where it belongs: gearmand's in gproxy_upstream_up and
gproxy_upstream_connect_errors, gproxy's own (file descriptors, memory) in
gproxy_resource_exhausted, leaving gearmand's metrics as they are.
"""

from __future__ import annotations

import socket

import trio

from .config import Keepalive, Route
from .connection import Connection, set_keepalive
from .core.limits import own_exhaustion
from .core.metrics import Metrics

CONNECT_TIMEOUT = 5.0
"""Seconds to reach gearmand before the downstream connection is refused."""


class Dialer:
    def __init__(self, metrics: Metrics, keepalive: Keepalive) -> None:
        self._metrics, self._keepalive = metrics, keepalive

    async def connect(self, route: Route) -> Connection:
        """A new connection to the route's gearmand for trio code."""
        return Connection(await self.socket(route))

    async def socket(self, route: Route) -> socket.socket:
        """A connected socket for the data plane. Raises limits.ResourceExhausted when
        gproxy's own host, not gearmand, is to blame."""
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
            set_keepalive(upstream, self._keepalive)  # a gearmand gone silent ends it
        except OSError:
            upstream.close()
            raise
        return upstream
