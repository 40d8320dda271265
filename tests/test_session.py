"""Session, pure: transcripts built with the real codec, as a worker and gearmand would send them."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gproxy.config import Address, Route
from gproxy.core.commands import CallLater, Close, Finish, OpenUpstream, SendDownstream, Timer
from gproxy.core.connections import LinkState
from gproxy.core.jobs import running_per_function
from gproxy.core.policy import DISCONNECTED, TIMED_OUT, FinalException, Mode, OnDisconnect, Policies, RetryPolicy
from gproxy.core.protocol import REQ, RES, PacketType, ProtocolError, build_packet
from gproxy.core.retry import NothingHeld, RecheckBudget, Retrier, SendUpstream, Submit, Wakeup
from gproxy.core.session import (
    MAX_SILENCED,
    Command,
    ServerTraits,
    Session,
    UpstreamLink,
)
from tests.test_protocol import admin_lines, packets

ROUTE = Route(Address("127.0.0.1", 4730), Address("127.0.0.1", 4731))

P = PacketType


class Driven(Session):
    """A Session as most of these tests look at it: an event returns the bytes forwarded
    (to the current gearmand connection, or to the worker), gproxy's own answers to the
    worker pile up in `replies`, and every other command in `actions`, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.actions: list[Command] = []
        self.replies: list[bytes] = []

    def from_downstream(self, data: bytes, now: float) -> bytes:  # type: ignore[override]
        # As a Pair does: a packet that passes goes first, and the Session sees it after.
        sent = self.passes_downstream(data)
        return (data if sent else b"") + self._split(super().from_downstream(data, now, sent), to_gearmand=True)

    def from_upstream(self, link: UpstreamLink, data: bytes, now: float) -> bytes:  # type: ignore[override]
        sent = self.passes_upstream(link, data)
        return (data if sent else b"") + self._split(super().from_upstream(link, data, now, sent), to_gearmand=False)

    def link_closed(self, link: UpstreamLink) -> bytes:
        """gearmand connection `link` was lost (a reset)."""
        return self._split(self.link_ended(link, ConnectionResetError("reset")), to_gearmand=False)

    def _split(self, commands: list[Command], to_gearmand: bool) -> bytes:
        forwarded = []
        for command in commands:
            if to_gearmand and type(command) is SendUpstream and command.owner is self.current:
                forwarded.append(command.data)
            elif type(command) is SendDownstream:
                (self.replies if to_gearmand else forwarded).append(command.data)
            else:
                self.actions.append(command)
        return b"".join(forwarded)


def req(ptype: PacketType, **args: bytes) -> bytes:
    return build_packet(REQ, ptype, **args)


def res(ptype: PacketType, **args: bytes) -> bytes:
    return build_packet(RES, ptype, **args)


def assign_uniq(handle: bytes, function: bytes = b"f", unique: bytes = b"u-1", data: bytes = b"d") -> bytes:
    return res(P.JOB_ASSIGN_UNIQ, handle=handle, function=function, unique=unique, data=data)


def running(session: Session) -> dict[bytes, int]:
    """The jobs the session's worker runs, per function, as a scrape counts them."""
    return dict(running_per_function(link.jobs for link in session.links))


@pytest.fixture
def session() -> Driven:
    return Driven("up-1", route=ROUTE)


def test_grab_job_is_upgraded_and_the_worker_still_gets_a_plain_assign(session: Driven) -> None:
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
    session: Driven, grab: PacketType, reply: bytes
) -> None:
    assert session.from_downstream(req(grab), now=0.0) == req(grab)
    assert session.from_upstream(session.current, reply, now=1.0) == reply
    assert [(j.handle, j.unique) for j in session.current.jobs] == [(b"H:x:2", b"u-1")]


def test_pipelined_grabs_are_answered_in_order(session: Driven) -> None:
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
def test_a_final_result_ends_the_job_and_passes_through(session: Driven, result: bytes) -> None:
    session.from_downstream(req(P.GRAB_JOB_UNIQ) * 2, now=0.0)
    session.from_upstream(session.current, assign_uniq(b"H:1") + assign_uniq(b"H:2"), now=0.0)
    assert session.from_downstream(result, now=0.0) == result
    assert [j.handle for j in session.current.jobs] == [b"H:2"]


def test_cant_do_hands_back_only_that_functions_jobs(session: Driven) -> None:
    session.from_downstream(req(P.GRAB_JOB_UNIQ) * 2, now=0.0)
    session.from_upstream(session.current, assign_uniq(b"H:1", function=b"a") + assign_uniq(b"H:2", function=b"b"), now=0.0)
    assert session.from_downstream(req(P.CANT_DO, function=b"a"), now=0.0) == req(P.CANT_DO, function=b"a")
    assert [j.handle for j in session.current.jobs] == [b"H:2"]
    session.from_downstream(req(P.RESET_ABILITIES), now=0.0)
    assert list(session.current.jobs) == []


def test_closing_hands_back_everything(session: Driven) -> None:
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0)
    session.from_upstream(session.current, assign_uniq(b"H:1"), now=0.0)
    session.link_closed(session.current)
    assert len(session.current.jobs) == 0 and running(session) == {}


def test_a_work_result_without_a_handle_terminator_is_refused(session: Driven) -> None:
    bad = b"\0REQ" + (13).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"H:x:1"
    with pytest.raises(ProtocolError, match="WORK_COMPLETE"):
        session.from_downstream(bad, now=0.0)


