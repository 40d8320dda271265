"""When gproxy reaches gearmand again (gproxy.reconnect), pure, with the time passed in; and
the retry connection's reader (gproxy.submitter) at bad input and in silence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gproxy.core.protocol import REQ, RES, PacketType, build_packet
from gproxy.core.reconnect import INITIAL, MAXIMUM, PROVEN_AFTER, Failure, Reconnects, Recovered, Report
from gproxy.core.retry import Submit
from gproxy.core.submitter import Broken, Created, JobPacket, Silence, Submitter

P = PacketType


def test_a_connection_accepted_and_dropped_at_once_backs_off_like_a_refused_one() -> None:
    """The storm: gearmand (or a load balancer with no backend) accepts and drops every
    connection. Each loss is one more failed try, doubling to MAXIMUM: one outage, one
    WARNING, however long it lasts."""
    reconnects, now, tries, reports = Reconnects(), 0.0, 0, []
    while now < 60.0:
        reconnects.trying()
        tries += 1
        reconnects.connected(now)
        failure = reconnects.lost(now + 0.001)
        reports.append(failure.report)
        now += 0.001 + failure.wait
    assert reports[0] is Report.OUTAGE_STARTS and set(reports[1:]) == {Report.OUTAGE_GOES_ON}
    # Tries at 0, 0.1, 0.3, 0.7, 1.5, 3.1, then every 5 s from 6.3: 17 in a minute.
    assert tries == 17 and reconnects.tries == 17 and not reconnects.up


def test_an_answer_alone_does_not_prove_a_connection_it_must_also_last() -> None:
    reconnects = Reconnects()
    reconnects.connected(0.0)
    assert reconnects.answered(0.01) is None and reconnects.proof_due() == PROVEN_AFTER
    first = reconnects.lost(1.0)  # (gearmand answered, then sent garbage: still a storm)
    reconnects.trying()
    reconnects.connected(1.1)
    reconnects.answered(1.2)
    second = reconnects.lost(2.0)
    assert (first.wait, second.wait) == (INITIAL, 2 * INITIAL)
    assert (first.report, second.report) == (Report.OUTAGE_STARTS, Report.OUTAGE_GOES_ON)


def test_a_connection_that_never_answers_is_never_proven() -> None:
    reconnects = Reconnects()
    reconnects.connected(0.0)
    assert reconnects.proof_due() is None and reconnects.check(3600.0) is None
    assert reconnects.lost(3600.0).wait == INITIAL


def test_an_outage_ends_when_a_connection_proves_itself_with_its_length_and_tries() -> None:
    reconnects = Reconnects()
    reconnects.trying()
    assert reconnects.failed(10.0) == Failure(INITIAL, Report.OUTAGE_STARTS)
    assert reconnects.outage_since == 10.0 and not reconnects.up
    reconnects.trying()
    assert reconnects.failed(10.1) == Failure(2 * INITIAL, Report.OUTAGE_GOES_ON)
    reconnects.trying()
    reconnects.connected(10.3)
    assert reconnects.answered(10.3) is None  # not yet: it must last
    assert reconnects.check(10.3 + PROVEN_AFTER - 0.01) is None
    assert reconnects.check(10.3 + PROVEN_AFTER) == Recovered(pytest.approx(PROVEN_AFTER + 0.3), 3)
    assert reconnects.up and reconnects.check(100.0) is None  # over once
    # A proven connection lost is tried again at once, and the backoff starts afresh.
    assert reconnects.lost(200.0) == Failure(0.0, Report.OUTAGE_STARTS)
    reconnects.trying()
    assert reconnects.failed(200.0).wait == INITIAL


def test_a_connection_that_proves_itself_as_it_is_lost_still_ends_its_outage() -> None:
    reconnects = Reconnects()
    reconnects.failed(0.0)
    reconnects.trying()
    reconnects.connected(1.0)
    reconnects.answered(1.0)
    lost = reconnects.lost(1.0 + PROVEN_AFTER)  # before any timer looked
    assert lost == Failure(0.0, Report.OUTAGE_STARTS, Recovered(1.0 + PROVEN_AFTER, 2))


def test_a_proven_connection_closed_cleanly_is_no_outage_unless_the_next_try_fails() -> None:
    reconnects = Reconnects()
    reconnects.connected(0.0)
    reconnects.answered(0.0)
    assert reconnects.lost(60.0, closed=True) == Failure(0.0, Report.CLOSED)
    assert reconnects.up  # a load balancer's idle timeout, or gearmand stopping: not yet known
    reconnects.trying()
    assert reconnects.failed(60.1) == Failure(INITIAL, Report.OUTAGE_STARTS)  # gearmand stopped
    assert reconnects.outage_since == 60.0 and reconnects.tries == 1  # counted from the close
    # Unproven, or during an outage, a clean close is a failure like any other.
    reconnects.trying()
    reconnects.connected(61.0)
    assert reconnects.lost(61.5, closed=True) == Failure(2 * INITIAL, Report.OUTAGE_GOES_ON)
    fresh = Reconnects()
    fresh.connected(0.0)
    assert fresh.lost(1.0, closed=True).report is Report.OUTAGE_STARTS


@given(st.lists(st.sampled_from(["refused", "dropped", "answered and dropped", "proven"]), max_size=60))
def test_waits_double_to_the_cap_and_only_a_proven_connection_resets_them(events: list[str]) -> None:
    reconnects, now, expected = Reconnects(), 0.0, INITIAL
    for event in events:
        reconnects.trying()
        if event == "refused":
            failure = reconnects.failed(now)
        else:
            reconnects.connected(now)
            if event != "dropped":
                reconnects.answered(now)
            now += PROVEN_AFTER if event == "proven" else 0.5
            failure = reconnects.lost(now)
        if event == "proven":
            assert failure.wait == 0.0 and failure.report is Report.OUTAGE_STARTS
            expected = INITIAL
        else:
            assert failure.wait == expected <= MAXIMUM
            expected = min(2 * expected, MAXIMUM)
        now += failure.wait


# -- the Submitter: bad input and silence

RETRY = Submit("route", 7, b"f", b"gpr:2:u", b"p")
CREATED = build_packet(RES, P.JOB_CREATED, handle=b"H:9")


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b"\0RES" + (25).to_bytes(4, "big") + (4).to_bytes(4, "big") + b"H:9x", "malformed"),  # WORK_EXCEPTION, no NUL
        (b"\0RES" + (19).to_bytes(4, "big") + (4).to_bytes(4, "big") + b"oops", "malformed"),  # ERROR, no NUL
        (b"\0RXS" + bytes(8), "bad_magic"),
        (b"\0RES" + (99).to_bytes(4, "big") + bytes(4), "unknown_type"),
    ],
)
def test_bad_input_right_after_a_jobs_creation_still_reports_the_creation(bad: bytes, reason: str) -> None:
    """JOB_CREATED and garbage in one read: the job exists in gearmand, so its retry runs;
    lost with the connection, it is submitted again as the next attempt, not left waiting."""
    submitter: Submitter[str] = Submitter()
    submitter.submit(RETRY, 0.0)
    events = submitter.receive(CREATED + bad, 0.0)
    assert events[0] == Created(7, b"H:9") and type(events[1]) is Broken and events[1].reason == reason
    assert submitter.unanswered() == []


def test_a_result_just_before_garbage_is_still_reported() -> None:
    submitter: Submitter[str] = Submitter()
    done = build_packet(RES, P.WORK_COMPLETE, handle=b"H:9", data=b"ok")
    assert submitter.receive(done + b"\0RXS" + bytes(8), 0.0)[0] == JobPacket(P.WORK_COMPLETE, {"handle": b"H:9", "data": b"ok"})


def test_a_reply_too_malformed_to_read_answers_nothing() -> None:
    submitter: Submitter[str] = Submitter()
    submitter.submit(RETRY, 0.0)
    no_nul = b"\0RES" + (19).to_bytes(4, "big") + (4).to_bytes(4, "big") + b"oops"
    (broken,) = submitter.receive(no_nul, 0.0)
    assert type(broken) is Broken and submitter.unanswered() == [RETRY]  # sent again on the next connection


def test_a_silent_gearmand_that_owes_an_answer_is_echoed_then_given_up() -> None:
    submitter: Submitter[str] = Submitter()
    assert submitter.silence(100.0, 30.0, 20.0) == (Silence.NONE, None)  # owes nothing
    submitter.submit(RETRY, 10.0)
    assert submitter.silence(39.0, 30.0, 20.0) == (Silence.NONE, 40.0)
    assert submitter.silence(40.0, 30.0, 20.0) == (Silence.ECHO, 60.0)
    assert submitter.echo() == build_packet(REQ, P.ECHO_REQ, data=b"gproxy")
    assert submitter.silence(50.0, 30.0, 20.0) == (Silence.NONE, 60.0)  # echoed once
    assert submitter.silence(60.0, 30.0, 20.0) == (Silence.DEAD, None)


def test_anything_heard_from_gearmand_ends_its_silence() -> None:
    submitter: Submitter[str] = Submitter()
    submitter.submit(RETRY, 0.0)
    submitter.submit(Submit("route", 8, b"f", b"gpr:2:v", b"p"), 25.0)  # (owed since the first)
    assert submitter.silence(30.0, 30.0, 20.0)[0] is Silence.ECHO
    submitter.echo()
    submitter.receive(build_packet(RES, P.ECHO_RES, data=b"gproxy"), 45.0)
    assert submitter.silence(74.0, 30.0, 20.0) == (Silence.NONE, 75.0)  # a fresh wait, a fresh echo
    submitter.receive(CREATED + build_packet(RES, P.JOB_CREATED, handle=b"H:10"), 74.0)
    assert submitter.silence(1000.0, 30.0, 20.0) == (Silence.NONE, None)
