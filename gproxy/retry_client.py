"""gproxy's own client connection to a route's gearmand, for the retry jobs it submits.

One task owns the connection. It connects when there is something to submit, and after a
loss reconnects with backoff for as long as it takes: trouble on this connection is never a
reason to fail a job. Only gearmand's own ERROR answer to a submission is a refusal. What
was in flight when a connection broke is handed to the Retrier (retry jobs are submitted
again as their next attempt) or sent again (dead letters, whose unique ids make a second
submission coalesce with the first).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from .config import Route
from .connection import Connection
from .protocol import DEFAULT_MAX_PACKET_SIZE, ProtocolError
from .retry import Action, Retrier, Submit
from .session import route_name
from .submitter import HELLO, Created, Event, JobPacket, Refused, Submitter, TooLarge

log = logging.getLogger("gproxy.retry")
RECEIVE_SIZE = 65536
RECONNECT_INITIAL = 0.1
RECONNECT_MAX = 5.0
"""Seconds between attempts to reach gearmand again: doubling from the first to the last."""

if TYPE_CHECKING:
    from .session import UpstreamLink

Execute = Callable[[Sequence[Action["UpstreamLink", Route]]], Awaitable[None]]


class RetryClient:
    """The retry-client connection of one route. `submit()` never waits and never fails."""

    def __init__(
        self,
        route: Route,
        retrier: Retrier[UpstreamLink, Route],
        connect: Callable[[], Awaitable[Connection]],
        execute: Execute,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        bad_input: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.route = route
        self._max_packet_size = max_packet_size
        self._bad_input = bad_input
        """Counts a connection lost to bad input from gearmand, by reason (the metric)."""
        self._retrier = retrier
        self._connect = connect
        self._execute = execute
        self._pending: deque[Submit[Route]] = deque()
        """Submissions not yet written, oldest first; they wait here through any outage."""
        self._more = trio.Event()
        self._connection: Connection | None = None
        self._submitter: Submitter[Route] = Submitter(max_packet_size)
        self._acknowledging: int | None = None
        """The submission whose JOB_CREATED is being handled."""

    @property
    def connected(self) -> bool:
        return self._connection is not None

    def submit(self, action: Submit[Route]) -> None:
        self._pending.append(action)
        self._more.set()

    async def run(self) -> None:
        """Connect when there is work, serve until the connection breaks, start again."""
        delay = RECONNECT_INITIAL
        failures = 0
        while True:
            await self._work()
            try:
                connection = await self._connect()
                await connection.send_all(HELLO)
            except (OSError, trio.TooSlowError) as exc:
                failures += 1
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "retry client to gearmand %s: cannot connect (%s); %d submissions wait, "
                    "trying again in %.1fs", route_name(self.route), exc or "timed out", len(self._pending), delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            if failures:
                log.info("retry client to gearmand %s: connected again", route_name(self.route))
            delay, failures = RECONNECT_INITIAL, 0
            self._connection, self._submitter = connection, Submitter(self._max_packet_size)
            try:
                reason = await self._serve(connection)
            except Exception:  # a bug must cost this connection at most, never a retry
                log.exception("retry client to gearmand %s: internal error", route_name(self.route))
                reason = "internal error"
            finally:
                self._connection = None
                connection.close()
            await self._lost(reason)

    async def _work(self) -> None:
        while not self._pending:
            self._more = trio.Event()
            await self._more.wait()

    async def _serve(self, connection: Connection) -> str:
        """Write what is pending and read the replies until either side fails."""
        reasons: list[str] = []
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                try:
                    await self._write(connection)
                except OSError as exc:
                    reasons.append(f"send failed: {exc}")
                nursery.cancel_scope.cancel()

            async def read() -> None:
                try:
                    while data := await connection.receive(RECEIVE_SIZE):
                        await self._handle(self._submitter.receive(data))
                    reasons.append("gearmand closed it")
                except ProtocolError as exc:
                    self._bad_input(exc.reason)
                    reasons.append(f"protocol error from gearmand: {exc}")
                except OSError as exc:
                    reasons.append(str(exc))
                nursery.cancel_scope.cancel()

            nursery.start_soon(write)
            nursery.start_soon(read)
        return reasons[0] if reasons else "closed"

    async def _write(self, connection: Connection) -> None:
        while True:
            while self._pending:
                action = self._pending.popleft()
                if action.key is not None and not self._retrier.submitting(action.key):
                    continue  # the job ended while this waited: nothing to submit for it
                await connection.send_all(self._submitter.submit(action))
            await self._work()

    async def _handle(self, events: list[Event[Route]]) -> None:
        retrier = self._retrier
        for event in events:
            now = trio.current_time()
            if type(event) is JobPacket:
                actions = retrier.retry_packet(self.route, event.type, event.args, now)
            elif type(event) is Created:
                self._acknowledging = event.key  # unanswered still, should this fail
                actions = retrier.retry_created(event.key, event.handle)
                self._acknowledging = None
            elif type(event) is TooLarge:
                reason = b"gproxy: the retry's %s of %d bytes exceeds max_packet_size %d" % (
                    event.type.name.encode(), event.size, self._max_packet_size,
                )
                actions = retrier.retry_failed_for_good(self.route, event.handle, reason, now)
            else:
                assert type(event) is Refused
                if event.submit.key is None:
                    log.error(
                        "gearmand %s refused a dead letter for %s (%s): it is lost",
                        route_name(self.route), event.submit.function.decode("utf-8", "replace"),
                        event.error.decode("utf-8", "replace"),
                    )
                    continue
                actions = retrier.retry_rejected(event.submit.key, event.error, now)
            await self._execute(actions)

    async def _lost(self, reason: str) -> None:
        unanswered = self._submitter.unanswered()
        dead_letters = [submit for submit in unanswered if submit.key is None]
        in_flight = {submit.key for submit in unanswered if submit.key is not None}
        if self._acknowledging is not None:  # its JOB_CREATED came, but was never taken in
            in_flight.add(self._acknowledging)
            self._acknowledging = None
        log.warning(
            "retry client to gearmand %s lost (%s); resubmitting retries in flight", route_name(self.route), reason
        )
        self._pending.extendleft(reversed(dead_letters))
        await self._execute(self._retrier.retry_connection_lost(self.route, in_flight, trio.current_time()))