_UNWATCHED_REQ = tuple(
    t for t in PacketType
    if t not in {P.GRAB_JOB, P.GRAB_JOB_UNIQ, P.GRAB_JOB_ALL, P.WORK_COMPLETE, P.WORK_FAIL,
                 P.WORK_EXCEPTION, P.CANT_DO, P.RESET_ABILITIES, P.CAN_DO_TIMEOUT}
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
    session = Driven("up", route=ROUTE)
    down_stream, up_stream = b"".join(down), b"".join(up)
    sent = b"".join(session.from_downstream(down_stream[i : i + chunk], now=0.0) for i in range(0, len(down_stream), chunk))
    received = b"".join(
        session.from_upstream(session.current, up_stream[i : i + chunk], now=0.0) for i in range(0, len(up_stream), chunk)
    )
    assert (sent, received) == (down_stream, up_stream)


def test_cant_do_for_a_held_job_moves_the_worker_to_a_fresh_connection() -> None:
    session = Driven("up", retrier=Retrier(Policies(RetryPolicy(jitter=False))), route=ROUTE)
    old = session.current
    registration = req(P.SET_CLIENT_ID, client_id=b"w1") + req(P.CAN_DO, function=b"f") + req(
        P.CAN_DO_TIMEOUT, function=b"g", timeout=b"5000"
    )
    # (gproxy enforces g's timeout itself: gearmand is told CAN_DO g.)
    upstream_registration = req(P.SET_CLIENT_ID, client_id=b"w1") + req(P.CAN_DO, function=b"f") + req(
        P.CAN_DO, function=b"g"
    )
    assert session.from_downstream(registration + req(P.GRAB_JOB_UNIQ) * 2, now=0.0) == (
        upstream_registration + req(P.GRAB_JOB_UNIQ) * 2
    )
    session.from_upstream(old, assign_uniq(b"H:1", function=b"f") + assign_uniq(b"H:2", function=b"g"), now=0.0)
    assert session.actions == [CallLater(Timer.TIMEOUTS, 5.0)]
    assert session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0) == b""
    assert session.actions == [CallLater(Timer.TIMEOUTS, 5.0), Wakeup(1, 1.0, 1)]
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
        OpenUpstream(new, req(P.SET_CLIENT_ID, client_id=b"w1") + req(P.CAN_DO, function=b"g")),
    ]
    assert sent == b""  # the grab waits for the fresh connection, after its replay
    assert session.link_opened(new) == [
        SendUpstream(new, req(P.SET_CLIENT_ID, client_id=b"w1") + req(P.CAN_DO, function=b"g") + req(P.GRAB_JOB_UNIQ))
    ]
    session.actions.clear()

    # H:2 still runs on `old`: its result goes there, and `old`, holding H:1, stays.
    assert session.from_downstream(req(P.WORK_COMPLETE, handle=b"H:2", data=b"ok"), now=0.0) == b""
    assert session.actions == [SendUpstream(old, req(P.WORK_COMPLETE, handle=b"H:2", data=b"ok"))]
    assert not session.idle(old)
    session.actions.clear()
    session.retrier.owner_lost(old)  # once nothing is held there, it may close
    assert session.idle(old)


def test_draining_answers_grabs_itself_and_lets_running_jobs_finish(session: Driven) -> None:
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0)
    session.from_upstream(session.current, assign_uniq(b"H:1"), now=0.0)
    session.drain.start()
    assert session.from_downstream(req(P.GRAB_JOB) + req(P.PRE_SLEEP), now=0.0) == b""
    assert session.replies == [res(P.NO_JOB)]
    result = req(P.WORK_COMPLETE, handle=b"H:1", data=b"ok")
    assert session.from_downstream(result, now=1.0) == result
    assert len(session.current.jobs) == 0


# -- with retries: what a worker sends after a failure, moves, other servers -------------------

FAST = RetryPolicy(jitter=False)


def retrying(policy: RetryPolicy = FAST, traits: ServerTraits | None = None) -> Driven:
    return Driven("up", retrier=Retrier(Policies(policy)), route=ROUTE, traits=traits)


def give(session: Driven, *jobs: bytes, plain: bool = False) -> None:
    """The worker grabs and gets each job; `jobs` are handle or handle=unique."""
    grab = req(P.GRAB_JOB if plain else P.GRAB_JOB_UNIQ)
    for job in jobs:
        handle, _, unique = job.partition(b"=")
        session.from_downstream(grab, now=0.0)
        if plain and not session.traits.grab_uniq:
            reply = res(P.JOB_ASSIGN, handle=handle, function=b"f", data=b"d")
        else:
            reply = assign_uniq(handle, unique=unique or b"u-" + handle)
        session.from_upstream(session.current, reply, now=0.0)
    session.actions.clear()


LATE = [
    req(P.WORK_FAIL, handle=b"H:1"),
    req(P.WORK_COMPLETE, handle=b"H:1", data=b"stale result"),
    req(P.WORK_DATA, handle=b"H:1", data=b"late data"),
    req(P.WORK_STATUS, handle=b"H:1", numerator=b"1", denominator=b"2"),
    req(P.WORK_WARNING, handle=b"H:1", data=b"w"),
    req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: again"),
]


# -- what may go on before the Session sees it (a Pair sends it first) --------------------------


def test_the_packets_of_an_ordinary_job_go_on_before_the_session_sees_them() -> None:
    session = retrying()
    assert session.passes_upstream(session.current, res(P.NOOP))
    assert session.passes_downstream(req(P.GRAB_JOB_UNIQ))
    assert session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0) == req(P.GRAB_JOB_UNIQ)
    assert session.passes_upstream(session.current, assign_uniq(b"H:1"))
    assert session.from_upstream(session.current, assign_uniq(b"H:1"), now=0.0) == assign_uniq(b"H:1")
    (job,) = session.current.jobs  # tracked all the same
    assert job.handle == b"H:1"
    for update in (req(P.WORK_DATA, handle=b"H:1", data=b"d"), req(P.WORK_WARNING, handle=b"H:1", data=b"w")):
        assert session.passes_downstream(update)
    complete = req(P.WORK_COMPLETE, handle=b"H:1", data=b"ok")
    assert session.passes_downstream(complete)
    assert session.from_downstream(complete, now=1.0) == complete
    assert not session.current.jobs and session.metrics.snapshot().stats["f"].outcomes["complete"] == 1
    assert session.passes_downstream(req(P.PRE_SLEEP)) and session.passes_downstream(req(P.ECHO_REQ, data=b"x"))
    assert session.passes_upstream(session.current, res(P.NO_JOB))


