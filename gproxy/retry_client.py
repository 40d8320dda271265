"""gproxy's own client connection to a route's gearmand, for the retry jobs it submits.

One task owns the connection. It connects when there is first something to submit, and
keeps the connection from then on: after a loss it reconnects, whether or not anything
waits (so that an outage ends when gearmand is back, not at the next retry), with backoff (gproxy.reconnect: a connection counts as up only once it has
proved itself, so one that gearmand accepts and drops at once is no reason to try again at
once) for as long as it takes: trouble on this connection is never a reason to fail a job.
Only gearmand's own ERROR answer to a submission is a refusal. A gearmand that owes an
answer and stays silent is sent an ECHO_REQ, and if it stays silent still, the connection
is given up as dead (an up-but-hung gearmand keeps TCP alive; see Submitter.silence).

However the connection is lost (a reset, a close, bad input, found dead, an internal
error), what was in flight has the same fate, decided by the Retrier: a submission gearmand
never acknowledged is sent again (dead letters too: their unique ids make a second one
coalesce with the first), a retry job it had created is submitted again as the next
attempt, and a job with no attempt left gets its last failure.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from .config import Route
from .connection import Connection
from .core.assignments import route_name
from .core.fields import about
from .core.metrics import Metrics
from .core.protocol import DEFAULT_MAX_PACKET_SIZE
from .core.reconnect import Failure, Reconnects, Recovered, Report
from .core.retry import Action, Retrier, Submit
from .core.submitter import HELLO, Broken, Created, Event, JobPacket, Refused, Silence, Submitter, TooLarge
from .core.tls_refusals import TlsError

log = logging.getLogger("gproxy.retry")
RECEIVE_SIZE = 65536
ANSWER_WAIT = 30.0
"""Seconds gearmand may owe an answer in silence before it is sent an ECHO_REQ (the
proxy passes [upstream_keepalive] idle)."""
ECHO_WAIT = 30.0
"""Seconds more of silence after that before the connection is given up as dead (the
proxy passes [upstream_keepalive] interval * count)."""

CLOSED_BY_GEARMAND = "gearmand closed it"
"""Why a connection ended with a clean EOF: for a proven one, no outage (reconnect.Reconnects)."""

if TYPE_CHECKING:
    from .core.session import UpstreamLink

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
        metrics: Metrics | None = None,
        answer_wait: float = ANSWER_WAIT,
        echo_wait: float = ECHO_WAIT,
    ) -> None:
        self.route = route
        self._name = route_name(route)
        self._max_packet_size = max_packet_size
        self._metrics = metrics if metrics is not None else Metrics()
        self._retrier = retrier
        self._connect = connect
        self._execute = execute
        self._answer_wait, self._echo_wait = answer_wait, echo_wait
        self._pending: deque[Submit[Route]] = deque()
        """Submissions not yet written, oldest first; they wait here through any outage."""
        self._more = trio.Event()
        self._connection: Connection | None = None
        self._submitter: Submitter[Route] = Submitter(max_packet_size)
        self._acknowledging: int | None = None
        """The submission whose JOB_CREATED is being handled."""
        self.reconnects = Reconnects()
        """The owner of the outage: gproxy_retry_connection_up reads it at scrape time."""
        self._metrics.retry_connection_up.labels(self._name).set_function(lambda: float(self.reconnects.up))

    @property
    def connected(self) -> bool:
        return self._connection is not None

    def submit(self, action: Submit[Route]) -> None:
        self._pending.append(action)
        self._more.set()

    async def run(self) -> None:
        """Connect when there is work, serve until the connection is lost, connect again."""
        await self._work()
        while True:
            self.reconnects.trying()
            if not self.reconnects.up:
                self._metrics.retry_reconnects.labels(self._name).inc()
            try:
                connection = await self._connect()
            except (OSError, trio.TooSlowError) as exc:
                why = f"TLS handshake failed: {exc}" if isinstance(exc, TlsError) else str(exc) or "timed out"
                await self._pause(self.reconnects.failed(trio.current_time()), f": cannot connect ({why})")
                continue
            self.reconnects.connected(trio.current_time())
            self._connection, self._submitter = connection, Submitter(self._max_packet_size)
            try:
                reason = await self._serve(connection)
            except Exception:  # a bug must cost this connection at most, never a retry
                log.exception(
                    "retry client to gearmand %s: internal error", self._name,
                    extra=about(upstream=self._name),
                )
                reason = "internal error"
            finally:
                self._connection = None
                connection.close()
            failure = self.reconnects.lost(trio.current_time(), closed=reason == CLOSED_BY_GEARMAND)
            await self._lost()
            await self._pause(failure, f" lost ({reason})")

    async def _pause(self, failure: Failure, what: str) -> None:
        """Say what failed (WARNING when an outage starts, DEBUG while it lasts), then wait."""
        if failure.recovered is not None:
            self._recovered(failure.recovered)
        log.log(
            logging.WARNING if failure.report is Report.OUTAGE_STARTS else logging.DEBUG,
            "retry client to gearmand %s%s; %d submissions wait; trying again in %.1fs",
            self._name, what, len(self._pending), failure.wait,
            extra=about(upstream=self._name, reason=what.strip(" ;"), waiting=len(self._pending), seconds=failure.wait),
        )
        await trio.sleep(failure.wait)

    def _recovered(self, recovered: Recovered) -> None:
        log.info(
            "retry client to gearmand %s: connected again after an outage of %.1fs (%d tries)",
            self._name, recovered.seconds, recovered.tries,
            extra=about(upstream=self._name, seconds=round(recovered.seconds, 1), tries=recovered.tries),
        )

    async def _work(self) -> None:
        while not self._pending:
            self._more = trio.Event()
            await self._more.wait()

    async def _serve(self, connection: Connection) -> str:
        """Write what is pending, read the replies and watch gearmand's silence until the
        connection is lost; returns why."""
        reasons: list[str] = []
        changed = trio.Event()
        """Set at each submission written and each read: the watch has something new to time."""

        async with trio.open_nursery() as nursery:

            def lost(reason: str) -> None:
                reasons.append(reason)
                nursery.cancel_scope.cancel()

            def nudge() -> None:
                nonlocal changed
                changed.set()
                changed = trio.Event()

            async def write() -> None:
                try:
                    await connection.send_all(HELLO)
                    while True:
                        while self._pending:
                            action = self._pending.popleft()
                            if action.key is not None and not self._retrier.submitting(action.key):
                                continue  # the job ended while this waited: nothing to submit for it
                            await connection.send_all(self._submitter.submit(action, trio.current_time()))
                            nudge()
                        await self._work()
                except OSError as exc:
                    lost(f"send failed: {exc}")

            async def read() -> None:
                try:
                    while data := await connection.receive(RECEIVE_SIZE):
                        now = trio.current_time()
                        if (recovered := self.reconnects.answered(now)) is not None:
                            self._recovered(recovered)
                        nudge()
                        if reason := await self._handle(self._submitter.receive(data, now)):
                            return lost(reason)
                    lost(CLOSED_BY_GEARMAND)
                except OSError as exc:
                    lost(str(exc))

            async def watch() -> None:
                """Times the connection's proof, and gearmand's silence while it owes an answer."""
                while True:
                    now = trio.current_time()
                    if (recovered := self.reconnects.check(now)) is not None:
                        self._recovered(recovered)
                    silence, due = self._submitter.silence(now, self._answer_wait, self._echo_wait)
                    if silence is Silence.DEAD:
                        return lost(
                            f"gearmand answered nothing for {self._answer_wait + self._echo_wait:g}s, "
                            "not even an ECHO_REQ: it is hung or gone"
                        )
                    if silence is Silence.ECHO:
                        try:
                            await connection.send_all(self._submitter.echo())
                        except OSError as exc:
                            return lost(f"send failed: {exc}")
                    wake = min(due if due is not None else math.inf, self.reconnects.proof_due() or math.inf)
                    with trio.move_on_at(wake):
                        await changed.wait()

            nursery.start_soon(write)
            nursery.start_soon(read)
            nursery.start_soon(watch)
        return reasons[0] if reasons else "closed"

    async def _handle(self, events: list[Event[Route]]) -> str | None:
        """Carry out what gearmand's replies mean; returns why the connection must end, if
        it must (bad input: counted, and the events before it still carried out)."""
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
            elif type(event) is Broken:
                self._metrics.protocol_errors.labels(event.reason).inc()
                return f"protocol error from gearmand: {event.message}"
            else:
                assert type(event) is Refused
                if event.submit.key is None:
                    log.error(
                        "gearmand %s refused a dead letter for %s (%s): it is lost",
                        self._name, event.submit.function.decode("utf-8", "replace"),
                        event.error.decode("utf-8", "replace"),
                        extra=about(
                            upstream=self._name, function=event.submit.function.decode("utf-8", "replace"),
                            reason=event.error.decode("utf-8", "replace"),
                        ),
                    )
                    continue
                actions = retrier.retry_rejected(event.submit.key, event.error, now)
            await self._execute(actions)
        return None

    async def _lost(self) -> None:
        """What was in flight on the lost connection goes on (see the module's docstring)."""
        unanswered = self._submitter.unanswered()
        dead_letters = [submit for submit in unanswered if submit.key is None]
        in_flight = {submit.key for submit in unanswered if submit.key is not None}
        if self._acknowledging is not None:  # its JOB_CREATED came, but was never taken in
            in_flight.add(self._acknowledging)
            self._acknowledging = None
        self._pending.extendleft(reversed(dead_letters))
        await self._execute(self._retrier.retry_connection_lost(self.route, in_flight, trio.current_time()))
