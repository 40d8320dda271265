"""assignments: the worker's grabs, and what gearmand answers, as rules with an outbox of what
only the Session can do (no Session here)."""

from __future__ import annotations

from gproxy.config import Route
from gproxy.core.assignments import ANSWERED, ORPHANED, Armed, Assignments, ServerTraits, unknown_command
from gproxy.core.deadlines import Deadlines
from gproxy.core.ejection import Ejection
from gproxy.core.metrics import Metrics
from gproxy.core.policy import Policies, RetryPolicy
from gproxy.core.protocol import RES, Framer, Oversized, Packet, PacketType
from gproxy.core.retry import Retrier, SendUpstream
from gproxy.core.silenced import Silenced
from tests.links import ROUTE, Link, req, res

P = PacketType
PERL_ERROR = res(P.ERROR, code=b"server_error", text=b'Can\'t locate object method "CMD_" via package')


def assignments(
    retrier: Retrier[Link, Route] | None = None, traits: ServerTraits | None = None
) -> tuple[Assignments[Link], Deadlines[Link], Silenced[Link]]:
    deadlines, silenced = Deadlines[Link](), Silenced[Link](retrier, ROUTE)
    rules = Assignments(ROUTE, traits or ServerTraits(), retrier, deadlines, silenced, Metrics())
    return rules, deadlines, silenced


def packet(data: bytes) -> Packet:
    (frame,) = Framer(RES).receive(data)
    assert type(frame) is Packet
    return frame


def test_a_plain_grab_is_upgraded_and_its_assignment_handed_back_plain() -> None:
    rules, _, _ = assignments()
    link = Link()
    assert rules.grab(link, Packet(P.GRAB_JOB, req(P.GRAB_JOB)), False, Ejection()) == req(P.GRAB_JOB_UNIQ)
    assert rules.grab(link, Packet(P.GRAB_JOB_UNIQ, req(P.GRAB_JOB_UNIQ)), False, Ejection()) == req(P.GRAB_JOB_UNIQ)
    assert list(link.grabs_pending) == [True, False]
    assign = res(P.JOB_ASSIGN_UNIQ, handle=b"H:1", function=b"f", unique=b"u-1", data=b"payload")
    assert rules.received(link, packet(assign), 0.0, False) == res(P.JOB_ASSIGN, handle=b"H:1", function=b"f", data=b"payload")
    assert rules.received(link, packet(assign.replace(b"H:1", b"H:2")), 0.0, False) == assign.replace(b"H:1", b"H:2")
    assert [(job.handle, job.unique, bytes(job.payload)) for job in link.jobs] == [
        (b"H:1", b"u-1", b"payload"), (b"H:2", b"u-1", b"payload")
    ]
    assert rules.asked == [] and not link.grabs_pending


def test_a_plain_grab_goes_on_as_it_came_to_a_server_that_does_not_know_grab_job_uniq() -> None:
    rules, _, _ = assignments(traits=ServerTraits(grab_uniq=False))
    link = Link()
    assert rules.grab(link, Packet(P.GRAB_JOB, req(P.GRAB_JOB)), False, Ejection()) == req(P.GRAB_JOB)
    assert list(link.grabs_pending) == [False]


def test_grabs_answered_here_get_answered_and_a_sleep_is_kept() -> None:
    rules, _, _ = assignments()
    link, ejection = Link(), Ejection()
    assert rules.grab(link, Packet(P.GRAB_JOB, req(P.GRAB_JOB)), True, ejection) is ANSWERED
    ejection.until = 5.0
    assert rules.grab(link, Packet(P.GRAB_JOB_ALL, req(P.GRAB_JOB_ALL)), False, ejection) is ANSWERED
    assert rules.grab(link, Packet(P.PRE_SLEEP, req(P.PRE_SLEEP)), False, ejection) == b""
    assert ejection.sleeping and not link.grabs_pending


def test_a_retry_shows_the_original_unique_id_and_clears_its_silenced_handle() -> None:
    rules, _, silenced = assignments()
    link = Link()
    silenced.add(b"H:1")
    retry = res(P.JOB_ASSIGN_UNIQ, handle=b"H:1", function=b"f", unique=b"gpr:2:u-1", data=b"d")
    assert rules.received(link, packet(retry), 0.0, False) == res(
        P.JOB_ASSIGN_UNIQ, handle=b"H:1", function=b"f", unique=b"u-1", data=b"d"
    )
    (job,) = link.jobs
    assert job.is_retry and job.unique == b"gpr:2:u-1" and b"H:1" not in silenced