def test_what_the_session_changes_drops_or_decides_on_does_not_go_first() -> None:
    session = retrying()
    give(session, b"H:1", b"H:2")
    assert not session.passes_downstream(req(P.GRAB_JOB))  # sent as GRAB_JOB_UNIQ
    for failure in (req(P.WORK_FAIL, handle=b"H:1"), req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"),
                    req(P.WORK_STATUS, handle=b"H:1", numerator=b"1", denominator=b"2")):
        assert not session.passes_downstream(failure)
    for registration in (req(P.CAN_DO, function=b"g"), req(P.CANT_DO, function=b"f")):
        assert not session.passes_downstream(registration)
    complete = req(P.WORK_COMPLETE, handle=b"H:2", data=b"ok")
    assert not session.passes_downstream(complete[:-1]) and not session.passes_downstream(complete * 2)
    assert not session.passes_downstream(req(P.WORK_COMPLETE, handle=b"H:2", data=b"")[:-1] + b"x")  # no NUL
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0)
    assert session.retrier.holder(ROUTE, b"H:1") is session.current
    assert not session.passes_downstream(req(P.WORK_COMPLETE, handle=b"H:1", data=b"stale"))  # held: dropped
    assert session.passes_downstream(complete)
    session.from_downstream(req(P.GRAB_JOB), now=0.0)  # upgraded: its assignment is rewritten
    assert not session.passes_upstream(session.current, assign_uniq(b"H:3"))
    session.from_upstream(session.current, res(P.NO_JOB), now=0.0)
    assert session.passes_upstream(session.current, assign_uniq(b"H:3"))
    assert not session.passes_upstream(session.current, assign_uniq(b"H:3", unique=b"gpr:1:u"))  # a retry's
    assert not session.passes_upstream(session.current, assign_uniq(b"H:1"))  # the held job, taken back
    assert not session.passes_upstream(session.current, assign_uniq(b"H:3")[:-3] + b"abc")  # too few NULs
    assert not session.passes_upstream(session.current, res(P.ERROR, code=b"c", text=b"t"))
    draining = retrying()
    draining.drain.start()
    assert not draining.passes_downstream(req(P.GRAB_JOB_UNIQ)) and not draining.passes_downstream(req(P.PRE_SLEEP))


def test_nothing_goes_first_on_a_connection_the_worker_was_moved_off_or_once_it_left() -> None:
    session = retrying()
    give(session, b"H:1", b"H:2")
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0)
    old = session.current
    session.from_downstream(req(P.CANT_DO, function=b"f"), now=0.0)  # held H:1 there: a move
    assert session.current is not old and session.retired == [old]
    assert not session.passes_upstream(old, res(P.NOOP))
    assert not session.passes_downstream(req(P.WORK_COMPLETE, handle=b"H:2", data=b"ok"))  # old owns it
    assert session.passes_upstream(session.current, res(P.NOOP))
    session.worker_left(now=1.0)
    assert not session.passes_upstream(session.current, res(P.NOOP))


def test_a_packet_sent_first_that_the_session_would_not_have_sent_is_an_error() -> None:
    session = retrying()
    with pytest.raises(RuntimeError, match="not meant to go on"):
        Session.from_downstream(session, req(P.GRAB_JOB), 0.0, sent=True)


@pytest.mark.parametrize("late", LATE, ids=lambda p: PacketType(int.from_bytes(p[4:8], "big")).name)
def test_nothing_the_worker_sends_for_a_held_job_reaches_gearmand(late: bytes) -> None:
    session = retrying()
    give(session, b"H:1")
    assert session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0) == b""
    session.actions.clear()
    # python-gearman's send_job_exception + return: the exception, a WORK_FAIL, a WORK_COMPLETE.
    assert session.from_downstream(late + late, now=1.0) == b""
    assert session.actions == [] and len(session.retrier.held) == 1


def test_a_held_job_is_still_recognised_after_many_other_failures() -> None:
    session = retrying()
    give(session, b"H:1")
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0)
    for n in range(2, MAX_SILENCED + 10):  # so many unmarked exceptions that H:1 leaves the memory
        handle = b"H:%d" % n
        give(session, handle)
        session.from_downstream(req(P.WORK_EXCEPTION, handle=handle, data=b"boom"), now=0.0)
    assert session.from_downstream(req(P.WORK_COMPLETE, handle=b"H:1", data=b"stale"), now=1.0) == b""


@pytest.mark.parametrize("exception_ends_job", [True, False])
def test_after_a_forwarded_exception_the_trailing_work_fail_is_dropped_where_the_job_has_ended(
    exception_ends_job: bool,
) -> None:
    session = retrying(traits=ServerTraits(exception_ends_job=exception_ends_job))
    give(session, b"H:1")
    exception = req(P.WORK_EXCEPTION, handle=b"H:1", data=b"boom: not marked")
    trailing = req(P.WORK_FAIL, handle=b"H:1")
    sent = session.from_downstream(exception + trailing, now=0.0)
    # gearmand: the exception ended the job, the WORK_FAIL would earn the worker an ERROR.
    # The Perl Gearman::Server: the exception only informs, the WORK_FAIL ends the job.
    assert sent == (exception if exception_ends_job else exception + trailing)
    assert running(session) == {}


def test_a_new_assignment_of_an_ended_handle_is_a_new_job() -> None:
    session = retrying()
    give(session, b"H:1")
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"boom"), now=0.0)
    give(session, b"H:1")  # handles repeat after a gearmand restart
    done = req(P.WORK_COMPLETE, handle=b"H:1", data=b"ok")
    assert session.from_downstream(done, now=0.0) == done


@pytest.mark.parametrize(
    "failure", [req(P.WORK_EXCEPTION, handle=b"H:7", data=b"RETRY: x"), req(P.WORK_FAIL, handle=b"H:7")]
)
def test_a_retry_jobs_failure_goes_to_its_owner_and_nothing_after_it(failure: bytes) -> None:
    session = retrying(replace(FAST, on_fail=True))
    give(session, b"H:7=gpr:2:orig")
    assert session.from_downstream(failure, now=0.0) == failure
    assert session.retrier.held == {} and session.actions == []  # no second loop
    assert session.from_downstream(req(P.WORK_COMPLETE, handle=b"H:7", data=b"late"), now=0.0) == b""


def test_over_max_held_the_failure_is_forwarded_and_dead_lettered() -> None:
    session = retrying(replace(FAST, max_held=1, dead_letter="dlq"))
    give(session, b"H:1", b"H:2")
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0)
    session.actions.clear()
    exception = req(P.WORK_EXCEPTION, handle=b"H:2", data=b"RETRY: x")
    assert session.from_downstream(exception + req(P.WORK_FAIL, handle=b"H:2"), now=0.0) == exception
    assert [type(a) for a in session.actions] == [Submit]


