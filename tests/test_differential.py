"""The compiled data plane against the pure one, each driving a real Pair and Session over
real sockets: the same byte streams from the worker and from gearmand, split at the same
random points, must give the same bytes out on both sides, the same Session events, the same
commands (refusals included) and the same packet counts.

(tests/test_gate.py holds the Gate to the pure rule read by read; this holds the whole path,
the Gate's bypass and the Pair's, to one behaviour.)"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gproxy import dataplane
from gproxy.config import Address, Route
from gproxy.core.assignments import ServerTraits
from gproxy.core.drain import Drain
from gproxy.core.metrics import Metrics
from gproxy.core.protocol import REQ, RES, PacketType, build_packet
from gproxy.core.session import Session, UpstreamLink
from gproxy.handshake import Transport
from gproxy.pair import Pair, PairSet

P = PacketType
pytestmark = pytest.mark.skipif(dataplane.fast_path() != "compiled", reason="the compiled data plane is not built")
ROUTE = Route(Address("127.0.0.1", 0), Address("127.0.0.1", 4730))
NOW = 100.0
"""Both planes' clock: a job's duration is then the same number in both."""


def raw(magic: bytes, ptype: int, body: bytes) -> bytes:
    return magic + ptype.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body


handles = st.sampled_from([b"H:1", b"H:2", b"H:3"])
functions = st.sampled_from([b"f", b"g"])
small = st.binary(max_size=6).map(lambda b: b.replace(b"\0", b""))
junk = st.one_of(
    st.builds(raw, st.sampled_from([REQ, RES]), st.integers(0, 45), st.binary(max_size=10)),
    st.binary(min_size=1, max_size=12),  # (bad input, or admin text)
)
worker_packets = st.one_of(
    st.sampled_from([
        build_packet(REQ, P.GRAB_JOB), build_packet(REQ, P.GRAB_JOB_UNIQ), build_packet(REQ, P.GRAB_JOB_ALL),
        build_packet(REQ, P.PRE_SLEEP), build_packet(REQ, P.RESET_ABILITIES), build_packet(REQ, P.ECHO_REQ, data=b"hi"),
    ]),
    st.builds(lambda f: build_packet(REQ, P.CAN_DO, function=f), functions),
    st.builds(lambda h, d: build_packet(REQ, P.WORK_COMPLETE, handle=h, data=d), handles, small),
    st.builds(lambda h, d: build_packet(REQ, P.WORK_DATA, handle=h, data=d), handles, small),
    st.builds(lambda h: build_packet(REQ, P.WORK_FAIL, handle=h), handles),
    st.builds(lambda h, d: build_packet(REQ, P.WORK_EXCEPTION, handle=h, data=b"RETRY " + d), handles, small),
    st.builds(lambda h: build_packet(REQ, P.WORK_STATUS, handle=h, numerator=b"1", denominator=b"2"), handles),
)
gearmand_packets = st.one_of(
    st.sampled_from([build_packet(RES, P.NOOP), build_packet(RES, P.NO_JOB), build_packet(RES, P.ECHO_RES, data=b"hi")]),
    st.builds(lambda h, f, d: build_packet(RES, P.JOB_ASSIGN, handle=h, function=f, data=d), handles, functions, small),
    st.builds(
        lambda h, f, d: build_packet(RES, P.JOB_ASSIGN_UNIQ, handle=h, function=f, unique=b"u", data=d),
        handles, functions, small,
    ),
    st.builds(lambda c: build_packet(RES, P.ERROR, code=c, text=b"no"), small),
)
sleeping = {
    REQ: st.sampled_from([build_packet(REQ, P.GRAB_JOB_UNIQ), build_packet(REQ, P.GRAB_JOB), build_packet(REQ, P.PRE_SLEEP)]),
    RES: st.sampled_from([build_packet(RES, P.NO_JOB), build_packet(RES, P.NOOP)]),
}
"""Most of a sleeping worker's traffic, by side (its magic)."""
EOF = b""
"""A step that half-closes that side's connection."""


