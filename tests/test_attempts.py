"""attempts: how the worker's attempts at its jobs end, as rules with an outbox of what only the
Session can do (no Session here)."""

from __future__ import annotations

import pytest

from gproxy.config import Route
from gproxy.core.assignments import Armed, ServerTraits
from gproxy.core.attempts import Attempts, Ejected, handle_of
from gproxy.core.deadlines import Deadlines
from gproxy.core.ejection import Ejection
from gproxy.core.metrics import Metrics
from gproxy.core.policy import TIMED_OUT, Mode, Policies, RetryPolicy
from gproxy.core.protocol import Packet, PacketType, ProtocolError
from gproxy.core.retry import Retrier, SendUpstream, Wakeup
from tests.links import ROUTE, Link, req

P = PacketType
POLICIES = Policies(
    RetryPolicy(jitter=False, eject_after=2, eject_for=30.0),
    {
        b"t": RetryPolicy(timeout=5.0),
        b"o": RetryPolicy(timeout=5.0, mode=Mode.OBSERVE),
        b"r": RetryPolicy(on_fail=True, jitter=False),
    },
)


def attempts() -> tuple[Attempts[Link], Retrier[Link, Route], Deadlines[Link], Ejection]:
    retrier: Retrier[Link, Route] = Retrier(POLICIES)
    deadlines, ejection = Deadlines[Link](), Ejection()
    return Attempts(ROUTE, ServerTraits(), retrier, deadlines, ejection, Metrics()), retrier, deadlines, ejection


def work(ptype: PacketType, handle: bytes = b"H:1", **args: bytes) -> Packet:
    return Packet(ptype, req(ptype, handle=handle, **args))


def test_a_result_goes_to_the_link_that_owns_the_job_and_ends_it() -> None:
    rules, _, _, _ = attempts()
    current, old = Link("new"), Link("old")
    current.jobs.assigned(b"H:1", b"f", b"u", b"d", 0.0)
    old.jobs.assigned(b"H:2", b"f", b"u", b"d", 0.0)
    complete = work(P.WORK_COMPLETE, data=b"ok")
    assert rules.job_packet(complete, 1.0, current, [old]) == (current, complete.raw)
    data = work(P.WORK_DATA, b"H:2", data=b"d")
    assert rules.job_packet(data, 1.0, current, [old]) == (old, b"")  # asked for: only old can take it
    assert rules.take() == [SendUpstream(old, data.raw)]
    unknown = work(P.WORK_COMPLETE, b"H:9", data=b"")
    assert rules.job_packet(unknown, 1.0, current, [old]) == (current, unknown.raw)  # gearmand's to answer
    assert len(current.jobs) == 0 and [job.handle for job in old.jobs] == [b"H:2"]


def test_a_retryable_failure_is_held_and_what_follows_it_dropped() -> None:
    rules, retrier, _, _ = attempts()
    link = Link()
    link.jobs.assigned(b"H:1", b"f", b"u", b"d", 0.0)
    assert rules.job_packet(work(P.WORK_EXCEPTION, data=b"RETRY x"), 1.0, link, []) == (link, b"")
    (wakeup,) = rules.take()
    assert type(wakeup) is Wakeup and retrier.holds(link) and b"H:1" in rules.silenced
    assert rules.job_packet(work(P.WORK_FAIL), 1.0, link, []) == (link, b"")  # the library's WORK_FAIL after it
    assert rules.asked == []


def test_a_held_work_fail_silences_its_handle_too() -> None:
    rules, retrier, _, _ = attempts()
    link = Link()
    link.jobs.assigned(b"H:1", b"r", b"u", b"d", 0.0)
    assert rules.job_packet(work(P.WORK_FAIL), 1.0, link, []) == (link, b"")
    assert retrier.holds(link) and b"H:1" in rules.silenced


def test_a_failure_that_ends_the_job_goes_on_and_silences_its_handle() -> None:
    rules, retrier, _, _ = attempts()
    link = Link()
    link.jobs.assigned(b"H:1", b"f", b"u", b"d", 0.0)
    failure = work(P.WORK_EXCEPTION, data=b"FATAL x")
    assert rules.job_packet(failure, 1.0, link, []) == (link, failure.raw)
    assert not retrier.holds(link) and b"H:1" in rules.silenced


def test_failures_in_a_row_eject_the_worker_and_a_completion_starts_the_count_again() -> None:
    rules, _, _, ejection = attempts()
    link = Link()
    for handle in (b"H:1", b"H:2", b"H:3"):
        link.jobs.assigned(handle, b"f", b"u", b"d", 0.0)
    rules.job_packet(work(P.WORK_FAIL, b"H:1"), 1.0, link, [])
    rules.job_packet(work(P.WORK_COMPLETE, b"H:2", data=b""), 1.0, link, [])
    rules.job_packet(work(P.WORK_FAIL, b"H:3"), 1.0, link, [])
    assert rules.take() == [] and ejection.until is None
    link.jobs.assigned(b"H:4", b"f", b"u", b"d", 0.0)
    rules.job_packet(work(P.WORK_FAIL, b"H:4"), 2.0, link, [])
    assert rules.take() == [Ejected(30.0, b"f", 2)] and ejection.until == 32.0


def test_an_attempt_past_its_deadline_is_retried_and_the_timer_set_for_the_next() -> None:
    rules, retrier, deadlines, _ = attempts()
    link = Link()
    late = link.jobs.assigned(b"H:1", b"t", b"u", b"d", 0.0)
    later = link.jobs.assigned(b"H:2", b"t", b"u", b"d", 3.0)
    deadlines.started(link, late, 5.0)
    deadlines.started(link, later, 8.0)
    assert list(rules.timeouts_due(6.0, still_running=True)) == [link]
    asked = rules.take()
    assert [type(one) for one in asked] == [Wakeup, Armed] and asked[-1] == Armed(2.0)  # (the retry after its backoff)
    assert [job.handle for job in link.jobs] == [b"H:2"] and b"H:1" in rules.silenced and retrier.holding == 1


def test_a_retry_job_past_its_deadline_is_failed_back_and_an_observed_attempt_runs_on() -> None:
    rules, _, _, _ = attempts()
    link = Link()
    retry = link.jobs.assigned(b"H:1", b"t", b"gpr:2:u", b"d", 0.0, is_retry=True)
    observed = link.jobs.assigned(b"H:2", b"o", b"u", b"d", 0.0)
    assert rules.timed_out(link, retry, 6.0)
    assert rules.take() == [SendUpstream(link, req(P.WORK_EXCEPTION, handle=b"H:1", data=TIMED_OUT))]
    assert not rules.timed_out(link, observed, 6.0) and rules.asked == []
    assert not rules.timed_out(link, retry, 7.0)  # ended already
    observed_retry = link.jobs.assigned(b"H:3", b"o", b"gpr:2:u", b"d", 0.0, is_retry=True)
    assert not rules.timed_out(link, observed_retry, 6.0) and rules.asked == []
    assert [job.handle for job in link.jobs] == [b"H:2", b"H:3"]


def test_the_handle_of_a_work_packet() -> None:
    assert handle_of(work(P.WORK_DATA, data=b"x\0y")) == b"H:1"
    assert handle_of(work(P.WORK_STATUS, numerator=b"1", denominator=b"2")) == b"H:1"
    with pytest.raises(ProtocolError):
        handle_of(Packet(P.WORK_COMPLETE, req(P.WORK_COMPLETE, handle=b"H:1", data=b"")[:-1]))
