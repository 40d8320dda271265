"""TLS in the data plane and in trio code, against Python's own TLS (OpenSSL) as the peer,
driven byte by byte over a real socket so that what arrives together is chosen, not hoped
for: the handshake (its failures named), a TLS endpoint (its reads, writes, EOFs and
breakages), a TLS Connection (the retry client's and the readiness probe's)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio.testing

from gproxy.connection import TlsConnection
from gproxy.core.tls_refusals import ClosedBeforeHandshake, HandshakeFailed, TlsError
from gproxy.dataplane import HIGH_WATER, DataPlane, Endpoint
from gproxy.handshake import HANDSHAKE_TIMEOUT, TlsSession, handshake
from gproxy.tls import client_context, server_context
from tests.test_dataplane import Recorder
from tests.tls_files import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Peer:
    """The other end, in Python's TLS over memory BIOs: every byte it sends goes out in one
    send call, so the test decides what reaches gproxy together."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str | None) -> None:
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_hostname is None, server_hostname=server_hostname,
        )

    async def handshake(self, then_send: bytes = b"") -> None:
        """Shake hands; `then_send` goes out in the same send as the handshake's last bytes."""
        while True:
            try:
                self.tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            if done and then_send:
                self.tls.write(then_send)
            await self.flush()
            if done:
                return
            self.incoming.write(await self.sock.recv(65536))

    async def flush(self) -> None:
        if data := self.outgoing.read():
            await _send_all(self.sock, data)

    async def send(self, data: bytes, close_notify: bool = False) -> None:
        self.tls.write(data)
        if close_notify:
            self.unwrap()
        await self.flush()

    def unwrap(self) -> None:
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass

    async def receive(self, size: int) -> bytes:
        """`size` bytes, or fewer if the peer closes (b"" on a clean close_notify)."""
        got = b""
        while len(got) < size:
            try:
                chunk = self.tls.read(size - len(got))
                if not chunk:
                    return got
                got += chunk
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return got
            data = await self.sock.recv(65536)
            if not data:
                raise EOFError("the connection ended without a close_notify")
            self.incoming.write(data)
        return got


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


@pytest.fixture
def plane() -> Iterator[DataPlane]:
    plane = DataPlane()
    yield plane
    plane.close()


async def served(pki: Pki, then_send: bytes = b"") -> tuple[socket.socket, TlsSession, Peer]:
    """gproxy's side of a worker connection after its handshake, and the worker."""
    ours, theirs = socket.socketpair()
    peer = Peer(theirs, ssl.create_default_context(cafile=str(pki.ca)), "localhost")
    context = server_context(str(pki.server.cert), str(pki.server.key), None)
    sessions: list[TlsSession] = []

    async def serve() -> None:
        sessions.append(await handshake(ours, context))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await peer.handshake(then_send)
    return ours, sessions[0], peer


@pytest.fixture
async def driven(plane: DataPlane) -> AsyncIterator[DataPlane]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(plane.drive)
        yield plane
        nursery.cancel_scope.cancel()


async def until(condition: object, *, what: str) -> None:
    """Let the data plane serve until `condition()` holds (its events, not a clock, end it)."""
    with trio.fail_after(10):
        while not condition():  # type: ignore[operator]
            await trio.sleep(0)  # (a checkpoint: the plane's task serves what is ready)
            await trio.testing.wait_all_tasks_blocked()


async def test_what_a_worker_sends_with_its_last_handshake_bytes_is_read_once_it_is_served(
    pki: Pki, driven: DataPlane
) -> None:
    """Its Finished and its first packet reach gproxy in one segment: the handshake reads
    whole records only, so the packet waits in the kernel for the data plane."""
    ours, session, _peer = await served(pki, then_send=b"\0REQ first packet")
    assert not session.incoming.pending
    handler = Recorder()
    driven.add(ours, handler, "worker", session)
    await until(lambda: b"".join(handler.data) == b"\0REQ first packet", what="the first packet")


async def test_bytes_go_both_ways_in_every_size_records_split_and_joined(pki: Pki, driven: DataPlane) -> None:
    ours, session, peer = await served(pki)
    handler = Recorder()
    endpoint = driven.add(ours, handler, "worker", session)
    sizes = [1, 5, 16_384, 16_385, 100_000, 300_000]
    sent = b"".join(bytes([n % 251]) * size for n, size in enumerate(sizes))
    for n, size in enumerate(sizes):
        await peer.send(bytes([n % 251]) * size)
    await until(lambda: sum(map(len, handler.data)) >= len(sent), what="everything the peer sent")
    assert b"".join(handler.data) == sent
    for n, size in enumerate(sizes):
        endpoint.write(bytes([n % 251]) * size)
    assert await peer.receive(len(sent)) == sent


async def test_a_peer_that_does_not_read_holds_ciphertext_up_to_the_high_water_mark(pki: Pki, driven: DataPlane) -> None:
    ours, session, peer = await served(pki)
    handler = Recorder()
    endpoint = driven.add(ours, handler, "worker", session)
    big = b"x" * (3 * HIGH_WATER)
    endpoint.write(big)
    assert endpoint.buffered >= HIGH_WATER  # (the pair would stop reading the other side now)
    assert await peer.receive(len(big)) == big
    await until(lambda: handler.drains == 1, what="the buffer to go out")
    assert endpoint.buffered == 0


