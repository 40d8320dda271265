"""A data plane endpoint whose peer speaks TLS: decrypted as it is read, encrypted as it is
written, with the plain endpoint's buffering, backpressure and reporting unchanged.

Only TLS connections pay for it: the data plane reads every endpoint through its `receive`,
which for a plain one is the socket's own recv.
"""

from __future__ import annotations

import contextlib
import socket
import ssl

from .core.tls_refusals import TlsError
from .dataplane import DataPlane, Endpoint, Handler
from .handshake import TlsSession, describe


class TlsEndpoint(Endpoint):
    __slots__ = ("_incoming", "_outgoing", "_tls")

    def __init__(self, plane: DataPlane, sock: socket.socket, handler: Handler, peer: str, session: TlsSession) -> None:
        super().__init__(plane, sock, handler, peer)
        self._tls, self._incoming, self._outgoing = session.tls, session.incoming, session.outgoing
        self.receive = self._receive

    def write(self, data: bytes) -> None:
        if self.closed or self.error is not None or not data:
            return
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            self._broken(TlsError(describe(exc)))
            return
        super().write(self._outgoing.read())

    def shutdown_write(self) -> None:
        """The peer reads EOF: a close_notify, then the TCP half-close."""
        if not self.closed and not self.shut and self.error is None:
            self._close_notify()
            super().write(self._outgoing.read())
        super().shutdown_write()

    def close(self) -> None:
        """As a plain endpoint's, with a close_notify first if it can go at once: a peer's
        TLS library then reads a clean EOF, not a truncated connection."""
        if not self.closed and not self.shut and self.error is None and not self.buffered:
            self._close_notify()
            with contextlib.suppress(OSError):
                self.sock.send(self._outgoing.read())
        super().close()

    def _close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLError):  # (SSLWantReadError: sent; the peer's is not waited for)
            self._tls.unwrap()

    def _receive(self, size: int) -> bytes:
        """Decrypt what the socket holds: the plain recv's contract (b"" at EOF,
        BlockingIOError when no whole record has come yet, OSError when broken)."""
        raw = self.sock.recv(size)
        if not raw:
            return b""
        self._incoming.write(raw)
        tls, chunks, closed = self._tls, [], False
        try:
            while chunk := tls.read(size):
                chunks.append(chunk)
            closed = True  # the peer's close_notify: its EOF (b"" before we sent ours, ...)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # (... this one after)
            closed = True
        except ssl.SSLError as exc:
            raise TlsError(describe(exc)) from None
        if self._outgoing.pending:  # (post-handshake messages: a key update's answer)
            Endpoint.write(self, self._outgoing.read())
        data = b"".join(chunks)
        if closed:
            if data:  # the EOF is reported after the data, at the end of this poll
                self._plane._report(self)
            return data
        if not data:
            raise BlockingIOError
        return data