def test_updates_after_a_cant_do_in_the_same_read_go_to_the_connection_that_owns_the_job() -> None:
    session = retrying()
    old = session.current
    session.from_downstream(req(P.CAN_DO, function=b"f"), now=0.0)
    give(session, b"H:1", b"H:2")
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0)
    session.actions.clear()
    updates = req(P.WORK_DATA, handle=b"H:2", data=b"d") + req(P.WORK_STATUS, handle=b"H:2", numerator=b"1", denominator=b"2")
    sent = session.from_downstream(req(P.CANT_DO, function=b"f") + updates + req(P.GRAB_JOB_UNIQ), now=0.0)
    assert sent == b""  # the grab waits for the fresh connection
    new = session.current
    assert session.actions == [
        OpenUpstream(new, b""),  # it can do nothing now
        SendUpstream(old, req(P.WORK_DATA, handle=b"H:2", data=b"d")),
        SendUpstream(old, req(P.WORK_STATUS, handle=b"H:2", numerator=b"1", denominator=b"2")),
    ]
    assert session.link_opened(new) == [SendUpstream(new, req(P.GRAB_JOB_UNIQ))]


def test_a_retired_connection_closes_once_its_last_grab_is_answered() -> None:
    session = retrying()
    old = session.current
    give(session, b"H:1")
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0)
    # A grab still unanswered on the old connection when the worker is moved off it.
    session.from_downstream(req(P.GRAB_JOB_UNIQ) + req(P.RESET_ABILITIES), now=0.0)
    assert session.retired == [old]
    retrier = session.retrier
    retrier.timer_fired(1, 1, now=1.0)
    retrier.retry_created(1, b"H:9")
    finished = retrier.retry_packet(ROUTE, P.WORK_COMPLETE, {"handle": b"H:9", "data": b"ok"}, now=2.0)
    assert finished[-1] == NothingHeld(old)
    assert session.deliver(NothingHeld(old)) == [] and session.retired == [old]  # still owed the answer to that grab
    session.actions.clear()
    assert session.from_upstream(old, res(P.NO_JOB), now=3.0) == res(P.NO_JOB)
    assert session.actions == [Close(old)] and session.retired == [] and old.state is LinkState.CLOSED


def test_the_replies_to_a_replayed_registration_never_reach_the_worker() -> None:
    session = retrying()
    session.from_downstream(req(P.OPTION_REQ, option=b"exceptions") + req(P.CAN_DO, function=b"f"), now=0.0)
    assert session.from_upstream(session.current, res(P.OPTION_RES, option=b"exceptions"), now=0.0) == res(
        P.OPTION_RES, option=b"exceptions"
    )
    give(session, b"H:1")
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x") + req(P.RESET_ABILITIES), now=0.0)
    new = session.current
    assert new.replies_to_swallow == 1
    assert session.from_upstream(new, res(P.OPTION_RES, option=b"exceptions"), now=0.0) == b""
    # The worker's own request afterwards is answered as usual.
    session.from_downstream(req(P.OPTION_REQ, option=b"exceptions"), now=0.0)
    assert session.from_upstream(new, res(P.OPTION_RES, option=b"exceptions"), now=0.0) == res(
        P.OPTION_RES, option=b"exceptions"
    )


PERL_SERVER_REFUSAL = res(
    P.ERROR, code=b"server_error",
    text=b'Can\'t locate object method "CMD_" via package "Gearman::Server::Client" at Client.pm line 552.\n',
)


def test_a_server_without_grab_job_uniq_gets_the_workers_own_grab() -> None:
    traits = ServerTraits()
    session = retrying(traits=traits)
    link = session.current
    assert session.from_downstream(req(P.GRAB_JOB), now=0.0) == req(P.GRAB_JOB_UNIQ)
    assert session.from_upstream(link, PERL_SERVER_REFUSAL, now=0.0) == b""
    assert session.actions == [SendUpstream(link, req(P.GRAB_JOB))]
    assert (traits.grab_uniq, traits.exception_ends_job) == (False, False)
    assign = res(P.JOB_ASSIGN, handle=b"H:1", function=b"f", data=b"d")
    assert session.from_upstream(link, assign, now=0.0) == assign
    assert [(j.handle, j.unique) for j in link.jobs] == [(b"H:1", b"")]
    assert session.from_downstream(req(P.GRAB_JOB), now=0.0) == req(P.GRAB_JOB)
    # Sessions of the same route start knowing it.
    assert retrying(traits=traits).from_downstream(req(P.GRAB_JOB), now=0.0) == req(P.GRAB_JOB)


def test_other_errors_are_the_workers_own() -> None:
    session = retrying(traits=ServerTraits())
    link = session.current
    session.from_downstream(req(P.GRAB_JOB), now=0.0)
    not_found = res(P.ERROR, code=b"JOB_NOT_FOUND", text=b"Job given in work result not found")
    assert session.from_upstream(link, not_found, now=0.0) == not_found  # about an earlier packet
    assert list(link.grabs_pending) == [True] and session.traits.grab_uniq
    # A grab the worker itself sent and the server cannot name: the worker gets the answer.
    session.from_upstream(link, res(P.NO_JOB), now=0.0)
    session.from_downstream(req(P.GRAB_JOB_ALL), now=0.0)
    assert session.from_upstream(link, PERL_SERVER_REFUSAL, now=0.0) == PERL_SERVER_REFUSAL
    assert list(link.grabs_pending) == [] and session.traits.grab_uniq


def test_where_uniques_are_unknown_retry_jobs_are_recognised_by_handle() -> None:
    session = retrying(traits=ServerTraits(grab_uniq=False, exception_ends_job=False))
    retrier = session.retrier
    give(session, b"H:1", plain=True)
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0)
    (submit,) = retrier.timer_fired(1, 1, now=1.0)
    assert submit.unique.startswith(b"gpr:2.%s@" % retrier.tag)  # an empty original: one of its own
    retrier.retry_created(1, b"H:9")
    give(session, b"H:9", plain=True)  # the same worker gets the retry, without its unique
    failure = req(P.WORK_EXCEPTION, handle=b"H:9", data=b"RETRY: y") + req(P.WORK_FAIL, handle=b"H:9")
    assert session.from_downstream(failure, now=2.0) == failure  # passed on to the loop's owner
    assert list(retrier.held) == [1]


