"""A fault-injecting TCP relay, loopback only: break gproxy's connections to gearmand on cue.

What gproxy promises matters most when its upstream connections break: a worker's
connection reset in the middle of a job, a retry client's connection refused, gearmand
unreachable for a while. A real gearmand does not break on cue, so a test puts a
FaultRelay between gproxy and gearmand and breaks the relayed connections itself:

    with FaultRelay(gearmand.address) as relay, ProxyThread.to(relay.address) as proxy:
        ...
        relay.wait_for_connections(1, timeout=5)
        relay.reset_where(lambda c: c.first_bytes.startswith(OPTION_REQ))

Unless told otherwise the relay is transparent: bytes go both ways unchanged, an EOF from
one side becomes shutdown(SHUT_WR) towards the other, and a reset by either peer is
mirrored to the other. The faults:

- reset(port), reset_all(), reset_where(predicate): close both sockets of a connection with
  SO_LINGER (on, 0), so both gproxy and gearmand get a TCP RST (ECONNRESET), not an EOF.
- refuse_next(n): the next n connections are accepted and reset, never relayed.
- down() / up(): stop and resume listening on the same port (ECONNREFUSED in between);
  connections already relayed are not touched.
- an upstream that cannot be reached: the accepted connection is reset.

A connection condemned on arrival (refuse_next, unreachable upstream) is reset when its
client first sends (or closes), or after REFUSE_GRACE if it stays silent, not at accept:
the kernel completes the handshake before accept(), but a client doing a non-blocking
connect (trio does) learns the outcome only when it next looks, and an RST that got there
first would make connect() itself fail with ECONNRESET instead of the first send/recv.

Design: one daemon thread runs a `selectors` loop over non-blocking sockets and owns every
socket. The public methods hand it a command and wait for its result, so when reset()
returns the RST has been sent and the connection is gone from connections(). Plain threads
and blocking waits, no trio, so the relay works beside synchronous tests and beside a trio
loop running in another thread.
"""

from __future__ import annotations

import collections
import errno
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

log = logging.getLogger("tests.fault_relay")

HOST = "127.0.0.1"
FIRST_BYTES_MAX = 64
# How long a silent client condemned on arrival may keep its connection before the RST;
# long enough for its connect() to have returned, short enough for a test not to notice.
REFUSE_GRACE = 0.1

_CHUNK = 65536
# Per direction: stop reading from a peer while this much waits for the other one, so a
# slow reader slows its writer down (TCP flow control end to end) instead of growing memory.
_BUFFER_LIMIT = 256 * 1024
_COMMAND_TIMEOUT = 5.0
_JOIN_TIMEOUT = 5.0
_ACCEPTS_PER_WAKEUP = 64
# struct linger {int l_onoff; int l_linger;}: on, 0 s -> close() sends RST, drops unsent data.
_LINGER_RST = struct.pack("ii", 1, 0)
# A peer that went away abruptly: a fault to mirror, not a bug to warn about.
_PEER_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_PEER_GONE_ERRNOS = (errno.ENOTCONN, errno.ESHUTDOWN)  # shutdown() after the peer's RST
_CONNECT_PENDING = (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN)

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_WAKE = object()  # selector key data of the wake-up socket
_LISTENER = object()  # ... and of the listening socket
_DOOMED = object()  # ... and of a client socket waiting for its RST (see REFUSE_GRACE)

T = TypeVar("T")