def mostly(good: st.SearchStrategy[bytes], magic: bytes) -> st.SearchStrategy[bytes]:
    """`good` packets and the sleeping worker's of `magic`, with bad input one time in 40 (it
    ends the pair, and so the script)."""
    usual = st.one_of(sleeping[magic], good)
    return st.integers(0, 39).flatmap(lambda n: junk if n == 0 else usual)


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """Steps of (side, bytes): a few packets of one side at a time, cut at random points, and a
    sleeping worker's wake-ups."""
    steps: list[tuple[str, bytes]] = []
    for _ in range(draw(st.integers(1, 12))):
        side = draw(st.sampled_from(["worker", "gearmand", "a wake-up"]))
        if side == "a wake-up":  # (a sleeping worker's: a grab, then gearmand's answer, each one read)
            steps.append(("worker", draw(sleeping[REQ])))
            steps.append(("gearmand", draw(st.one_of(sleeping[RES], gearmand_packets))))
            continue
        packets = mostly(worker_packets, REQ) if side == "worker" else mostly(gearmand_packets, RES)
        data = b"".join(draw(packets) for _ in range(draw(st.sampled_from([1, 1, 2, 3]))))
        cuts: list[int] = []
        if draw(st.integers(0, 2)) == 0:  # (most reads are whole packets, as most of gproxy's are)
            cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), min_size=1, max_size=3)))
        steps.extend((side, data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if data[a:b])
        if draw(st.integers(0, 15)) == 0:
            steps.append((side, EOF))
    return steps


def plain(value: Any) -> Any:
    """A command or a posted item as comparable data: links and pairs by name."""
    if isinstance(value, UpstreamLink):
        return f"link {value.name}"
    if isinstance(value, Pair):
        return f"pair {value.name}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, *(plain(getattr(value, f.name)) for f in dataclasses.fields(value)))
    if isinstance(value, list | tuple):
        return tuple(plain(v) for v in value)
    return value


class Control:
    """The control plane, as a record of what the pair asked of it."""

    def __init__(self, trace: list[Any]) -> None:
        self.trace = trace

    def post(self, item: Any) -> None:
        self.trace.append(("posted", plain(item)))

    def deliver(self, action: Any) -> None:
        self.trace.append(("delivered", plain(action)))

    def settled(self, pair: Pair) -> None:
        self.trace.append("settled")


class RecordingSession(Session):
    """A Session that writes down each event it is given."""

    trace: list[Any]

    def from_downstream(self, data: bytes, now: float, sent: bool = False) -> list[Any]:
        commands = super().from_downstream(data, now, sent)
        self.trace.append(("from worker", data, sent, plain(commands)))
        return commands

    def from_upstream(self, link: UpstreamLink, data: bytes, now: float, sent: bool = False) -> list[Any]:
        commands = super().from_upstream(link, data, now, sent)
        self.trace.append(("from gearmand", link.name, data, sent, plain(commands)))
        return commands

    def refuse(self, reason: str, why: str) -> list[Any]:
        commands = super().refuse(reason, why)
        self.trace.append(("refused", reason, why))
        return commands


def unread(sock: socket.socket) -> bytes:
    """What the peer was sent and has not read yet; b"<closed>" after its EOF."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        except ConnectionError:
            chunks.append(b"<reset>")
            break
        if not chunk:
            chunks.append(b"<closed>")
            break
        chunks.append(chunk)
    return b"".join(chunks)


def run(plane_class: type[Any], steps: list[tuple[str, bytes]], draining: bool, grab_uniq: bool) -> list[Any]:
    trace: list[Any] = []
    plane = plane_class(clock=lambda: NOW)
    drain = Drain()
    if draining:
        drain.start()
    metrics = Metrics()
    session = RecordingSession("up", route=ROUTE, metrics=metrics, drain=drain, traits=ServerTraits(grab_uniq=grab_uniq))
    session.trace = trace
    pair = Pair("w", session, plane, Control(trace), PairSet())
    worker, worker_peer = socket.socketpair()
    upstream, gearmand = socket.socketpair()
    peers = {"worker": worker_peer, "gearmand": gearmand}
    try:
        pair.start(Transport(worker), "peer", Transport(upstream))
        for side, data in steps:
            try:
                if data == EOF:
                    peers[side].shutdown(socket.SHUT_WR)
                else:
                    peers[side].sendall(data)
            except OSError as exc:
                trace.append((side, "could not send", type(exc).__name__))
            for _ in range(4):  # (every read of this step is served in one or two polls)
                if not plane.poll(0):
                    break
            trace.append(("worker got", unread(worker_peer), "gearmand got", unread(gearmand)))
        trace.append(("counts", {d: [(t, n) for t, n in enumerate(c) if n] for d, c in metrics.packets.items()}))
        trace.append(("grabs pending", [repr(link.grabs_pending) for link in session.links], "done", session.done))
    finally:
        pair.stop()
        plane.close()
        for sock in (worker, worker_peer, upstream, gearmand):
            sock.close()
    return trace


@settings(max_examples=400, deadline=None)
@given(scripts(), st.booleans(), st.booleans())
def test_the_compiled_path_does_what_the_pure_path_does(steps: list[tuple[str, bytes]], draining: bool, grab_uniq: bool) -> None:
    pure = run(dataplane.DataPlanePy, steps, draining, grab_uniq)
    compiled = run(dataplane.DataPlane, steps, draining, grab_uniq)
    assert compiled == pure