def test_a_departed_worker_fails_retry_jobs_back_and_retries_its_originals() -> None:
    session = retrying()
    link = session.current
    give(session, b"H:1", b"H:2", b"H:3=gpr:2:other")
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY after=30: later"), now=0.0)
    actions = session.worker_left(now=1.0)
    assert actions == [
        SendUpstream(link, req(P.WORK_EXCEPTION, handle=b"H:3", data=DISCONNECTED)),
        Wakeup(2, 0.0, 1),
    ]
    assert session.retrier.held[2].handle == b"H:2" and running(session) == {}


def test_a_held_handle_assigned_again_is_held_afresh_when_it_fails_again() -> None:
    # gearmand took it back (a CAN_DO_TIMEOUT fired) and the same worker got it again.
    session = retrying()
    link = session.current
    give(session, b"H:1")
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0)
    session.actions.clear()
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=1.0)
    session.from_upstream(link, assign_uniq(b"H:1"), now=1.0)
    assert session.actions == [] and session.retrier.held == {}  # (its hold is over: nothing to settle)
    session.actions.clear()
    assert session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=2.0) == b""
    assert [job.key for job in session.retrier.held.values()] == [2]


def test_after_a_hold_ends_the_worker_still_cannot_finish_that_job_again() -> None:
    session = retrying(replace(FAST, on_fail=True))
    link = session.current
    give(session, b"H:1")
    assert session.from_downstream(req(P.WORK_FAIL, handle=b"H:1"), now=0.0) == b""
    retrier = session.retrier
    retrier.timer_fired(1, 1, now=1.0)
    retrier.retry_created(1, b"H:9")
    assert retrier.retry_packet(ROUTE, P.WORK_COMPLETE, {"handle": b"H:9", "data": b"ok"}, now=2.0)[-1] == NothingHeld(link)
    # gearmand has finished H:1 with the retry's result; a straggler would only earn an ERROR.
    assert session.from_downstream(req(P.WORK_COMPLETE, handle=b"H:1", data=b"late"), now=3.0) == b""


def test_where_exceptions_do_not_end_jobs_a_retry_failed_back_also_gets_its_work_fail() -> None:
    session = retrying(traits=ServerTraits(grab_uniq=False, exception_ends_job=False))
    link = session.current
    give(session, b"H:1", b"H:3", plain=True)
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0)
    link.jobs.ended(b"H:3")
    link.jobs.assigned(b"H:3", b"f", b"", b"d", 0.0, is_retry=True)  # recognised by handle
    assert session.worker_left(now=1.0)[0] == SendUpstream(
        link, req(P.WORK_EXCEPTION, handle=b"H:3", data=DISCONNECTED) + req(P.WORK_FAIL, handle=b"H:3")
    )


def test_what_the_session_is_asked_for_comes_in_order_with_the_bytes_around_it() -> None:
    """An assignment's timer comes before the assignment and after what came before it; a
    connection the worker was moved off closes after its last result."""
    policies = Policies(RetryPolicy(jitter=False), {b"g": RetryPolicy(timeout=5.0)})
    session = Session("up", retrier=Retrier(policies), route=ROUTE)
    old = session.current
    session.from_downstream(req(P.GRAB_JOB_UNIQ) * 2, now=0.0)
    noop, timed = res(P.NOOP), assign_uniq(b"H:2", function=b"g")
    assert session.from_upstream(old, noop + timed, now=0.0) == [
        SendDownstream(noop), CallLater(Timer.TIMEOUTS, 5.0), SendDownstream(timed)
    ]
    session.from_upstream(old, assign_uniq(b"H:1", function=b"f"), now=0.0)
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0)  # held on `old`
    session.from_downstream(req(P.CANT_DO, function=b"f"), now=0.0)  # the worker moves
    assert session.retrier is not None and session.retired == [old]
    session.retrier.owner_lost(old)  # nothing held there any more
    done = req(P.WORK_COMPLETE, handle=b"H:2", data=b"ok")
    assert session.from_downstream(done, now=1.0) == [SendUpstream(old, done), Close(old)]


def test_a_job_too_large_to_hand_over_is_failed_upstream_and_the_grab_gets_no_job() -> None:
    session = Driven("up", max_packet_size=2048, route=ROUTE)
    link = session.current
    assert session.from_downstream(req(P.GRAB_JOB), now=0.0) == req(P.GRAB_JOB_UNIQ)
    big = assign_uniq(b"H:big", function=b"resize", data=b"x" * 4096)
    after = res(P.NOOP)
    assert session.from_upstream(link, big[:500], now=0.0) == b""  # the head is not all there
    assert session.from_upstream(link, big[500:2000], now=0.0) == res(P.NO_JOB)
    assert session.from_upstream(link, big[2000:] + after, now=0.0) == after  # the rest, dropped
    reason = b"gproxy: a job of %d bytes exceeds max_packet_size 2048" % (len(big) - 12)
    assert session.actions == [SendUpstream(link, req(P.WORK_EXCEPTION, handle=b"H:big", data=reason))]
    assert list(link.grabs_pending) == [] and len(link.jobs) == 0


def test_a_job_too_large_after_other_replies_in_the_same_read_still_gets_the_grab_its_no_job() -> None:
    session = Driven("up", max_packet_size=2048, route=ROUTE)
    link = session.current
    session.from_downstream(req(P.GRAB_JOB), now=0.0)
    big = assign_uniq(b"H:big", function=b"resize", data=b"x" * 4096)
    # The failure goes upstream between what came before the job and the worker's NO_JOB.
    assert session.from_upstream(link, res(P.NOOP) + big, now=0.0) == res(P.NOOP) + res(P.NO_JOB)
    assert [type(action) for action in session.actions] == [SendUpstream]


def test_a_unique_of_thousands_of_digits_after_gpr_passes_as_it_is() -> None:
    session = retrying()
    unique = b"gpr:" + b"9" * 5000 + b":x"
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0)
    assign = assign_uniq(b"H:1", unique=unique)
    assert session.from_upstream(session.current, assign, now=0.0) == assign


