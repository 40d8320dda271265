"""The retry state machine: events in, actions out (the policy it follows is in policy.py).

Pure: no sockets, no clock (every event that needs the time carries `now`), randomness
injected. The trio layer feeds events (a worker's failure, a timer, a reply on a
retry-client connection, a lost connection, a job assigned) and executes the actions this
returns.

A held job ("hold and shadow", see the README): the worker's failure of the original job H1
is not forwarded, so H1 stays assigned to its upstream connection; after a backoff a retry
job H2 is submitted (same function and payload, a unique id that marks it as a retry), and
H2's updates and outcome are replayed on H1's connection as H1's. Only the last failure, or
a non-retryable one, reaches gearmand as H1's failure.

A held job moves through WAITING (its backoff) -> [DEFERRED (the function's retry budget
is spent)] -> SUBMITTING -> RUNNING, and back to WAITING when the retry fails retryably.
Every wait is bounded by `max_hold_time`, and a function never holds more than `max_held`.
"""

from __future__ import annotations

import enum
import logging
import random
from collections import Counter
from collections.abc import Collection, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from .budget import Budgets
from .deadlines import deadline_passed
from .jobs import Payload, TrackedJob
from .metrics import Metrics
from .outcomes import Job, Outcomes, final_exception, instead
from .policy import (
    DISCONNECTED,
    TIMED_OUT,
    FinalException,
    GiveUp,
    Mode,
    OnDisconnect,
    Policies,
    Reason,
    RetryPolicy,
    Verdict,
    classify,
)
from .protocol import REQ, PacketType, build_packet, text
from .uniques import retry_tag, retry_unique

OwnerT = TypeVar("OwnerT", bound=Hashable)
"""Who owns a held job: in gproxy the upstream connection (session.UpstreamLink) it came on."""
RouteT = TypeVar("RouteT", bound=Hashable)
"""Where retries are submitted: in gproxy a config.Route."""

log = logging.getLogger("gproxy.retry")
P = PacketType
# The state machine --------------------------------------------------------------------------


class State(enum.Enum):
    WAITING = "waiting"  # backoff timer running
    DEFERRED = "deferred"  # backoff over, waiting for the function's retry budget
    SUBMITTING = "submitting"  # SUBMIT_JOB queued or sent, JOB_CREATED not yet seen
    RUNNING = "running"  # retry job H2 exists in gearmand
    PAUSED = "paused"  # backoff over, its function's retries paused by an operator


@dataclass(slots=True)
class HeldJob(Generic[OwnerT, RouteT]):
    key: int
    owner: OwnerT
    """The upstream connection that owns H1: only it can finish H1."""
    route: RouteT
    """Where retries are submitted: the gearmand that H1 lives in."""
    handle: bytes
    function: bytes
    unique: bytes
    payload: Payload
    policy: RetryPolicy
    started_at: float
    exception_ends_job: bool = True
    """False on a server where WORK_EXCEPTION does not end a job (the Perl Gearman::Server):
    giving up there sends WORK_FAIL after the exception."""
    attempt: int = 1
    """Attempts made so far, the original included."""
    resubmitted: int = 0
    """Submissions lost with a connection before gearmand acknowledged them: each is sent
    again under a new unique id, without counting as an attempt."""
    state: State = State.WAITING
    retry_handle: bytes | None = None
    last_failure: tuple[PacketType, bytes] = (P.WORK_FAIL, b"")
    wait: int = 0
    """Which wait this is (one per failure), so a timer of an earlier wait does nothing."""
    deadline: float = 0.0
    """When the current wait runs out of max_hold_time."""
    next_attempt_at: float | None = None
    """When the backoff ends (while WAITING)."""


@dataclass(frozen=True, slots=True)
class Wakeup:
    """Call `timer_fired(key, wait, now)` after `delay` seconds."""

    key: int
    delay: float
    wait: int = 0


@dataclass(frozen=True, slots=True)
class RecheckBudget:
    """Call `budget_recheck(function, now)` after `delay` seconds."""

    function: bytes
    delay: float