async def test_a_close_notify_after_data_is_an_eof_after_the_data(pki: Pki, driven: DataPlane) -> None:
    """No FIN follows (the peer keeps its socket open): the EOF is the close_notify's."""
    ours, session, peer = await served(pki)
    handler = Recorder()
    driven.add(ours, handler, "worker", session)
    await peer.send(b"last words", close_notify=True)
    await until(lambda: handler.ends, what="the EOF")
    assert (b"".join(handler.data), handler.ends) == (b"last words", [None])


async def test_a_half_close_is_a_close_notify_and_the_peer_may_still_send(pki: Pki, driven: DataPlane) -> None:
    ours, session, peer = await served(pki)
    handler = Recorder()
    endpoint = driven.add(ours, handler, "worker", session)
    endpoint.write(b"bye")
    endpoint.shutdown_write()
    assert await peer.receive(100) == b"bye"  # then a clean close_notify: no more
    assert await peer.sock.recv(10) == b""  # and the TCP half-close after it
    await peer.send(b"still talking")
    await until(lambda: handler.data, what="what the peer sent after our close_notify")
    assert handler.data == [b"still talking"] and handler.ends == []


async def test_close_says_close_notify_first(pki: Pki, driven: DataPlane) -> None:
    ours, session, peer = await served(pki)
    endpoint = driven.add(ours, Recorder(), "worker", session)
    endpoint.close()
    assert await peer.receive(10) == b""  # (an EOF without close_notify raises EOFError)


async def test_garbage_after_the_handshake_ends_the_connection_with_tls_words(pki: Pki, driven: DataPlane) -> None:
    ours, session, peer = await served(pki)
    handler = Recorder()
    driven.add(ours, handler, "worker", session)
    await peer.sock.send(b"\x17\x03\x03\x00\x20" + b"\xaa" * 32)  # application data no key decrypts
    await until(lambda: handler.ends, what="the connection to break")
    (error,) = handler.ends
    assert isinstance(error, TlsError) and "(_ssl.c" not in str(error) and str(error), error


async def test_a_plain_endpoint_still_reads_with_the_sockets_own_recv(plane: DataPlane) -> None:
    """The fast path: no TLS, no wrapper between the loop and the socket."""
    ours, theirs = socket.socketpair()
    endpoint = plane.add(ours, Recorder(), "plain")
    assert endpoint.receive == ours.recv and type(endpoint) is Endpoint
    theirs.close()


# -- handshakes that fail, and why

async def test_a_plain_gearman_worker_on_a_tls_port_is_named_so(pki: Pki) -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(b"\0REQ\x00\x00\x00\x01\x00\x00\x00\x03fn1")  # CAN_DO, in clear
    with pytest.raises(HandshakeFailed, match=r"^not TLS: the worker sent no TLS record \(it speaks plain Gearman\)$"):
        await handshake(ours, server_context(str(pki.server.cert), str(pki.server.key), None))


async def test_a_port_probe_that_closes_at_once_is_no_failure_of_tls(pki: Pki) -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    with pytest.raises(ClosedBeforeHandshake):
        await handshake(ours, server_context(str(pki.server.cert), str(pki.server.key), None))


async def test_a_peer_that_says_nothing_is_given_up_after_the_timeout(pki: Pki, autojump_clock: trio.testing.MockClock) -> None:
    ours, _theirs = socket.socketpair()
    started = trio.current_time()
    with pytest.raises(HandshakeFailed, match=rf"^no TLS handshake within {HANDSHAKE_TIMEOUT:g}s$") as failed:
        await handshake(ours, server_context(str(pki.server.cert), str(pki.server.key), None))
    assert trio.current_time() - started == pytest.approx(HANDSHAKE_TIMEOUT)
    assert not failed.value.lasting


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.mark.parametrize(("trusted", "name", "reason"), [
    ("other_ca", "localhost", "certificate verify failed: unable to get local issuer certificate"),
    ("ca", "gearmand.elsewhere", "certificate verify failed: Hostname mismatch, certificate is not valid for 'gearmand.elsewhere'."),
])
async def test_gproxy_refuses_a_gearmand_it_cannot_trust_and_says_why(pki: Pki, trusted: str, name: str, reason: str) -> None:
    ours, theirs = socket.socketpair()
    gearmand = Peer(theirs, server_context(str(pki.server.cert), str(pki.server.key), None), None)
    context = client_context(str(getattr(pki, trusted)), None, None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_quietly, gearmand.handshake)
        with pytest.raises(HandshakeFailed) as failed:
            await handshake(ours, context, server_hostname=name)
        nursery.cancel_scope.cancel()
    assert str(failed.value) == reason and failed.value.lasting


async def _quietly(step: object) -> None:
    try:
        await step()  # type: ignore[operator]
    except (ssl.SSLError, OSError):
        pass


# -- the TLS Connection of trio code

async def test_a_tls_connection_reads_writes_and_half_closes(pki: Pki) -> None:
    ours, session, peer = await served(pki)
    connection = TlsConnection(ours, session)
    await connection.send_all(b"A" * 70_000)
    assert await peer.receive(70_000) == b"A" * 70_000
    await peer.send(b"answer")
    assert await connection.receive(100) == b"answer"
    connection.send_eof()
    assert await peer.receive(10) == b""
    await peer.send(b"", close_notify=True)
    assert await connection.receive(100) == b""
    connection.close()


async def test_a_tls_connection_names_what_broke_it(pki: Pki) -> None:
    ours, session, peer = await served(pki)
    connection = TlsConnection(ours, session)
    await peer.sock.send(b"\x17\x03\x03\x00\x20" + b"\xaa" * 32)
    with pytest.raises(TlsError):
        await connection.receive(100)
    connection.close()