def test_a_job_assigned_after_the_worker_left_is_retried_on_a_connection_kept_for_retries() -> None:
    session = retrying()
    link = session.current
    give(session, b"H:1")
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY after=30: x"), now=0.0)
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0)
    session.actions.clear()
    assert session.worker_left(now=1.0) == []  # nothing running yet: the grab is unanswered
    # gearmand's answer comes after the worker's EOF: nobody will run that job here.
    assert session.from_upstream(link, assign_uniq(b"H:2"), now=1.5) == b""
    assert session.actions == [Wakeup(2, 0.0, 1)] and session.retrier.held[2].handle == b"H:2"


def test_grabs_left_open_on_a_lost_retired_connection_are_answered_no_job() -> None:
    session = retrying()
    old = session.current
    give(session, b"H:1")
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0)
    session.from_downstream(req(P.GRAB_JOB_UNIQ) + req(P.RESET_ABILITIES), now=0.0)  # moved, grab open
    assert session.link_closed(old) == res(P.NO_JOB)  # the answer that will never come
    assert session.link_closed(session.current) == b""  # the current link owes nothing of the kind


def test_a_work_status_short_of_a_field_is_refused_before_gearmand_reads_on_into_the_next_packet() -> None:
    session = Driven("up", route=ROUTE)
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0)
    session.from_upstream(session.current, assign_uniq(b"H:1"), now=0.0)
    short = b"\0REQ" + (12).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"H:1\x001"
    with pytest.raises(ProtocolError, match="malformed WORK_STATUS"):
        session.from_downstream(short + req(P.WORK_COMPLETE, handle=b"H:1", data=b"ok"), now=0.0)


@pytest.mark.parametrize("timeout", [b"18446744073709551616", b"-5", b"30s", b"1" * 19])
def test_a_can_do_timeout_gearmand_would_die_of_is_refused(timeout: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed CAN_DO_TIMEOUT"):
        Driven("up", route=ROUTE).from_downstream(req(P.CAN_DO_TIMEOUT, function=b"f", timeout=timeout), now=0.0)


@pytest.mark.parametrize("timeout", [b"30", b"", b"9" * 18])
def test_an_ordinary_can_do_timeout_passes(timeout: bytes) -> None:
    packet = req(P.CAN_DO_TIMEOUT, function=b"f", timeout=timeout)
    assert Driven("up", route=ROUTE).from_downstream(packet, now=0.0) == packet


def test_every_event_answers_with_one_ordered_list_of_commands() -> None:
    """The caller carries the commands out in the order given: the bytes before a move go to
    the old connection, the fresh one is opened (its replay first) before anything is
    written to it, and gproxy's own answers to the worker come in their place."""
    session = Session("up", retrier=Retrier(Policies(RetryPolicy(jitter=False))), route=ROUTE)
    old = session.current
    session.from_downstream(req(P.CAN_DO, function=b"f") + req(P.GRAB_JOB_UNIQ), now=0.0)
    session.from_upstream(old, assign_uniq(b"H:1", function=b"f") + assign_uniq(b"H:2", function=b"f"), now=0.0)
    [wakeup] = session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=0.0)
    assert type(wakeup) is Wakeup
    commands = session.from_downstream(
        req(P.WORK_DATA, handle=b"H:2", data=b"d") + req(P.CANT_DO, function=b"f") + req(P.GRAB_JOB_UNIQ),
        now=0.0,
    )
    new = session.current
    assert commands == [
        SendUpstream(old, req(P.WORK_DATA, handle=b"H:2", data=b"d")),
        OpenUpstream(new, b""),  # (the grab waits in it until it is open)
    ]
    assert session.link_opened(new) == [SendUpstream(new, req(P.GRAB_JOB_UNIQ))]
    session.drain.start()
    assert session.from_downstream(req(P.GRAB_JOB) + req(P.WORK_COMPLETE, handle=b"H:2", data=b"ok"), now=1.0) == [
        SendDownstream(res(P.NO_JOB)),  # the grab's answer, as it came first
        SendUpstream(old, req(P.WORK_COMPLETE, handle=b"H:2", data=b"ok")),  # H:2 is the old one's
    ]
    assert session.from_upstream(new, res(P.NO_JOB), now=1.0) == [SendDownstream(res(P.NO_JOB))]


# -- on_disconnect = "retry" ------------------------------------------------------------------

CRASHES = replace(FAST, on_disconnect=OnDisconnect.RETRY)


def test_a_worker_that_vanishes_mid_job_leaves_its_connection_holding_the_job_for_a_retry() -> None:
    session = Driven("up", retrier=Retrier(Policies(FAST, {b"poison": CRASHES})), route=ROUTE)
    link = session.current
    give(session, b"H:1")  # function f: requeued by gearmand, as without gproxy
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0)
    session.from_upstream(link, assign_uniq(b"H:2", function=b"poison"), now=0.0)
    assert session.worker_left(now=1.0) == [Wakeup(1, 0.0, 1), Wakeup(2, 1.0, 1)]  # H:1 at once; a backoff
    assert [(job.handle, job.function) for job in session.retrier.held.values()] == [
        (b"H:1", b"f"), (b"H:2", b"poison")
    ]
    assert session.retrier.holds(link)  # the connection stays: closing it would requeue H:2


def test_without_on_disconnect_a_vanished_workers_connection_simply_closes() -> None:
    session = retrying()
    give(session, b"H:1")
    assert session.worker_left(now=1.0) == [] and not session.retrier.holds(session.current)


def test_a_retry_job_of_a_function_that_retries_disconnects_is_failed_back_before_its_connection_closes() -> None:
    session = retrying(CRASHES)
    link = session.current
    give(session, b"H:3=gpr:2:other")
    assert session.worker_left(now=1.0) == [SendUpstream(link, req(P.WORK_EXCEPTION, handle=b"H:3", data=DISCONNECTED))]
    assert not session.retrier.holds(link) and not link.jobs  # nothing held: the connection may close


def test_a_job_assigned_after_the_worker_vanished_is_left_to_gearmand_where_nothing_is_held() -> None:
    session = retrying(CRASHES)
    link = session.current
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0)
    assert session.worker_left(now=1.0) == []
    assert session.from_upstream(link, assign_uniq(b"H:2"), now=1.5) == b""  # it never ran
    assert session.actions == [] and session.retrier.held == {}


