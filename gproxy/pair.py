"""One worker connection and its gearmand connections in the data plane: the one interpreter
of its Session's commands.

A Pair owns the sockets (as data plane endpoints) and nothing else: bytes that arrive go to
the Session, and so does what the sockets did (an EOF, an error, a connection opened); the
Session answers every event with one ordered list of commands, carried out here in order:
bytes written, a connection half-closed, closed or opened, a timer asked of the control
plane, the pair's end. What a command names that is not this pair's (a retry's outcome for
a connection of another pair) goes to the control plane, which hands it to that pair. When
to linger, half-close, keep connections for held retries or refuse bad input is the
Session's to decide (gproxy.core.session), and tested there.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from .config import Route
from .core.commands import CallLater, Close, Finish, OpenUpstream, SendDownstream, Shut, Timer
from .core.fields import about
from .core.jobs import TrackedJob, running_per_function
from .core.protocol import ProtocolError
from .core.retry import NothingHeld, RecheckBudget, SendUpstream, Submit, Wakeup
from .core.session import Command, Session, UpstreamLink
from .dataplane import HIGH_WATER, DataPlane, Endpoint
from .handshake import Transport

log = logging.getLogger("gproxy.pair")


@dataclass(frozen=True, slots=True, eq=False)
class Connect:
    """Open a gearmand connection for `pair` as `link` (the Session moved the worker)."""

    pair: Pair
    link: UpstreamLink


@dataclass(frozen=True, slots=True, eq=False)
class PairTimer:
    """Call `pair.timer_fired(timer)` after `delay` seconds, instead of any earlier request
    for the same timer."""

    pair: Pair
    timer: Timer
    delay: float


@dataclass(frozen=True, slots=True, eq=False)
class Ended:
    """`pair` has closed every connection it had."""

    pair: Pair


Posted = Connect | PairTimer | Ended | Wakeup | RecheckBudget | Submit[Route]
"""What the data plane asks of the control plane (trio): rare, and never waited for."""
ForAnother = SendUpstream[UpstreamLink] | NothingHeld[UpstreamLink]
"""A Retrier's action for a connection of another pair."""


class ControlPlane(Protocol):
    def post(self, item: Posted) -> None:
        """Queue `item` for the trio side; returns at once, from any context."""

    def deliver(self, action: ForAnother) -> None:
        """Hand `action` to the pair whose connection it names, now."""

    def settled(self, pair: Pair) -> None:
        """While draining: `pair` has handled an event (its last job may have ended)."""


class PairSet:
    """Every pair of the process, by its Session (a connection's Session names its pair);
    what the pairs hold is read from them here (the metrics, the drain)."""

    def __init__(self) -> None:
        self._pairs: dict[Session, Pair] = {}

    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self) -> Iterator[Pair]:
        return iter(list(self._pairs.values()))

    def add(self, pair: Pair) -> None:
        self._pairs[pair.session] = pair

    def discard(self, pair: Pair) -> None:
        self._pairs.pop(pair.session, None)

    def of(self, link: UpstreamLink) -> Pair | None:
        """The pair whose connection `link` is, while it has not ended."""
        return None if link.session is None else self._pairs.get(link.session)

    def upstream_connections(self) -> int:
        return sum(pair.open_links for pair in self._pairs.values())

    def tracked_jobs(self) -> list[TrackedJob]:
        return [job for pair in self._pairs.values() for job in pair.session.tracked_jobs()]

    def running_jobs(self) -> collections.Counter[bytes]:
        """Jobs assigned to the workers now, per function, from each connection's JobTable."""
        return running_per_function(link.jobs for pair in self._pairs.values() for link in pair.session.links)

    def ejected_workers(self) -> collections.Counter[bytes]:
        """Workers ejected now, by the function of the failure that ejected them (from each
        Session's Ejection: the step that counts an ejection starts it, so no scrape sees one
        without the other)."""
        return collections.Counter(
            pair.session.ejection.function for pair in self._pairs.values() if pair.session.ejection.active
        )


