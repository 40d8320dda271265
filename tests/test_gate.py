"""What may bypass the Session (Session.bypasses_downstream and .bypasses_upstream, and the
compiled data plane's Gate, which compiles that rule): by hand for both, and the Gate against
the pure rule for any bytes read, in any state of the Session the rule reads: the same answer,
the same packet counted, the same bytes sent on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gproxy import dataplane
from gproxy.config import Address, Route
from gproxy.core.connections import LinkState
from gproxy.core.drain import Drain
from gproxy.core.metrics import Metrics
from gproxy.core.protocol import REQ, RES, PacketType, build_packet
from gproxy.core.session import Session, UpstreamLink

compiled_only = pytest.mark.skipif(dataplane.fast_path() != "compiled", reason="the compiled data plane is not built")
ROUTE = Route(Address("127.0.0.1", 0), Address("127.0.0.1", 4730))
TYPES = list(PacketType)


class Sink:
    """Where the bytes a gate lets through go."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffered = 0

    def write(self, data: bytes) -> None:
        self.written.append(data)


def packet(magic: bytes, ptype: PacketType, body: bytes) -> bytes:
    return magic + int(ptype).to_bytes(4, "big") + len(body).to_bytes(4, "big") + body


COMMON = [PacketType.NOOP, PacketType.PRE_SLEEP, PacketType.GRAB_JOB, PacketType.GRAB_JOB_UNIQ, PacketType.NO_JOB,
          PacketType.ECHO_REQ, PacketType.WORK_COMPLETE, PacketType.JOB_ASSIGN_UNIQ]
reads = st.one_of(
    st.builds(packet, st.sampled_from([REQ, RES]), st.sampled_from(COMMON), st.binary(max_size=8)),
    st.builds(packet, st.sampled_from([REQ, RES]), st.sampled_from(TYPES), st.binary(max_size=24)),
    st.builds(lambda a, b: a + b, st.builds(packet, st.just(REQ), st.sampled_from(TYPES), st.just(b"")),
              st.binary(min_size=1, max_size=8)),  # a packet and more
    st.binary(max_size=30),
    st.just(b"getpid\n"),
)
rarely = st.sampled_from([False, False, False, True])  # (each of these stops a bypass: mostly off)
states = st.fixed_dictionaries({
    "draining": rarely, "ejected": rarely, "connecting": rarely,
    "worker_gone": rarely, "retired": rarely, "partial": rarely,
    "grab_uniq": st.booleans(), "grabs": st.lists(st.booleans(), max_size=2),
})


def made(state: dict[str, bool], upstream: bool) -> tuple[Session, UpstreamLink, Sink, Sink]:
    drain = Drain()
    if state["draining"]:
        drain.start()
    session = Session("up", route=ROUTE, metrics=Metrics(), drain=drain)
    if state["ejected"]:
        session.ejection.until = 10.0
    link = session.current
    if state["connecting"]:
        link.state = LinkState.CONNECTING
    if state["worker_gone"]:
        session.worker_gone = True
    if state["retired"]:
        link = UpstreamLink("retired", 1 << 20, session.metrics, session)
    if state["partial"]:
        (link.framer if upstream else session.downstream).receive(b"\0RE")
    session.traits.grab_uniq = state["grab_uniq"]
    link.grabs_pending.extend(state["grabs"])
    return session, link, Sink(), Sink()


@compiled_only
@settings(max_examples=600)
@given(reads, states, st.booleans())
def test_the_gate_decides_as_the_session_does(data: bytes, state: dict[str, bool], upstream: bool) -> None:
    from gproxy._dataplane import Gate

    pure, pure_link, _, _ = made(state, upstream)
    compiled, link, worker, gearmand = made(state, upstream)
    pair = SimpleNamespace(worker=worker, _flow=lambda: None)
    endpoints = {compiled.current: gearmand}
    gate = Gate(pair, compiled, endpoints, link if upstream else None)
    if upstream:
        expected = pure.bypasses_upstream(pure_link, data)
    else:
        expected = pure.bypasses_downstream(data)
    assert gate.bypasses(data) == (expected is not None and expected is not False)
    sent = worker.written if upstream else gearmand.written
    if upstream:
        assert sent == ([data] if expected else [])
    else:
        assert sent == ([expected] if expected is not None else [])
    assert list(link.grabs_pending) == list(pure_link.grabs_pending)
    assert list(compiled.current.grabs_pending) == list(pure.current.grabs_pending)
    direction = "from_gearmand" if upstream else "to_gearmand"
    assert compiled.metrics.packets[direction] == pure.metrics.packets[direction]


