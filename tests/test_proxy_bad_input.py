"""Bad input and lost peers: the pair is closed with one log line, the proxy carries on.

Bad bytes cannot come from a real Gearman library, so the misbehaving side is a raw socket;
the other side is the real gearmand wherever it can be, and a listener of the test's own
only where gearmand itself must misbehave or vanish on cue.
"""

from __future__ import annotations

import logging
import socket
import struct
from types import SimpleNamespace

import pytest
import trio

from gproxy.config import Address, Config, Route
from gproxy.control import Proxy
from gproxy.core.commands import Timer
from gproxy.core.connections import HALF_CLOSE_LINGER
from gproxy.core.metrics import Metrics
from gproxy.core.policy import Policies
from gproxy.core.protocol import REQ, RES, Framer, Packet, PacketType, build_packet
from gproxy.core.retry import Retrier
from gproxy.core.session import Session, UpstreamLink
from gproxy.handshake import Transport
from gproxy.dataplane import DataPlane
from gproxy.pair import Pair, PairSet, PairTimer

ROUTE = Route(Address("127.0.0.1", 0), Address("127.0.0.1", 4730))

pytestmark = pytest.mark.timeout(30)
LOOPBACK = "127.0.0.1"


async def start_proxy(nursery: trio.Nursery, upstream: tuple[str, int], **settings) -> Address:
    return (await start(nursery, upstream, **settings)).listen_addresses[0]


async def start(nursery: trio.Nursery, upstream: tuple[str, int], **settings) -> Proxy:
    config = Config(routes=(Route(Address(LOOPBACK, 0), Address(*upstream)),), **settings)
    return await nursery.start(Proxy(config).serve)


async def connect(address: Address) -> trio.SocketStream:
    return await trio.open_tcp_stream(address.host, address.port)


async def receive_until_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            data += chunk
    return data


async def echo_through(address: Address) -> None:
    """A healthy round trip through the proxy to gearmand: the proxy is alive and serving."""
    stream = await connect(address)
    async with stream:
        await stream.send_all(build_packet(REQ, PacketType.ECHO_REQ, data=b"still here"))
        framer, frames = Framer(RES), []
        with trio.fail_after(10):
            while not frames:
                frames = framer.receive(await stream.receive_some())
        (frame,) = frames
        assert frame == Packet(PacketType.ECHO_RES, build_packet(RES, PacketType.ECHO_RES, data=b"still here"))


def pair_log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gproxy.pair" and "closed:" in r.getMessage()]


@pytest.mark.parametrize(
    "bad, reason, metric",
    [
        (b"\0REX" + struct.pack(">II", 16, 0), "bad magic", "bad_magic"),
        (b"\0RES" + struct.pack(">II", 16, 0), "bad magic", "bad_magic"),
        (b"\0REQ" + struct.pack(">II", 77, 0), "unknown packet type 77", "unknown_type"),
        (b"\0REQ" + struct.pack(">II", 16, 4096), "ECHO_REQ of 4096 bytes exceeds max_packet_size 2048", "oversized"),
        (b"\0REQ" + struct.pack(">II", 13, 5) + b"H:x:1", "malformed WORK_COMPLETE", "malformed"),
    ],
)
async def test_bad_packet_closes_the_pair_with_one_log_line(
    nursery: trio.Nursery, gearmand, caplog: pytest.LogCaptureFixture, bad: bytes, reason: str, metric: str
) -> None:
    caplog.set_level(logging.DEBUG, "gproxy")
    proxy = await start(nursery, gearmand.address, max_packet_size=2048)
    address = proxy.listen_addresses[0]
    stream = await connect(address)
    await stream.send_all(bad)  # an oversized packet is refused before its body is sent
    assert await receive_until_eof(stream) == b""
    (line,) = pair_log_lines(caplog)
    assert f"peer {LOOPBACK}:" in line and f"protocol error from peer: {reason}" in line
    assert [r.levelno for r in caplog.records if "closed:" in r.getMessage()] == [logging.WARNING]
    assert proxy.metrics.registry.get_sample_value("gproxy_protocol_errors_total", {"reason": metric}) == 1
    await echo_through(address)


async def test_peer_vanishing_mid_packet_is_logged(
    nursery: trio.Nursery, gearmand, caplog: pytest.LogCaptureFixture
) -> None:
    address = await start_proxy(nursery, gearmand.address)
    stream = await connect(address)
    await stream.send_all(build_packet(REQ, PacketType.ECHO_REQ, data=b"x" * 100)[:50])
    await stream.send_eof()
    assert await receive_until_eof(stream) == b""
    (line,) = pair_log_lines(caplog)
    assert "peer closed mid-packet (50 bytes of an unfinished frame)" in line
    await echo_through(address)