def test_an_assignment_starts_its_deadline_and_asks_for_the_timer() -> None:
    retrier: Retrier[Link, Route] = Retrier(Policies(RetryPolicy(), {b"f": RetryPolicy(timeout=5.0)}))
    rules, deadlines, _ = assignments(retrier)
    link = Link()
    assign = res(P.JOB_ASSIGN, handle=b"H:1", function=b"f", data=b"d")
    assert rules.received(link, packet(assign), 10.0, False) == assign
    assert rules.take() == [Armed(5.0)] and len(deadlines) == 1
    assert rules.received(link, packet(assign.replace(b"H:1", b"H:2")), 11.0, False) == assign.replace(b"H:1", b"H:2")
    assert rules.take() == [] and len(deadlines) == 2  # (a later deadline: the timer is set)
    assert rules.received(link, packet(assign.replace(b"\0f\0", b"\0g\0")), 12.0, False) == assign.replace(b"\0f\0", b"\0g\0")
    assert rules.asked == [] and len(deadlines) == 2


def test_a_job_assigned_after_the_worker_left_is_tracked_and_orphaned() -> None:
    rules, _, _ = assignments()
    link = Link()
    assign = res(P.JOB_ASSIGN, handle=b"H:1", function=b"f", data=b"d")
    assert rules.received(link, packet(assign), 0.0, True) == b""
    assert rules.take() == [ORPHANED] and [job.handle for job in link.jobs] == [b"H:1"]


def test_no_job_answers_the_oldest_grab() -> None:
    rules, _, _ = assignments()
    link = Link()
    link.grabs_pending.extend([True, False])
    assert rules.received(link, packet(res(P.NO_JOB)), 0.0, False) == res(P.NO_JOB)
    assert list(link.grabs_pending) == [False]


def test_a_server_that_does_not_know_grab_job_uniq_gets_the_workers_own_grab() -> None:
    traits = ServerTraits()
    rules, _, _ = assignments(traits=traits)
    link = Link()
    link.grabs_pending.append(True)
    assert rules.received(link, packet(PERL_ERROR), 0.0, False) == b""
    assert rules.take() == [SendUpstream(link, req(P.GRAB_JOB))]
    assert list(link.grabs_pending) == [False]
    assert traits == ServerTraits(grab_uniq=False, exception_ends_job=False)
    assert rules.received(link, packet(PERL_ERROR), 0.0, False) == PERL_ERROR  # the worker's own grab's answer
    other = res(P.ERROR, code=b"ERR", text=b"x")
    assert rules.received(link, packet(other), 0.0, False) == other and rules.asked == []
    assert not unknown_command(b"ERR", b'"CMD_"') and unknown_command(b"server_error", b'"CMD_"')


def test_the_replies_to_gproxys_own_replay_are_kept_from_the_worker() -> None:
    rules, _, _ = assignments()
    link = Link(replies_to_swallow=1)
    reply = res(P.OPTION_RES, option=b"exceptions")
    assert rules.received(link, packet(reply), 0.0, False) == b""
    assert rules.received(link, packet(reply), 0.0, False) == reply


def test_a_job_too_large_is_failed_where_it_came_and_the_grab_gets_no_job() -> None:
    rules, _, _ = assignments(traits=ServerTraits(exception_ends_job=False))
    link = Link(framer=Framer(RES, 2048))
    link.grabs_pending.append(True)
    oversized = Oversized(P.JOB_ASSIGN_UNIQ, 5000, b"H:big\0f\0u\0xxx")
    assert rules.received(link, oversized, 0.0, False) == res(P.NO_JOB)
    reason = b"gproxy: a job of 5000 bytes exceeds max_packet_size 2048"
    failure = req(P.WORK_EXCEPTION, handle=b"H:big", data=reason) + req(P.WORK_FAIL, handle=b"H:big")
    assert rules.take() == [SendUpstream(link, failure)]
    assert not link.grabs_pending and len(link.jobs) == 0
    assert rules.received(link, Oversized(P.JOB_ASSIGN, 5000, b"H:no-end"), 0.0, False) == res(P.NO_JOB)
    assert rules.asked == []  # no handle within its head: nothing to fail


def test_the_exception_that_ends_a_job_on_each_server() -> None:
    assert ServerTraits().exception(b"H:1", b"x") == req(P.WORK_EXCEPTION, handle=b"H:1", data=b"x")
    assert ServerTraits(exception_ends_job=False).exception(b"H:1", b"x") == req(
        P.WORK_EXCEPTION, handle=b"H:1", data=b"x"
    ) + req(P.WORK_FAIL, handle=b"H:1")
