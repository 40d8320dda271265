"""TLS handshakes, in trio, before a connection is handed to whoever serves it.

The handshake runs over an `ssl.SSLObject` and memory BIOs rather than an SSLSocket, so
that what it leaves behind (the TLS state, not a socket of another kind) can go on to the
data plane's epoll loop or a trio Connection alike. It reads exactly one TLS record at a
time, so that nothing sent after the handshake (a worker's first packets) is read before
the new owner of the socket waits for it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import Final

import trio

from .core.tls_refusals import ClosedBeforeHandshake, HandshakeFailed

HANDSHAKE_TIMEOUT: Final = 10.0
"""Seconds a peer has to complete its handshake."""
_MAX_RECORD: Final = 2**14 + 2048
"""The longest TLS record (TLSCiphertext, RFC 5246 6.2.3)."""
_RECORD_TYPES: Final = frozenset({20, 21, 22, 23})
"""change_cipher_spec, alert, handshake, application_data."""


@dataclass(frozen=True, slots=True)
class TlsSession:
    """A connection's TLS state once its handshake is done: what reads and writes go through."""

    tls: ssl.SSLObject
    incoming: ssl.MemoryBIO
    """Ciphertext read from the socket, not yet decrypted."""
    outgoing: ssl.MemoryBIO
    """Ciphertext to be written to the socket."""


@dataclass(frozen=True, slots=True)
class Transport:
    """A connected socket, and its TLS state if it speaks TLS: what the data plane takes over."""

    sock: socket.socket
    tls: TlsSession | None = None


async def handshake(
    sock: socket.socket, context: ssl.SSLContext, *, server_hostname: str | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> TlsSession:
    """Complete a handshake on the connected non-blocking `sock` as its server (with
    `server_hostname`: as its client, checking gearmand's certificate against that name).
    Raises HandshakeFailed."""
    sock.setblocking(False)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server_hostname is None
    tls = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
    first = True
    with trio.move_on_after(timeout):
        while True:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as exc:
                raise HandshakeFailed(describe(exc), lasting=True, alert=outgoing.read()) from None
            await _send(sock, outgoing.read())
            if done:
                return TlsSession(tls, incoming, outgoing)
            incoming.write(await _record(sock, first, server_side))
            first = False
    raise HandshakeFailed(f"no TLS handshake within {timeout:g}s", lasting=False)


def describe(exc: ssl.SSLError) -> str:
    """Why TLS failed, in words: OpenSSL's, without its codes and source places."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if exc.reason:
        words = exc.reason.lower().replace("_", " ")
        if "alert" in words:  # the peer refused something of ours, and said what
            return f"refused by the peer: {words}"
        return words
    return str(exc)


async def _record(sock: socket.socket, first: bool, server_side: bool) -> bytes:
    """The next whole TLS record: its header says its length."""
    header = await _exactly(sock, 5, before_any=first and server_side)  # (a client has sent its hello)
    length = int.from_bytes(header[3:5], "big")
    if header[0] not in _RECORD_TYPES or header[1] != 3 or length > _MAX_RECORD:
        peer = "the worker" if server_side else "gearmand"
        plain = " (it speaks plain Gearman)" if header[:1] == b"\0" else ""
        raise HandshakeFailed(f"not TLS: {peer} sent no TLS record{plain}", lasting=True)
    return header + await _exactly(sock, length, before_any=False)


async def _exactly(sock: socket.socket, size: int, *, before_any: bool) -> bytes:
    data = b""
    while len(data) < size:
        await trio.lowlevel.wait_readable(sock)
        try:
            chunk = sock.recv(size - len(data))
        except BlockingIOError:
            continue
        except OSError as exc:
            raise HandshakeFailed(f"connection lost during the TLS handshake: {exc.strerror or exc}", lasting=False) from None
        if not chunk:
            if before_any and not data:
                raise ClosedBeforeHandshake()
            raise HandshakeFailed("closed by the peer during the TLS handshake", lasting=False)
        data += chunk
    return data


async def _send(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
        except OSError as exc:
            raise HandshakeFailed(f"connection lost during the TLS handshake: {exc.strerror or exc}", lasting=False) from None


def close_with_alert(sock: socket.socket, failed: HandshakeFailed) -> None:
    """Close a connection whose handshake failed, telling the peer why if it can take it now:
    the alert, the FIN after it, and what the peer sent meanwhile read away (closed unread, it
    would make the kernel answer with a reset, which can overtake the alert)."""
    with contextlib.suppress(OSError):
        sock.send(failed.alert)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):  # (non-blocking: what has come, no more)
            pass
    sock.close()
