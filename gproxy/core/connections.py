"""The pair's connections and its end: which gearmand connections are open, being opened or
gone, when a side is half-closed, how long the other may linger, when the pair ends and why.

A pair is a worker's connection and its gearmand connections. The Session's packet rules say
what goes where; Connections takes what the sockets did (a side closed or broke, a connection
opened or could not be, a timer fired) and every command the rules give, and turns them into
the commands the shell (gproxy.pair.Pair) carries out, in order, ending with one Finish. Pure.
"""

from __future__ import annotations

import enum
import errno
import logging
import weakref
from typing import TYPE_CHECKING, Final

from .commands import (
    ArmTimeout,
    CallLater,
    Close,
    CloseUpstream,
    Eject,
    Finish,
    OpenUpstream,
    SendDownstream,
    Shut,
    Timer,
)
from .fields import about
from .protocol import text
from .retry import NothingHeld, RecheckBudget, SendUpstream, Submit, Wakeup

if TYPE_CHECKING:
    from .session import Command, Session, UpstreamLink

log = logging.getLogger("gproxy.pair")
"""The lines about a pair (its worker's address and route first), whoever logs them."""

HALF_CLOSE_LINGER: Final = 10.0
"""After one side closes, seconds the other may take to finish before the pair is cut."""


class LinkState(enum.Enum):
    """A gearmand connection of a pair, as its Connections know it."""

    CONNECTING = "connecting"  # asked for (a move); bytes for it wait in the link
    OPEN = "open"
    CLOSED = "closed"  # gone: gearmand requeues what it owned


_OPEN: Final = LinkState.OPEN
_FOR_THE_PROCESS: Final = (Submit, Wakeup, RecheckBudget)
"""The Retrier's actions that concern the process, not the pair: they pass after its Finish."""


