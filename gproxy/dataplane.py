"""The data plane: one readiness loop that owns every worker and gearmand socket of the proxy.

Every worker packet crosses gproxy twice. A trio task per socket costs a scheduler wake-up
per packet, which measured as most of gproxy's overhead over haproxy; here each socket is
registered once with epoll, and one wake-up serves every socket that is ready: a read is
handed straight to the socket's handler (the pure Session's owner), whose writes go out at
once when the kernel takes them, and wait in the endpoint's buffer when it does not.

The loop runs one of two ways, the same code either way:
- `run_host(main)`: production. This loop is the process's main loop and trio runs as its
  guest (trio.lowlevel.start_guest_run): timers, retry connections, HTTP and signals stay
  trio code, woken through an eventfd, while bytes never pass through trio's scheduler.
- `drive()`: a trio task waits on the epoll fd and serves what is ready: for tests, where
  trio is the main loop (pytest-trio, a proxy in a thread).

Handlers run synchronously inside `poll()`; one that raises is reported to its own
`failed()`, so a bug closes the pair it concerns and nothing else. A write never calls a
handler back: a socket found broken while writing is reported at the next poll.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import trio

from .core.fields import about

if TYPE_CHECKING:
    from .handshake import TlsSession

log = logging.getLogger("gproxy.dataplane")

RECEIVE_SIZE: Final = 65536
HIGH_WATER: Final = 1 << 20
"""Bytes waiting in an endpoint's buffer above which its pair stops reading the other side:
a peer that does not read never makes gproxy hold more than about this much for it."""
MAX_EVENTS: Final = 256
_READ: Final = select.EPOLLIN | select.EPOLLRDHUP
_WRITE: Final = select.EPOLLOUT
_BROKEN: Final = select.EPOLLERR | select.EPOLLHUP
_WAKE: Final = -1
T = TypeVar("T")


class Handler(Protocol):
    """Whoever owns an endpoint: told of what arrives on it, never asked to poll."""

    def received(self, endpoint: Endpoint, data: bytes) -> None: ...

    def ended(self, endpoint: Endpoint, error: OSError | None) -> None:
        """The peer closed (`error` None: an EOF) or the connection broke. Reading stops."""

    def drained(self, endpoint: Endpoint) -> None:
        """The endpoint's buffer has gone out (below HIGH_WATER: the other side may be read)."""

    def failed(self, endpoint: Endpoint, exc: Exception) -> None:
        """A handler method raised unexpectedly (a bug): close what it concerns."""


