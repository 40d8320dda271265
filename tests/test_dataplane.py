"""The data plane on its own: sockets, a recording handler, and both ways of running it."""

from __future__ import annotations

import gc
import socket
import time
import weakref
from collections.abc import Iterator

import pytest
import trio

from gproxy.config import Address, Config, Route
from gproxy.dataplane import HIGH_WATER, DataPlane, Endpoint
from gproxy.core.protocol import REQ, RES, PacketType, build_packet
from gproxy.control import Proxy

P = PacketType


class Recorder:
    """A handler that writes down what it hears; `explode` makes `received` raise."""

    def __init__(self, explode: bool = False) -> None:
        self.data: list[bytes] = []
        self.ends: list[OSError | None] = []
        self.drains = 0
        self.failures: list[Exception] = []
        self.explode = explode

    def received(self, endpoint: Endpoint, data: bytes) -> None:
        if self.explode:
            raise RuntimeError("a bug in the handler")
        self.data.append(data)

    def ended(self, endpoint: Endpoint, error: OSError | None) -> None:
        self.ends.append(error)

    def drained(self, endpoint: Endpoint) -> None:
        self.drains += 1

    def failed(self, endpoint: Endpoint, exc: Exception) -> None:
        self.failures.append(exc)
        endpoint.close()


@pytest.fixture
def plane() -> Iterator[DataPlane]:
    plane = DataPlane()
    yield plane
    plane.close()


def pair_of(plane: DataPlane, handler: Recorder | None = None) -> tuple[Endpoint, socket.socket, Recorder]:
    ours, theirs = socket.socketpair()
    handler = handler or Recorder()
    return plane.add(ours, handler, "test"), theirs, handler


def test_reads_are_handed_over_and_an_eof_is_told_once(plane: DataPlane) -> None:
    endpoint, theirs, handler = pair_of(plane)
    theirs.sendall(b"hello")
    plane.poll(1)
    assert handler.data == [b"hello"]
    theirs.shutdown(socket.SHUT_WR)
    plane.poll(1)
    assert handler.ends == [None] and endpoint.ended
    # Level-triggered epoll would report that EOF on every poll; it is told once, and the
    # socket stays writable for the half-close.
    assert plane.poll(0) == 0
    endpoint.write(b"bye")
    assert theirs.recv(10) == b"bye"