@dataclass(frozen=True, slots=True)
class Submit(Generic[RouteT]):
    """Submit a job on the route's retry-client connection; `key` None: a dead letter, in
    the background, no reply wanted."""

    route: RouteT
    key: int | None
    function: bytes
    unique: bytes
    payload: Payload
    type: PacketType = P.SUBMIT_JOB


@dataclass(slots=True)
class SendUpstream(Generic[OwnerT]):
    """Packets for H1 on the connection that owns it. (Not frozen: one is made for nearly
    every read a worker's connection gets, and a frozen dataclass costs 3x to make.)"""

    owner: OwnerT
    data: bytes


@dataclass(frozen=True, slots=True)
class Released(Generic[OwnerT]):
    """The owner connection holds nothing more for us (it may close if its worker left)."""

    owner: OwnerT


Action = SendUpstream[OwnerT] | Released[OwnerT] | Submit[RouteT] | Wakeup | RecheckBudget
"""`Action[OwnerT, RouteT]`: what the caller of a Retrier executes."""


@dataclass(frozen=True, slots=True)
class Decision(Generic[OwnerT, RouteT]):
    """What happens to a worker's failure: held (not forwarded), or forwarded; `actions`
    either way (a forwarded failure may still be dead-lettered). `instead`: what is
    forwarded in the failure's place (a final exception as its function's final_exception
    says), None for the failure as the worker sent it."""

    held: bool
    actions: list[Action[OwnerT, RouteT]] = field(default_factory=list)
    instead: bytes | None = None


_RELAYED: Final = {P.WORK_DATA, P.WORK_WARNING, P.WORK_STATUS}
_LOST: Final = {Reason.DISCONNECT: "its worker vanished", Reason.TIMEOUT: "it ran past its timeout"}


