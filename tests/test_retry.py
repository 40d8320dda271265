"""The retry policy and state machine, pure: transcripts of events and the actions they give."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gproxy.core.jobs import TrackedJob
from gproxy.core.protocol import REQ, PacketType, build_packet
from gproxy.core.dead_letter import envelope, parse
from gproxy.core.policy import (
    DISCONNECTED,
    TIMED_OUT,
    FinalException,
    Mode,
    OnDisconnect,
    Policies,
    Priority,
    Reason,
    RetryPolicy,
    Verdict,
    classify,
)
from gproxy.core.retry import Decision, RecheckBudget, NothingHeld, Retrier, SendUpstream, Submit, Wakeup
from gproxy.core.uniques import MAX_UNIQUE, dead_letter_unique, parse_retry_unique, retry_tag, retry_unique

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


@given(st.binary(max_size=70).filter(lambda u: b"\0" not in u), st.integers(min_value=2, max_value=99))
def test_tagged_retry_uniques_fit_and_give_the_worker_the_original(unique: bytes, attempt: int) -> None:
    tag = retry_tag(random.Random(attempt))
    marked = retry_unique(unique, b"H:1", attempt, tag)
    assert len(marked) <= MAX_UNIQUE and tag in marked
    parsed = parse_retry_unique(marked)
    assert parsed is not None and parsed[0] == attempt
    assert parsed[1] == (unique if b":" + unique in marked else b"" if not unique else marked)


def test_two_gproxies_never_submit_the_same_retry_unique() -> None:
    # A killed gproxy's queued retry is abandoned by gearmand, and dropped unrun when a worker
    # would take it, with any submission that attached to it since: the next gproxy holding
    # the job must not send the same unique for the same attempt.
    first, second = Retrier(Policies()), Retrier(Policies())
    assert first.tag != second.tag and len(first.tag) == 5
    assert retry_unique(b"u", b"H:1", 2, first.tag) != retry_unique(b"u", b"H:1", 2, second.tag)
    assert retry_unique(b"", b"H:1", 2, first.tag) != retry_unique(b"", b"H:1", 2, second.tag)


def test_empty_uniques_get_a_retry_unique_of_their_own_per_job() -> None:
    assert retry_unique(b"", b"H:a:1", 2) != retry_unique(b"", b"H:a:2", 2)
    assert parse_retry_unique(retry_unique(b"", b"H:a:1", 2)) == (2, b"")
    assert parse_retry_unique(b"an ordinary unique") is None



def test_dead_letter_uniques_are_the_jobs_own_and_never_a_retrys() -> None:
    first = dead_letter_unique(b"f", b"u", b"H:1", b"payload")
    assert first == dead_letter_unique(b"f", b"u", b"H:1", b"payload")  # a resubmission coalesces
    assert len(first) <= MAX_UNIQUE and parse_retry_unique(first) is None
    others = {dead_letter_unique(*job) for job in [(b"g", b"u", b"H:1", b"payload"), (b"f", b"", b"H:1", b"payload"),
                                                   (b"f", b"u", b"H:2", b"payload"), (b"f", b"u", b"H:1", b"other")]}
    assert first not in others and len(others) == 4


@given(st.floats(min_value=0, max_value=60), st.integers(min_value=1, max_value=9), st.integers())
def test_a_worker_hint_is_a_minimum_and_jitter_only_adds_to_it(hint: float, attempt: int, seed: int) -> None:
    delay = RetryPolicy().delay(Verdict(Reason.WORKER_HINT, hint), attempt, random.Random(seed))
    assert hint <= delay <= hint * 1.5
    assert RetryPolicy(jitter=False).delay(Verdict(Reason.WORKER_HINT, hint), attempt, random.Random(seed)) == hint


SMALL_BUDGET = replace(POLICY, budget_ratio=0.5, budget_min_per_second=0.1, budget_ttl=10.0)
"""One retry per 10 s window from the floor, half a retry per first attempt."""


class Transcript:
    """A Retrier, driven event by event; `now` is whatever the test says it is."""

    def __init__(self, policy: RetryPolicy = POLICY) -> None:
        self.retrier = Retrier(Policies(policy), random.Random(1), tag=b"")  # plain uniques to read
        self.wakeups: dict[int, Wakeup] = {}

    def fail(self, handle: bytes = b"H:1", ptype: PacketType = P.WORK_EXCEPTION, failure: bytes = b"RETRY: x",
             unique: bytes = b"u-1", function: bytes = b"f", now: float = 0.0, owner: str = "up-1",
             exception_ends_job: bool = True) -> Decision:
        decision = self.retrier.worker_failed(
            owner=owner, route="route", job=TrackedJob(handle, function, unique, b"payload", owner, 0.0),
            ptype=ptype, failure=failure, now=now, exception_ends_job=exception_ends_job,
        )
        self.note(decision.actions)
        return decision

    def note(self, actions: list) -> list:
        for action in actions:
            if type(action) is Wakeup:
                self.wakeups[action.key] = action
        return actions

    def fire(self, key: int, now: float) -> list:
        wakeup = self.wakeups[key]
        return self.note(self.retrier.timer_fired(key, wakeup.wait, now))

    def submit_and_create(self, key: int, retry_handle: bytes, now: float = 1.0) -> Submit:
        (submit,) = self.fire(key, now)
        assert self.retrier.retry_created(key, retry_handle) == []
        return submit

    def retry(self, ptype: PacketType, now: float = 2.0, **args: bytes) -> list:
        return self.note(self.retrier.retry_packet("route", ptype, args, now=now))

    def sample(self, name: str, **labels: str) -> float | None:
        return self.retrier.metrics.registry.get_sample_value(name, {"function": "f", **labels})


def test_a_held_job_is_retried_and_its_retry_completes_the_original() -> None:
    t = Transcript()
    assert t.fail() == Decision(True, [Wakeup(1, 1.0, 1)])
    submit = t.submit_and_create(1, b"H:2")
    assert submit == Submit("route", 1, b"f", b"gpr:2:u-1", b"payload", P.SUBMIT_JOB)
    assert t.retry(P.WORK_DATA, handle=b"H:2", data=b"part") == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_DATA, handle=b"H:1", data=b"part"))
    ]
    assert t.retry(P.WORK_STATUS, handle=b"H:2", numerator=b"1", denominator=b"2") == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_STATUS, handle=b"H:1", numerator=b"1", denominator=b"2"))
    ]
    assert t.retry(P.WORK_COMPLETE, handle=b"H:2", data=b"ok") == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_COMPLETE, handle=b"H:1", data=b"ok")),
        NothingHeld("up-1"),
    ]
    assert t.retrier.held == {} and t.retrier.held_per_function == {}
    assert t.retry(P.WORK_COMPLETE, handle=b"H:2", data=b"late") == []  # unknown now: ignored


def test_exhaustion_forwards_the_last_exception_and_dead_letters_the_payload() -> None:
    t = Transcript(replace(POLICY, max_attempts=3, dead_letter="dlq.{function}"))
    t.fail()
    t.submit_and_create(1, b"H:2")
    assert t.retry(P.WORK_EXCEPTION, handle=b"H:2", data=b"RETRY: second") == [Wakeup(1, 2.0, 2)]
    assert t.submit_and_create(1, b"H:3", now=5.0).unique == b"gpr:3:u-1"
    assert t.retry(P.WORK_EXCEPTION, handle=b"H:3", data=b"RETRY: third") == [
        Submit("route", None, b"dlq.f", dead_letter_unique(b"f", b"u-1", b"H:1", b"payload"),
               envelope(b"f", b"u-1", b"H:1", 3, "WORK_EXCEPTION", b"RETRY: third", b"payload"), P.SUBMIT_JOB_BG),
        SendUpstream("up-1", build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: third")),
        NothingHeld("up-1"),
    ]
    assert t.sample("gproxy_retries_exhausted_total") == 1


def test_where_an_exception_does_not_end_a_job_giving_up_also_sends_work_fail() -> None:
    # The Perl Gearman::Server: WORK_EXCEPTION only informs the clients; WORK_FAIL ends the job.
    t = Transcript(replace(POLICY, max_attempts=2))
    t.fail(exception_ends_job=False)
    t.submit_and_create(1, b"H:2")
    assert t.retry(P.WORK_EXCEPTION, handle=b"H:2", data=b"RETRY: again")[0] == SendUpstream(
        "up-1",
        build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: again")
        + build_packet(REQ, P.WORK_FAIL, handle=b"H:1"),
    )


def test_a_non_retryable_failure_of_a_retry_ends_it_without_dead_letter() -> None:
    t = Transcript(replace(POLICY, dead_letter="dlq"))
    t.fail()
    t.submit_and_create(1, b"H:2")
    assert t.retry(P.WORK_FAIL, handle=b"H:2") == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_FAIL, handle=b"H:1")),
        NothingHeld("up-1"),
    ]


def test_observe_mode_forwards_and_counts() -> None:
    t = Transcript(replace(POLICY, mode=Mode.OBSERVE, dead_letter="dlq"))
    assert t.fail() == Decision(False, [])
    assert t.sample("gproxy_retries_observed_total") == 1


def test_with_one_attempt_a_retryable_failure_is_exhausted_at_once() -> None:
    t = Transcript(replace(POLICY, max_attempts=1, dead_letter="dlq"))
    decision = t.fail()
    assert not decision.held and [type(a) for a in decision.actions] == [Submit]
    assert t.sample("gproxy_retries_exhausted_total") == 1


def test_over_max_held_a_failure_is_forwarded_and_dead_lettered() -> None:
    t = Transcript(replace(POLICY, max_held=2, dead_letter="dlq"))
    assert t.fail(handle=b"H:1").held and t.fail(handle=b"H:2").held
    decision = t.fail(handle=b"H:3", unique=b"u-3")
    letter = envelope(b"f", b"u-3", b"H:3", 1, "WORK_EXCEPTION", b"RETRY: x", b"payload")
    assert decision == Decision(False, [Submit("route", None, b"dlq", dead_letter_unique(b"f", b"u-3", b"H:3", b"payload"), letter, P.SUBMIT_JOB_BG)])
    assert t.sample("gproxy_retry_cap_rejections_total", cap="max_held") == 1
    assert t.fail(handle=b"H:9", function=b"g").held  # the cap is per function


def test_over_budget_a_retry_waits_for_the_budget_instead_of_failing() -> None:
    t = Transcript(SMALL_BUDGET)
    t.fail(handle=b"H:1", unique=b"a")
    t.fail(handle=b"H:5", unique=b"b")
    assert t.fire(1, now=1.0) == [Submit("route", 1, b"f", b"gpr:2:a", b"payload", P.SUBMIT_JOB)]  # the floor's one
    # Job 2's backoff is over too, but the window's retry is spent: it waits, still held.
    assert t.fire(2, now=1.0) == [Wakeup(2, 599.0, 1), RecheckBudget(b"f", 1.0)]
    assert t.sample("gproxy_retries_deferred_total") == 1
    assert t.retrier.budget_recheck(b"f", now=2.0) == [RecheckBudget(b"f", 1.0)]
    # Two first attempts earn a retry (ratio 0.5): the next look submits job 2.
    for handle in (b"H:10", b"H:11"):
        t.retrier.job_assigned("route", handle, b"f", False, now=2.5)
    assert t.retrier.budget_recheck(b"f", now=3.0) == [Submit("route", 2, b"f", b"gpr:2:b", b"payload", P.SUBMIT_JOB)]
    assert t.retrier.budget_recheck(b"f", now=4.0) == []  # nothing left waiting: no more looks
    assert t.retrier.budget_balances(4.0, [b"f"]) == {b"f": 0.0}


def test_deferred_retries_go_in_the_order_they_became_due() -> None:
    t = Transcript(replace(SMALL_BUDGET, budget_min_per_second=0.0))
    for n in range(1, 4):
        t.fail(handle=b"H:%d" % n, unique=b"u%d" % n)
    assert [type(a) for a in t.fire(2, now=1.0)] == [Wakeup, RecheckBudget]
    t.fire(1, now=1.5)
    t.retrier.job_assigned("route", b"H:10", b"f", False, now=1.6)
    t.retrier.job_assigned("route", b"H:11", b"f", False, now=1.6)
    # Budget for one: the oldest in line goes first, even though job 3 is due now with budget to spare.
    assert [a.unique for a in t.fire(3, now=1.7) if type(a) is Submit] == []
    assert [a.key for a in t.retrier.budget_recheck(b"f", now=2.0) if type(a) is Submit] == [2]


def test_a_retry_that_waits_longer_than_max_hold_time_gets_its_last_failure() -> None:
    t = Transcript(replace(SMALL_BUDGET, budget_min_per_second=0.0, max_hold_time=30.0, dead_letter="dlq"))
    t.fail(failure=b"RETRY: db down")
    assert t.fire(1, now=1.0) == [Wakeup(1, 29.0, 1), RecheckBudget(b"f", 1.0)]
    actions = t.fire(1, now=30.0)
    assert actions[1:] == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: db down")),
        NothingHeld("up-1"),
    ]
    assert type(actions[0]) is Submit and actions[0].function == b"dlq"
    assert t.sample("gproxy_retry_cap_rejections_total", cap="max_hold_time") == 1
    assert t.retrier.budget_recheck(b"f", now=31.0) == []  # its place in line is gone too


def test_a_deferred_retry_past_its_deadline_is_given_up_when_the_budget_returns() -> None:
    t = Transcript(replace(SMALL_BUDGET, budget_min_per_second=0.0, max_hold_time=30.0))
    t.fail()
    t.fire(1, now=1.0)
    t.retrier.job_assigned("route", b"H:10", b"f", False, now=30.5)
    t.retrier.job_assigned("route", b"H:11", b"f", False, now=30.5)
    # The look at the budget comes before the job's own deadline timer: it still gives up.
    assert [type(a) for a in t.retrier.budget_recheck(b"f", now=31.0)] == [SendUpstream, NothingHeld]


def test_a_backoff_longer_than_max_hold_time_wakes_at_the_deadline_to_give_up() -> None:
    t = Transcript(replace(POLICY, backoff_initial=100.0, backoff_max=100.0, max_hold_time=30.0))
    assert t.fail().actions == [Wakeup(1, 30.0, 1)]
    assert [type(a) for a in t.fire(1, now=30.0)] == [SendUpstream, NothingHeld]


def test_a_timer_of_an_earlier_wait_does_nothing() -> None:
    t = Transcript(replace(POLICY, max_hold_time=50.0))
    t.fail()
    first = t.wakeups[1]
    t.submit_and_create(1, b"H:2")
    t.retry(P.WORK_EXCEPTION, handle=b"H:2", data=b"RETRY: again")  # a second wait begins
    assert t.retrier.timer_fired(1, first.wait, now=50.0) == []
    assert t.retrier.held[1].attempt == 2


def test_a_retry_whose_worker_left_is_retried_with_reason_disconnect() -> None:
    t = Transcript(replace(POLICY, max_attempts=3))
    t.fail(failure=b"RETRY: first")
    t.submit_and_create(1, b"H:2")
    # A gproxy in front of H:2's worker kept its connection for held jobs and failed H:2 back.
    assert t.retry(P.WORK_EXCEPTION, handle=b"H:2", data=DISCONNECTED) == [Wakeup(1, 0.0, 2)]
    assert t.sample("gproxy_retries_total", reason="disconnect") == 1
    assert t.submit_and_create(1, b"H:3").unique == b"gpr:3:u-1"
    # The last attempt lost the same way ends as gearmand's --job-retries would end it.
    assert t.retry(P.WORK_EXCEPTION, handle=b"H:3", data=DISCONNECTED)[0] == SendUpstream(
        "up-1", build_packet(REQ, P.WORK_FAIL, handle=b"H:1")
    )


def test_retries_go_with_the_priority_configured() -> None:
    t = Transcript(replace(POLICY, retry_priority=Priority.HIGH))
    t.fail()
    assert t.submit_and_create(1, b"H:2").type is P.SUBMIT_JOB_HIGH
    assert Priority.LOW.submit_type is P.SUBMIT_JOB_LOW


def test_a_lost_retry_connection_resubmits_what_was_in_flight() -> None:
    t = Transcript(replace(POLICY, max_attempts=3))
    t.fail(handle=b"H:1", unique=b"a")
    t.fail(handle=b"H:5", unique=b"b")
    t.fail(handle=b"H:6", unique=b"c")
    t.submit_and_create(1, b"H:2")  # running
    t.fire(3, now=1.0)  # submitted, not yet sent (not in flight); job 2 is still waiting
    # A created retry job may have run: the next attempt, under a new unique, as gearmand
    # would drop the abandoned retry job even with a client reattached to its unique.
    assert t.retrier.retry_connection_lost("route", set(), now=2.0) == [Submit("route", 1, b"f", b"gpr:3:a", b"payload")]
    assert t.retrier.held[1].attempt == 3
    assert t.retry(P.WORK_COMPLETE, handle=b"H:2", data=b"stale") == []
    assert t.retrier.submitting(3) and t.retrier.submitting(1) and not t.retrier.submitting(2)
    # A submission never acknowledged is sent again, under a new unique, as the same attempt.
    assert t.retrier.retry_connection_lost("route", {3}, now=2.0) == [Submit("route", 3, b"f", b"gpr:3:c", b"payload")]
    assert t.retrier.retry_connection_lost("route", {3}, now=2.0) == [Submit("route", 3, b"f", b"gpr:4:c", b"payload")]
    assert t.retrier.held[3].attempt == 2
    t.retrier.retry_created(1, b"H:7")
    assert t.retry(P.WORK_COMPLETE, handle=b"H:7", data=b"ok")[0] == SendUpstream(
        "up-1", build_packet(REQ, P.WORK_COMPLETE, handle=b"H:1", data=b"ok")
    )
    t.retrier.retry_created(3, b"H:8")
    assert t.retry(P.WORK_EXCEPTION, handle=b"H:8", data=b"RETRY: y") == [Wakeup(3, 2.0, 2)]
    t.submit_and_create(3, b"H:9", now=5.0)
    # Lost while running its last attempt: the client gets the last failure.
    assert t.retrier.retry_connection_lost("route", set(), now=6.0) == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:6", data=b"RETRY: y")),
    ]


def test_a_refused_retry_gives_the_client_the_last_failure() -> None:
    t = Transcript()
    t.fail(failure=b"RETRY: first")
    t.fire(1, now=1.0)
    assert t.retrier.retry_rejected(1, b"QUEUE_ERROR", now=2.0) == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: first")),
        NothingHeld("up-1"),
    ]
    assert t.retrier.retry_rejected(1, b"QUEUE_ERROR", now=2.0) == []  # once only


def test_losing_the_owner_drops_its_retries_and_stale_timers_do_nothing() -> None:
    t = Transcript()
    t.fail()
    assert t.retrier.holds("up-1") and t.retrier.holds("up-1", b"f") and not t.retrier.holds("up-1", b"g")
    assert t.retrier.holder("route", b"H:1") == "up-1"
    assert t.retrier.owner_lost("up-1") == []
    assert t.fire(1, now=5.0) == []
    assert not t.retrier.holds("up-1") and t.retrier.holder("route", b"H:1") is None


def test_a_held_handle_assigned_again_ends_the_hold_and_orphans_its_retry() -> None:
    # gearmand took the job back (a CAN_DO_TIMEOUT fired) and gave it to a worker again.
    t = Transcript()
    t.fail(handle=b"H:1", owner="up-1")
    t.fail(handle=b"H:4", owner="up-1")
    t.submit_and_create(1, b"H:2")
    assert t.retrier.job_assigned("route", b"H:1", b"f", False, now=3.0) == []  # up-1 still holds H:4
    assert t.retrier.holder("route", b"H:1") is None and t.retrier.held_per_function == {b"f": 1}
    assert t.retry(P.WORK_COMPLETE, handle=b"H:2", data=b"orphan") == []  # finishes nothing
    assert t.retrier.job_assigned("route", b"H:4", b"f", False, now=3.0) == [NothingHeld("up-1")]
    # The new assignment may fail and be held afresh.
    assert t.fail(handle=b"H:1", owner="up-2").held and t.retrier.holder("route", b"H:1") == "up-2"


def test_first_attempts_fill_the_budget_and_retries_do_not() -> None:
    t = Transcript(replace(POLICY, budget_ratio=0.5, budget_min_per_second=0.0))
    for n in range(4):
        t.retrier.job_assigned("route", b"H:%d" % n, b"f", False, now=0.0)
    t.retrier.job_assigned("route", b"H:9", b"f", True, now=0.0)
    assert t.retrier.budget_balances(0.0, [b"f"]) == {b"f": 2.0}
    assert t.retrier.is_retry_handle("route", b"H:2") is False


def test_jobs_a_departed_worker_was_running_are_retried_at_once() -> None:
    t = Transcript()
    t.fail()
    running = [TrackedJob(b"H:4", b"f", b"u-4", b"p4", "up-1", 0.0)]
    assert t.note(t.retrier.worker_left("up-1", "route", running, now=1.0)) == [Wakeup(2, 0.0, 1)]
    assert t.fire(2, now=1.0) == [Submit("route", 2, b"f", b"gpr:2:u-4", b"p4")]
    assert t.sample("gproxy_retries_total", reason="disconnect") == 1


def test_over_max_held_a_departed_workers_job_fails_and_is_dead_lettered() -> None:
    t = Transcript(replace(POLICY, max_held=1, dead_letter="dlq"))
    t.fail()
    running = [TrackedJob(b"H:4", b"f", b"u-4", b"p4", "up-1", 0.0)]
    actions = t.retrier.worker_left("up-1", "route", running, now=1.0)
    assert [type(a) for a in actions] == [Submit, SendUpstream]
    assert actions[1] == SendUpstream("up-1", build_packet(REQ, P.WORK_FAIL, handle=b"H:4"))


def test_answers_and_timers_out_of_turn_change_nothing() -> None:
    t = Transcript(replace(SMALL_BUDGET, budget_min_per_second=0.0, max_hold_time=30.0))
    t.fail()
    # gearmand's answers to a submission that is not outstanding (the job is still waiting).
    assert t.retrier.retry_created(1, b"H:2") == [] and t.retrier.retry_rejected(1, b"X", now=0.5) == []
    assert t.retrier.held[1].state.value == "waiting"
    t.fire(1, now=1.0)  # over budget: deferred, with a timer for its deadline at 30 s
    # A timer that wakes early (clocks differ) is set again for what is left, nothing more.
    assert t.retrier.timer_fired(1, 1, now=20.0) == [Wakeup(1, 10.0, 1)]
    assert t.retrier.held[1].state.value == "deferred"


def test_a_unique_with_thousands_of_digits_is_not_a_retry_unique() -> None:
    # int() of that many digits raised, and the pair closed with an internal error.
    assert parse_retry_unique(b"gpr:" + b"9" * 5000 + b":x") is None
    assert parse_retry_unique(b"gpr:123456789:x") == (123456789, b"x")


def test_idle_budgets_are_dropped_so_new_function_names_cost_no_memory_for_ever() -> None:
    # Found by the fuzz tier: a budget for every function name ever seen, kept for ever.
    t = Transcript(replace(POLICY, budget_ttl=1.0))
    for n in range(5000):
        t.retrier.job_assigned("route", b"H:%d" % n, b"f%d" % n, False, now=float(n))
    assert len(t.retrier.budgets) < 600
    # A dropped budget comes back as new, which is what it was: its window was empty.
    assert t.retrier.budget_balances(6000.0, [b"f1"]) == {b"f1": 10.0}


def test_a_budget_in_use_is_kept() -> None:
    t = Transcript(replace(POLICY, budget_ttl=1000.0))
    t.retrier.job_assigned("route", b"H:0", b"busy", False, now=0.0)
    for n in range(1, 3000):
        t.retrier.job_assigned("route", b"H:%d" % n, b"f%d" % n, False, now=0.0)
    assert b"busy" in t.retrier.budgets  # its deposit is still in the window


# -- on_disconnect = "retry": a worker that vanishes mid-job is a failure ---------------------

CRASHES = replace(POLICY, on_disconnect=OnDisconnect.RETRY, max_attempts=3, dead_letter="dlq")


def running(handle: bytes = b"H:1") -> list[TrackedJob]:
    return [TrackedJob(handle, b"f", b"u-1", b"payload", "up-1", 0.0)]


@pytest.mark.parametrize("reason", ["disconnect", "timeout"])
def test_an_attempt_lost_without_a_result_is_retried_with_backoff_then_dead_lettered(reason: str) -> None:
    """Its worker vanished (on_disconnect = "retry"), or it ran past its timeout: so did
    the retries, failed back by the gproxy in front of their workers."""
    t = Transcript(CRASHES)
    if reason == "disconnect":
        first, failed_back = t.retrier.worker_left("up-1", "route", running(), now=0.0), DISCONNECTED
    else:
        first, failed_back = t.retrier.worker_timed_out("up-1", "route", running()[0], now=0.0), TIMED_OUT
    assert t.note(first or []) == [Wakeup(1, 1.0, 1)]  # the backoff
    assert t.sample("gproxy_retries_total", reason=reason) == 1
    t.submit_and_create(1, b"H:2")
    assert t.retry(P.WORK_EXCEPTION, handle=b"H:2", data=failed_back, now=2.0) == [Wakeup(1, 2.0, 2)]
    t.submit_and_create(1, b"H:3", now=4.0)
    actions = t.retry(P.WORK_EXCEPTION, handle=b"H:3", data=failed_back, now=5.0)
    assert [type(a) for a in actions] == [Submit, SendUpstream, NothingHeld]
    assert actions[0].function == b"dlq" and actions[0].type is P.SUBMIT_JOB_BG
    assert actions[1] == SendUpstream("up-1", build_packet(REQ, P.WORK_FAIL, handle=b"H:1"))
    assert t.sample("gproxy_retries_exhausted_total") == 1 and t.sample("gproxy_retries_total", reason=reason) == 2


def test_only_a_function_so_configured_retries_disconnects() -> None:
    assert Transcript(CRASHES).retrier.retries_disconnects(b"f") and not Transcript().retrier.retries_disconnects(b"f")


def test_a_vanished_worker_with_one_attempt_allowed_fails_its_job_to_the_dead_letter() -> None:
    t = Transcript(replace(CRASHES, max_attempts=1))
    actions = t.retrier.worker_left("up-1", "route", running(), now=0.0)
    assert [type(a) for a in actions] == [Submit, SendUpstream] and t.retrier.held == {}
    assert actions[1] == SendUpstream("up-1", build_packet(REQ, P.WORK_FAIL, handle=b"H:1"))
    assert t.sample("gproxy_retries_exhausted_total") == 1


def test_a_job_assigned_after_its_worker_vanished_never_ran_and_is_requeued_at_once() -> None:
    t = Transcript(CRASHES)
    assert t.retrier.worker_left("up-1", "route", running(), now=0.0, ran=False) == [Wakeup(1, 0.0, 1)]


def test_observe_mode_counts_a_vanished_workers_job_and_leaves_it_to_gearmand() -> None:
    t = Transcript(replace(CRASHES, mode=Mode.OBSERVE))
    assert not t.retrier.retries_disconnects(b"f")
    t.retrier.disconnects_observed(running())
    assert t.sample("gproxy_retries_observed_total") == 1 and t.retrier.held == {}
    enforced = Transcript(CRASHES)  # (held instead: see worker_left)
    enforced.retrier.disconnects_observed(running())
    assert not enforced.sample("gproxy_retries_observed_total")


# -- final_exception: how a client hears of an exception that ends its job -------------------


@pytest.mark.parametrize("failure", [b"boom", b"FATAL: no"])
def test_a_final_exception_reaches_the_client_as_its_function_says(failure: bytes) -> None:
    fail = build_packet(REQ, P.WORK_FAIL, handle=b"H:1")
    warning = build_packet(REQ, P.WORK_WARNING, handle=b"H:1", data=failure)
    for final, instead in ((FinalException.EXCEPTION, None), (FinalException.FAIL, fail),
                           (FinalException.BOTH, warning + fail)):
        t = Transcript(replace(POLICY, final_exception=final))
        assert t.fail(failure=failure) == Decision(False, [], instead)
        assert t.fail(ptype=P.WORK_FAIL, failure=b"") == Decision(False)  # a WORK_FAIL is one already


def test_an_exhausted_or_capped_exception_reaches_the_client_as_a_fail_where_asked() -> None:
    t = Transcript(replace(POLICY, max_attempts=2, final_exception=FinalException.FAIL))
    t.fail()
    t.submit_and_create(1, b"H:2")
    actions = t.retry(P.WORK_EXCEPTION, handle=b"H:2", data=b"RETRY: again")
    assert actions[0] == SendUpstream("up-1", build_packet(REQ, P.WORK_FAIL, handle=b"H:1"))
    t = Transcript(replace(POLICY, max_attempts=1, final_exception=FinalException.FAIL))
    assert t.fail().instead == build_packet(REQ, P.WORK_FAIL, handle=b"H:1")
    observed = Transcript(replace(POLICY, mode=Mode.OBSERVE, final_exception=FinalException.FAIL))
    assert observed.fail().instead == build_packet(REQ, P.WORK_FAIL, handle=b"H:1")


def test_gproxys_own_exceptions_follow_final_exception_too() -> None:
    t = Transcript(replace(POLICY, final_exception=FinalException.BOTH))
    assert t.retrier.final_exception(b"f", b"H:1", b"too large", exception_ends_job=True) == (
        build_packet(REQ, P.WORK_WARNING, handle=b"H:1", data=b"too large") + build_packet(REQ, P.WORK_FAIL, handle=b"H:1")
    )
    plain = Transcript().retrier.final_exception(b"f", b"H:1", b"too large", exception_ends_job=False)
    assert plain == build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"too large") + build_packet(
        REQ, P.WORK_FAIL, handle=b"H:1"
    )


# -- timeouts: an attempt that runs past its function's timeout ---------------------------------


def test_a_timed_out_attempt_with_no_attempt_left_fails_and_observe_mode_only_counts() -> None:
    t = Transcript(replace(POLICY, max_attempts=1))
    assert t.retrier.worker_timed_out("up-1", "route", running()[0], now=0.0) == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_FAIL, handle=b"H:1"))
    ]
    observed = Transcript(replace(POLICY, mode=Mode.OBSERVE))
    assert observed.retrier.worker_timed_out("up-1", "route", running()[0], now=0.0) is None
    assert observed.sample("gproxy_retries_observed_total") == 1 and observed.retrier.held == {}


# -- the dead-letter envelope ----------------------------------------------------------------------


def test_a_dead_letter_carries_the_job_and_its_last_failure_around_the_payload_byte_for_byte() -> None:
    payload = b"\x00\xffbinary\npayload"
    letter = envelope(b"resize", b"img-\xff", b"H:1", 5, "WORK_EXCEPTION", b"RETRY: busy", payload)
    assert letter.startswith(b'GPROXY-DEAD-LETTER 1\n{"function": "resize", "unique": "img-\\udcff"')
    parsed = parse(letter)
    assert parsed is not None and (parsed.function, parsed.unique, parsed.handle, parsed.attempts) == (b"resize", b"img-\xff", b"H:1", 5)
    assert (parsed.failure_type, parsed.failure, parsed.payload) == ("WORK_EXCEPTION", b"RETRY: busy", payload)
    assert parse(payload) is None and parse(b"GPROXY-DEAD-LETTER 1\n{not json}\nx") is None  # 0.1's bare payload; junk
    t = Transcript(replace(POLICY, max_attempts=1, dead_letter="dlq"))
    (submit,) = t.fail(failure=b"\x05\x0b\x0a\x0cRETRY: oops\n").actions  # Perl's Storable-frozen `die`
    assert parse(bytes(submit.payload)).failure == b"RETRY: oops\n"  # type: ignore[union-attr]