def test_a_full_kernel_buffer_keeps_writes_in_order_and_says_when_they_have_gone(plane: DataPlane) -> None:
    endpoint, theirs, handler = pair_of(plane)
    endpoint.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    chunks = [bytes([n]) * 300_000 for n in range(1, 9)]  # more than the kernel takes at once
    for chunk in chunks:
        endpoint.write(chunk)
    assert endpoint.buffered > HIGH_WATER
    endpoint.shutdown_write()  # after what is buffered, not before
    received = bytearray()
    theirs.setblocking(False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        plane.poll(0.01)
        try:
            data = theirs.recv(1 << 20)
        except BlockingIOError:
            continue
        if not data:
            break
        received += data
    assert bytes(received) == b"".join(chunks) and endpoint.buffered == 0
    assert handler.drains == 1  # once, when it fell below HIGH_WATER


def test_a_write_to_a_broken_connection_is_reported_by_the_loop_not_the_write(plane: DataPlane) -> None:
    endpoint, theirs, handler = pair_of(plane)
    theirs.close()
    endpoint.write(b"x" * 100_000)  # EPIPE or ECONNRESET: never raised here
    endpoint.write(b"more")
    assert handler.ends == []
    plane.poll(0)
    assert len(handler.ends) == 1 and isinstance(handler.ends[0], OSError)


def test_a_handler_that_raises_closes_its_endpoint_and_nothing_else(plane: DataPlane) -> None:
    broken, broken_peer, bad = pair_of(plane, Recorder(explode=True))
    healthy, healthy_peer, good = pair_of(plane)
    broken_peer.sendall(b"a")
    healthy_peer.sendall(b"b")
    plane.poll(1)
    plane.poll(0)
    assert [str(e) for e in bad.failures] == ["a bug in the handler"] and broken.closed
    assert good.data == [b"b"] and not healthy.closed


def test_a_hang_up_while_reads_are_paused_is_told_and_then_left_alone(plane: DataPlane) -> None:
    endpoint, theirs, handler = pair_of(plane)
    endpoint.pause()  # backpressure
    theirs.close()
    plane.poll(1)
    assert handler.ends == [None]
    assert plane.poll(0) in (0, 1)  # one last hang-up report at most, then it is unwatched
    assert plane.poll(0) == 0


async def test_driven_by_a_trio_task() -> None:
    plane = DataPlane(trio.current_time)
    endpoint, theirs, handler = pair_of(plane)
    theirs.setblocking(False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(plane.drive)
        await trio.to_thread.run_sync(theirs.sendall, b"ping")
        with trio.fail_after(5):
            while not handler.data:
                await trio.sleep(0.01)
        endpoint.write(b"pong")
        nursery.cancel_scope.cancel()
    assert handler.data == [b"ping"] and theirs.recv(10) == b"pong"
    plane.close()


def test_as_trios_host_it_serves_sockets_while_trio_runs_its_guest() -> None:
    plane = DataPlane()
    endpoint, theirs, handler = pair_of(plane)

    async def main() -> str:
        await trio.sleep(0.05)  # a trio timer, woken by the host loop
        await trio.to_thread.run_sync(theirs.sendall, b"ping")
        while not handler.data:
            await trio.sleep(0.01)  # the host serves the socket meanwhile
        endpoint.write(b"pong")
        return "done"

    assert plane.run_host(main) == "done"
    assert handler.data == [b"ping"] and theirs.recv(10) == b"pong"
    plane.close()


# -- through the proxy: a pair as the data plane runs it


async def test_a_worker_that_does_not_read_makes_gproxy_stop_reading_gearmand() -> None:
    """gearmand's output for a worker that reads nothing waits in gearmand's socket, not in
    gproxy's memory: gproxy buffers about HIGH_WATER, then stops reading."""
    fake = trio.socket.socket()
    await fake.bind(("127.0.0.1", 0))
    fake.listen()
    config = Config(routes=(Route(Address("127.0.0.1", 0), Address(*fake.getsockname()[:2])),))
    proxy = Proxy(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        worker = trio.socket.socket()
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await worker.connect(proxy.listen_addresses[0].host_port)
        gearmand, _ = await fake.accept()
        echo = build_packet(RES, P.ECHO_RES, data=b"e" * 60_000)
        written = 0
        with trio.move_on_after(2):  # until gproxy stops taking more
            while True:
                written += await gearmand.send(echo)
        (pair,) = proxy.pairs
        # The rest waits in the kernels' buffers (several MiB on loopback) and in gearmand.
        assert pair.worker is not None and HIGH_WATER <= pair.worker.buffered < HIGH_WATER + 200_000 < written
        nursery.cancel_scope.cancel()
    worker.close()
    gearmand.close()
    fake.close()


async def test_a_closed_pair_is_let_go_at_once() -> None:
    """Nothing keeps a closed pair (its Session, its jobs' payloads) alive: not the control
    plane's queue, not a cycle waiting for the garbage collector."""
    fake = trio.socket.socket()
    await fake.bind(("127.0.0.1", 0))
    fake.listen()
    config = Config(routes=(Route(Address("127.0.0.1", 0), Address(*fake.getsockname()[:2])),))
    proxy = Proxy(config)
    gc.disable()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            worker = trio.socket.socket()
            await worker.connect(proxy.listen_addresses[0].host_port)
            gearmand, _ = await fake.accept()
            with trio.fail_after(5):
                while not len(proxy.pairs):
                    await trio.sleep(0.01)
            (pair,) = proxy.pairs
            gone = weakref.ref(pair)
            del pair
            await worker.send(build_packet(REQ, P.ECHO_REQ, data=b"x"))
            worker.close()
            with trio.fail_after(5):
                while (await gearmand.recv(100)) != b"":
                    pass
            gearmand.close()
            with trio.fail_after(5):
                while gone() is not None:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        gc.enable()
        fake.close()
