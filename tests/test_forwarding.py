"""forwarding: which packets pass unread, and which go on before the Session sees them, as
rules over explicit inputs (no Session here). The Session's own tests check the same rules
through it, and that the Session agrees with them (sent_already)."""

from __future__ import annotations

import pytest

from gproxy.config import Route
from gproxy.core.deadlines import Deadlines
from gproxy.core.ejection import Ejection
from gproxy.core.forwarding import (
    ASSIGN_FIELDS,
    ASSIGNS,
    WATCHED_DOWNSTREAM,
    WATCHED_DRAINING,
    WATCHED_UPSTREAM,
    Forwarding,
    grabs_answered_here,
    sent_already,
)
from gproxy.core.policy import Policies, RetryPolicy
from gproxy.core.protocol import REQ, Framer, PacketType
from gproxy.core.retry import Retrier
from gproxy.core.silenced import Silenced
from tests.links import ROUTE, Link, req, res

P = PacketType


def rules(
    retrier: Retrier[Link, Route] | None = None, deadlines: Deadlines[Link] | None = None
) -> tuple[Forwarding[Link], Ejection, Silenced[Link]]:
    ejection, silenced = Ejection(), Silenced[Link](retrier, ROUTE)
    forwarding = Forwarding(Framer(REQ), ejection, silenced, retrier, ROUTE, deadlines if deadlines is not None else Deadlines())
    return forwarding, ejection, silenced


def test_the_watched_sets() -> None:
    assert WATCHED_DOWNSTREAM | {P.PRE_SLEEP} == WATCHED_DRAINING and P.PRE_SLEEP not in WATCHED_DOWNSTREAM
    assert ASSIGNS <= WATCHED_UPSTREAM and set(ASSIGN_FIELDS) == ASSIGNS
    assert P.NOOP not in WATCHED_UPSTREAM and P.ECHO_REQ not in WATCHED_DOWNSTREAM


def test_grabs_are_answered_here_while_draining_or_ejected() -> None:
    ejection = Ejection()
    assert not grabs_answered_here(False, ejection)
    assert grabs_answered_here(True, ejection)
    ejection.until = 5.0
    assert grabs_answered_here(False, ejection)


@pytest.mark.parametrize(
    ("packet", "grab_uniq", "passes"),
    [
        (req(P.ECHO_REQ, data=b"x"), True, True),  # not watched
        (req(P.GRAB_JOB_UNIQ), True, True),
        (req(P.GRAB_JOB_ALL), True, True),
        (req(P.PRE_SLEEP), True, True),
        (req(P.GRAB_JOB), True, False),  # sent as GRAB_JOB_UNIQ
        (req(P.GRAB_JOB), False, True),
        (req(P.WORK_COMPLETE, handle=b"H:1", data=b"ok"), True, True),
        (req(P.WORK_DATA, handle=b"H:1", data=b"d"), True, True),
        (req(P.WORK_WARNING, handle=b"H:1", data=b"w"), True, True),
        (req(P.WORK_FAIL, handle=b"H:1"), True, False),  # a retry decision
        (req(P.WORK_EXCEPTION, handle=b"H:1", data=b"x"), True, False),
        (req(P.WORK_STATUS, handle=b"H:1", numerator=b"1", denominator=b"2"), True, False),
        (req(P.CAN_DO, function=b"f"), True, False),  # registration
    ],
)
def test_what_goes_on_from_the_worker_first(packet: bytes, grab_uniq: bool, passes: bool) -> None:
    forwarding, _, _ = rules()
    current = Link()
    assert forwarding.downstream(packet, False, grab_uniq, current, []) is passes


def test_from_the_worker_nothing_watched_goes_first_while_grabs_are_answered_here() -> None:
    forwarding, ejection, _ = rules()
    current = Link()
    for packet in (req(P.GRAB_JOB_UNIQ), req(P.PRE_SLEEP), req(P.WORK_COMPLETE, handle=b"H:1", data=b"")):
        assert not forwarding.downstream(packet, True, True, current, [])
    ejection.until = 1.0
    assert not forwarding.downstream(req(P.GRAB_JOB_UNIQ), False, True, current, [])
    assert forwarding.downstream(req(P.ECHO_REQ, data=b"x"), False, True, current, [])  # unwatched still