def test_a_retry_job_assigned_after_the_worker_vanished_never_ran_and_is_not_failed_back() -> None:
    session = retrying(CRASHES)
    link = session.current
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0)
    session.worker_left(now=1.0)
    assert session.from_upstream(link, assign_uniq(b"H:3", unique=b"gpr:2:u"), now=1.5) == b""
    assert session.actions == []  # gearmand requeues it when the connection closes


def test_in_observe_mode_a_vanished_workers_job_is_counted_and_left_to_gearmand() -> None:
    session = retrying(replace(CRASHES, mode=Mode.OBSERVE))
    give(session, b"H:1")
    assert session.worker_left(now=1.0) == [] and session.retrier.held == {}
    assert session.retrier.metrics.registry.get_sample_value("gproxy_retries_observed_total", {"function": "f"}) == 1


# -- final_exception ----------------------------------------------------------------------------


@pytest.mark.parametrize("exception_ends_job", [True, False])
def test_a_final_exception_goes_on_as_a_fail_and_the_workers_own_fail_after_it_is_dropped(
    exception_ends_job: bool,
) -> None:
    traits = ServerTraits(exception_ends_job=exception_ends_job)
    session = retrying(replace(FAST, final_exception=FinalException.FAIL), traits=traits)
    give(session, b"H:1")
    perl = req(P.WORK_EXCEPTION, handle=b"H:1", data=b"boom") + req(P.WORK_FAIL, handle=b"H:1")
    assert session.from_downstream(perl, now=1.0) == req(P.WORK_FAIL, handle=b"H:1")  # one WORK_FAIL ends it
    assert session.from_downstream(req(P.WORK_COMPLETE, handle=b"H:1", data=b"late"), now=1.0) == b""
    assert session.metrics.snapshot().stats["f"].outcomes["exception"] == 1  # what the worker did


def test_a_retry_jobs_exception_goes_on_as_it_is_to_the_gproxy_that_owns_its_loop() -> None:
    session = retrying(replace(FAST, final_exception=FinalException.FAIL))
    give(session, b"H:3=gpr:2:other")
    exception = req(P.WORK_EXCEPTION, handle=b"H:3", data=b"boom")
    assert session.from_downstream(exception, now=1.0) == exception


def test_a_job_too_large_to_hand_over_is_failed_as_final_exception_says() -> None:
    policies = Policies(replace(FAST, final_exception=FinalException.FAIL))
    session = Driven("up", max_packet_size=2048, retrier=Retrier(policies), route=ROUTE)
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=0.0)
    assert session.from_upstream(session.current, assign_uniq(b"H:1", data=b"x" * 4096), now=0.0) == res(P.NO_JOB)
    assert session.actions == [SendUpstream(session.current, req(P.WORK_FAIL, handle=b"H:1"))]


# -- outlier ejection ---------------------------------------------------------------------------

EJECTS = replace(FAST, eject_after=2, eject_for=5.0)