class Retrier(Generic[OwnerT, RouteT]):
    """Every held job of the process. Each method takes an event and returns the actions."""

    def __init__(
        self,
        policies: Policies,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        tag: bytes | None = None,
    ) -> None:
        self.policies = policies
        self.rng = rng or random.Random()
        self.tag = retry_tag(self.rng) if tag is None else tag
        """In every retry unique this Retrier submits (see retry_unique)."""
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.held = lambda: self._held_per_function
        self.outcomes = Outcomes(self.metrics)
        self.held: dict[int, HeldJob[OwnerT, RouteT]] = {}
        self._by_handle: dict[tuple[RouteT, bytes], int] = {}
        self._by_retry_handle: dict[tuple[RouteT, bytes], int] = {}
        self._by_owner: dict[OwnerT, set[int]] = {}
        self._held_per_function: Counter[bytes] = Counter()
        self.budgets = Budgets(policies)
        """The retry budgets, and the jobs deferred for them."""
        self._next_key = 0
        self.paused: set[bytes] = set()
        """Functions whose retries an operator paused."""

    # -- queries

    def holds(self, owner: OwnerT, function: bytes | None = None) -> bool:
        """Does `owner` hold jobs for us (of `function`, if given)?"""
        keys = self._by_owner.get(owner)
        if not keys:
            return False
        return function is None or any(self.held[key].function == function for key in keys)

    def holder(self, route: RouteT, handle: bytes) -> OwnerT | None:
        """The connection that holds `handle` for a retry, if we hold it."""
        key = self._by_handle.get((route, handle))
        return None if key is None else self.held[key].owner

    def owners(self, key: int | None = None, function: bytes | None = None) -> list[OwnerT]:
        """Who a timer concerns: the owner of held job `key`, or of the jobs deferred for
        `function`'s budget. (Should handling it fail, these are the connections to close:
        gearmand requeues what they own.)"""
        keys = [key] if key is not None else list(self.budgets.deferred(function or b""))
        return list(dict.fromkeys(self.held[k].owner for k in keys if k in self.held))

    @property
    def holding(self) -> int:
        """Jobs held now."""
        return len(self.held)

    def describe(self, key: int) -> str:
        """Held job `key` as a log line names it."""
        job = self.held.get(key)
        return f"held job {key}" if job is None else f"{text(job.function)} {text(job.handle)}"

    def is_retry_handle(self, route: RouteT, handle: bytes) -> bool:
        """Is `handle` a retry job this process submitted? (How retries are recognised on a
        server that cannot tell a worker the unique id.)"""
        return (route, handle) in self._by_retry_handle

    def submitting(self, key: int) -> bool:
        """Is a submission for `key` still wanted? (Not if the job ended meanwhile.)"""
        job = self.held.get(key)
        return job is not None and job.state is State.SUBMITTING

    def budget_balances(self, now: float, functions: Iterable[bytes]) -> dict[bytes, float]:
        """The balance of each of `functions` (a gauge): what its budget allows now."""
        return self.budgets.balances(now, functions)

    # -- events

    def job_assigned(
        self, route: RouteT, handle: bytes, function: bytes, is_retry: bool, now: float
    ) -> list[Action[OwnerT, RouteT]]:
        """gearmand assigned a job to a worker behind us. A first attempt earns its function
        retries. A handle we hold means gearmand took the job back behind our back (a
        CAN_DO_TIMEOUT fired): that hold is over; its retry, if one runs, finishes nothing."""
        actions: list[Action[OwnerT, RouteT]] = []
        key = self._by_handle.get((route, handle))
        if key is not None:
            job = self.held[key]
            log.warning(
                "gearmand assigned held job %s %s again (it took the job back, e.g. a "
                "CAN_DO_TIMEOUT fired): the hold ends, the job runs as gearmand decided",
                text(job.function), text(handle),
            )
            actions = self._release(job)
        budget = self.budgets.budget(function, now)
        if not is_retry:
            budget.deposit(now)
        return actions

    def worker_failed(
        self,
        *,
        owner: OwnerT,
        route: RouteT,
        job: TrackedJob,
        ptype: PacketType,
        failure: bytes,
        now: float,
        exception_ends_job: bool = True,
    ) -> Decision[OwnerT, RouteT]:
        """A worker failed an original job: hold it for a retry, or let the failure pass."""
        function, handle = job.function, job.handle
        policy = self.policies.for_function(function)
        verdict = classify(policy, ptype, failure)

        def forwarded(actions: list[Action[OwnerT, RouteT]]) -> Decision[OwnerT, RouteT]:
            if ptype is not P.WORK_EXCEPTION or policy.final_exception is FinalException.EXCEPTION:
                return Decision(False, actions)
            return Decision(False, actions, instead(policy, function, handle, failure))

        if verdict is None:
            return forwarded([])
        name = text(function)
        if policy.mode is Mode.OBSERVE:
            log.info("observe: would retry %s %s (%s)", name, text(handle), verdict.reason.value)
            self.metrics.count(self.metrics.observed, function)
            return forwarded([])
        if policy.max_attempts <= 1:
            log.info("retry exhausted: %s %s after 1 attempt, failure forwarded", name, text(handle))
            self.metrics.count(self.metrics.exhausted, function)
            return forwarded(self._dead_letter(route, policy, job, (ptype, failure)))
        if self._held_per_function[function] >= policy.max_held:
            self.metrics.count(self.metrics.cap_rejections, function, GiveUp.MAX_HELD.value)
            log.warning(
                "%s already holds %d jobs (max_held): %s failure forwarded",
                name, policy.max_held, text(handle),
            )
            return forwarded(self._dead_letter(route, policy, job, (ptype, failure)))
        held = self._hold(owner, route, job, verdict, now, (ptype, failure), exception_ends_job)
        return Decision(True, held)

    def final_exception(self, function: bytes, handle: bytes, failure: bytes, exception_ends_job: bool) -> bytes:
        """What ends a job of `function` with the exception `failure` (gproxy's own: a job
        too large to hand over), as the function's final_exception says."""
        return final_exception(self.policies.for_function(function), function, handle, failure, exception_ends_job)

    def retries_disconnects(self, function: bytes) -> bool:
        """Is a job of `function` whose worker vanishes retried as a failure (on_disconnect
        = "retry", enforced), rather than requeued by gearmand?"""
        policy = self.policies.for_function(function)
        return policy.on_disconnect is OnDisconnect.RETRY and policy.mode is Mode.ENFORCE

    def disconnects_observed(self, running: Iterable[TrackedJob]) -> None:
        """The worker left jobs running that gearmand requeues: counted as observed where
        on_disconnect = "retry" is only observed."""
        for job in running:
            policy = self.policies.for_function(job.function)
            if policy.on_disconnect is OnDisconnect.RETRY and policy.mode is Mode.OBSERVE and not job.is_retry:
                log.info("observe: would retry %s %s (disconnect)", text(job.function), text(job.handle))
                self.metrics.count(self.metrics.observed, job.function)

    def worker_left(
        self, owner: OwnerT, route: RouteT, running: list[TrackedJob], now: float, ran: bool = True
    ) -> list[Action[OwnerT, RouteT]]:
        """The worker of `owner` disconnected while `owner` stays open (it holds retries for
        us, or runs jobs whose function retries disconnects), so gearmand cannot requeue the
        original jobs the worker was still running there. A function that retries
        disconnects gets a retryable failure (backoff, attempts, dead letter); any other job
        is retried here at once instead, as gearmand would have requeued it (so is every
        job if `ran` is False: assigned after the worker left, it never ran)."""
        actions: list[Action[OwnerT, RouteT]] = []
        for job in running:
            policy = self.policies.for_function(job.function)
            if ran and self.retries_disconnects(job.function):
                actions += self._disconnected(owner, route, job, policy, now)
                continue
            if self._held_per_function[job.function] < policy.max_held:
                actions += self._hold(owner, route, job, Verdict(Reason.DISCONNECT, 0.0), now)
                continue
            self.metrics.count(self.metrics.cap_rejections, job.function, GiveUp.MAX_HELD.value)
            self.metrics.job_ended(job.function, "fail", now - job.started_at)
            log.warning(
                "%s already holds %d jobs (max_held): %s, whose worker left, fails",
                text(job.function), policy.max_held, text(job.handle),
            )
            actions += self._dead_letter(route, policy, job, (P.WORK_FAIL, b"gproxy: its worker left"))
            actions.append(SendUpstream(owner, build_packet(REQ, P.WORK_FAIL, handle=job.handle)))
        return actions

    def worker_timed_out(
        self, owner: OwnerT, route: RouteT, job: TrackedJob, now: float
    ) -> list[Action[OwnerT, RouteT]] | None:
        """An original ran past its function's timeout: a retryable failure (reason
        timeout; the worker's late result is the caller's to drop). None in observe mode:
        only counted, and the attempt runs on."""
        policy = self.policies.for_function(job.function)
        if policy.mode is Mode.OBSERVE:
            log.info("observe: would retry %s %s (timeout)", text(job.function), text(job.handle))
            self.metrics.count(self.metrics.observed, job.function)
            return None
        return self._attempt_lost(owner, route, job, policy, now, Reason.TIMEOUT)

    def _disconnected(
        self, owner: OwnerT, route: RouteT, job: TrackedJob, policy: RetryPolicy, now: float
    ) -> list[Action[OwnerT, RouteT]]:
        """An original whose worker vanished, of a function that retries disconnects: a
        failure like a retryable WORK_FAIL (a poison job that kills its workers runs
        max_attempts times with backoff, then goes to the dead letter)."""
        return self._attempt_lost(owner, route, job, policy, now, Reason.DISCONNECT)

    def _attempt_lost(
        self, owner: OwnerT, route: RouteT, job: TrackedJob, policy: RetryPolicy, now: float, reason: Reason
    ) -> list[Action[OwnerT, RouteT]]:
        """An attempt that ended with no result of the worker's (it vanished, or ran out of
        time): held for a retry with backoff; with no attempt or room left, failed (a
        WORK_FAIL, as gearmand's --job-retries would end it) and dead-lettered."""
        name, why = text(job.function), _LOST[reason]
        if policy.max_attempts > 1 and self._held_per_function[job.function] < policy.max_held:
            return self._hold(owner, route, job, Verdict(reason), now)
        if policy.max_attempts <= 1:
            self.metrics.count(self.metrics.exhausted, job.function)
            log.warning("retry exhausted: %s %s after 1 attempt (%s), failed", name, text(job.handle), why)
        else:
            self.metrics.count(self.metrics.cap_rejections, job.function, GiveUp.MAX_HELD.value)
            log.warning("%s already holds %d jobs (max_held): %s (%s) fails", name, policy.max_held, text(job.handle), why)
        self.metrics.job_ended(job.function, "fail", now - job.started_at)
        lost = (P.WORK_FAIL, b"gproxy: " + why.encode())
        return [*self._dead_letter(route, policy, job, lost), SendUpstream(owner, build_packet(REQ, P.WORK_FAIL, handle=job.handle))]

    def timer_fired(self, key: int, wait: int, now: float) -> list[Action[OwnerT, RouteT]]:
        job = self.held.get(key)
        if job is None or job.wait != wait:
            return []
        if job.state is State.WAITING:
            if deadline_passed(job.deadline, now):
                return self._give_up(job, now, GiveUp.MAX_HOLD_TIME)
            return self._submit_or_defer(job, now)
        if job.state is State.DEFERRED or job.state is State.PAUSED:
            if deadline_passed(job.deadline, now):
                return self._give_up(job, now, GiveUp.MAX_HOLD_TIME)
            return [Wakeup(job.key, job.deadline - now, job.wait)]  # woken early: again
        return []

    # -- an operator's hand (the admin endpoint)

    def retry_now(self, key: int, now: float) -> list[Action[OwnerT, RouteT]] | None:
        """Held job `key` is retried now, whatever its backoff, budget or pause; None if it
        is not waiting (unknown, or its retry is under way already)."""
        job = self.held.get(key)
        if job is None or job.state not in (State.WAITING, State.DEFERRED, State.PAUSED):
            return None
        job.next_attempt_at = None  # (its timers find it under way, and do nothing)
        log.warning(
            "operator: retrying %s %s now, attempt %d of %d",
            text(job.function), text(job.handle), job.attempt + 1, job.policy.max_attempts,
        )
        return [self._submit(job)]  # (a deferred queue skips a job that is no longer DEFERRED)

    def give_up_now(self, key: int, now: float) -> list[Action[OwnerT, RouteT]] | None:
        """Held job `key` gets its last failure now (and is dead-lettered, if configured);
        None if it is not held."""
        job = self.held.get(key)
        if job is None:
            return None
        log.warning(
            "operator: giving up %s %s after %d attempts; its last failure is forwarded",
            text(job.function), text(job.handle), job.attempt,
        )
        return self._give_up(job, now, GiveUp.OPERATOR)

    def pause(self, function: bytes) -> None:
        """No retry of `function` starts until resume() (held jobs wait, up to max_hold_time)."""
        if function not in self.paused:
            self.paused.add(function)
            log.warning("operator: retries of %s paused", text(function))

    def resume(self, function: bytes, now: float) -> list[Action[OwnerT, RouteT]]:
        """Retries of `function` go on: those paused are submitted, oldest first, as the
        budget allows."""
        if function not in self.paused:
            return []
        self.paused.discard(function)
        waiting = sorted((job for job in self.held.values() if job.function == function and job.state is State.PAUSED),
                         key=lambda job: job.key)
        log.warning("operator: retries of %s resumed (%d paused jobs go on)", text(function), len(waiting))
        actions: list[Action[OwnerT, RouteT]] = []
        for job in waiting:
            actions += self._submit_or_defer(job, now)
        return actions

    def budget_recheck(self, function: bytes, now: float) -> list[Action[OwnerT, RouteT]]:
        """Submit the deferred retries of `function` that its budget allows now, oldest first."""
        if not self.budgets.deferred(function):
            return []
        if function in self.paused:  # they wait for resume() instead (their deadlines stand)
            for key in self.budgets.drop(function):
                if (job := self.held.get(key)) is not None and job.state is State.DEFERRED:
                    job.state = State.PAUSED
            return []
        actions: list[Action[OwnerT, RouteT]] = []

        def waits(key: int) -> bool:
            """Is job `key` still deferred? (One past its deadline is given up.)"""
            job = self.held.get(key)
            if job is None or job.state is not State.DEFERRED:
                return False  # ended meanwhile
            if deadline_passed(job.deadline, now):
                actions.extend(self._give_up(job, now, GiveUp.MAX_HOLD_TIME))
                return False
            return True

        delay = self.budgets.recheck(function, now, waits, lambda key: actions.append(self._submit(self.held[key])))
        if delay is not None:
            actions.append(RecheckBudget(function, delay))
        return actions

    def retry_created(self, key: int, retry_handle: bytes) -> list[Action[OwnerT, RouteT]]:
        job = self.held.get(key)
        if job is None or job.state is not State.SUBMITTING:
            return []
        job.state, job.retry_handle = State.RUNNING, retry_handle
        self._by_retry_handle[(job.route, retry_handle)] = key
        return []

    def retry_rejected(self, key: int, error: bytes, now: float) -> list[Action[OwnerT, RouteT]]:
        """gearmand answered the retry's submission with ERROR (e.g. a full queue): a real
        refusal, so the job gets its last failure."""
        job = self.held.get(key)
        if job is None or job.state is not State.SUBMITTING:
            return []
        log.warning(
            "retry of %s %s refused by gearmand (%s): last failure forwarded",
            text(job.function), text(job.handle), text(error),
        )
        return self._give_up(job, now, GiveUp.REFUSED)

    def retry_packet(
        self, route: RouteT, ptype: PacketType, args: dict[str, bytes], now: float
    ) -> list[Action[OwnerT, RouteT]]:
        """A packet for a retry job H2, seen on the retry-client connection."""
        key = self._by_retry_handle.get((route, args.get("handle", b"")))
        job = self.held.get(key) if key is not None else None
        if job is None:
            return []
        if ptype in _RELAYED:
            return [SendUpstream(job.owner, _for_handle(ptype, job.handle, args))]
        if ptype is P.WORK_COMPLETE:
            log.info(
                "retry succeeded: %s %s on attempt %d",
                text(job.function), text(job.handle), job.attempt,
            )
            self.metrics.job_ended(job.function, "complete", now - job.started_at)
            return self._finish(job, _for_handle(ptype, job.handle, args))
        if ptype not in (P.WORK_FAIL, P.WORK_EXCEPTION):
            return []
        failure = args.get("data", b"")
        del self._by_retry_handle[(job.route, args["handle"])]
        job.retry_handle = None
        if ptype is P.WORK_EXCEPTION and failure == DISCONNECTED:
            # The retry's worker vanished: at once, as gearmand would requeue it, unless
            # the function retries disconnects as failures (with backoff).
            retried = job.policy.on_disconnect is OnDisconnect.RETRY
            verdict: Verdict | None = Verdict(Reason.DISCONNECT, None if retried else 0.0)
            job.last_failure = (P.WORK_FAIL, b"")  # as gearmand's --job-retries would end it
        elif ptype is P.WORK_EXCEPTION and failure == TIMED_OUT:
            verdict = Verdict(Reason.TIMEOUT)  # it ran past its timeout behind a gproxy
            job.last_failure = (P.WORK_FAIL, b"")
        else:
            verdict = classify(job.policy, ptype, failure)
            job.last_failure = (ptype, failure)
        if verdict is None:
            log.info(
                "retry failed for good: %s %s on attempt %d (not retryable), forwarded",
                text(job.function), text(job.handle), job.attempt,
            )
            return self._give_up(job, now, GiveUp.FINAL)
        if job.attempt >= job.policy.max_attempts:
            return self._give_up(job, now, GiveUp.EXHAUSTED)
        return self._schedule(job, verdict, now)

    def retry_failed_for_good(self, route: RouteT, retry_handle: bytes, reason: bytes, now: float) -> list[Action[OwnerT, RouteT]]:
        """A retry job went wrong in a way no further attempt would mend (its result is too
        large to relay): the original gets `reason` as a final exception."""
        key = self._by_retry_handle.get((route, retry_handle))
        job = self.held.get(key) if key is not None else None
        if job is None:
            return []
        log.warning("retry of %s %s failed for good: %s", text(job.function), text(job.handle), text(reason))
        job.last_failure = (P.WORK_EXCEPTION, reason)
        return self._give_up(job, now, GiveUp.FINAL)

    def retry_connection_lost(self, route: RouteT, in_flight: Collection[int], now: float) -> list[Action[OwnerT, RouteT]]:
        """The retry-client connection to `route` broke with the submissions `in_flight`
        unanswered. gearmand abandons the retry jobs of that connection (a queued one is
        dropped when a worker would take it, even if a new client attached to its unique id
        meanwhile), so each is submitted again with a new unique id: a retry job gearmand
        had created counts as an attempt (it may have run), and one with no attempt left is
        given up; an unanswered submission is simply sent again. Submissions not yet sent
        are not affected."""
        actions: list[Action[OwnerT, RouteT]] = []
        lost = [
            job for job in self.held.values()
            if job.route == route
            and (job.state is State.RUNNING or (job.state is State.SUBMITTING and job.key in in_flight))
        ]
        for job in lost:
            if job.state is State.SUBMITTING:  # never acknowledged: perhaps never arrived
                job.resubmitted += 1
                actions.append(self._submission(job))
                continue
            if job.retry_handle is not None:  # the retry job existed, and may have run
                del self._by_retry_handle[(job.route, job.retry_handle)]
                job.retry_handle = None
            if job.attempt >= job.policy.max_attempts:
                actions += self._give_up(job, now, GiveUp.EXHAUSTED)
                continue
            log.info(
                "retry connection lost: resubmitting %s %s as attempt %d of %d",
                text(job.function), text(job.handle), job.attempt + 1, job.policy.max_attempts,
            )
            actions.append(self._submit(job))
        return actions

    def owner_lost(self, owner: OwnerT) -> list[Action[OwnerT, RouteT]]:
        """H1's connection is gone, so gearmand has requeued H1: our retries have no job to
        finish any more. Dropped; whatever runs of them still finishes unseen."""
        for key in list(self._by_owner.get(owner, ())):
            job = self.held[key]
            log.warning(
                "connection holding %s %s lost: gearmand requeues it, retry abandoned",
                text(job.function), text(job.handle),
            )
            self._forget(job)
        return []

    # -- internals

    def _hold(
        self,
        owner: OwnerT,
        route: RouteT,
        tracked: TrackedJob,
        verdict: Verdict,
        now: float,
        last_failure: tuple[PacketType, bytes] = (P.WORK_FAIL, b""),
        exception_ends_job: bool = True,
    ) -> list[Action[OwnerT, RouteT]]:
        self._next_key += 1
        job = HeldJob(
            key=self._next_key, owner=owner, route=route, handle=tracked.handle,
            function=tracked.function, unique=tracked.unique, payload=tracked.payload,
            policy=self.policies.for_function(tracked.function), started_at=tracked.started_at,
            exception_ends_job=exception_ends_job, last_failure=last_failure,
        )
        self.held[job.key] = job
        self._by_handle[(route, job.handle)] = job.key
        self._by_owner.setdefault(owner, set()).add(job.key)
        self._held_per_function[job.function] += 1
        self.metrics.job_outcome(job.function, "retried")
        return self._schedule(job, verdict, now)

    def _schedule(self, job: HeldJob[OwnerT, RouteT], verdict: Verdict, now: float) -> list[Action[OwnerT, RouteT]]:
        delay = job.policy.delay(verdict, job.attempt, self.rng)
        job.state, job.retry_handle = State.WAITING, None
        job.wait += 1
        job.deadline = now + job.policy.max_hold_time
        job.next_attempt_at = now + delay
        self.metrics.count(self.metrics.retries, job.function, verdict.reason.value)
        log.info(
            "retrying %s %s: attempt %d of %d in %.2fs (%s)",
            text(job.function), text(job.handle), job.attempt + 1, job.policy.max_attempts,
            delay, verdict.reason.value,
        )
        # A backoff that ends after the deadline wakes at the deadline, to give up.
        return [Wakeup(job.key, min(delay, job.policy.max_hold_time), job.wait)]

    def _submit_or_defer(self, job: HeldJob[OwnerT, RouteT], now: float) -> list[Action[OwnerT, RouteT]]:
        """The backoff is over: submit the retry if the budget allows it and no older retry
        of the function is waiting for the budget; else wait for the budget, in line."""
        job.next_attempt_at = None
        if job.function in self.paused:
            job.state = State.PAUSED  # until resume(), or max_hold_time
            return [Wakeup(job.key, job.deadline - now, job.wait)]
        if self.budgets.withdraw(job.function, now):
            return [self._submit(job)]
        job.state = State.DEFERRED
        self.metrics.count(self.metrics.deferred, job.function)
        log.info(
            "retry of %s %s deferred: the retry budget of %s is spent",
            text(job.function), text(job.handle), text(job.function),
        )
        actions: list[Action[OwnerT, RouteT]] = [Wakeup(job.key, job.deadline - now, job.wait)]
        if (delay := self.budgets.defer(job.function, job.key, now)) is not None:
            actions.append(RecheckBudget(job.function, delay))
        return actions

    def _submit(self, job: HeldJob[OwnerT, RouteT]) -> Submit[RouteT]:
        job.attempt += 1
        job.state = State.SUBMITTING
        return self._submission(job)

    def _submission(self, job: HeldJob[OwnerT, RouteT]) -> Submit[RouteT]:
        """The retry's SUBMIT_JOB. Its unique id is never used twice: gearmand would attach
        a new submission to an abandoned retry job, which it drops unrun."""
        unique = retry_unique(job.unique, job.handle, job.attempt + job.resubmitted, self.tag)
        return Submit(
            job.route, job.key, job.function, unique, job.payload, job.policy.retry_priority.submit_type
        )

    def _give_up(self, job: HeldJob[OwnerT, RouteT], now: float, why: GiveUp) -> list[Action[OwnerT, RouteT]]:
        packet = self.outcomes.given_up(job, now, why)
        dead_letter = [] if why is GiveUp.FINAL else self._dead_letter(job.route, job.policy, job, job.last_failure, job.attempt)
        return dead_letter + self._finish(job, packet)

    def _dead_letter(
        self, route: RouteT, policy: RetryPolicy, job: Job, failure: tuple[PacketType, bytes], attempts: int = 1
    ) -> list[Action[OwnerT, RouteT]]:
        """The job, in the dead-letter envelope, to the function's dead letter (if any)."""
        letter = self.outcomes.dead_letter(policy, job, attempts, failure)
        if letter is None:
            return []
        return [Submit(route, None, letter.function, letter.unique, letter.payload, P.SUBMIT_JOB_BG)]

    def _finish(self, job: HeldJob[OwnerT, RouteT], packet: bytes) -> list[Action[OwnerT, RouteT]]:
        return [SendUpstream(job.owner, packet), *self._release(job)]

    def _release(self, job: HeldJob[OwnerT, RouteT]) -> list[Action[OwnerT, RouteT]]:
        self._forget(job)
        return [] if self.holds(job.owner) else [Released(job.owner)]

    def _forget(self, job: HeldJob[OwnerT, RouteT]) -> None:
        del self.held[job.key]
        if self._by_handle.get((job.route, job.handle)) == job.key:
            del self._by_handle[(job.route, job.handle)]
        if job.retry_handle is not None:
            self._by_retry_handle.pop((job.route, job.retry_handle), None)
        owned = self._by_owner[job.owner]
        owned.discard(job.key)
        if not owned:
            del self._by_owner[job.owner]
        self._held_per_function[job.function] -= 1
        if not self._held_per_function[job.function]:
            del self._held_per_function[job.function]


def _for_handle(ptype: PacketType, handle: bytes, args: dict[str, bytes]) -> bytes:
    """The same packet, about H1 instead of H2, as the worker of H1 would have sent it."""
    return build_packet(REQ, ptype, **{**args, "handle": handle})

