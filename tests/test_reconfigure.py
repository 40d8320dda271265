"""New policies without a restart: what a held job, a budget and a decision make of them."""

from __future__ import annotations

from dataclasses import replace

from gproxy.core.budget import Budgets
from gproxy.core.policy import Policies, RetryPolicy
from gproxy.core.protocol import REQ, PacketType, build_packet
from gproxy.core.retry import Decision, NothingHeld, SendUpstream, Wakeup
from tests.test_retry import POLICY, Transcript

P = PacketType


def test_a_held_job_keeps_its_attempts_and_deadline_and_follows_the_new_policy_from_its_next_decision() -> None:
    t = Transcript(replace(POLICY, max_attempts=5, backoff_initial=1.0))
    assert t.fail() == Decision(True, [Wakeup(1, 1.0, 1)])
    t.submit_and_create(1, b"H:2")
    (job,) = t.retrier.held.values()
    attempt, deadline = job.attempt, job.deadline
    t.retrier.reconfigure(Policies(replace(POLICY, max_attempts=5, backoff_initial=7.0)))
    assert (job.attempt, job.deadline, job.policy.backoff_initial) == (attempt, deadline, 7.0)
    assert t.retry(P.WORK_EXCEPTION, handle=b"H:2", data=b"RETRY: again") == [Wakeup(1, 14.0, 2)]  # the new backoff


def test_a_max_attempts_below_a_held_job_s_count_ends_it_at_its_next_failure_not_before() -> None:
    t = Transcript(replace(POLICY, max_attempts=5))
    t.fail()
    t.submit_and_create(1, b"H:2")  # attempt 2 runs
    t.retrier.reconfigure(Policies(replace(POLICY, max_attempts=2)))
    assert len(t.retrier.held) == 1  # the attempt on its way still runs
    assert t.retry(P.WORK_EXCEPTION, handle=b"H:2", data=b"RETRY: again") == [
        SendUpstream("up-1", build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: again")),
        NothingHeld("up-1"),
    ]
    assert t.sample("gproxy_retries_exhausted_total") == 1


def test_the_next_failure_is_classified_by_the_new_policy() -> None:
    t = Transcript()
    t.retrier.reconfigure(Policies(replace(POLICY, exception_marker=b"TRANSIENT")))
    assert t.fail(failure=b"RETRY: x") == Decision(False, [])
    assert t.fail(handle=b"H:9", failure=b"TRANSIENT: x").held


def test_a_budget_takes_its_new_settings_when_next_used_and_keeps_its_window() -> None:
    budgets = Budgets(Policies(RetryPolicy(budget_ratio=0.0, budget_min_per_second=0.1, budget_ttl=10.0)))
    assert budgets.withdraw(b"f", 0.0)  # the floor: one retry per window
    assert not budgets.withdraw(b"f", 1.0)
    budgets.reconfigure(Policies(RetryPolicy(budget_ratio=0.0, budget_min_per_second=0.3, budget_ttl=10.0)))
    assert budgets.withdraw(b"f", 1.0) and budgets.withdraw(b"f", 1.0)  # 3 in the window, 1 spent already
    assert not budgets.withdraw(b"f", 1.0)
    budgets.reconfigure(Policies(RetryPolicy(budget_ratio=0.0, budget_min_per_second=0.1, budget_ttl=20.0)))
    assert budgets.withdraw(b"f", 1.0) and budgets.withdraw(b"f", 1.0)  # a new length: a new window
    assert not budgets.withdraw(b"f", 1.0)
