"""The Retrier under random sequences of events (hypothesis' stateful testing).

A model world drives it: workers fail jobs, timers fire when due, gearmand creates, runs,
refuses and reassigns retry jobs, connections break. After every step the Retrier's own
bookkeeping must agree with itself, no job may be stuck (every waiting job has a timer that
will wake it, every deferred one a budget look that will reach it), no job may end twice,
the retries submitted must stay within the budget, and every state change of a held job
must be a move of the table (TRANSITIONS), made through HeldJobs.move.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gproxy.core.budget import SLICES
from gproxy.core.jobs import TrackedJob
from gproxy.core.policy import DISCONNECTED, Policies, RetryPolicy
from gproxy.core.protocol import PacketType
from gproxy.core.retry import (
    TRANSITIONS,
    Event,
    HeldJob,
    RecheckBudget,
    NothingHeld,
    Retrier,
    SendUpstream,
    State,
    Submit,
    Wakeup,
)

P = PacketType
POLICY = RetryPolicy(
    max_attempts=3, backoff_initial=1.0, backoff_max=8.0, budget_ratio=0.25,
    budget_min_per_second=0.1, budget_ttl=5.0, max_held=6, max_hold_time=20.0, dead_letter="dlq",
)
FUNCTIONS = (b"f", b"g")
OWNERS = ("up-1", "up-2")
FAILURES = (b"RETRY: x", b"RETRY after=2: y", b"FATAL: z", b"plain")


@dataclass
class Timer:
    due: float
    action: Wakeup | RecheckBudget


class RetrierMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.retrier = Retrier(Policies(POLICY), random.Random(0))
        self.now = 0.0
        self.timers: list[Timer] = []
        self.next_handle = 100
        self.in_flight: dict[int, Submit] = {}  # sent on the retry connection, no JOB_CREATED yet
        self.retry_handles: dict[bytes, int] = {}  # running retry jobs: handle -> key
        self.finals: Counter[bytes] = Counter()  # final packets sent per original handle
        self.deposits: list[tuple[float, bytes]] = []
        self.withdrawals: list[tuple[float, bytes]] = []
        self.states: dict[int, State] = {}  # every held job's state, as the last step left it
        self.moves: list[tuple[int, State | None, Event, State | None]] = []  # made since
        jobs, move = self.retrier.jobs, self.retrier.jobs.move

        def recorded(job: HeldJob, event: Event, retry_handle: bytes | None = None) -> None:
            source = job.state if jobs.by_key.get(job.key) is job else None
            move(job, event, retry_handle)
            self.moves.append((job.key, source, event, job.state if jobs.by_key.get(job.key) is job else None))

        jobs.move = recorded  # type: ignore[method-assign]  # the one way a job changes state, watched

    # -- executing what the Retrier asks for

    def run(self, actions: list) -> None:
        for action in actions:
            if type(action) is Wakeup or type(action) is RecheckBudget:
                self.timers.append(Timer(self.now + action.delay, action))
            elif type(action) is Submit:
                if action.key is not None:
                    self.in_flight[action.key] = action
            elif type(action) is SendUpstream:
                handle = action.data[12:].split(b"\0", 1)[0]
                ptype = PacketType(int.from_bytes(action.data[4:8], "big"))
                if ptype in (P.WORK_COMPLETE, P.WORK_FAIL, P.WORK_EXCEPTION):
                    self.finals[handle] += 1
                    assert self.finals[handle] == 1, f"{handle!r} ended twice"
            elif type(action) is NothingHeld:
                assert not self.retrier.holds(action.owner)

    def submit_counted(self, actions: list, resubmission: bool = False) -> list:
        if not resubmission:
            for action in actions:
                if type(action) is Submit and action.key is not None:
                    self.withdrawals.append((self.now, action.function))
        return actions

    # -- rules

    @rule(function=st.sampled_from(FUNCTIONS), owner=st.sampled_from(OWNERS), failure=st.sampled_from(FAILURES))
    def worker_fails_a_job(self, function: bytes, owner: str, failure: bytes) -> None:
        self.next_handle += 1
        handle = b"H:%d" % self.next_handle
        self.run(self.retrier.job_assigned("route", handle, function, False, self.now))
        self.deposits.append((self.now, function))
        job = TrackedJob(handle, function, b"u%d" % self.next_handle, b"p", owner, self.now)
        decision = self.retrier.worker_failed(
            owner=owner, route="route", job=job, ptype=P.WORK_EXCEPTION, failure=failure, now=self.now
        )
        if not decision.held:
            self.finals[handle] += 1  # forwarded by the Session as it came
        self.run(decision.actions)

    @rule(function=st.sampled_from(FUNCTIONS))
    def a_first_attempt_succeeds(self, function: bytes) -> None:
        self.next_handle += 1
        self.run(self.retrier.job_assigned("route", b"H:%d" % self.next_handle, function, False, self.now))
        self.deposits.append((self.now, function))

    @precondition(lambda self: self.timers)
    @rule(data=st.data())
    def time_passes_to_a_timer(self, data: st.DataObject) -> None:
        timer = data.draw(st.sampled_from(sorted(self.timers, key=lambda t: t.due)[:3]))
        self.timers.remove(timer)
        self.now = max(self.now, timer.due)
        action = timer.action
        if type(action) is Wakeup:
            self.run(self.submit_counted(self.retrier.timer_fired(action.key, action.wait, self.now)))
        else:
            self.run(self.submit_counted(self.retrier.budget_recheck(action.function, self.now)))

    @precondition(lambda self: self.retrier.held)
    @rule(data=st.data())
    def a_held_job_takes_its_next_step(self, data: st.DataObject) -> None:
        """The way a job usually goes, so that runs reach the later attempts often."""
        job = data.draw(st.sampled_from(sorted(self.retrier.held.values(), key=lambda j: j.key)))
        if job.state is State.WAITING:
            (timer,) = [t for t in self.timers if type(t.action) is Wakeup and t.action.key == job.key
                        and t.action.wait == job.wait]
            self.timers.remove(timer)
            self.now = max(self.now, timer.due)
            self.run(self.submit_counted(self.retrier.timer_fired(job.key, job.wait, self.now)))
        elif job.state is State.DEFERRED:  # traffic earns the budget back, and it is looked at
            for _ in range(4):
                self.a_first_attempt_succeeds(job.function)
            (timer,) = [t for t in self.timers if type(t.action) is RecheckBudget and t.action.function == job.function]
            self.timers.remove(timer)
            self.now = max(self.now, timer.due)
            self.run(self.submit_counted(self.retrier.budget_recheck(job.function, self.now)))
        elif job.state is State.SUBMITTING and job.key in self.in_flight:
            del self.in_flight[job.key]
            self.next_handle += 1
            self.run(self.retrier.retry_created(job.key, b"H:%d" % self.next_handle))
            self.retry_handles[b"H:%d" % self.next_handle] = job.key
        elif job.state is State.RUNNING:
            assert job.retry_handle is not None
            del self.retry_handles[job.retry_handle]
            args = {"handle": job.retry_handle, "data": b"RETRY: again"}
            self.run(self.retrier.retry_packet("route", P.WORK_EXCEPTION, args, self.now))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), refuse=st.booleans())
    def gearmand_answers_a_submission(self, data: st.DataObject, refuse: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.in_flight)))
        del self.in_flight[key]
        if refuse:
            self.run(self.retrier.retry_rejected(key, b"QUEUE_ERROR", self.now))
        else:
            self.next_handle += 1
            handle = b"H:%d" % self.next_handle
            self.run(self.retrier.retry_created(key, handle))
            if self.retrier.held.get(key) is not None and self.retrier.held[key].retry_handle == handle:
                self.retry_handles[handle] = key

    @precondition(lambda self: self.retry_handles)
    @rule(data=st.data(), outcome=st.sampled_from(["complete", "retry", "fatal", "fail", "disconnected", "data"]))
    def a_retry_job_reports(self, data: st.DataObject, outcome: str) -> None:
        handle = data.draw(st.sampled_from(sorted(self.retry_handles)))
        ptype, payload = {
            "complete": (P.WORK_COMPLETE, b"ok"), "retry": (P.WORK_EXCEPTION, b"RETRY: again"),
            "fatal": (P.WORK_EXCEPTION, b"FATAL: no"), "fail": (P.WORK_FAIL, b""),
            "disconnected": (P.WORK_EXCEPTION, DISCONNECTED), "data": (P.WORK_DATA, b"d"),
        }[outcome]
        args = {"handle": handle} if ptype is P.WORK_FAIL else {"handle": handle, "data": payload}
        if ptype is not P.WORK_DATA:
            del self.retry_handles[handle]
        self.run(self.retrier.retry_packet("route", ptype, args, self.now))

    @rule(data=st.data())
    def the_retry_connection_breaks(self, data: st.DataObject) -> None:
        lost = set(data.draw(st.lists(st.sampled_from(sorted(self.in_flight)), unique=True))) if self.in_flight else set()
        for key in lost:
            del self.in_flight[key]
        self.retry_handles.clear()
        self.run(self.submit_counted(self.retrier.retry_connection_lost("route", lost, self.now), resubmission=True))

    @rule(owner=st.sampled_from(OWNERS))
    def an_owner_connection_is_lost(self, owner: str) -> None:
        for job in self.retrier.held.values():
            if job.owner == owner:
                self.finals[job.handle] += 1  # gearmand requeues it: it ends there, not here
        self.run(self.retrier.owner_lost(owner))

    @precondition(lambda self: self.retrier.held)
    @rule(data=st.data())
    def gearmand_takes_a_held_job_back_and_assigns_it_again(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(sorted(self.retrier.held.values(), key=lambda j: j.key)))
        self.finals[job.handle] += 1  # the hold is over; the job runs on as gearmand decided
        self.run(self.retrier.job_assigned("route", job.handle, job.function, False, self.now))
        self.deposits.append((self.now, job.function))
        self.finals[job.handle] = 0  # a new life for that handle

    # -- invariants

    @invariant()
    def bookkeeping_agrees_with_itself(self) -> None:
        r = self.retrier
        held = r.held.values()
        assert r.held_per_function == Counter(job.function for job in held)
        assert {owner: keys for owner, keys in r.jobs.by_owner.items()} == {
            owner: {job.key for job in held if job.owner == owner} for owner in {job.owner for job in held}
        }
        assert r.jobs.by_handle == {(job.route, job.handle): job.key for job in held}
        assert r.jobs.by_retry_handle == {
            (job.route, job.retry_handle): job.key for job in held if job.retry_handle is not None
        }
        for job in held:
            assert 1 <= job.attempt <= POLICY.max_attempts
            assert (job.retry_handle is not None) == (job.state is State.RUNNING)
            assert job.state is not State.PAUSED or job.function in r.paused  # (none is, here)
            assert r.held_per_function[job.function] <= POLICY.max_held

    @invariant()
    def every_state_change_is_a_move_of_the_table(self) -> None:
        """Replayed from where the last step left them, the moves recorded in this step
        are the table's and lead to the states the jobs are in now: no state changed
        without a move, and no move went elsewhere than the table says."""
        expected: dict[int, State | None] = dict(self.states)
        for key, source, event, target in self.moves:
            assert expected.get(key) == source, f"job {key} moved from {source}, but was {expected.get(key)}"
            assert (source, event) in TRANSITIONS and TRANSITIONS[source, event] == target, (key, source, event, target)
            expected[key] = target
        now = {key: job.state for key, job in self.retrier.held.items()}
        assert {key: state for key, state in expected.items() if state is not None} == now
        self.states, self.moves = now, []

    @invariant()
    def no_job_is_stuck(self) -> None:
        r = self.retrier
        wakeups = {(t.action.key, t.action.wait) for t in self.timers if type(t.action) is Wakeup}
        rechecks = {t.action.function for t in self.timers if type(t.action) is RecheckBudget}
        assert set(r.budgets.lines) == rechecks
        for job in r.held.values():
            if job.state in (State.WAITING, State.DEFERRED):
                assert (job.key, job.wait) in wakeups, f"job {job.key} waits with no timer"
            if job.state is State.DEFERRED:
                assert job.key in r.budgets.deferred(job.function)

    @invariant()
    def retries_stay_within_the_budget(self) -> None:
        span = POLICY.budget_ttl * (SLICES - 1) / SLICES
        floor = POLICY.budget_min_per_second * POLICY.budget_ttl
        for function in FUNCTIONS:
            taken = [t for t, f in self.withdrawals if f == function]
            earned = [t for t, f in self.deposits if f == function]
            for start in taken:
                inside = sum(1 for t in taken if start <= t <= start + span)
                deposits = sum(1 for t in earned if start - POLICY.budget_ttl <= t <= start + span)
                assert inside <= floor + POLICY.budget_ratio * deposits + 1e-6


TestRetrier = RetrierMachine.TestCase
TestRetrier.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