def test_from_the_worker_only_whole_packets_go_first() -> None:
    forwarding, _, _ = rules()
    current, grab = Link(), req(P.GRAB_JOB_UNIQ)
    assert not forwarding.downstream(grab + grab, False, True, current, [])
    assert not forwarding.downstream(grab[:-1], False, True, current, [])
    assert not forwarding.downstream(req(P.WORK_COMPLETE, handle=b"H:1", data=b"")[:-1], False, True, current, [])


def test_a_result_for_a_silenced_or_held_handle_or_after_a_move_does_not_go_first() -> None:
    retrier: Retrier[Link, Route] = Retrier(Policies(RetryPolicy()))
    forwarding, _, silenced = rules(retrier)
    current, complete = Link(), req(P.WORK_COMPLETE, handle=b"H:1", data=b"ok")
    assert forwarding.downstream(complete, False, True, current, [])
    assert not forwarding.downstream(complete, False, True, current, [Link("old")])
    silenced.add(b"H:1")
    assert not forwarding.downstream(complete, False, True, current, [])


def test_from_gearmand_unwatched_packets_and_no_job_go_first_on_the_current_link_only() -> None:
    forwarding, _, _ = rules()
    link = Link()
    for packet in (res(P.NOOP), res(P.NO_JOB), res(P.ECHO_RES, data=b"e")):
        assert forwarding.upstream(packet, link, True)
        assert not forwarding.upstream(packet, link, False)
    assert not forwarding.upstream(res(P.ERROR, code=b"x", text=b"y"), link, True)
    assert not forwarding.upstream(res(P.OPTION_RES, option=b"exceptions"), link, True)


def test_from_gearmand_an_assignment_goes_first_unless_rewritten_held_or_timed() -> None:
    assign = res(P.JOB_ASSIGN_UNIQ, handle=b"H:1", function=b"f", unique=b"u", data=b"d")
    forwarding, _, _ = rules()
    link = Link()
    assert forwarding.upstream(assign, link, True)
    link.grabs_pending.append(True)  # an upgraded grab's: the unique id is cut out
    assert not forwarding.upstream(assign, link, True)
    link.grabs_pending[0] = False
    assert forwarding.upstream(assign, link, True)
    retry = res(P.JOB_ASSIGN_UNIQ, handle=b"H:1", function=b"f", unique=b"gpr:2:u", data=b"d")
    assert not forwarding.upstream(retry, link, True)  # shown with the original unique id
    assert not forwarding.upstream(res(P.JOB_ASSIGN, handle=b"H:1", function=b"f", data=b"")[:-1], link, True)

    timed: Retrier[Link, Route] = Retrier(Policies(RetryPolicy(), {b"f": RetryPolicy(timeout=5.0)}))
    forwarding, _, _ = rules(timed)
    assert not forwarding.upstream(assign, link, True)  # its deadline is a command
    assert forwarding.upstream(assign.replace(b"\0f\0", b"\0g\0"), link, True)
    deadlines: Deadlines[Link] = Deadlines()
    deadlines.registered(b"g", 2000)
    forwarding, _, _ = rules(timed, deadlines)
    assert not forwarding.upstream(assign.replace(b"\0f\0", b"\0g\0"), link, True)


def test_an_assignment_of_a_held_handle_does_not_go_first() -> None:
    retrier: Retrier[Link, Route] = Retrier(Policies(RetryPolicy()))
    forwarding, _, _ = rules(retrier)
    link = Link()
    job = link.jobs.assigned(b"H:1", b"f", b"u", b"d", 0.0)
    link.jobs.ended(b"H:1")
    decision = retrier.worker_failed(
        owner=link, route=ROUTE, job=job, ptype=P.WORK_EXCEPTION, failure=b"RETRY x", now=0.0, exception_ends_job=True
    )
    assert decision.held
    assign = res(P.JOB_ASSIGN_UNIQ, handle=b"H:1", function=b"f", unique=b"u", data=b"d")
    assert not forwarding.upstream(assign, link, True)
    assert forwarding.upstream(assign.replace(b"H:1", b"H:2"), link, True)


def test_sent_already_is_all_the_session_would_send_or_an_error() -> None:
    data = req(P.GRAB_JOB_UNIQ)
    pieces = [data]
    sent_already([], pieces, data)
    assert pieces == []
    with pytest.raises(RuntimeError):
        sent_already([], [bytes(bytearray(data))], data)  # equal, but not what it was handed
    with pytest.raises(RuntimeError):
        sent_already([], [data, data], data)
    with pytest.raises(RuntimeError):
        sent_already(["a command"], [data], data)
