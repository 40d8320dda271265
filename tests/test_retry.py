"""The retry policy and state machine, pure: transcripts of events and the actions they give."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gproxy.jobs import TrackedJob
from gproxy.protocol import REQ, PacketType, build_packet
from gproxy.retry import (
    MAX_UNIQUE,
    Mode,
    Policies,
    Reason,
    Released,
    Retrier,
    RetryPolicy,
    SendUpstream,
    Submit,
    Verdict,
    Wakeup,
    classify,
    parse_retry_unique,
    retry_unique,
)

P = PacketType
POLICY = RetryPolicy(jitter=False)


@pytest.mark.parametrize(
    "policy, ptype, payload, verdict",
    [
        (POLICY, P.WORK_EXCEPTION, b"RETRY: deadlock", Verdict(Reason.EXCEPTION)),
        (POLICY, P.WORK_EXCEPTION, b"RETRY", Verdict(Reason.EXCEPTION)),
        (POLICY, P.WORK_EXCEPTION, b"RETRY after=30: rate limited", Verdict(Reason.WORKER_HINT, 30.0)),
        (POLICY, P.WORK_EXCEPTION, b"RETRY after=0.25", Verdict(Reason.WORKER_HINT, 0.25)),
        (POLICY, P.WORK_EXCEPTION, b"RETRY after=3600: later", Verdict(Reason.WORKER_HINT, 60.0)),
        (POLICY, P.WORK_EXCEPTION, b"RETRY after=x: odd", Verdict(Reason.EXCEPTION)),
        (POLICY, P.WORK_EXCEPTION, b"retry: lower case", None),
        (POLICY, P.WORK_EXCEPTION, b"error: RETRY later", None),
        (POLICY, P.WORK_EXCEPTION, b"FATAL: RETRY would be wrong", None),
        (replace(POLICY, fatal_marker=b"RETRY: no"), P.WORK_EXCEPTION, b"RETRY: no", None),
        (replace(POLICY, exception_marker=b"TRANSIENT"), P.WORK_EXCEPTION, b"TRANSIENT io", Verdict(Reason.EXCEPTION)),
        (POLICY, P.WORK_FAIL, b"", None),
        (replace(POLICY, on_fail=True), P.WORK_FAIL, b"", Verdict(Reason.FAIL)),
        # Perl's Gearman::Worker: `die "RETRY: oops\n"` arrives Storable-frozen.
        (POLICY, P.WORK_EXCEPTION, b"\x05\x0b\x0a\x0cRETRY: oops\n", Verdict(Reason.EXCEPTION)),
        (POLICY, P.WORK_EXCEPTION, b"\x05\x0b\x01\x00\x00\x00\x05RETRY", Verdict(Reason.EXCEPTION)),
        (POLICY, P.WORK_EXCEPTION, b"\x05\x0b\x0a\x0cFATAL: oops\n", None),
    ],
)
def test_classify(policy: RetryPolicy, ptype: PacketType, payload: bytes, verdict: Verdict | None) -> None:
    assert classify(policy, ptype, payload) == verdict


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(backoff_initial=1, backoff_multiplier=2, backoff_max=5, jitter=False)
    assert [policy.backoff(n, random.Random(0)) for n in range(1, 6)] == [1, 2, 4, 5, 5]


@given(st.integers(min_value=1, max_value=40), st.integers())
def test_jitter_stays_in_the_upper_half(attempt: int, seed: int) -> None:
    policy = RetryPolicy()
    plain = replace(policy, jitter=False).backoff(attempt, random.Random(seed))
    assert plain / 2 <= policy.backoff(attempt, random.Random(seed)) <= plain


@given(
    st.binary(max_size=80).filter(lambda u: b"\0" not in u),
    st.binary(min_size=1, max_size=40),
    st.integers(min_value=2, max_value=999),
)
def test_retry_uniques_fit_differ_and_give_the_worker_the_original(
    unique: bytes, handle: bytes, attempt: int
) -> None:
    marked = retry_unique(unique, handle, attempt)
    assert len(marked) <= MAX_UNIQUE and marked != unique and b"\0" not in marked
    parsed = parse_retry_unique(marked)
    assert parsed is not None and parsed[0] == attempt
    if len(unique) + len(b"gpr:%d:" % attempt) <= MAX_UNIQUE:
        assert parsed[1] == unique  # what a worker behind gproxy is shown
    else:
        assert parsed[1] == marked  # too long to carry: the worker sees the retry unique


def test_empty_uniques_get_a_retry_unique_of_their_own_per_job() -> None:
    assert retry_unique(b"", b"H:a:1", 2) != retry_unique(b"", b"H:a:2", 2)
    assert parse_retry_unique(retry_unique(b"", b"H:a:1", 2)) == (2, b"")
    assert parse_retry_unique(b"an ordinary unique") is None


class Transcript:
    """A Retrier and one held job, driven step by step."""

    def __init__(self, policy: RetryPolicy = POLICY, running: int = 1) -> None:
        self.retrier = Retrier(Policies(policy), random.Random(1))
        self.running = running

    def fail(self, handle: bytes = b"H:1", ptype: PacketType = P.WORK_EXCEPTION, failure: bytes = b"RETRY: x",
             unique: bytes = b"u-1", function: bytes = b"f"):
        return self.retrier.worker_failed(
            owner="up-1", route="route", job=TrackedJob(handle, function, unique, b"payload", "up-1", 0.0),
            ptype=ptype, failure=failure, running=self.running,
        )

    def submit_and_create(self, key: int, retry_handle: bytes) -> Submit:
        (submit,) = self.retrier.timer_fired(key)
        assert self.retrier.retry_created(key, retry_handle) == []
        return submit

    def retry(self, ptype: PacketType, **args: bytes) -> list:
        return self.retrier.retry_packet("route", ptype, args, now=2.0)


def test_a_held_job_is_retried_and_its_retry_completes_the_original() -> None:
    t = Transcript()
    assert t.fail() == [Wakeup(1, 1.0)]
    submit = t.submit_and_create(1, b"H:2")
    assert submit == Submit("route", 1, b"f", b"gpr:2:u-1", b"payload")
    assert t.retry(P.WORK_DATA, handle=b"H:2", data=b"part") == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_DATA, handle=b"H:1", data=b"part"))
    ]
    assert t.retry(P.WORK_STATUS, handle=b"H:2", numerator=b"1", denominator=b"2") == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_STATUS, handle=b"H:1", numerator=b"1", denominator=b"2"))
    ]
    assert t.retry(P.WORK_COMPLETE, handle=b"H:2", data=b"ok") == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_COMPLETE, handle=b"H:1", data=b"ok")),
        Released("up-1"),
    ]
    assert t.retrier.held == {} and t.retrier.metrics.held() == {}
    assert t.retry(P.WORK_COMPLETE, handle=b"H:2", data=b"late") == []  # unknown now: ignored


def test_exhaustion_forwards_the_last_exception_and_dead_letters_the_payload() -> None:
    t = Transcript(replace(POLICY, max_attempts=3, dead_letter="dlq.{function}"))
    t.fail()
    t.submit_and_create(1, b"H:2")
    assert t.retry(P.WORK_EXCEPTION, handle=b"H:2", data=b"RETRY: second") == [Wakeup(1, 2.0)]
    assert t.submit_and_create(1, b"H:3").unique == b"gpr:3:u-1"
    assert t.retry(P.WORK_EXCEPTION, handle=b"H:3", data=b"RETRY: third") == [
        Submit("route", None, b"dlq.f", b"", b"payload"),
        SendUpstream("up-1", build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: third")),
        Released("up-1"),
    ]


def test_a_non_retryable_failure_of_a_retry_ends_it_without_dead_letter() -> None:
    t = Transcript(replace(POLICY, dead_letter="dlq"))
    t.fail()
    t.submit_and_create(1, b"H:2")
    assert t.retry(P.WORK_FAIL, handle=b"H:2") == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_FAIL, handle=b"H:1")),
        Released("up-1"),
    ]


@pytest.mark.parametrize(
    "policy, running",
    [
        (replace(POLICY, mode=Mode.OBSERVE), 1),
        (replace(POLICY, max_attempts=1), 1),
        (replace(POLICY, budget_min=1, budget_ratio=0.0), 1),
    ],
    ids=["observe", "one attempt", "over budget"],
)
def test_failures_that_are_forwarded_after_all(policy: RetryPolicy, running: int) -> None:
    t = Transcript(policy, running)
    if policy.budget_min == 1:
        assert t.fail(handle=b"H:1") is not None  # the first fits the budget of one
    assert t.fail(handle=b"H:9") is None


def test_the_budget_grows_with_the_jobs_running() -> None:
    t = Transcript(replace(POLICY, budget_min=1, budget_ratio=0.5), running=4)
    assert t.fail(handle=b"H:1") is not None and t.fail(handle=b"H:2") is not None
    assert t.fail(handle=b"H:3") is None  # max(1, 0.5 * 4) = 2 held at most


def test_a_lost_retry_connection_resubmits_what_was_in_flight_as_the_next_attempt() -> None:
    t = Transcript(replace(POLICY, max_attempts=3))
    t.fail(handle=b"H:1", unique=b"a")
    t.fail(handle=b"H:5", unique=b"b")
    t.submit_and_create(1, b"H:2")  # job 2 is still waiting for its timer
    # A new unique: gearmand would drop the abandoned retry job even with a client reattached.
    assert t.retrier.retry_connection_lost("route", now=2.0) == [Submit("route", 1, b"f", b"gpr:3:a", b"payload")]
    assert t.retry(P.WORK_COMPLETE, handle=b"H:2", data=b"stale") == []
    t.retrier.retry_created(1, b"H:7")
    assert t.retry(P.WORK_COMPLETE, handle=b"H:7", data=b"ok")[0] == SendUpstream(
        "up-1", build_packet(REQ, P.WORK_COMPLETE, handle=b"H:1", data=b"ok")
    )
    t.submit_and_create(2, b"H:8")  # attempt 2 of job 2
    assert t.retrier.retry_connection_lost("route", now=2.0) == [Submit("route", 2, b"f", b"gpr:3:b", b"payload")]
    # Lost again with no attempt left: the client gets the last failure.
    assert t.retrier.retry_connection_lost("route", now=2.0) == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:5", data=b"RETRY: x")),
        Released("up-1"),
    ]


def test_a_refused_retry_gives_the_client_the_last_failure() -> None:
    t = Transcript()
    t.fail(failure=b"RETRY: first")
    t.retrier.timer_fired(1)
    assert t.retrier.retry_rejected(1, b"QUEUE_ERROR", now=2.0) == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: first")),
        Released("up-1"),
    ]


def test_losing_the_owner_drops_its_retries_and_stale_timers_do_nothing() -> None:
    t = Transcript()
    t.fail()
    assert t.retrier.holds("up-1") and t.retrier.holds("up-1", b"f") and not t.retrier.holds("up-1", b"g")
    assert t.retrier.owner_lost("up-1") == []
    assert t.retrier.timer_fired(1) == []
    assert not t.retrier.holds("up-1")


def test_jobs_a_departed_worker_was_running_are_retried_at_once() -> None:
    t = Transcript()
    t.fail()
    running = [TrackedJob(b"H:4", b"f", b"u-4", b"p4", "up-1", 0.0)]
    assert t.retrier.worker_left("up-1", "route", running) == [Wakeup(2, 0.0)]
    assert t.retrier.timer_fired(2) == [Submit("route", 2, b"f", b"gpr:2:u-4", b"p4")]