def _abort(sock: socket.socket) -> None:
    """Close so that the peer sees a reset (ECONNRESET), not a clean EOF."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:  # already dead (reset by its peer): closing is all that is left
        pass
    sock.close()


class RelayedConnection:
    """One client connection and its upstream twin.

    The public attributes are for tests to read (and to match in reset_where predicates);
    only the relay's I/O thread changes them. The underscored state belongs to that thread.
    """

    def __init__(self, client: socket.socket, client_address: tuple[str, int]) -> None:
        # The peer that connected to the relay; for gproxy this is its local port, which a
        # test can match with sock.getsockname()[1] of the proxy's upstream socket.
        self.client_host: str = client_address[0]
        self.client_port: int = client_address[1]
        # The first bytes the client sent (up to FIRST_BYTES_MAX): tells a retry client
        # (which opens with OPTION_REQ) from a worker.
        self.first_bytes: bytes = b""
        # The relay's local port towards upstream once connected, as the upstream sees it.
        self.upstream_port: int | None = None
        self.bytes_to_upstream: int = 0
        self.bytes_to_client: int = 0
        self._client = client
        self._upstream: socket.socket | None = None
        self._connecting = True
        self._to_upstream = bytearray()
        self._to_client = bytearray()
        self._client_eof = False
        self._upstream_eof = False
        self._upstream_shut = False
        self._client_shut = False
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"RelayedConnection(client_port={self.client_port}, upstream_port={self.upstream_port},"
            f" first_bytes={self.first_bytes!r}, up={self.bytes_to_upstream}, down={self.bytes_to_client})"
        )


class FaultRelay:
    """Relays 127.0.0.1:<free port> to `upstream` and breaks connections when told to."""

    def __init__(self, upstream: tuple[str, int], host: str = HOST) -> None:
        self.upstream = upstream
        family, _, _, _, sockaddr = socket.getaddrinfo(*upstream, type=socket.SOCK_STREAM)[0]
        self._upstream_family = family
        self._upstream_sockaddr = sockaddr
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # live set, counters, first_bytes
        self._commands: collections.deque[tuple[Callable[[], Any], Future[Any]]]
        self._commands = collections.deque()
        self._live: list[RelayedConnection] = []  # relayed: upstream connected
        self._conns: set[RelayedConnection] = set()  # I/O thread only: all, connecting too
        self._accepted = 0
        self._refused = 0
        self._doomed: dict[socket.socket, tuple[float, int, str]] = {}  # -> deadline, port, why
        self._refuse_pending = 0
        self._stopping = False  # I/O thread only: leave the loop after this round
        self._stopped = False  # the I/O thread has finished; no command will run any more
        self._closed = False
        self._crash: BaseException | None = None
        # Unexpected errors met in the I/O thread (each also logged at WARNING).
        self.errors: list[BaseException] = []
        self._selector = selectors.DefaultSelector()
        self._masks: dict[socket.socket, int] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._listener: socket.socket | None = self._listen(host, 0)
        self.address: tuple[str, int] = (host, int(self._listener.getsockname()[1]))
        if family == socket.AF_INET and tuple(sockaddr[:2]) == self._listener.getsockname():
            # Possible when `upstream` names a port that was free a moment ago: relaying to
            # itself, every connection would beget another until file descriptors run out.
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()
            self._selector.close()
            raise ValueError(f"fault relay would relay {upstream} to itself")
        self._name = f"fault relay :{self.address[1]} -> {upstream[0]}:{upstream[1]}"
        self._set_mask(self._wake_r, _READ, _WAKE)
        self._set_mask(self._listener, _READ, _LISTENER)
        self._thread = threading.Thread(
            target=self._run, name=f"fault-relay:{self.address[1]}", daemon=True
        )
        self._thread.start()

    # --- public API --------------------------------------------------------------------

    def __enter__(self) -> FaultRelay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def accepted(self) -> int:
        """Connections accepted so far, the refused ones included."""
        with self._lock:
            return self._accepted

    @property
    def refused(self) -> int:
        """Connections reset on arrival (refuse_next, unreachable upstream), counted once
        the RST has been sent."""
        with self._lock:
            return self._refused

    @property
    def is_up(self) -> bool:
        """Whether the relay is listening (False between down() and up())."""
        with self._lock:
            return self._listener is not None

    def connections(self) -> list[RelayedConnection]:
        """The live relayed connections, oldest first (a snapshot).

        A connection is listed once its upstream connection is established (microseconds
        after accept on loopback) until either side closes it or it is reset.
        """
        with self._lock:
            return list(self._live)

    def reset(self, client_port: int) -> bool:
        """Reset the connection whose client uses `client_port`; False if there is none."""
        return self.reset_where(lambda c: c.client_port == client_port) > 0

    def reset_all(self) -> int:
        """Reset every live connection; returns how many."""
        return self.reset_where(lambda c: True)

    def reset_where(self, predicate: Callable[[RelayedConnection], bool]) -> int:
        """Reset the live connections matching `predicate`; returns how many.

        Both peers get an RST. Only listed connections count (see connections()): one whose
        upstream connect is still under way is left alone. The predicate runs in the I/O thread, on every connection
        before any is reset, so one that raises resets nothing (the error is re-raised here).
        """

        def run() -> int:
            with self._lock:
                live = list(self._live)
            chosen = [c for c in live if predicate(c)]
            for conn in chosen:
                self._finish(conn, abort=True, why="reset by the test")
            return len(chosen)

        return self._call(run, "reset connections")

    def refuse_next(self, n: int) -> None:
        """Reset the next `n` connections on arrival, without connecting upstream
        (replaces any count still pending; 0 cancels).

        The peer's connect() succeeds; the RST goes out when it first sends (that send has
        already succeeded locally, so the following recv fails with ECONNRESET) or after
        REFUSE_GRACE of silence (its recv fails). A connection whose handshake completed
        before this call, but which the relay had not accepted yet, counts as "next".
        """
        if n < 0:
            raise ValueError(f"refuse_next: n must be >= 0, got {n}")
        with self._lock:
            self._refuse_pending = n

    def down(self) -> None:
        """Stop listening: new connects get ECONNREFUSED. Live connections are untouched,
        and so are those whose handshake completed before this call (accepted first)."""

        def run() -> None:
            if self._listener is None:
                return
            self._accept()  # whatever already sits in the backlog; closing would reset it
            self._drop(self._listener)
            self._listener.close()
            with self._lock:
                self._listener = None
            log.debug("%s: down", self._name)

        self._call(run, "go down")

    def up(self) -> None:
        """Listen again on the same port (SO_REUSEADDR, so live connections do not block it)."""

        def run() -> None:
            if self._listener is not None:
                return
            listener = self._listen(self.address[0], self.address[1])
            with self._lock:
                self._listener = listener
            self._set_mask(listener, _READ, _LISTENER)
            log.debug("%s: up", self._name)

        self._call(run, "come up")

    def wait_for_connections(
        self,
        count: int,
        timeout: float = 5.0,
        where: Callable[[RelayedConnection], bool] | None = None,
    ) -> list[RelayedConnection]:
        """Wait until at least `count` connections are live (and match `where`, which is
        re-checked whenever a connection comes, goes or receives its first bytes).

        Returns the matching connections; raises TimeoutError saying what it waited for.
        """

        def matching() -> list[RelayedConnection]:
            return [c for c in self._live if where is None or where(c)]

        with self._changed:
            if not self._changed.wait_for(lambda: self._stopped or len(matching()) >= count, timeout):
                what = "" if where is None else f" matching {getattr(where, '__name__', where)}"
                raise TimeoutError(
                    f"{self._name}: waited {timeout} s for {count} live connection(s){what};"
                    f" have {matching()} of {self._live}"
                )
            found = matching()
            if len(found) < count:
                raise RuntimeError(
                    f"{self._name} stopped while waiting for {count} connection(s)"
                ) from self._crash
            return found

    def wait_for_accepted(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least `count` connections were accepted in total (refused included)."""
        self._wait_for_counter(lambda: self._accepted, count, timeout, "accepted")

    def wait_for_refused(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least `count` connections were reset on arrival (the RST sent)."""
        self._wait_for_counter(lambda: self._refused, count, timeout, "refused")

    def _wait_for_counter(
        self, counter: Callable[[], int], count: int, timeout: float, what: str
    ) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self._stopped or counter() >= count, timeout):
                raise TimeoutError(
                    f"{self._name}: waited {timeout} s for {count} {what} connection(s);"
                    f" have {counter()}"
                )
            if counter() < count:
                raise RuntimeError(
                    f"{self._name} stopped while waiting for {count} {what}"
                ) from self._crash

    def close(self) -> None:
        """Stop the I/O thread, closing every socket; raises if it does not stop in time
        or if it crashed earlier (so a crash is not lost). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            stopped = self._stopped
        if not stopped:
            try:
                self._call(self._request_stop, "stop")
            except RuntimeError:  # it stopped (crashed) meanwhile; the join below tells
                pass
        self._thread.join(_JOIN_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError(f"{self._name}: I/O thread did not stop within {_JOIN_TIMEOUT} s")
        self._wake_r.close()
        self._wake_w.close()
        if self._crash is not None:
            raise RuntimeError(f"{self._name}: I/O thread crashed (see the log)") from self._crash

    # --- commands: callers -> I/O thread --------------------------------------------------

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn` in the I/O thread, which owns the sockets, and return its result."""
        if threading.current_thread() is self._thread:  # e.g. a predicate that resets
            return fn()
        future: Future[T] = Future()
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"{self._name} is closed; cannot {what}") from self._crash
            self._commands.append((fn, future))
        self._wake()
        try:
            return future.result(timeout=_COMMAND_TIMEOUT)
        except TimeoutError:
            if future.done():  # fn itself raised TimeoutError
                raise
            raise TimeoutError(
                f"{self._name}: I/O thread did not {what} within {_COMMAND_TIMEOUT} s"
            ) from None

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:  # a wake-up is already pending
            pass
        except OSError:  # closed: the thread is gone, _call's checks report it
            pass

    def _request_stop(self) -> None:
        self._stopping = True

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                fn, future = self._commands.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # the caller re-raises it
                future.set_exception(exc)
            else:
                future.set_result(result)

    # --- the I/O thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._doomed:
                    timeout = max(0.0, min(d for d, _, _ in self._doomed.values()) - time.monotonic())
                for key, events in self._selector.select(timeout):
                    if key.data is _WAKE:
                        self._drain_wake()
                    elif key.data is _LISTENER:
                        if self._listener is not None:
                            self._accept()
                    elif key.data is _DOOMED:
                        assert isinstance(key.fileobj, socket.socket)
                        self._execute(key.fileobj, "client spoke")
                    else:
                        assert isinstance(key.data, RelayedConnection)
                        assert isinstance(key.fileobj, socket.socket)
                        self._service(key.data, key.fileobj, events)
                now = time.monotonic()
                for sock in [s for s, (deadline, _, _) in self._doomed.items() if deadline <= now]:
                    self._execute(sock, "grace over")
                self._run_commands()
        except BaseException as exc:
            log.warning("%s: I/O loop crashed", self._name, exc_info=True)
            self._crash = exc
        finally:
            self._shut_down()

    def _shut_down(self) -> None:
        """Close everything; fail the commands nobody will run."""
        with self._lock:
            self._stopped = True
            pending = list(self._commands)
            self._commands.clear()
            listener, self._listener = self._listener, None
            self._changed.notify_all()
        for _, future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError(f"{self._name} closed before the command ran"))
        for conn in list(self._conns):
            try:
                self._finish(conn, abort=False, why="relay closing")
            except Exception:
                log.warning("%s: closing %r failed", self._name, conn, exc_info=True)
        for sock in list(self._doomed):
            self._execute(sock, "relay closing")
        if listener is not None:
            listener.close()
        self._selector.close()
        log.debug("%s: stopped", self._name)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _listen(self, host: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Also set on the accepted sockets (inherited), which is what lets up() bind the
            # port again while connections accepted on it are still open.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _set_mask(self, sock: socket.socket, mask: int, data: object) -> None:
        """Register/modify/unregister so that `sock` is watched for exactly `mask`."""
        current = self._masks.get(sock, 0)
        if mask == current:
            return
        if current == 0:
            self._selector.register(sock, mask, data)
        elif mask == 0:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, mask, data)
        if mask:
            self._masks[sock] = mask
        else:
            del self._masks[sock]

    def _drop(self, sock: socket.socket) -> None:
        if self._masks.pop(sock, 0):
            self._selector.unregister(sock)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                client, address = self._listener.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:  # reset before we got to it
                continue
            except OSError:  # e.g. EMFILE; the listener stays readable, so it comes back
                log.warning("%s: accept failed", self._name, exc_info=True)
                return
            with self._lock:
                refuse = self._refuse_pending > 0
                if refuse:
                    self._refuse_pending -= 1
            if refuse:
                with self._lock:
                    self._accepted += 1
                    self._changed.notify_all()
                self._condemn(client, address[1], "refuse_next")
                continue
            try:
                self._start(client, address)
            except Exception as exc:
                log.warning("%s: relaying client port %d failed", self._name, address[1], exc_info=True)
                self.errors.append(exc)
                _abort(client)

    def _start(self, client: socket.socket, address: tuple[str, int]) -> None:
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = socket.socket(self._upstream_family, socket.SOCK_STREAM)
        upstream.setblocking(False)
        err = upstream.connect_ex(self._upstream_sockaddr)
        if err not in _CONNECT_PENDING:
            upstream.close()
            with self._lock:
                self._accepted += 1
                self._changed.notify_all()
            self._condemn(client, address[1], f"upstream unreachable ({errno.errorcode.get(err, err)})")
            return
        conn = RelayedConnection(client, address)
        conn._upstream = upstream
        self._conns.add(conn)
        with self._lock:
            self._accepted += 1
            self._changed.notify_all()
        log.debug("%s: accepted client port %d", self._name, conn.client_port)
        try:
            if err == 0:
                self._connected(conn)
            self._update(conn)
        except Exception as exc:
            self._unexpected(conn, exc)

    def _condemn(self, client: socket.socket, port: int, why: str) -> None:
        """Reset `client` once it speaks or REFUSE_GRACE has passed (see the module doc)."""
        self._doomed[client] = (time.monotonic() + REFUSE_GRACE, port, why)
        self._set_mask(client, _READ, _DOOMED)

    def _execute(self, client: socket.socket, when: str) -> None:
        """Send a condemned client its RST."""
        _, port, why = self._doomed.pop(client)
        self._drop(client)
        log_level = logging.INFO if why.startswith("upstream") else logging.DEBUG
        log.log(log_level, "%s: reset client port %d on arrival (%s; %s)", self._name, port, why, when)
        with self._lock:  # see _finish
            _abort(client)
            self._refused += 1
            self._changed.notify_all()

    def _unreachable(self, conn: RelayedConnection, err: int) -> None:
        """The upstream connect failed: condemn the client like a refused one."""
        conn._closed = True
        self._conns.discard(conn)
        self._drop(conn._client)
        if conn._upstream is not None:
            self._drop(conn._upstream)
            conn._upstream.close()
        why = f"upstream unreachable ({errno.errorcode.get(err, err)})"
        self._condemn(conn._client, conn.client_port, why)
        if conn.first_bytes:  # it has spoken, so its connect() is over: no grace needed
            self._execute(conn._client, "client spoke")

    def _connected(self, conn: RelayedConnection) -> None:
        """The upstream connection is up: from now on the pair is relayed and listed."""
        assert conn._upstream is not None
        conn._connecting = False
        conn._upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.upstream_port = int(conn._upstream.getsockname()[1])
        with self._lock:
            self._live.append(conn)
            self._changed.notify_all()
        log.debug(
            "%s: client port %d relayed via port %d", self._name, conn.client_port, conn.upstream_port
        )

    def _service(self, conn: RelayedConnection, sock: socket.socket, events: int) -> None:
        """Handle one readiness event; any failure ends the connection, never the loop."""
        if conn._closed:  # finished by an earlier event of the same round
            return
        try:
            if sock is conn._upstream and conn._connecting:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._unreachable(conn, err)
                    return
                self._connected(conn)
            else:
                if events & _READ:
                    self._read(conn, sock)
                if events & _WRITE:
                    self._write(conn, sock)
            self._update(conn)
        except OSError as exc:
            if not (isinstance(exc, _PEER_GONE) or exc.errno in _PEER_GONE_ERRNOS):
                self._unexpected(conn, exc)
                return
            side = "client" if sock is conn._client else "upstream"
            self._finish(conn, abort=True, why=f"{side} went away ({exc!r}); reset mirrored")
        except Exception as exc:
            self._unexpected(conn, exc)

    def _unexpected(self, conn: RelayedConnection, exc: Exception) -> None:
        """A bug or an odd socket error: say so loudly, keep it for the test, reset the pair."""
        log.warning("%s: client port %d failed", self._name, conn.client_port, exc_info=exc)
        self.errors.append(exc)
        self._finish(conn, abort=True, why="unexpected error")

    def _read(self, conn: RelayedConnection, sock: socket.socket) -> None:
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return
        if sock is conn._client:
            if not data:
                conn._client_eof = True
                return
            conn._to_upstream += data
            missing = FIRST_BYTES_MAX - len(conn.first_bytes)
            if missing > 0:
                with self._lock:
                    conn.first_bytes += data[:missing]
                    self._changed.notify_all()
        else:
            if not data:
                conn._upstream_eof = True
                return
            conn._to_client += data

    def _write(self, conn: RelayedConnection, sock: socket.socket) -> None:
        to_client = sock is conn._client
        buffer = conn._to_client if to_client else conn._to_upstream
        if not buffer:
            return
        try:
            sent = sock.send(buffer)
        except BlockingIOError:
            return
        del buffer[:sent]
        if to_client:
            conn.bytes_to_client += sent
        else:
            conn.bytes_to_upstream += sent

    def _update(self, conn: RelayedConnection) -> None:
        """Propagate drained EOFs as half-closes, end the connection when both directions
        are done, and watch each socket for exactly what it can do next."""
        upstream = conn._upstream
        assert upstream is not None
        if not conn._connecting:
            if conn._client_eof and not conn._to_upstream and not conn._upstream_shut:
                upstream.shutdown(socket.SHUT_WR)
                conn._upstream_shut = True
            if conn._upstream_eof and not conn._to_client and not conn._client_shut:
                conn._client.shutdown(socket.SHUT_WR)
                conn._client_shut = True
            if conn._upstream_shut and conn._client_shut:
                self._finish(conn, abort=False, why="both sides closed")
                return
        client_reads = not conn._client_eof and len(conn._to_upstream) < _BUFFER_LIMIT
        client_mask = (_READ if client_reads else 0) | (_WRITE if conn._to_client else 0)
        if conn._connecting:
            upstream_mask = _WRITE
        else:
            upstream_reads = not conn._upstream_eof and len(conn._to_client) < _BUFFER_LIMIT
            upstream_mask = (_READ if upstream_reads else 0) | (_WRITE if conn._to_upstream else 0)
        self._set_mask(conn._client, client_mask, conn)
        self._set_mask(upstream, upstream_mask, conn)

    def _finish(self, conn: RelayedConnection, *, abort: bool, why: str) -> None:
        """Close both sockets of `conn` (with RST if `abort`) and forget it."""
        if conn._closed:
            return
        conn._closed = True
        self._conns.discard(conn)
        sockets = [sock for sock in (conn._client, conn._upstream) if sock is not None]
        for sock in sockets:
            self._drop(sock)
        verb = "reset" if abort else "closed"
        log.debug("%s: client port %d %s: %s", self._name, conn.client_port, verb, why)
        # Close under the lock, so that a test which saw the RST (or EOF) and then looks at
        # connections() or the counters finds them already updated.
        with self._lock:
            for sock in sockets:
                if abort:
                    _abort(sock)
                else:
                    sock.close()
            if conn in self._live:
                self._live.remove(conn)
            self._changed.notify_all()
