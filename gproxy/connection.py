"""A TCP connection for trio code: gproxy's own retry connections and readiness probes; and
the TCP keepalive of every connection to gearmand.

(Workers' connections and theirs to gearmand belong to the data plane, not to trio.) A
read waits for readiness first and then makes one recv, and a write that fits in the
kernel buffer is one send with no wait at all.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from .config import Keepalive
from .core.tls_refusals import TlsError
from .handshake import TlsSession, describe

_INT_MAX = 2**31 - 1
_RECORDS: Final = 65536
"""Ciphertext read at once by a TLS connection."""


class Connection:
    """A connected non-blocking socket: one task reads; any number of tasks may write, each
    write arrives whole and in the order the writes began."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int] | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._send_lock = trio.StrictFIFOLock()
        if peer is None:
            with contextlib.suppress(OSError):
                peer = sock.getpeername()
        self.peer = _address(peer) if peer else "?"

    @classmethod
    def from_stream(cls, stream: trio.SocketStream) -> Connection:
        """Take over the socket of a trio stream (TCP_NODELAY, set by trio, stays on)."""
        sock = stream.socket
        return cls(socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach()))

    async def receive(self, max_bytes: int) -> bytes:
        """The next bytes, or b"" at EOF. Raises OSError if the connection broke, or was
        closed here meanwhile."""
        while True:
            await _wait(trio.lowlevel.wait_readable, self.sock)
            try:
                return self.sock.recv(max_bytes)
            except BlockingIOError:  # woken without data (it happens): wait again
                continue

    async def send_all(self, data: bytes) -> None:
        """Send everything, waiting only while the kernel's buffer is full (backpressure).
        Raises OSError if the connection broke, or was closed here meanwhile.

        The lock is taken only when a write has to wait, so the usual write (the kernel takes
        it all at once) costs one send and no scheduling; a write that finds another one
        waiting queues behind it rather than interleaving with it.
        """
        lock = self._send_lock
        if lock.locked():
            async with lock:
                await self._send_rest(memoryview(data))
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        lock.acquire_nowait()  # no checkpoint since locked() was False: nobody got in between
        try:
            await self._send_rest(memoryview(data)[sent:])
        finally:
            lock.release()

    async def _send_rest(self, view: memoryview) -> None:
        while view:
            await _wait(trio.lowlevel.wait_writable, self.sock)
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                continue

    def send_eof(self) -> None:
        """Half-close: the peer reads EOF, and can still send to us."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


class TlsConnection(Connection):
    """A Connection whose peer speaks TLS (its handshake done): the same promises, plaintext
    in and out."""

    def __init__(self, sock: socket.socket, session: TlsSession, peer: tuple[str, int] | None = None) -> None:
        super().__init__(sock, peer)
        self._tls, self._incoming, self._outgoing = session.tls, session.incoming, session.outgoing

    async def receive(self, max_bytes: int) -> bytes:
        """Raises a TlsError if TLS fails (the peer refused something of ours, or sent garbage)."""
        while True:
            try:
                return self._tls.read(max_bytes)  # (b"": the peer's close_notify)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as exc:
                raise TlsError(describe(exc)) from None
            if self._outgoing.pending:  # (post-handshake messages: a key update's answer)
                await super().send_all(self._outgoing.read())
            records = await super().receive(_RECORDS)
            if not records:
                return b""
            self._incoming.write(records)

    async def send_all(self, data: bytes) -> None:
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            raise TlsError(describe(exc)) from None
        await super().send_all(self._outgoing.read())  # (no checkpoint since the write: in order)

    def send_eof(self) -> None:
        """A close_notify, then the TCP half-close."""
        with contextlib.suppress(ssl.SSLError):  # (SSLWantReadError: sent; the peer's is not waited for)
            self._tls.unwrap()
        with contextlib.suppress(OSError):
            self.sock.send(self._outgoing.read())
        super().send_eof()


def set_keepalive(sock: socket.socket, keepalive: Keepalive) -> None:
    """Probe a connection that has been silent for `keepalive.idle` seconds, and give it up
    after `keepalive.count` probes go unanswered: its next recv fails as any broken
    connection's would (ETIMEDOUT, or EHOSTUNREACH when the last word the kernel had was an
    ICMP error or a failed ARP). Disabled: the system's defaults stay (no keepalive)."""
    if not keepalive.enabled:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive.idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)
    # Keepalive probes only a connection with nothing unacknowledged: data written to a dead
    # peer would be retransmitted instead, for about 15 minutes on Linux (tcp_retries2). The
    # user timeout ends it after as long as keepalive allows an idle one. Set to exactly
    # that, it leaves keepalive's own verdict unchanged (the kernel then ends an idle
    # connection when the time since its last answer reaches the user timeout, with a probe
    # out, which falls on the last probe's deadline). In ms, at most what the kernel takes.
    user_timeout = min(keepalive.deadline * 1000, _INT_MAX)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout)


class ClosedHere(OSError):
    """The connection was closed by gproxy itself while a task waited on it: to the waiting
    task the same as a broken connection (trio says ClosedResourceError, which is no OSError)."""


async def _wait(wait: Callable[[socket.socket], Awaitable[None]], sock: socket.socket) -> None:
    try:
        await wait(sock)
    except trio.ClosedResourceError as exc:
        raise ClosedHere("closed while in use") from exc


def _address(peer: tuple[str, int]) -> str:
    host, port, *_ = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
