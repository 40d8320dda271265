"""One worker connection and its gearmand connections: everything about them decided here.

A Pair owns its Session and its endpoints in the data plane. Bytes that arrive go through
the Session, and the Session's commands are carried out in order: bytes are written to the
worker or to a gearmand connection (of this pair, or of the pair whose connection holds a
job being retried), and what only trio code can do (timers, the retry client, connecting)
is posted to the control plane. The lifecycle is the pair's too: a worker that leaves while
retries are held keeps the connections that hold them; one side's EOF gives the other
HALF_CLOSE_LINGER seconds; bad input is refused with one WARNING; and whatever ends it, the
pair logs one line, closes every connection (gearmand requeues what they owned) and is
gone. A PairSet knows every pair and which pair owns each gearmand connection.
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from .config import Route
from .core.jobs import TrackedJob
from .core.metrics import Metrics
from .core.protocol import ProtocolError
from .core.retry import RecheckBudget, Released, Retrier, SendUpstream, Submit, Wakeup
from .core.session import ArmTimeout, CloseUpstream, Command, Eject, OpenUpstream, SendDownstream, Session, UpstreamLink
from .dataplane import HIGH_WATER, DataPlane, Endpoint

log = logging.getLogger("gproxy.proxy")

HALF_CLOSE_LINGER: Final = 10.0
"""After one side closes, seconds the other may take to finish before the pair is cut."""


@dataclass(frozen=True, slots=True, eq=False)
class Connect:
    """Open a gearmand connection for `pair` as `link` (the Session moved the worker)."""

    pair: Pair
    link: UpstreamLink


class PairTimer(enum.Enum):
    """What a pair has the control plane call it back for: at most one of each at a time."""

    LINGER = "linger"  # one side closed: the other's grace period is over
    EJECTION = "ejection"  # its worker's ejection is over
    TIMEOUTS = "timeouts"  # the earliest deadline of the attempts it times


@dataclass(frozen=True, slots=True, eq=False)
class CallLater:
    """Call `pair.timer_fired(timer)` after `delay` seconds, instead of any earlier request
    for the same timer."""

    pair: Pair
    timer: PairTimer
    delay: float


@dataclass(frozen=True, slots=True, eq=False)
class Ended:
    """`pair` has closed every connection it had."""

    pair: Pair


Posted = Connect | CallLater | Ended | Wakeup | RecheckBudget | Submit[Route]
"""What the data plane asks of the control plane (trio): rare, and never waited for."""


class ControlPlane(Protocol):
    def post(self, item: Posted) -> None:
        """Queue `item` for the trio side; returns at once, from any context."""


class PairSet:
    """Every pair of the process, and which pair owns each gearmand connection."""

    def __init__(self) -> None:
        self.pairs: set[Pair] = set()
        self._owners: dict[UpstreamLink, Pair] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[Pair]:
        return iter(list(self.pairs))

    def owner(self, link: UpstreamLink) -> Pair | None:
        return self._owners.get(link)

    def own(self, link: UpstreamLink, pair: Pair) -> None:
        self._owners[link] = pair

    def disown(self, link: UpstreamLink, pair: Pair) -> None:
        if self._owners.get(link) is pair:
            del self._owners[link]

    def upstream_connections(self) -> int:
        return sum(pair.open_links for pair in self.pairs)

    def tracked_jobs(self) -> list[TrackedJob]:
        return [job for pair in self.pairs for job in pair.session.tracked_jobs()]

    def execute(self, commands: Sequence[Command]) -> None:
        """Commands that concern no pair's own event (a retry's outcome, a timer's): bytes for
        the connection that holds a job, and the news that it holds nothing more."""
        for command in commands:
            if type(command) is SendUpstream:
                if (pair := self._owners.get(command.owner)) is not None:
                    pair.write_link(command.owner, command.data)
            elif type(command) is Released:
                if (pair := self._owners.get(command.owner)) is not None:
                    pair.settle(command.owner)
            else:
                raise TypeError(f"not for the data plane: {command!r}")


class Pair:
    """A worker's connection, its gearmand connections and its Session. Handles the data
    plane's events for all of them (see dataplane.Handler)."""

    def __init__(
        self, name: str, session: Session, plane: DataPlane, control: ControlPlane, pairs: PairSet,
        retrier: Retrier[UpstreamLink, Route], metrics: Metrics,
    ) -> None:
        self.name = name
        self.session = session
        self._plane = plane
        self._clock = plane.clock
        self._control = control
        self._pairs = pairs
        self._retrier = retrier
        self._metrics = metrics
        self.worker: Endpoint | None = None
        self._links: dict[UpstreamLink, Endpoint | None] = {}
        """The pair's gearmand connections; None while one is being opened."""
        self._waiting: dict[UpstreamLink, list[bytes]] = {}
        """What was written to a connection still being opened, its replay first."""
        self._link_of: dict[Endpoint, UpstreamLink] = {}
        self.reason: str | None = None
        self.level = logging.DEBUG
        self._eofs = 0
        self._departing = False
        """The worker has left, and its connections that hold retries are kept for them."""
        self.worker_lost: str | None = None
        """Why the worker's connection broke (a reset, a failed send), if it did: it has left,
        as if it had closed, and its connections that hold retries stay open for them."""
        self.done = False

    def start(self, worker: socket.socket, peer: str, upstream: socket.socket) -> None:
        """Take over the worker's socket and its first gearmand connection's."""
        self._pairs.pairs.add(self)
        self.worker = self._plane.add(worker, self, peer)
        self._attach(self.session.current, upstream)

    @property
    def route(self) -> Route:
        return self.session.route

    def drain(self) -> None:
        """gproxy is shutting down: the worker's grabs get NO_JOB, its jobs finish."""
        self.session.draining = True

    @property
    def open_links(self) -> int:
        return sum(endpoint is not None for endpoint in self._links.values())

    # -- the data plane's events

    def received(self, endpoint: Endpoint, data: bytes) -> None:
        # A packet that goes on unchanged goes first, and the Session sees it after: a job's
        # latency is the sum of its hops, and its bookkeeping need not be one of them.
        session, worker = self.session, self.worker
        if endpoint is worker:
            upstream, sent = self._links.get(session.current), False
            if upstream is not None and session.passes_downstream(data):
                self._write(upstream, data)
                sent = True
            try:
                commands = session.from_downstream(data, self._clock(), sent)
            except ProtocolError as exc:
                return self.refuse(exc.reason, f"protocol error from peer: {exc}")
        else:
            link, sent = self._link_of[endpoint], False
            if worker is not None and session.passes_upstream(link, data):
                self._write(worker, data)
                sent = True
            try:
                commands = session.from_upstream(link, data, self._clock(), sent)
            except ProtocolError as exc:
                return self.refuse(exc.reason, f"protocol error from gearmand: {exc}")
        if commands:
            self.run(commands)

    def ended(self, endpoint: Endpoint, error: OSError | None) -> None:
        # A side that closes mid-packet has sent bad input, unless gproxy had closed its way
        # to it first: then the close answers gproxy's, and cut short what it was sending.
        mid_packet = error is None and not endpoint.shut
        if endpoint is self.worker:
            self._worker_ended(error, mid_packet)
        else:
            self._link_ended(self._link_of[endpoint], error, mid_packet)

    def drained(self, endpoint: Endpoint) -> None:
        self._flow()

    def failed(self, endpoint: Endpoint, exc: Exception) -> None:
        log.error("%s: closed: internal error", self.name, exc_info=exc)
        self.reason, self.level = "internal error", logging.ERROR
        self._finish(logged=True)

    # -- carrying out the Session's commands

    def run(self, commands: list[Command]) -> None:
        """In order. (Commands of another pair's event may name this pair's connections.)"""
        for command in commands:
            if type(command) is SendUpstream:
                self._send_upstream(command.owner, command.data)
            elif type(command) is SendDownstream:
                worker = self.worker
                if worker is not None and not self.session.worker_gone:  # (a lost one's writes go nowhere)
                    self._write(worker, command.data)
            elif type(command) is Released:
                if (owner := self._pairs.owner(command.owner)) is not None:
                    owner.settle(command.owner)
            elif type(command) is CloseUpstream:
                if (owner := self._pairs.owner(command.link)) is not None:
                    owner.detach(command.link)
            elif type(command) is OpenUpstream:
                self._links[command.link] = None
                self._waiting[command.link] = [command.replay]
                self._pairs.own(command.link, self)
                self._control.post(Connect(self, command.link))
            elif type(command) is Wakeup or type(command) is RecheckBudget or type(command) is Submit:
                self._control.post(command)
            elif type(command) is ArmTimeout:
                self._control.post(CallLater(self, PairTimer.TIMEOUTS, command.delay))
            elif type(command) is Eject:
                log.warning(
                    "%s: worker ejected for %gs: %d failed jobs in a row (the last of %s); its grabs get NO_JOB",
                    self.name, command.delay, command.failures, command.function.decode("utf-8", "replace"),
                )
                self._control.post(CallLater(self, PairTimer.EJECTION, command.delay))

    def _send_upstream(self, link: UpstreamLink, data: bytes) -> None:
        if (endpoint := self._links.get(link)) is not None:
            return self._write(endpoint, data)  # the usual: this pair's own connection, open
        owner = self if link in self._links else self._pairs.owner(link)
        if owner is not None:
            owner.write_link(link, data)
        elif link is self.session.current and not self.session.worker_gone:
            self.fail("gearmand connection lost: closed", logging.INFO)
        # else: a connection that is gone already; its loss was that pair's to report

    def write_link(self, link: UpstreamLink, data: bytes) -> None:
        """Bytes for one of this pair's gearmand connections (kept while it is being opened)."""
        endpoint = self._links.get(link)
        if endpoint is not None:
            self._write(endpoint, data)
        elif link in self._waiting:
            self._waiting[link].append(data)

    def _write(self, endpoint: Endpoint, data: bytes) -> None:
        endpoint.write(data)
        if endpoint.buffered:
            self._flow()

    def _flow(self) -> None:
        """A side whose buffer is over HIGH_WATER stops the other side being read."""
        worker = self.worker
        if worker is None:
            return
        links = [endpoint for endpoint in self._links.values() if endpoint is not None]
        if any(endpoint.buffered >= HIGH_WATER for endpoint in links):
            worker.pause()
        else:
            worker.resume()
        for endpoint in links:
            if worker.buffered >= HIGH_WATER:
                endpoint.pause()
            else:
                endpoint.resume()

    # -- gearmand connections

    def _attach(self, link: UpstreamLink, sock: socket.socket) -> Endpoint:
        endpoint = self._plane.add(sock, self, f"gearmand via {link.name}")
        self._links[link] = endpoint
        self._link_of[endpoint] = link
        self._pairs.own(link, self)
        return endpoint

    def link_connected(self, link: UpstreamLink, sock: socket.socket) -> None:
        """The control plane opened the connection a move asked for."""
        if self.done or link not in self._links:
            sock.close()
            return
        endpoint = self._attach(link, sock)
        for data in self._waiting.pop(link, []):
            endpoint.write(data)
        log.info("%s: moved to a fresh gearmand connection; the old one keeps its held jobs", self.name)

    def link_failed(self, link: UpstreamLink, why: str) -> None:
        """No fresh connection for a move: `why` says whose fault (gearmand's, or gproxy's own limit)."""
        if not self.done:
            self.fail(why)

    def _link_ended(self, link: UpstreamLink, error: OSError | None, mid_packet: bool) -> None:
        current = link is self.session.current and not self.session.worker_gone
        if error is not None:
            if current:
                self.fail(f"gearmand connection lost: {_cause(error)}", logging.INFO)
            else:  # a connection that only holds jobs (the worker moved off it, or left): the pair
                # goes on, so the cause is told here
                log.info("%s: gearmand connection %s lost: %s", self.name, link.name, _cause(error))
        elif mid_packet and (unfinished := self.session.unfinished(link)):
            return self.refuse("mid_packet", _mid_packet("gearmand", unfinished))
        elif current:
            self.closing("gearmand closed the connection")
            if self.worker is not None:
                self.worker.shutdown_write()
        # The connection is gone, so is everything gearmand had assigned through it (it
        # requeues those jobs): their holds end now, not when the pair is done lingering.
        self.detach(link)

    def detach(self, link: UpstreamLink) -> None:
        """`link`'s connection closes: gearmand requeues whatever it still owns."""
        if link not in self._links:
            return
        endpoint = self._links.pop(link)
        self._waiting.pop(link, None)
        self._pairs.disown(link, self)
        if endpoint is not None:
            del self._link_of[endpoint]
            endpoint.close()
        owed = self.session.link_closed(link)
        if not self.done:
            self.run(owed)
            self._released()
            self._maybe_finished()

    def settle(self, link: UpstreamLink) -> None:
        """`link` holds nothing more: a retired link may close; a departed worker's pair may end."""
        if self.session.released(link) and link in self._links:
            self.detach(link)
        self._released()

    def _holds_retries(self) -> bool:
        return any(self._retrier.holds(link) for link in self.session.links)

    # -- the worker

    def _worker_ended(self, error: OSError | None, mid_packet: bool) -> None:
        if error is not None:
            self.worker_lost = f"peer connection lost: {error}"
        elif mid_packet and (unfinished := self.session.unfinished()):
            return self.refuse("mid_packet", _mid_packet("peer", unfinished))
        # Closing its gearmand connections would requeue the jobs gproxy holds, and the
        # jobs it was running of functions that retry disconnects: the Session holds those
        # (a retry each, see Session.worker_left); what it sends goes before any EOF.
        self.run(self.session.worker_left(self._plane.clock()))
        if self._holds_retries():
            log.info("%s: worker left while retries are held; keeping their gearmand connections", self.name)
            self._departing = True
            for link, endpoint in list(self._links.items()):
                if endpoint is not None and not self._retrier.holds(link):
                    endpoint.shutdown_write()  # its running jobs requeue natively
            return self._released()
        self._left()

    def _released(self) -> None:
        if self._departing and not self.done and not self._holds_retries():
            self._departing = False
            self._left()

    def _left(self) -> None:
        """The worker has gone and nothing is held for it."""
        if self.worker_lost is not None:
            return self.fail(self.worker_lost, logging.INFO)
        self.closing("peer closed the connection")
        for endpoint in list(self._links.values()):
            if endpoint is not None:
                endpoint.shutdown_write()
        self._maybe_finished()

    # -- the end

    def refuse(self, reason: str, message: str) -> None:
        """Bad input: counted by reason, and the pair closes with one warning."""
        self._metrics.protocol_errors.labels(reason).inc()
        self.fail(message)

    def fail(self, reason: str, level: int = logging.WARNING) -> None:
        """Close the pair. The first reason is the one logged, unless a graver one follows
        (bad input after the other side closed is still a WARNING, like its metric)."""
        if self.reason is None or level > self.level:
            self.reason, self.level = reason, level
        self._finish()

    def closing(self, reason: str) -> None:
        """One side closed: the other gets a grace period to finish, then the pair is cut."""
        self._eofs += 1
        if self._eofs == 1:
            if self.reason is None:  # a refusal that came first keeps its reason
                self.reason = reason
            self._control.post(CallLater(self, PairTimer.LINGER, HALF_CLOSE_LINGER))

    def timer_fired(self, timer: PairTimer) -> None:
        if self.done:
            return
        if timer is PairTimer.LINGER:
            self._finish()
        elif timer is PairTimer.EJECTION:
            log.warning("%s: worker back from its ejection; it is given jobs again", self.name)
            self.run(self.session.ejection_over())
        else:
            self.run(self.session.timeouts_due(self._clock()))

    def stop(self) -> None:
        """gproxy is stopping: the pair closes now (gearmand requeues what is left)."""
        if self.reason is None:
            self.reason = "gproxy stopped"
        self._finish()

    def _maybe_finished(self) -> None:
        worker_done = self.worker is None or self.worker.ended
        if worker_done and not self._departing and not self._links and self._eofs:
            self._finish()

    def _finish(self, logged: bool = False) -> None:
        if self.done:
            return
        self.done = True
        self._pairs.pairs.discard(self)
        # The line first: a peer that sees its connection close, and connects again from
        # the same port, comes after it in the log.
        if not logged:
            log.log(self.level, "%s: closed: %s", self.name, self.reason or "both sides finished")
        for link in list(self._links):
            self.detach(link)
        if self.worker is not None:
            self.worker.close()
        self._control.post(Ended(self))

    def __repr__(self) -> str:
        return f"Pair({self.name})"


_UNANSWERED: Final = {errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}
"""How the kernel ends an established connection whose peer stopped answering (keepalive,
TCP_USER_TIMEOUT, retransmissions): timed out, or unreachable when the last word it had
about the way there was an ICMP error or a failed ARP."""


def _cause(error: OSError) -> str:
    """A gearmand connection's error, and what it means where the kernel's words mislead
    ("No route to host" for a host that merely went silent)."""
    if error.errno in _UNANSWERED:
        return f"{error} (gearmand's host stopped answering)"
    return str(error)


def _mid_packet(side: str, buffered: int) -> str:
    return f"{side} closed mid-packet ({buffered} bytes of an unfinished frame)"