async def test_unreachable_gearmand_closes_the_peer(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.socket.socket() as unused:  # a port that nothing listens on
        await unused.bind((LOOPBACK, 0))
        dead = unused.getsockname()
    address = await start_proxy(nursery, dead)
    stream = await connect(address)
    assert await receive_until_eof(stream) == b""
    (line,) = pair_log_lines(caplog)
    assert f"to gearmand {LOOPBACK}:{dead[1]}): closed: gearmand unreachable" in line


class FakeGearmand:
    """A listener of the test's own, for what the real gearmand will not do on cue."""

    def __init__(self) -> None:
        self.accepted: trio.MemoryReceiveChannel[trio.SocketStream]
        self._send, self.accepted = trio.open_memory_channel(10)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        self.address = listeners[0].socket.getsockname()[:2]
        async with listeners[0]:
            task_status.started()
            while True:
                await self._send.send(await listeners[0].accept())


@pytest.fixture
async def fake_gearmand(nursery: trio.Nursery) -> FakeGearmand:
    fake = FakeGearmand()
    await nursery.start(fake.serve)
    return fake


async def test_garbage_from_gearmand_closes_both_sides(
    nursery: trio.Nursery, fake_gearmand: FakeGearmand, caplog: pytest.LogCaptureFixture
) -> None:
    address = await start_proxy(nursery, fake_gearmand.address)
    peer = await connect(address)
    upstream = await fake_gearmand.accepted.receive()
    await upstream.send_all(b"\0REQ" + struct.pack(">II", 6, 0))  # request magic from a server
    assert await receive_until_eof(peer) == b""
    assert await receive_until_eof(upstream) == b""
    (line,) = pair_log_lines(caplog)
    assert "protocol error from gearmand: bad magic" in line


async def test_either_side_closing_closes_the_other(
    nursery: trio.Nursery, fake_gearmand: FakeGearmand
) -> None:
    address = await start_proxy(nursery, fake_gearmand.address)
    noop = build_packet(RES, PacketType.NOOP)

    peer = await connect(address)
    upstream = await fake_gearmand.accepted.receive()
    await upstream.send_all(noop)
    await upstream.aclose()
    assert await receive_until_eof(peer) == noop  # what was in flight still arrives

    peer = await connect(address)
    upstream = await fake_gearmand.accepted.receive()
    grab = build_packet(REQ, PacketType.GRAB_JOB_UNIQ)
    await peer.send_all(grab)
    await peer.aclose()
    assert await receive_until_eof(upstream) == grab


async def test_bad_input_after_the_other_side_closed_is_still_a_warning_and_counted(
    nursery: trio.Nursery, fake_gearmand: FakeGearmand, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "gproxy")
    proxy = await start(nursery, fake_gearmand.address)
    peer = await connect(proxy.listen_addresses[0])
    upstream = await fake_gearmand.accepted.receive()
    await peer.send_eof()  # the worker leaves first: a quiet close, at DEBUG...
    assert await receive_until_eof(upstream) == b""
    await upstream.send_all(b"\0REQ" + struct.pack(">II", 6, 0))  # ...then gearmand sends garbage
    assert await receive_until_eof(peer) == b""
    (line,) = pair_log_lines(caplog)
    assert "protocol error from gearmand: bad magic" in line
    assert [r.levelno for r in caplog.records if "closed:" in r.getMessage()] == [logging.WARNING]
    assert proxy.metrics.registry.get_sample_value("gproxy_protocol_errors_total", {"reason": "bad_magic"}) == 1


@pytest.mark.parametrize("first", ["peer", "gearmand"])
async def test_a_side_cut_short_by_gproxys_own_close_is_not_blamed_for_bad_input(
    nursery: trio.Nursery, fake_gearmand: FakeGearmand, caplog: pytest.LogCaptureFixture, first: str
) -> None:
    """One side leaves while the other is sending a packet: gproxy half-closes the other,
    which closes in answer, its packet cut short. Nobody sent bad input: the close line names
    the side that left first, at DEBUG, and no protocol error is counted."""
    caplog.set_level(logging.DEBUG, "gproxy")
    proxy = await start(nursery, fake_gearmand.address)
    peer = await connect(proxy.listen_addresses[0])
    upstream = await fake_gearmand.accepted.receive()
    leaves, answers = (peer, upstream) if first == "peer" else (upstream, peer)
    half = (
        build_packet(RES, PacketType.JOB_ASSIGN, handle=b"H:x:1", function=b"f", data=b"x" * 100)
        if first == "peer" else build_packet(REQ, PacketType.WORK_COMPLETE, handle=b"H:x:1", data=b"x" * 100)
    )[:50]
    await answers.send_all(half)
    await leaves.send_eof()
    assert await receive_until_eof(answers) == b""  # gproxy's half-close, passed on
    await answers.aclose()  # the answer: a close, in the middle of its packet
    assert await receive_until_eof(leaves) == b""
    with trio.fail_after(10):
        while not pair_log_lines(caplog):
            await trio.sleep(0.01)
    (line,) = pair_log_lines(caplog)
    assert line.endswith(f": closed: {first} closed the connection"), line
    assert [r.levelno for r in caplog.records if "closed:" in r.getMessage()] == [logging.DEBUG]
    assert proxy.metrics.registry.get_sample_value("gproxy_protocol_errors_total", {"reason": "mid_packet"}) == 0


async def test_a_peer_that_resets_at_once_is_named_by_its_address(
    nursery: trio.Nursery, gearmand, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "gproxy")
    address = await start_proxy(nursery, gearmand.address)
    sock = trio.socket.socket()
    await sock.connect((address.host, address.port))
    port = sock.getsockname()[1]
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset before gproxy has looked at the connection
    with trio.fail_after(10):
        while not pair_log_lines(caplog):
            await trio.sleep(0.01)
    (line,) = pair_log_lines(caplog)
    assert line.startswith(f"peer {LOOPBACK}:{port} ("), line
    await echo_through(address)


async def test_a_refusal_keeps_its_reason_when_the_other_side_closes_right_after() -> None:
    # Found by the fuzz tier: both sides' events in one batch, in either order.
    for first, second in (("refuse", "close"), ("close", "refuse")):
        metrics = Metrics()
        retrier: Retrier[UpstreamLink, Route] = Retrier(Policies(), metrics=metrics)
        session = Session("up", route=ROUTE, retrier=retrier, metrics=metrics)
        for event in (first, second):
            if event == "refuse":
                session.refuse("bad_magic", "protocol error from peer: bad magic")
            else:
                session.link_ended(session.current, None)  # gearmand closed the connection
        assert (session.reason, session.level) == ("protocol error from peer: bad magic", logging.WARNING)


def test_a_pair_logs_its_close_before_it_closes_the_workers_connection() -> None:
    """Found by the fuzz tier: a peer that sees its connection close and connects again from
    the same port must come after the first connection's close line in the log."""
    metrics = Metrics()
    retrier: Retrier[UpstreamLink, Route] = Retrier(Policies(), metrics=metrics)
    plane = DataPlane()
    pair = Pair("p", Session("up", route=ROUTE, retrier=retrier, metrics=metrics), plane,
                SimpleNamespace(post=lambda item: None), PairSet())  # type: ignore[arg-type]
    worker, worker_peer = socket.socketpair()
    upstream, upstream_peer = socket.socketpair()
    pair.start(Transport(worker), "w", Transport(upstream))
    seen: list[bool] = []

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if ": closed: " in record.getMessage():
                seen.append(pair.worker is not None and pair.worker.closed)

    handler = Watch()
    logging.getLogger("gproxy.pair").addHandler(handler)
    try:
        pair.execute(pair.session.refuse("bad_magic", "protocol error from peer: bad magic"))
    finally:
        logging.getLogger("gproxy.pair").removeHandler(handler)
        plane.close()
        worker_peer.close()
        upstream_peer.close()
    assert seen == [False]


def test_a_side_that_lingers_after_the_other_closed_is_cut_when_its_grace_period_is_over() -> None:
    metrics = Metrics()
    retrier: Retrier[UpstreamLink, Route] = Retrier(Policies(), metrics=metrics)
    plane = DataPlane()
    posted: list[object] = []
    pair = Pair("p", Session("up", route=ROUTE, retrier=retrier, metrics=metrics), plane,
                SimpleNamespace(post=posted.append), PairSet())  # type: ignore[arg-type]
    worker, worker_peer = socket.socketpair()
    upstream, upstream_peer = socket.socketpair()
    pair.start(Transport(worker), "w", Transport(upstream))
    try:
        worker_peer.shutdown(socket.SHUT_WR)  # the worker is done; gearmand's side stays open
        plane.poll(1.0)
        assert upstream_peer.recv(10) == b""  # passed on as a half-close
        (later,) = [item for item in posted if type(item) is PairTimer]
        assert (later.pair, later.timer, later.delay) == (pair, Timer.LINGER, HALF_CLOSE_LINGER)
        assert not pair.done
        pair.timer_fired(Timer.LINGER)
        assert pair.done and pair.session.reason == "peer closed the connection"
        assert worker_peer.recv(10) == b""  # cut
    finally:
        plane.close()
        worker_peer.close()
        upstream_peer.close()