class Endpoint:
    """One connected socket of the data plane, and what waits to be written to it."""

    __slots__ = ("_eof_pending", "_mask", "_out", "_plane", "buffered", "closed", "ended", "error", "fd", "gate",
                 "handler", "peer", "reading", "receive", "shut", "sock", "watched")

    def __init__(self, plane: DataPlane, sock: socket.socket, handler: Handler, peer: str) -> None:
        self._plane = plane
        self.sock = sock
        self.fd = sock.fileno()
        self.receive: Callable[[int], bytes] = sock.recv
        """What the loop reads with: the socket's recv, or a TLS endpoint's decrypting one."""
        self.handler = handler
        self.gate: object | None = None
        """The compiled data plane's bypass of the Session (never set here: the pure Pair
        asks its Session itself)."""
        self.peer = peer
        self.reading = True
        """Reads are wanted (the pair may pause them for backpressure)."""
        self.closed = False
        self.ended = False
        """The handler was told the peer closed or the connection broke."""
        self.watched = True
        """Registered with epoll (not once the peer has hung up: epoll reports that forever)."""
        self.error: OSError | None = None
        """Why a write failed; reported to the handler at the next poll."""
        self._out: collections.deque[memoryview] = collections.deque()
        self.buffered = 0
        """Bytes written here and not yet taken by the kernel."""
        self._eof_pending = False
        self.shut = False
        """gproxy half-closed it (or will, once its buffer has gone): an EOF from the peer
        after that is its answer, not a close of its own."""
        self._mask = _READ

    def write(self, data: bytes) -> None:
        """Send `data` after whatever waits already; never blocks, never raises."""
        if self.closed or self.error is not None or not data:
            return
        if not self._out:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._broken(exc)
                return
            if sent == len(data):
                return
            view = memoryview(data)[sent:]
        else:
            view = memoryview(data)
        self._out.append(view)
        self.buffered += len(view)
        self._watch()

    def shutdown_write(self) -> None:
        """Half-close once everything written so far has gone: the peer reads EOF."""
        if self.closed:
            return
        self.shut = True
        if self._out:
            self._eof_pending = True
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                self._broken(exc)

    def pause(self) -> None:
        if self.reading:
            self.reading = False
            self._watch()

    def resume(self) -> None:
        if not self.reading and not self.closed and not self.ended:
            self.reading = True
            self._watch()

    def close(self) -> None:
        """Forget it and close the socket; what waited to be written is dropped, and so is
        the handler (no cycle keeps a closed pair's memory until the garbage collector runs)."""
        if not self.closed:
            self.closed = True
            self._out.clear()
            self.buffered = 0
            self._plane._forget(self)
            self.sock.close()
            self.handler = _CLOSED

    # -- for the loop

    def _flush(self) -> bool:
        """Write what waits; True if the buffer fell below HIGH_WATER from above it."""
        before = self.buffered
        out = self._out
        try:
            while out:
                view = out[0]
                sent = self.sock.send(view)
                self.buffered -= sent
                if sent < len(view):
                    out[0] = view[sent:]
                    break
                out.popleft()
        except BlockingIOError:
            pass
        except OSError as exc:
            self._broken(exc)
            return False
        if not out:
            if self._eof_pending:
                self._eof_pending = False
                self.shutdown_write()
            self._watch()
        return before >= HIGH_WATER > self.buffered

    def _watch(self) -> None:
        mask = (_READ if self.reading else 0) | (_WRITE if self._out else 0)
        if mask != self._mask and self.watched and not self.closed:
            self._mask = mask
            self._plane._epoll.modify(self.fd, mask)

    def _broken(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc
            self._out.clear()
            self.buffered = 0
            self._plane._report(self)

    def __repr__(self) -> str:
        return f"Endpoint({self.peer}, fd {self.fd})"


class _Closed:
    """The handler of a closed endpoint: hears nothing."""

    def received(self, endpoint: Endpoint, data: bytes) -> None:
        pass

    def ended(self, endpoint: Endpoint, error: OSError | None) -> None:
        pass

    def drained(self, endpoint: Endpoint) -> None:
        pass

    def failed(self, endpoint: Endpoint, exc: Exception) -> None:
        pass


_CLOSED: Final = _Closed()


class DataPlane:
    """Owns the epoll object and the endpoints registered with it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        """Now, for the handlers: the clock trio's timers run on, so the two planes agree."""
        self._epoll = select.epoll()
        self._endpoints: dict[int, Endpoint] = {}
        self._broken: list[Endpoint] = []
        self._wake_fd: int | None = None
        self.hosted = False
        """Running as the host of trio's guest run (else a trio task drives it)."""

    def __len__(self) -> int:
        return len(self._endpoints)

    def add(self, sock: socket.socket, handler: Handler, peer: str, tls: TlsSession | None = None) -> Endpoint:
        """Take over a connected socket (with `tls`: whose handshake is done): from now on
        only this loop reads and writes it."""
        sock.setblocking(False)
        if tls is None:
            endpoint = EndpointPy(self, sock, handler, peer)  # (this module's, whichever is selected)
        else:
            from .tls_endpoint import TlsEndpoint  # (it is an Endpoint: imported once this module is)

            endpoint = TlsEndpoint(self, sock, handler, peer, tls)
        self._endpoints[endpoint.fd] = endpoint
        self._epoll.register(endpoint.fd, _READ)
        return endpoint

    def guard(self, endpoint: Endpoint, pair: object, session: object, endpoints: object, link: object = None) -> None:
        """(The compiled data plane gives `endpoint` a Gate; here the Pair bypasses its
        Session itself: Session.bypasses_downstream.)"""

    def poll(self, timeout: float) -> int:
        """Serve everything ready now (waiting up to `timeout` seconds, -1: until something
        is); returns how many events there were."""
        try:
            events = self._epoll.poll(timeout, MAX_EVENTS)
        except InterruptedError:
            events = []
        endpoints, wake_fd = self._endpoints, self._wake_fd
        read, write, broken = _READ, _WRITE, _BROKEN
        for fd, mask in events:
            if fd == wake_fd:
                os.eventfd_read(fd)
                continue
            endpoint = endpoints.get(fd)
            if endpoint is None:
                continue
            handler = endpoint.handler
            try:
                if mask & write and endpoint._flush():
                    handler.drained(endpoint)
                if endpoint.closed or endpoint.error is not None:
                    continue
                if (endpoint.reading and mask & read) or (mask & broken and not endpoint.ended):
                    # (a hang-up is read even while paused: its EOF or error)
                    try:
                        data = endpoint.receive(RECEIVE_SIZE)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        self._ended(endpoint, handler, exc)
                        continue
                    if data:
                        handler.received(endpoint, data)
                    else:
                        self._ended(endpoint, handler, None)
                elif mask & broken:  # told already; epoll would report the hang-up forever
                    self._unwatch(endpoint)
            except Exception as exc:  # noqa: BLE001 - a bug closes its pair, not the process
                self._failed(endpoint, exc)
        if self._broken:
            self._report_broken()
        return len(events)

    @staticmethod
    def _ended(endpoint: Endpoint, handler: Handler, error: OSError | None) -> None:
        endpoint.error = error
        endpoint.ended = True
        endpoint.pause()  # level-triggered: an EOF would be reported again and again
        handler.ended(endpoint, error)

    def _report_broken(self) -> None:
        while self._broken:
            broken, self._broken = self._broken, []
            for endpoint in broken:
                if endpoint.closed or endpoint.ended:
                    continue
                endpoint.ended = True
                endpoint.pause()
                try:
                    endpoint.handler.ended(endpoint, endpoint.error)
                except Exception as exc:  # noqa: BLE001 - as in poll()
                    self._failed(endpoint, exc)

    def _failed(self, endpoint: Endpoint, exc: Exception) -> None:
        try:
            endpoint.handler.failed(endpoint, exc)
        except Exception:  # the handler's last resort failed too: still only this socket
            log.exception("%r: internal error while closing it", endpoint, extra=about(peer=endpoint.peer))
            endpoint.close()

    def _report(self, endpoint: Endpoint) -> None:
        """A write found `endpoint` broken: its handler hears of it from the loop, not from
        inside the write (whose caller may be that very handler)."""
        self._broken.append(endpoint)
        if self._wake_fd is not None:
            os.eventfd_write(self._wake_fd, 1)

    def _unwatch(self, endpoint: Endpoint) -> None:
        if endpoint.watched:
            endpoint.watched = False
            with contextlib.suppress(OSError):
                self._epoll.unregister(endpoint.fd)

    def _forget(self, endpoint: Endpoint) -> None:
        if self._endpoints.get(endpoint.fd) is endpoint:
            del self._endpoints[endpoint.fd]
            self._unwatch(endpoint)

    # -- driven by a trio task

    async def drive(self) -> None:
        """Serve until cancelled, as a trio task: for tests and embedding under trio."""
        self._ensure_wake_fd()
        fd = self._epoll.fileno()
        while True:
            if self._broken:
                self._report_broken()
            await trio.lowlevel.wait_readable(fd)
            self.poll(0)

    # -- as the host of trio's guest run

    def run_host(self, main: Callable[..., Awaitable[T]], *args: Any, clock: trio.abc.Clock | None = None) -> T:
        """Run `main(*args)` under trio as this loop's guest, serving sockets meanwhile;
        returns what it returns (or raises what it raises)."""
        return run_as_host(self, main, *args, clock=clock)

    def reports_waiting(self) -> bool:
        """Broken writes are yet to be reported to their handlers (poll at once)."""
        return bool(self._broken)

    def _ensure_wake_fd(self) -> int:
        if self._wake_fd is None:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._epoll.register(self._wake_fd, select.EPOLLIN)
        return self._wake_fd

    def close(self) -> None:
        for endpoint in list(self._endpoints.values()):
            endpoint.close()
        if self._wake_fd is not None:
            os.close(self._wake_fd)
            self._wake_fd = None
        self._epoll.close()


class Host(Protocol):
    """What run_as_host needs of a data plane (the pure one's or the compiled one's)."""

    hosted: bool

    def poll(self, timeout: float) -> int: ...

    def reports_waiting(self) -> bool: ...

    def _ensure_wake_fd(self) -> int: ...


def run_as_host(plane: Host, main: Callable[..., Awaitable[T]], *args: Any, clock: trio.abc.Clock | None = None) -> T:
    """Run `main(*args)` under trio as `plane`'s guest (DataPlane.run_host, both of them)."""
    plane.hosted = True
    wake = plane._ensure_wake_fd()
    calls: collections.deque[Callable[[], object]] = collections.deque()
    done: list[Any] = []

    def soon_threadsafe(fn: Callable[[], object]) -> None:
        calls.append(fn)
        os.eventfd_write(wake, 1)

    trio.lowlevel.start_guest_run(
        main, *args,
        run_sync_soon_threadsafe=soon_threadsafe,
        run_sync_soon_not_threadsafe=calls.append,
        done_callback=done.append,
        host_uses_signal_set_wakeup_fd=False,
        clock=clock if clock is not None else MonotonicClock(),
    )  # fmt: skip
    while not done:
        plane.poll(0 if calls or plane.reports_waiting() else -1)
        for _ in range(len(calls)):  # those queued now; new ones wait for the next round
            calls.popleft()()
    plane.hosted = False
    result: T = done[0].unwrap()
    return result


class MonotonicClock(trio.abc.Clock):
    """trio's clock in production: time.monotonic, which the data plane reads directly (it
    cannot ask trio for the time between trio's own steps)."""

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return time.monotonic()

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return deadline - time.monotonic()


EndpointPy, DataPlanePy = Endpoint, DataPlane
"""The pure-Python data plane, always importable."""
if not TYPE_CHECKING and not os.environ.get("GPROXY_NO_EXTENSIONS"):
    with contextlib.suppress(ImportError):  # (not built: the pure one serves)
        from ._dataplane import DataPlane, Endpoint


def fast_path() -> str:
    """Which data plane runs: "compiled" (gproxy/_dataplane.pyx) or "pure" (this module's:
    not built, or GPROXY_NO_EXTENSIONS set)."""
    return "pure" if DataPlane is DataPlanePy else "compiled"


def described() -> str:
    """The data plane that runs, in words (`gproxy --version`), a checked build named: the
    fuzz tier's log shows that it ran on one."""
    if fast_path() == "pure":
        return "pure data plane"
    checked = getattr(sys.modules[DataPlane.__module__], "CHECKED_BUILD", False)
    return "compiled data plane, checked build" if checked else "compiled data plane"
