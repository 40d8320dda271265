"""The fault relay itself, against small servers of this file (no gearmand): it must relay
faithfully when left alone and break exactly what it is told to, or the fault tests built
on it would prove nothing about gproxy."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.fault_relay import FIRST_BYTES_MAX, HOST, FaultRelay, RelayedConnection

TIMEOUT = 5.0
# An OPTION_REQ packet ("exceptions"), as a retry client opens with.
OPTION_REQ = b"\0REQ" + (26).to_bytes(4, "big") + (10).to_bytes(4, "big") + b"exceptions"


class Server:
    """A loopback TCP server running `handler(conn)` in a thread per connection and
    recording what each handler returned (how the connection ended, as seen upstream)."""

    def __init__(self, handler: Callable[[socket.socket], str]) -> None:
        self._handler = handler
        self._listener = socket.create_server((HOST, 0))
        self.address: tuple[str, int] = (HOST, int(self._listener.getsockname()[1]))
        self._changed = threading.Condition()
        self.outcomes: list[str] = []
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="test-server", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.settimeout(TIMEOUT * 2)  # a handler never blocks forever
            with self._changed:
                if self._stopping:
                    conn.close()
                    return
                self._conns.append(conn)
                thread = threading.Thread(target=self._serve, args=(conn,), name="test-conn", daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            outcome = self._handler(conn)
        except ConnectionResetError:
            outcome = "reset"
        except OSError as exc:
            outcome = f"error: {exc!r}"
        finally:
            conn.close()
        with self._changed:
            self.outcomes.append(outcome)
            self._changed.notify_all()

    @property
    def accepted(self) -> int:
        with self._changed:
            return len(self._conns)

    def wait_for_outcomes(self, outcome: str, count: int) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.outcomes.count(outcome) >= count, TIMEOUT):
                raise TimeoutError(
                    f"waited {TIMEOUT} s for {count} {outcome!r} outcome(s); have {self.outcomes}"
                )

    def close(self) -> None:
        with self._changed:
            self._stopping = True
            conns, threads = list(self._conns), list(self._threads)
        try:  # wake the blocking accept(); it sees _stopping and returns
            socket.create_connection(self.address, timeout=TIMEOUT).close()
        except OSError:
            pass
        self._acceptor.join(TIMEOUT)
        self._listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv
            except OSError:
                pass
        deadline = time.monotonic() + TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in [self._acceptor, *threads] if t.is_alive()]
        assert not alive, f"test server threads still alive: {alive}"


def echo(conn: socket.socket) -> str:
    """Echo everything; on EOF, half-close back (so EOF travels both ways through the relay)."""
    while True:
        data = conn.recv(65536)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return "eof"
        conn.sendall(data)


def greet_then_listen(conn: socket.socket) -> str:
    """Say hello and half-close at once, then read what the client still sends until EOF."""
    conn.sendall(b"hello")
    conn.shutdown(socket.SHUT_WR)
    received = b""
    while chunk := conn.recv(65536):
        received += chunk
    return f"got {received!r}"


@pytest.fixture
def echo_server() -> Iterator[Server]:
    server = Server(echo)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def relay(echo_server: Server) -> Iterator[FaultRelay]:
    with FaultRelay(echo_server.address) as running:
        yield running
        assert running.errors == []


def connect(address: tuple[str, int]) -> socket.socket:
    """A client socket whose every recv/send has a deadline."""
    return socket.create_connection(address, timeout=TIMEOUT)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := sock.recv(65536):
        buf += chunk
    return bytes(buf)


def roundtrip(sock: socket.socket, data: bytes = b"ping") -> None:
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data


def assert_reset(sock: socket.socket) -> None:
    """The peer reset the connection: recv fails with ECONNRESET, it does not see EOF."""
    with pytest.raises(ConnectionResetError):
        sock.recv(1)


def test_relays_bytes_both_ways(relay: FaultRelay) -> None:
    with connect(relay.address) as sock:
        for size in (1, 100, 10_000):
            roundtrip(sock, os.urandom(size))


def test_relays_one_mebibyte_and_its_eof(relay: FaultRelay) -> None:
    payload = os.urandom(1 << 20)
    with connect(relay.address) as sock:
        errors: list[BaseException] = []

        def send() -> None:  # while the test reads, or both sides' buffers fill up
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:
                errors.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = recv_until_eof(sock)
        sender.join(TIMEOUT)
        assert not sender.is_alive() and errors == []
    assert len(received) == len(payload) and received == payload


def test_client_half_close_reaches_upstream_and_back(relay: FaultRelay, echo_server: Server) -> None:
    with connect(relay.address) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"last words"  # echo saw EOF and half-closed back
    echo_server.wait_for_outcomes("eof", 1)


def test_upstream_half_close_reaches_client_which_can_still_send() -> None:
    server = Server(greet_then_listen)
    try:
        with FaultRelay(server.address) as relay, connect(relay.address) as sock:
            assert recv_until_eof(sock) == b"hello"
            sock.sendall(b"still talking")
            sock.shutdown(socket.SHUT_WR)
            server.wait_for_outcomes("got b'still talking'", 1)
            assert relay.errors == []
    finally:
        server.close()


def test_connections_show_client_port_and_first_bytes(relay: FaultRelay) -> None:
    with connect(relay.address) as retry_client, connect(relay.address) as worker:
        roundtrip(retry_client, OPTION_REQ)
        roundtrip(retry_client, b"x" * 100)  # first_bytes keeps only the first 64 in all
        roundtrip(worker, b"\0REQ\0\0\0\x01\0\0\0\0")  # CAN_DO, empty
        by_port = {c.client_port: c for c in relay.connections()}
        assert set(by_port) == {retry_client.getsockname()[1], worker.getsockname()[1]}
        expected = (OPTION_REQ + b"x" * 100)[:FIRST_BYTES_MAX]
        assert by_port[retry_client.getsockname()[1]].first_bytes == expected
        assert by_port[worker.getsockname()[1]].first_bytes == b"\0REQ\0\0\0\x01\0\0\0\0"
        assert all(c.upstream_port is not None for c in by_port.values())
        assert relay.accepted == 2


def test_wait_for_connections_wakes_on_first_bytes_and_times_out_saying_why(relay: FaultRelay) -> None:
    with pytest.raises(TimeoutError, match="2 live connection"):
        relay.wait_for_connections(2, timeout=0.05)
    with connect(relay.address) as sock:
        [conn] = relay.wait_for_connections(1)
        assert conn.client_port == sock.getsockname()[1]
        sock.sendall(OPTION_REQ)  # not read back: the wait alone must see it arrive

        def is_retry_client(c: RelayedConnection) -> bool:
            return c.first_bytes.startswith(OPTION_REQ)

        assert relay.wait_for_connections(1, where=is_retry_client) == [conn]
        with pytest.raises(TimeoutError, match="is_retry_client"):
            relay.wait_for_connections(2, timeout=0.05, where=is_retry_client)


def test_reset_one_gives_both_peers_econnreset_and_spares_the_others(
    relay: FaultRelay, echo_server: Server
) -> None:
    with connect(relay.address) as victim, connect(relay.address) as bystander:
        roundtrip(victim)
        roundtrip(bystander)
        assert relay.reset(victim.getsockname()[1]) is True
        assert_reset(victim)
        echo_server.wait_for_outcomes("reset", 1)  # upstream got an RST too, not an EOF
        assert [c.client_port for c in relay.connections()] == [bystander.getsockname()[1]]
        roundtrip(bystander, b"still here")
        assert relay.reset(victim.getsockname()[1]) is False  # already gone
        assert echo_server.outcomes == ["reset"]


def test_reset_all_and_reset_where(relay: FaultRelay, echo_server: Server) -> None:
    socks = [connect(relay.address) for _ in range(4)]
    try:
        for sock in socks[:2]:
            roundtrip(sock, OPTION_REQ)
        for sock in socks[2:]:
            roundtrip(sock, b"worker")
        assert relay.reset_where(lambda c: c.first_bytes.startswith(OPTION_REQ)) == 2
        for sock in socks[:2]:
            assert_reset(sock)
        for sock in socks[2:]:
            roundtrip(sock)

        def bad(c: RelayedConnection) -> bool:
            raise ValueError("bad predicate")

        with pytest.raises(ValueError, match="bad predicate"):
            relay.reset_where(bad)
        assert len(relay.connections()) == 2  # a failing predicate resets nothing

        assert relay.reset_all() == 2
        for sock in socks[2:]:
            assert_reset(sock)
        assert relay.connections() == []
        echo_server.wait_for_outcomes("reset", 4)
        assert relay.reset_all() == 0
    finally:
        for sock in socks:
            sock.close()
    with connect(relay.address) as fresh:
        roundtrip(fresh)


def test_refuse_next_resets_on_arrival_then_relays_again(relay: FaultRelay, echo_server: Server) -> None:
    relay.refuse_next(2)
    for _ in range(2):
        with connect(relay.address) as refused:  # connect() itself succeeds
            assert_reset(refused)  # a silent client gets its RST after REFUSE_GRACE
    assert relay.refused == 2 and relay.accepted == 2 and relay.connections() == []
    with connect(relay.address) as sock:
        roundtrip(sock)
    assert relay.accepted == 3 and relay.refused == 2
    assert echo_server.accepted == 1  # the refused ones never reached upstream


def test_refused_client_that_speaks_first_is_reset_without_grace(
    relay: FaultRelay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tests.fault_relay")
    relay.refuse_next(1)
    with connect(relay.address) as refused:
        refused.sendall(OPTION_REQ)  # only queued locally: it is what triggers the RST
        assert_reset(refused)
        relay.wait_for_refused(1)
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            refused.sendall(b"more")
    [message] = [r.getMessage() for r in caplog.records if "on arrival" in r.getMessage()]
    assert "refuse_next; client spoke" in message


def test_down_refuses_new_connections_keeps_old_ones_and_up_listens_again(relay: FaultRelay) -> None:
    with connect(relay.address) as old:
        roundtrip(old)
        relay.down()
        assert not relay.is_up
        with pytest.raises(ConnectionRefusedError):
            connect(relay.address).close()
        roundtrip(old, b"untouched by down()")
        relay.down()  # idempotent
        relay.up()
        assert relay.is_up
        with connect(relay.address) as new:
            roundtrip(new, b"works after up()")
        roundtrip(old, b"and still")
        relay.up()  # idempotent


def test_unreachable_upstream_resets_the_client() -> None:
    # Bound but not listening: connects to it are refused, and nobody else gets the port.
    with socket.socket() as placeholder:
        placeholder.bind((HOST, 0))
        with FaultRelay((HOST, int(placeholder.getsockname()[1]))) as relay:
            with connect(relay.address) as sock:
                assert_reset(sock)
            assert relay.accepted == 1 and relay.refused == 1
            assert relay.connections() == [] and relay.errors == []


def test_close_stops_its_thread_and_every_socket(echo_server: Server) -> None:
    before = set(threading.enumerate())
    relay = FaultRelay(echo_server.address)
    with connect(relay.address) as sock:
        roundtrip(sock)
        relay.close()
        assert recv_until_eof(sock) == b""  # closed by the relay, not left hanging
    relay.close()  # idempotent
    leftover = [t for t in set(threading.enumerate()) - before if t.name.startswith("fault-relay")]
    assert leftover == []
    with pytest.raises(ConnectionRefusedError):
        connect(relay.address).close()
    with pytest.raises(RuntimeError, match="closed"):
        relay.reset_all()
    echo_server.wait_for_outcomes("eof", 1)