def test_a_worker_failing_eject_after_jobs_in_a_row_is_ejected_and_woken_when_it_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session = retrying(EJECTS)
    give(session, b"H:1", b"H:2")
    session.from_downstream(req(P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"), now=1.0)  # held: counts
    assert not any(type(a) is CallLater for a in session.actions)
    with caplog.at_level(logging.WARNING, "gproxy.pair"):
        session.from_downstream(req(P.WORK_FAIL, handle=b"H:2"), now=1.0)
    assert [a for a in session.actions if type(a) is CallLater] == [CallLater(Timer.EJECTION, 5.0)]
    assert "worker ejected for 5s: 2 failed jobs in a row (the last of f)" in caplog.text
    assert session.metrics.registry.get_sample_value("gproxy_worker_ejections_total", {"function": "f"}) == 1
    # Ejected: its grabs get NO_JOB from gproxy, its sleep is not passed on (gearmand would wake it).
    assert not session.passes_downstream(req(P.GRAB_JOB_UNIQ))
    assert session.from_downstream(req(P.GRAB_JOB_UNIQ) + req(P.PRE_SLEEP), now=2.0) == b""
    assert session.replies == [res(P.NO_JOB)] and not session.current.grabs_pending
    assert session.ejection_over() == [SendDownstream(res(P.NOOP))]  # time is up: woken
    assert session.from_downstream(req(P.GRAB_JOB_UNIQ), now=7.0) == req(P.GRAB_JOB_UNIQ)


def test_a_completion_resets_the_count_and_ejection_is_off_by_default() -> None:
    session = retrying(EJECTS)
    give(session, b"H:1", b"H:2", b"H:3")
    session.from_downstream(req(P.WORK_FAIL, handle=b"H:1"), now=0.0)
    session.from_downstream(req(P.WORK_COMPLETE, handle=b"H:2", data=b"ok"), now=0.0)
    session.from_downstream(req(P.WORK_FAIL, handle=b"H:3"), now=0.0)
    assert not session.ejection.active and session.ejection_over() == []
    plain = retrying()
    give(plain, *[b"H:%d" % n for n in range(20)])
    for n in range(20):
        plain.from_downstream(req(P.WORK_FAIL, handle=b"H:%d" % n), now=0.0)
    assert not plain.ejection.active and not any(type(a) is CallLater for a in plain.actions)


def test_a_worker_that_left_while_ejected_is_not_woken() -> None:
    session = retrying(replace(EJECTS, eject_after=1))
    give(session, b"H:1")
    session.from_downstream(req(P.WORK_FAIL, handle=b"H:1"), now=0.0)
    session.from_downstream(req(P.PRE_SLEEP), now=0.0)
    session.worker_left(now=1.0)
    assert session.ejection_over() == []


# -- timeouts that gproxy enforces --------------------------------------------------------------

TIMED = replace(FAST, timeout=2.0)


def assign_g(session: Driven, handle: bytes, now: float, unique: bytes = b"u-1") -> None:
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=now)
    session.from_upstream(session.current, assign_uniq(handle, function=b"g", unique=unique), now=now)


def test_can_do_timeout_goes_to_gearmand_as_can_do_and_gproxy_times_the_attempt_out() -> None:
    session = retrying()
    assert session.from_downstream(req(P.CAN_DO_TIMEOUT, function=b"g", timeout=b"300"), now=0.0) == req(
        P.CAN_DO, function=b"g"
    )
    assert session.registration.replay() == req(P.CAN_DO, function=b"g")  # a move says CAN_DO too
    assert not session.passes_upstream(session.current, assign_uniq(b"H:1", function=b"g"))
    assign_g(session, b"H:1", now=10.0)
    assert session.actions == [CallLater(Timer.TIMEOUTS, 1.0)]  # gearmand's reading: milliseconds, at least a second
    session.actions.clear()
    assert session.timeouts_due(now=10.5) == [CallLater(Timer.TIMEOUTS, 0.5)]  # not yet: the timer again
    (wakeup,) = session.timeouts_due(now=11.0)
    assert wakeup == Wakeup(1, 1.0, 1) and session.retrier.held[1].handle == b"H:1"  # retried
    assert not session.current.jobs  # not the worker's any more
    late = req(P.WORK_COMPLETE, handle=b"H:1", data=b"late")
    assert session.from_downstream(late, now=12.0) == b""  # dropped: no stale result, no ERROR
    assert session.retrier.metrics.registry.get_sample_value(
        "gproxy_retries_total", {"function": "g", "reason": "timeout"}
    ) == 1


def test_a_function_timeout_applies_to_workers_that_register_none_and_a_completion_disarms_it() -> None:
    session = Driven("up", retrier=Retrier(Policies(FAST, {b"g": TIMED})), route=ROUTE)
    assign_g(session, b"H:1", now=0.0)
    assert session.actions == [CallLater(Timer.TIMEOUTS, 2.0)]
    session.actions.clear()
    session.from_downstream(req(P.WORK_COMPLETE, handle=b"H:1", data=b"ok"), now=1.0)
    assign_g(session, b"H:2", now=1.5)  # deadline 3.5, after the timer set for 2.0
    assert session.actions == []
    assert session.timeouts_due(now=2.0) == [CallLater(Timer.TIMEOUTS, 1.5)]  # H:1's deadline is gone: H:2's next
    assert session.timeouts_due(now=3.5)[0] == Wakeup(1, 1.0, 1)


def test_a_retry_job_past_its_timeout_is_failed_back_to_the_loops_owner() -> None:
    session = Driven("up", retrier=Retrier(Policies(FAST, {b"g": TIMED})), route=ROUTE)
    link = session.current
    assign_g(session, b"H:3", now=0.0, unique=b"gpr:2:other")
    assert session.timeouts_due(now=2.0) == [SendUpstream(link, req(P.WORK_EXCEPTION, handle=b"H:3", data=TIMED_OUT))]
    assert session.from_downstream(req(P.WORK_FAIL, handle=b"H:3"), now=3.0) == b""


def test_timeouts_are_forgotten_with_the_registration_and_observed_only_in_observe_mode() -> None:
    session = retrying()
    session.from_downstream(req(P.CAN_DO_TIMEOUT, function=b"g", timeout=b"5000"), now=0.0)
    session.from_downstream(req(P.CAN_DO, function=b"g"), now=0.0)  # registered again without one
    assign_g(session, b"H:1", now=0.0)
    session.from_downstream(req(P.CAN_DO_TIMEOUT, function=b"g", timeout=b"0"), now=0.0)  # 0: none
    assign_g(session, b"H:2", now=0.0)
    assert session.actions == []
    observing = retrying(replace(TIMED, mode=Mode.OBSERVE))
    timeout = req(P.CAN_DO_TIMEOUT, function=b"g", timeout=b"5000")
    assert observing.from_downstream(timeout, now=0.0) == timeout  # gearmand enforces it, as ever
    assign_g(observing, b"H:1", now=0.0)
    assert observing.timeouts_due(now=2.0) == [] and len(observing.current.jobs) == 1  # it runs on
    assert observing.retrier.metrics.registry.get_sample_value("gproxy_retries_observed_total", {"function": "g"}) == 1


def test_an_earlier_deadline_sets_the_timer_earlier_and_ended_jobs_leave_no_deadline_behind() -> None:
    session = Driven("up", retrier=Retrier(Policies(FAST, {b"g": replace(FAST, timeout=10.0), b"h": TIMED})), route=ROUTE)
    assign_g(session, b"H:1", now=0.0)
    session.from_downstream(req(P.GRAB_JOB_UNIQ), now=1.0)
    session.from_upstream(session.current, assign_uniq(b"H:2", function=b"h"), now=1.0)
    assert session.actions == [CallLater(Timer.TIMEOUTS, 10.0), CallLater(Timer.TIMEOUTS, 2.0)]  # h's deadline, 3.0, comes first
    for n in range(3, 1000):  # a fast worker: no deadline outlives its job
        assign_g(session, b"H:%d" % n, now=2.0)
        session.from_downstream(req(P.WORK_COMPLETE, handle=b"H:%d" % n, data=b"ok"), now=2.0)
    assert len(session.deadlines) == 2



def test_no_timeout_fires_once_the_worker_has_left_and_reset_abilities_forgets_its_timeouts() -> None:
    session = Driven("up", retrier=Retrier(Policies(FAST, {b"g": TIMED})), route=ROUTE)
    assign_g(session, b"H:1", now=0.0)
    assert session.worker_left(now=1.0) == []  # nothing held: its connection closes, gearmand requeues
    assert session.timeouts_due(now=5.0) == [] and session.retrier.held == {}
    other = retrying()
    other.from_downstream(req(P.CAN_DO_TIMEOUT, function=b"g", timeout=b"5000"), now=0.0)
    assert other.deadlines.any_registered
    other.from_downstream(req(P.RESET_ABILITIES), now=0.0)
    assert not other.deadlines.any_registered


def test_after_its_finish_a_pair_passes_on_only_the_retrier_s_actions_for_the_process() -> None:
    """A held job of another pair may be woken by this pair's last event: its Wakeup,
    Submit and RecheckBudget go on; nothing of this pair's own follows its Finish."""
    session = Session("up", route=ROUTE, retrier=Retrier(Policies(FAST)))
    assert session.stop() == [Finish("gproxy stopped", logging.DEBUG)]  # (it closes every connection)
    process = [Wakeup(7, 1.0, 1), RecheckBudget(b"f", 0.5), Submit(ROUTE, 7, b"f", b"u", b"p", P.SUBMIT_JOB)]
    own = [SendDownstream(b"late"), CallLater(Timer.LINGER, 1.0), SendUpstream(session.current, b"late")]
    session.command(*own[:2], *process, own[2])
    assert session.event_done() == process