class Connections:
    """The lifecycle of one Session's pair. Every event answers with the commands to carry
    out; `resolve` passes the packet rules' commands through the same state."""

    def __init__(self, session: Session) -> None:
        # A weak reference: the Session owns its Connections, and a cycle would keep every
        # ended pair's memory until a full collection (the fuzz regression "per-function
        # state kept for ever" measures it). Only the Session calls in, so it is alive then.
        self._session: Session = weakref.proxy(session)
        self.reason: str | None = None
        """Why the pair ends: the first reason, unless a graver one follows."""
        self.level = logging.DEBUG
        self.done = False
        self._closings = 0
        """Sides that closed (an EOF): the first starts the other's grace period."""
        self._worker_ended = False
        self._worker_shut = False
        self._worker_broke: str | None = None
        """Why the worker's connection broke (a reset, a failed send), if it did."""
        self._kept_for_retries = False
        """The worker has left, and its connections that hold retries are kept for them."""
        self._finish_sent = False
        """Finish is in the commands given out: nothing of the pair's own follows it."""

    # -- what the sockets did

    def worker_ended(self, error: OSError | None, now: float) -> list[Command]:
        """The worker's connection ended: closed, or broken (`error`: it has left as if it had
        closed). Closing its gearmand connections would requeue the jobs gproxy holds, and
        the jobs it was running of functions that retry disconnects: Session.worker_left holds
        those, and the connections that hold retries stay open until they hold nothing."""
        session = self._session
        self._worker_ended = True
        if self.done:
            return []
        if error is not None:
            self._worker_broke = f"peer connection lost: {error}"
        elif not self._worker_shut and (unfinished := session.downstream.buffered):
            return self.refuse("mid_packet", mid_packet("peer", unfinished))
        out = session.worker_left(now)  # (carried out first: what it releases settles now)
        if self.done:
            return out
        if self._holds_retries():
            log.info(
                "%s: worker left while retries are held; keeping their gearmand connections", session.name,
                extra=about(**session.log_fields),
            )
            self._kept_for_retries = True
            for link in session.links:
                if link.state is _OPEN and not self._holds(link):
                    self._shut(link)  # its running jobs requeue natively
            self._nothing_held_check()
        else:
            self._wind_down()
        return out + session.event_done()

    def link_ended(self, link: UpstreamLink, error: OSError | None) -> list[Command]:
        """Gearmand connection `link` ended: closed, or broken (`error`)."""
        session = self._session
        if self.done or link.state is LinkState.CLOSED:
            return []
        current = link is session.current and not session.worker_gone
        if error is not None:
            if current:
                self._fail(f"gearmand connection lost: {cause(error)}", logging.INFO)
            else:  # a connection that only holds jobs (the worker moved off it, or left): the
                # pair goes on, so the cause is told here
                log.info(
                    "%s: gearmand connection %s lost: %s", session.name, link.name, cause(error),
                    extra=about(**session.log_fields, link=link.name, reason=cause(error)),
                )
        elif not link.shut and (unfinished := link.framer.buffered):
            return self.refuse("mid_packet", mid_packet("gearmand", unfinished))
        elif current:
            self._closing("gearmand closed the connection")
            if not self._worker_ended:
                self._shut(None)
        # The connection is gone, so is everything gearmand had assigned through it (it
        # requeues those jobs): their holds end now, not when the pair is done lingering.
        self._detach(link)
        return session.event_done()

    def link_opened(self, link: UpstreamLink) -> list[Command]:
        """The connection a move asked for (OpenUpstream) is open."""
        if self.done or link.state is not LinkState.CONNECTING:
            return [Close(link)]  # (wanted no more)
        link.state = _OPEN
        pending, link.pending = link.pending, []
        log.info(
            "%s: moved to a fresh gearmand connection; the old one keeps its held jobs", self._session.name,
            extra=about(**self._session.log_fields, link=link.name),
        )
        return [SendUpstream(link, b"".join(pending))]

    def link_failed(self, link: UpstreamLink, why: str) -> list[Command]:
        """No connection for a move: `why` says whose fault (gearmand's, or gproxy's own limit)."""
        if not self.done:
            self._fail(why)
        return self._session.event_done()

    def timer_fired(self, timer: Timer, now: float) -> list[Command]:
        session = self._session
        if self.done:
            return []
        if timer is Timer.LINGER:
            self._finish()
            return session.event_done()
        if timer is Timer.EJECTION:
            log.warning(
                "%s: worker back from its ejection; it is given jobs again", session.name,
                extra=about(**session.log_fields),
            )
            return session.ejection_over()
        return session.timeouts_due(now)

    def refuse(self, reason: str, message: str) -> list[Command]:
        """Bad input: counted by reason, and the pair ends with one warning. (What the event
        had asked for before the bad bytes is dropped with them.)"""
        self._session.discard_pending()
        self._session.metrics.protocol_errors.labels(reason).inc()
        self._fail(message)
        return self._session.event_done()

    def internal_error(self, reason: str, logged: bool) -> list[Command]:
        """Handling an event of the pair failed: it ends, and gearmand requeues its jobs
        (`logged`: the caller has logged its close line, with the traceback)."""
        self._session.discard_pending()
        if self.reason is None or self.level < logging.ERROR:
            self.reason, self.level = reason, logging.ERROR
        self._finish(logged)
        return self._session.event_done()

    def stop(self) -> list[Command]:
        """gproxy is stopping: the pair ends now (gearmand requeues what is left)."""
        if self.reason is None:
            self.reason = "gproxy stopped"
        self._finish()
        return self._session.event_done()

    # -- what the packet rules asked for

    def resolve(self, commands: list[Command]) -> list[Command]:
        """The commands for the shell, in order, with what the lifecycle makes of them: bytes
        for a connection being opened wait in it; a retired connection that owns nothing
        closes; a NothingHeld for one of this pair's connections settles it; the pair's own
        commands end with its Finish."""
        session = self._session
        out: list[Command] = []
        for command in commands:
            if type(command) is SendUpstream:
                link = command.owner
                if link is not session.current and not self._ours(link):
                    out.append(command)  # another pair's connection: the shell hands it over
                elif self._finish_sent:
                    pass
                elif link.state is _OPEN:
                    out.append(command)
                elif link.state is LinkState.CONNECTING:
                    link.pending.append(command.data)
                elif link is session.current and not session.worker_gone:
                    self._fail("gearmand connection lost: closed", logging.INFO)
                    out += session.event_done()
                # else: a connection that is gone already; its loss was reported
            elif type(command) is SendDownstream:
                if not self._finish_sent and not session.worker_gone:
                    out.append(command)
            elif type(command) is NothingHeld:
                if not self._ours(command.owner):
                    out.append(command)
                else:
                    self._settle(command.owner)
                    out += session.event_done()
            elif type(command) is CloseUpstream:
                self._detach(command.link)
                out += session.event_done()
            elif self._finish_sent:
                if type(command) in _FOR_THE_PROCESS:
                    out.append(command)
            else:
                out += self._own(command)
        return out

    def _own(self, command: Command) -> list[Command]:
        """A command about the pair itself, before its Finish."""
        if isinstance(command, OpenUpstream):
            command.link.state = LinkState.CONNECTING
            command.link.pending = [command.replay]
        elif isinstance(command, ArmTimeout):
            return [CallLater(Timer.TIMEOUTS, command.delay)]
        elif isinstance(command, Eject):
            log.warning(
                "%s: worker ejected for %gs: %d failed jobs in a row (the last of %s); its grabs get NO_JOB",
                self._session.name, command.delay, command.failures, text(command.function),
                extra=about(
                    **self._session.log_fields, seconds=command.delay, function=text(command.function),
                    failures=command.failures,
                ),
            )
            return [CallLater(Timer.EJECTION, command.delay)]
        elif isinstance(command, Finish):
            self._finish_sent = True
        elif isinstance(command, Shut) and command.link is not None and command.link.state is not _OPEN:
            return []  # (a connection being opened, or gone, has nothing to half-close)
        return [command]

    # -- the lifecycle's own steps

    def _ours(self, link: UpstreamLink) -> bool:
        """An open connection of this pair (not another pair's, nor gone)."""
        return link.session is not None and link.session.connections is self

    def _holds(self, link: UpstreamLink) -> bool:
        retrier = self._session.retrier
        return retrier is not None and retrier.holds(link)

    def _holds_retries(self) -> bool:
        return any(self._holds(link) for link in self._session.links)

    def _shut(self, link: UpstreamLink | None) -> None:
        if link is None:
            self._worker_shut = True
        else:
            link.shut = True
        self._session.command(Shut(link))

    def _settle(self, link: UpstreamLink) -> None:
        """`link` holds nothing more: a retired link may close; a departed worker's pair may end."""
        if self._session.retire_if_idle(link) and link.state is not LinkState.CLOSED:
            self._detach(link)
        self._nothing_held_check()

    def _detach(self, link: UpstreamLink) -> None:
        """`link`'s connection closes: gearmand requeues whatever it still owns."""
        if link.state is LinkState.CLOSED:
            return
        link.state, link.pending = LinkState.CLOSED, []
        link.session = None  # (it is nobody's now; and the Session is freed with its pair, no cycle)
        if not self.done:
            self._session.command(Close(link))
        self._session.forget(link)
        if not self.done:
            self._nothing_held_check()
            self._maybe_finished()

    def _nothing_held_check(self) -> None:
        if self._kept_for_retries and not self.done and not self._holds_retries():
            self._kept_for_retries = False
            self._wind_down()

    def _wind_down(self) -> None:
        """The worker has gone and nothing is held for it: its gearmand connections are shut."""
        if self._worker_broke is not None:
            return self._fail(self._worker_broke, logging.INFO)
        self._closing("peer closed the connection")
        for link in self._session.links:
            if link.state is _OPEN:
                self._shut(link)
        self._maybe_finished()

    def _closing(self, reason: str) -> None:
        """One side closed: the other gets a grace period to finish, then the pair is cut."""
        self._closings += 1
        if self._closings == 1:
            if self.reason is None:  # a refusal that came first keeps its reason
                self.reason = reason
            self._session.command(CallLater(Timer.LINGER, HALF_CLOSE_LINGER))

    def _maybe_finished(self) -> None:
        if (
            self._worker_ended and not self._kept_for_retries and self._closings
            and all(link.state is LinkState.CLOSED for link in self._session.links)
        ):
            self._finish()

    def _fail(self, reason: str, level: int = logging.WARNING) -> None:
        """End the pair. The first reason is the one logged, unless a graver one follows
        (bad input after the other side closed is still a WARNING, like its metric)."""
        if self.reason is None or level > self.level:
            self.reason, self.level = reason, level
        self._finish()

    def _finish(self, logged: bool = False) -> None:
        if self.done:
            return
        self.done = True
        # The line first: a peer that sees its connection close, and connects again from
        # the same port, comes after it in the log.
        self._session.command(Finish(self.reason or "both sides finished", self.level, logged))
        for link in self._session.links:
            self._detach(link)  # (gearmand requeues what they own; Finish closes them)


_UNANSWERED: Final = {errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}
"""How the kernel ends an established connection whose peer stopped answering (keepalive,
TCP_USER_TIMEOUT, retransmissions): timed out, or unreachable when the last word it had
about the way there was an ICMP error or a failed ARP."""


def cause(error: OSError) -> str:
    """A gearmand connection's error, and what it means where the kernel's words mislead
    ("No route to host" for a host that merely went silent)."""
    if error.errno in _UNANSWERED:
        return f"{error} (gearmand's host stopped answering)"
    return str(error)


def mid_packet(side: str, buffered: int) -> str:
    return f"{side} closed mid-packet ({buffered} bytes of an unfinished frame)"
