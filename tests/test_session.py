"""Session, pure: transcripts built with the real codec, as a worker and gearmand would send them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gproxy.protocol import REQ, RES, PacketType, ProtocolError, build_packet
from gproxy.retry import Policies, Retrier, RetryPolicy, SendUpstream, Wakeup
from gproxy.session import OpenUpstream, Session
from tests.test_protocol import admin_lines, packets

P = PacketType


def req(ptype: PacketType, **args: bytes) -> bytes:
    return build_packet(REQ, ptype, **args)


def res(ptype: PacketType, **args: bytes) -> bytes:
    return build_packet(RES, ptype, **args)


def assign_uniq(handle: bytes, function: bytes = b"f", unique: bytes = b"u-1", data: bytes = b"d") -> bytes:
    return res(P.JOB_ASSIGN_UNIQ, handle=handle, function=function, unique=unique, data=data)


@pytest.fixture
def session() -> Session:
    return Session("up-1")


def test_grab_job_is_upgraded_and_the_worker_still_gets_a_plain_assign(session: Session) -> None:
    assert session.from_downstream(req(P.GRAB_JOB), now=0.0) == req(P.GRAB_JOB_UNIQ)
    got = session.from_upstream(session.current, assign_uniq(b"H:x:1", data=b"pay\0load"), now=7.0)
    assert got == res(P.JOB_ASSIGN, handle=b"H:x:1", function=b"f", data=b"pay\0load")
    (job,) = session.current.jobs
    assert (job.handle, job.function, job.unique, job.payload) == (b"H:x:1", b"f", b"u-1", b"pay\0load")
    assert (job.upstream, job.started_at) == ("up-1", 7.0)


@pytest.mark.parametrize(
    "grab, reply",
    [
        (P.GRAB_JOB_UNIQ, assign_uniq(b"H:x:2")),
        (P.GRAB_JOB_ALL, assign_uniq(b"H:x:2")),
        (
            P.GRAB_JOB_ALL,
            res(P.JOB_ASSIGN_ALL, handle=b"H:x:2", function=b"f", unique=b"u-1", reducer=b"r", data=b"d"),
        ),
    ],
)
def test_other_grabs_and_their_assigns_pass_unchanged_and_are_tracked(
    session: Session, grab: PacketType, reply: bytes
) -> None:
    assert session.from_downstream(req(grab), now=0.0) == req(grab)
    assert session.from_upstream(session.current, reply, now=1.0) == reply
    assert [(j.handle, j.unique) for j in session.current.jobs] == [(b"H:x:2", b"u-1")]


def test_pipelined_grabs_are_answered_in_order(session: Session) -> None:
    sent = session.from_downstream(req(P.GRAB_JOB) + req(P.GRAB_JOB_UNIQ) + req(P.GRAB_JOB), now=0.0)
    assert sent == req(P.GRAB_JOB_UNIQ) * 3
    replies = assign_uniq(b"H:1") + assign_uniq(b"H:2") + res(P.NO_JOB)
    assert session.from_upstream(session.current, replies, now=0.0) == (
        res(P.JOB_ASSIGN, handle=b"H:1", function=b"f", data=b"d")
        + assign_uniq(b"H:2")
        + res(P.NO_JOB)
    )
    # NO_JOB answered the third grab: the next reply belongs to a new grab.
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0)
    assert session.from_upstream(session.current, assign_uniq(b"H:3"), now=0.0) == assign_uniq(b"H:3")


@pytest.mark.parametrize(
    "result",
    [
        req(P.WORK_COMPLETE, handle=b"H:1", data=b"ok"),
        req(P.WORK_FAIL, handle=b"H:1"),
        req(P.WORK_EXCEPTION, handle=b"H:1", data=b"boom"),
    ],
)
def test_a_final_result_ends_the_job_and_passes_through(session: Session, result: bytes) -> None:
    session.from_downstream(req(P.GRAB_JOB_UNIQ) * 2, now=0.0)
    session.from_upstream(session.current, assign_uniq(b"H:1") + assign_uniq(b"H:2"), now=0.0)
    assert session.from_downstream(result, now=0.0) == result
    assert [j.handle for j in session.current.jobs] == [b"H:2"]


def test_cant_do_hands_back_only_that_functions_jobs(session: Session) -> None:
    session.from_downstream(req(P.GRAB_JOB_UNIQ) * 2, now=0.0)
    session.from_upstream(session.current, assign_uniq(b"H:1", function=b"a") + assign_uniq(b"H:2", function=b"b"), now=0.0)
    assert session.from_downstream(req(P.CANT_DO, function=b"a"), now=0.0) == req(P.CANT_DO, function=b"a")
    assert [j.handle for j in session.current.jobs] == [b"H:2"]
    session.from_downstream(req(P.RESET_ABILITIES), now=0.0)
    assert list(session.current.jobs) == []


def test_closing_hands_back_everything(session: Session) -> None:
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0)
    session.from_upstream(session.current, assign_uniq(b"H:1"), now=0.0)
    assert [j.handle for j in session.link_closed(session.current)] == [b"H:1"]
    assert len(session.current.jobs) == 0


def test_a_work_result_without_a_handle_terminator_is_refused(session: Session) -> None:
    bad = b"\0REQ" + (13).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"H:x:1"
    with pytest.raises(ProtocolError, match="WORK_COMPLETE"):
        session.from_downstream(bad, now=0.0)


_UNWATCHED_REQ = tuple(
    t for t in PacketType
    if t not in {P.GRAB_JOB, P.GRAB_JOB_UNIQ, P.GRAB_JOB_ALL, P.WORK_COMPLETE, P.WORK_FAIL,
                 P.WORK_EXCEPTION, P.CANT_DO, P.RESET_ABILITIES}
)
_UNWATCHED_RES = tuple(
    t for t in PacketType if t not in {P.JOB_ASSIGN, P.JOB_ASSIGN_UNIQ, P.JOB_ASSIGN_ALL, P.NO_JOB}
)


@given(
    st.lists(st.one_of(packets(REQ, _UNWATCHED_REQ), admin_lines), max_size=10),
    st.lists(st.one_of(packets(RES, _UNWATCHED_RES), admin_lines), max_size=10),
    st.integers(min_value=1, max_value=50),
)
def test_everything_else_passes_byte_for_byte_in_order(
    down: list[bytes], up: list[bytes], chunk: int
) -> None:
    session = Session("up")
    down_stream, up_stream = b"".join(down), b"".join(up)
    sent = b"".join(session.from_downstream(down_stream[i : i + chunk], now=0.0) for i in range(0, len(down_stream), chunk))
    received = b"".join(
        session.from_upstream(session.current, up_stream[i : i + chunk], now=0.0) for i in range(0, len(up_stream), chunk)
    )
    assert (sent, received) == (down_stream, up_stream)


def test_cant_do_for_a_held_job_moves_the_worker_to_a_fresh_connection() -> None:
    session = Session("up", retrier=Retrier(Policies(RetryPolicy(jitter=False))), route="r")
    old = session.current
    registration = req(P.SET_CLIENT_ID, client_id=b"w1") + req(P.CAN_DO, function=b"f") + req(
        P.CAN_DO_TIMEOUT, function=b"g", timeout=b"5000"
    )
    assert session.from_downstream(registration + req(P.GRAB_JOB_UNIQ) * 2, now=0.0) == (
        registration + req(P.GRAB_JOB_UNIQ) * 2
    )
    session.from_upstream(old, assign_uniq(b"H:1", function=b"f") + assign_uniq(b"H:2", function=b"g"), now=0.0)
    assert session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0) == b""
    assert session.actions == [Wakeup(1, 1.0)]
    session.actions.clear()

    # CANT_DO f on `old` would make gearmand requeue the held H:1: not sent there.
    sent = session.from_downstream(
        req(P.WORK_DATA, handle=b"H:2", data=b"d") + req(P.CANT_DO, function=b"f") + req(P.GRAB_JOB_UNIQ),
        now=0.0,
    )
    new = session.current
    assert new is not old and session.retired == [old]
    assert session.actions == [
        SendUpstream(old, req(P.WORK_DATA, handle=b"H:2", data=b"d")),
        OpenUpstream(session, new, req(P.SET_CLIENT_ID, client_id=b"w1")
                     + req(P.CAN_DO_TIMEOUT, function=b"g", timeout=b"5000")),
    ]
    assert sent == req(P.GRAB_JOB_UNIQ)  # for the fresh connection
    session.actions.clear()

    # H:2 still runs on `old`: its result goes there, and `old`, holding H:1, stays.
    assert session.from_downstream(req(P.WORK_COMPLETE, handle=b"H:2", data=b"ok"), now=0.0) == b""
    assert session.actions == [SendUpstream(old, req(P.WORK_COMPLETE, handle=b"H:2", data=b"ok"))]
    assert not session.idle(old)
    session.actions.clear()
    session.retrier.owner_lost(old)  # once nothing is held there, it may close
    assert session.idle(old)


def test_draining_answers_grabs_itself_and_lets_running_jobs_finish(session: Session) -> None:
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0)
    session.from_upstream(session.current, assign_uniq(b"H:1"), now=0.0)
    session.draining = True
    assert session.from_downstream(req(P.GRAB_JOB) + req(P.PRE_SLEEP), now=0.0) == b""
    assert session.replies == [res(P.NO_JOB)]
    result = req(P.WORK_COMPLETE, handle=b"H:1", data=b"ok")
    assert session.from_downstream(result, now=1.0) == result
    assert len(session.current.jobs) == 0
