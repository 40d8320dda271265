"""gproxy's own client connection to a route's gearmand, for the retry jobs it submits.

Opened on first use, and again after a loss; the Retrier then submits again whatever was in
flight, with the same unique ids, so gearmand reattaches them to retry jobs still running.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from .config import Route
from .connection import Connection
from .protocol import ProtocolError
from .retry import Submit
from .submitter import HELLO, Created, JobPacket, Refused, Submitter

if TYPE_CHECKING:
    from .proxy import Proxy

log = logging.getLogger("gproxy.retry")
RECEIVE_SIZE = 65536


class RetryClient:
    """The retry-client connection of one route."""

    def __init__(self, proxy: Proxy, route: Route, nursery: trio.Nursery) -> None:
        self.proxy = proxy
        self.route = route
        self._nursery = nursery
        self._connection: Connection | None = None
        self._submitter = Submitter()
        self._connecting = trio.Lock()

    @property
    def connected(self) -> bool:
        return self._connection is not None

    async def submit(self, action: Submit) -> None:
        try:
            connection = await self._connected()
            await connection.send_all(
                self._submitter.submit(action.key, action.function, action.unique, action.payload)
            )
        except (OSError, trio.TooSlowError) as exc:
            log.warning("retry client to gearmand %s: cannot submit: %s", self.route.upstream, exc or "timed out")
            if action.key is not None:
                await self.proxy.execute(self.proxy.retrier.retry_rejected(action.key, b"gearmand unreachable", trio.current_time()))

    async def _connected(self) -> Connection:
        async with self._connecting:
            if self._connection is None:
                connection = await self.proxy.connect(self.route)
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
                        actions = retrier.retry_packet(route, event.type, event.args, trio.current_time())
                    elif type(event) is Created:
                        actions = retrier.retry_created(event.key, event.handle)
                    else:
                        assert type(event) is Refused
                        actions = retrier.retry_rejected(event.key, event.error, trio.current_time())
                    await self.proxy.execute(actions)
            reason = "gearmand closed it"
        except (OSError, ProtocolError) as exc:
            reason = str(exc)
        self._connection = None
        connection.close()
        log.warning("retry client to gearmand %s lost (%s); resubmitting retries in flight", route.upstream, reason)
        await self.proxy.execute(retrier.retry_connection_lost(route, trio.current_time()))