class Pair:
    """A worker's connection, its gearmand connections and its Session. Handles the data
    plane's events for all of them (see dataplane.Handler)."""

    def __init__(self, name: str, session: Session, plane: DataPlane, control: ControlPlane, pairs: PairSet) -> None:
        self.name = name
        self.session = session
        self._plane = plane
        self._clock = plane.clock
        self._control = control
        self._pairs = pairs
        self.worker: Endpoint | None = None
        self._endpoints: dict[UpstreamLink, Endpoint] = {}
        """The open gearmand connections' sockets, by the Session's name for them."""
        self._link_of: dict[Endpoint, UpstreamLink] = {}

    def start(self, worker: Transport, peer: str, upstream: Transport) -> None:
        """Take over the worker's connection and its first gearmand connection."""
        self._pairs.add(self)
        self.worker = self._plane.add(worker.sock, self, peer, worker.tls)
        self._plane.guard(self.worker, self, self.session, self._endpoints)
        self._attach(self.session.current, upstream)

    @property
    def route(self) -> Route:
        return self.session.route

    @property
    def done(self) -> bool:
        return self.session.done

    @property
    def open_links(self) -> int:
        return len(self._endpoints)

    @property
    def running_jobs(self) -> int:
        """Jobs its worker runs now (assigned, not ended nor handed back)."""
        return sum(len(link.jobs) for link in self.session.links)

    # -- the data plane's events

    def received(self, endpoint: Endpoint, data: bytes) -> None:
        # A packet that goes on unchanged goes first, and the Session sees it after: a job's
        # latency is the sum of its hops, and its bookkeeping need not be one of them.
        session, worker = self.session, self.worker
        if endpoint is worker:
            if endpoint.gate is None and (bypass := session.bypasses_downstream(data)) is not None:
                self._write(self._endpoints[session.current], bypass)
                return
            upstream, sent = self._endpoints.get(session.current), False
            if upstream is not None and session.passes_downstream(data):
                self._write(upstream, data)
                sent = True
            try:
                commands = session.from_downstream(data, self._clock(), sent)
            except ProtocolError as exc:
                commands = session.refuse(exc.reason, f"protocol error from peer: {exc}")
        else:
            link, sent = self._link_of[endpoint], False
            if endpoint.gate is None and worker is not None and session.bypasses_upstream(link, data):
                self._write(worker, data)
                return
            if worker is not None and session.passes_upstream(link, data):
                self._write(worker, data)
                sent = True
            try:
                commands = session.from_upstream(link, data, self._clock(), sent)
            except ProtocolError as exc:
                commands = session.refuse(exc.reason, f"protocol error from gearmand: {exc}")
        if commands or session.drain.started:  # (while draining, a job's end is news even without commands)
            self.execute(commands)

    def ended(self, endpoint: Endpoint, error: OSError | None) -> None:
        if endpoint is self.worker:
            self.execute(self.session.worker_ended(error, self._clock()))
        else:
            self.execute(self.session.link_ended(self._link_of[endpoint], error))

    def drained(self, endpoint: Endpoint) -> None:
        self._flow()

    def failed(self, endpoint: Endpoint, exc: Exception) -> None:
        log.error(
            "%s: closed: internal error", self.name,
            exc_info=exc,
            extra=about(**self.session.log_fields, reason="internal error"),
        )
        self.execute(self.session.internal_error(logged=True))

    # -- the control plane's answers

    def link_connected(self, link: UpstreamLink, upstream: Transport) -> None:
        """The connection an OpenUpstream asked for."""
        self._attach(link, upstream)
        self.execute(self.session.link_opened(link))

    def link_failed(self, link: UpstreamLink, why: str) -> None:
        self.execute(self.session.link_failed(link, why))

    def timer_fired(self, timer: Timer) -> None:
        self.execute(self.session.timer_fired(timer, self._clock()))

    def stop(self) -> None:
        """gproxy is stopping: the pair closes now (gearmand requeues what is left)."""
        self.execute(self.session.stop())

    def fail_internally(self, reason: str) -> None:
        """Handling something of the pair's failed in the control plane (which logged it):
        the pair closes, and the process serves on."""
        self.execute(self.session.internal_error(reason))

    # -- carrying out the Session's commands

    def execute(self, commands: list[Command]) -> None:
        """In order: the one place where what the Session decided is done."""
        for command in commands:
            if type(command) is SendUpstream:
                endpoint = self._endpoints.get(command.owner)
                if endpoint is not None:
                    self._write(endpoint, command.data)
                elif command.owner.session is not self.session:
                    self._control.deliver(command)
                else:
                    raise RuntimeError(f"{self.name}: the Session sent bytes to {command.owner!r}, which has no socket")
            elif type(command) is SendDownstream:
                if self.worker is not None:
                    self._write(self.worker, command.data)
            elif type(command) is NothingHeld:
                self._control.deliver(command)
            elif type(command) is Shut:
                endpoint = self.worker if command.link is None else self._endpoints.get(command.link)
                if endpoint is not None:
                    endpoint.shutdown_write()
            elif type(command) is Close:
                if (endpoint := self._endpoints.pop(command.link, None)) is not None:
                    del self._link_of[endpoint]
                    endpoint.close()
            elif type(command) is OpenUpstream:
                self._control.post(Connect(self, command.link))
            elif type(command) is CallLater:
                self._control.post(PairTimer(self, command.timer, command.delay))
            elif type(command) is Finish:
                self._finish(command)
            elif type(command) is Submit or type(command) is Wakeup or type(command) is RecheckBudget:
                self._control.post(command)
            else:
                raise TypeError(f"not a command for a pair: {command!r}")
        if self.session.drain.started:
            self._control.settled(self)

    def _finish(self, finish: Finish) -> None:
        self._pairs.discard(self)
        # The line first: a peer that sees its connection close, and connects again from
        # the same port, comes after it in the log.
        if not finish.logged:
            log.log(
                finish.level, "%s: closed: %s", self.name, finish.reason,
                extra=about(**self.session.log_fields, reason=finish.reason),
            )
        for endpoint in self._endpoints.values():
            endpoint.close()
        self._endpoints.clear()
        self._link_of.clear()
        if self.worker is not None:
            self.worker.close()
        self._control.post(Ended(self))

    def _write(self, endpoint: Endpoint, data: bytes) -> None:
        endpoint.write(data)
        if endpoint.buffered:
            self._flow()

    def _flow(self) -> None:
        """A side whose buffer is over HIGH_WATER stops the other side being read."""
        worker = self.worker
        if worker is None:
            return
        links = list(self._endpoints.values())
        if any(endpoint.buffered >= HIGH_WATER for endpoint in links):
            worker.pause()
        else:
            worker.resume()
        for endpoint in links:
            if worker.buffered >= HIGH_WATER:
                endpoint.pause()
            else:
                endpoint.resume()

    def _attach(self, link: UpstreamLink, upstream: Transport) -> None:
        endpoint = self._plane.add(upstream.sock, self, f"gearmand via {link.name}", upstream.tls)
        self._plane.guard(endpoint, self, self.session, self._endpoints, link)
        self._endpoints[link] = endpoint
        self._link_of[endpoint] = link

    def __repr__(self) -> str:
        return f"Pair({self.name})"