@pytest.mark.parametrize("kind", ["pure", "compiled"])
def test_what_passes_is_what_no_rule_watches(kind: str) -> None:
    """By hand, for both: a NOOP from gearmand and a PRE_SLEEP from the worker pass, and so
    do grabs and NO_JOBs, with their books kept on grabs_pending; a job's assignment and its
    result do not, nor a sleep gproxy answers itself, nor anything for a worker that has left."""
    session, _, worker, gearmand = made({
        "draining": False, "ejected": False, "connecting": False, "worker_gone": False, "retired": False,
        "partial": False, "grab_uniq": True, "grabs": [],
    }, upstream=False)
    if kind == "compiled":
        if dataplane.fast_path() != "compiled":
            pytest.skip("the compiled data plane is not built")
        from gproxy._dataplane import Gate

        pair = SimpleNamespace(worker=worker, _flow=lambda: None)
        down = Gate(pair, session, {session.current: gearmand}).bypasses
        up = Gate(pair, session, {session.current: gearmand}, session.current).bypasses
    else:
        down = session.bypasses_downstream
        up = lambda data: session.bypasses_upstream(session.current, data)  # noqa: E731
    assert down(build_packet(REQ, PacketType.PRE_SLEEP))
    assert down(build_packet(REQ, PacketType.GRAB_JOB_UNIQ))  # its entry on grabs_pending
    assert down(build_packet(REQ, PacketType.GRAB_JOB))  # upgraded: gearmand knows GRAB_JOB_UNIQ
    assert list(session.current.grabs_pending) == [False, True]
    assert gearmand.written[-1:] == [build_packet(REQ, PacketType.GRAB_JOB_UNIQ)] or kind == "pure"
    assert up(build_packet(RES, PacketType.NOOP))
    assert up(build_packet(RES, PacketType.NO_JOB))  # the oldest grab answered
    assert list(session.current.grabs_pending) == [True]
    session.traits.grab_uniq = False  # (a server that refused GRAB_JOB_UNIQ: the worker's own grab goes)
    assert down(build_packet(REQ, PacketType.GRAB_JOB)) in (True, build_packet(REQ, PacketType.GRAB_JOB))
    assert list(session.current.grabs_pending) == [True, False]
    assert kind == "pure" or gearmand.written[-1] == build_packet(REQ, PacketType.GRAB_JOB)
    assert not down(build_packet(REQ, PacketType.WORK_COMPLETE, handle=b"H:1", data=b"done"))
    assert not up(build_packet(RES, PacketType.JOB_ASSIGN, handle=b"H:1", function=b"f", data=b"x"))
    assert session.metrics.packets["to_gearmand"][PacketType.PRE_SLEEP] == 1
    assert session.metrics.packets["from_gearmand"][PacketType.NOOP] == 1
    session.ejection.until = 10.0  # ejected, then draining: its sleep is gproxy's to answer
    assert not down(build_packet(REQ, PacketType.PRE_SLEEP))
    session.ejection.until = None
    session.drain.start()
    assert not down(build_packet(REQ, PacketType.PRE_SLEEP))
    assert up(build_packet(RES, PacketType.NOOP))  # (what comes from gearmand is not the drain's)
    session.worker_gone = True
    assert not up(build_packet(RES, PacketType.NOOP))


@compiled_only
def test_a_bypass_that_fills_the_other_side_stops_the_pair_reading_as_its_own_writes_do() -> None:
    """A write the kernel did not take whole leaves the other side buffered: the gate asks
    the pair to check its flow (Pair._flow, as Pair._write does), which pauses reading."""
    from gproxy._dataplane import Gate

    session, _, worker, gearmand = made({
        "draining": False, "ejected": False, "connecting": False, "worker_gone": False, "retired": False,
        "partial": False, "grab_uniq": True, "grabs": [],
    }, upstream=False)
    flows: list[bool] = []
    pair = SimpleNamespace(worker=worker, _flow=lambda: flows.append(True))
    gate = Gate(pair, session, {session.current: gearmand})
    assert gate.bypasses(build_packet(REQ, PacketType.PRE_SLEEP)) and flows == []
    gearmand.buffered = 100
    assert gate.bypasses(build_packet(REQ, PacketType.PRE_SLEEP)) and flows == [True]
