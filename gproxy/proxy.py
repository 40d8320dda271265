"""The trio shell: listeners, one upstream connection per downstream connection, byte pumps.

All protocol decisions are made by Session (pure); this module only moves bytes, keeps the
two connections of a pair alive and dead together, and turns every failure of one pair into
one log line and a closed pair, never into a crashed proxy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .config import Address, Config, Route
from .connection import Connection
from .jobs import TrackedJob
from .protocol import Framer, ProtocolError
from .session import Session

log = logging.getLogger("gproxy.proxy")

RECEIVE_SIZE = 65536
CONNECT_TIMEOUT = 5.0
"""Seconds to reach gearmand before the downstream connection is refused."""
HALF_CLOSE_LINGER = 10.0
"""After one side closes, seconds the other may take to finish before the pair is cut."""


@dataclass(slots=True)
class _Pair:
    """Why a connection pair ended: the first reason wins, and is logged once."""

    name: str
    cancel_scope: trio.CancelScope
    reason: str | None = None
    level: int = logging.DEBUG
    eofs: int = 0

    def fail(self, reason: str, level: int = logging.WARNING) -> None:
        if self.reason is None:
            self.reason, self.level = reason, level
        self.cancel_scope.cancel()


class Proxy:
    """Serves every configured route; `tracked_jobs()` shows what workers hold right now."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.listen_addresses: list[Address] = []
        self._sessions: set[Session] = set()
        self._bound: list[tuple[Route, list[trio.SocketListener]]] = []

    def tracked_jobs(self) -> list[TrackedJob]:
        return [job for session in self._sessions for job in session.jobs]

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
        session = Session(f"{upstream.sock.getsockname()[1]}->{route.upstream}", self.config.max_packet_size)
        self._sessions.add(session)
        try:
            with trio.CancelScope() as scope:
                pair = _Pair(name, scope)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        self._pump, pair, downstream, upstream, session.downstream,
                        session.from_downstream, "peer",
                    )
                    nursery.start_soon(
                        self._pump, pair, upstream, downstream, session.upstream,
                        lambda data: session.from_upstream(data, trio.current_time()), "gearmand",
                    )
        except Exception:
            log.exception("%s: closed: internal error", name)
        else:
            log.log(pair.level, "%s: closed: %s", name, pair.reason or "both sides finished")
        finally:
            self._sessions.discard(session)
            session.closed()
            upstream.close()
            downstream.close()

    async def _pump(
        self,
        pair: _Pair,
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
            if out:
                try:
                    await sink.send_all(out)
                except OSError as exc:
                    return pair.fail(f"{sink_name} connection lost: {exc}", logging.INFO)
        if framer.buffered:
            return pair.fail(
                f"{source_name} closed mid-packet ({framer.buffered} bytes of an unfinished frame)"
            )
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
