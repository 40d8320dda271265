"""A TCP connection for trio code: gproxy's own retry connections and readiness probes.

(Workers' connections and theirs to gearmand belong to the data plane, not to trio.) A
read waits for readiness first and then makes one recv, and a write that fits in the
kernel buffer is one send with no wait at all.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable

import trio


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
