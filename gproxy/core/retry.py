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
Every move is in TRANSITIONS, and HeldJobs.move, the only way a held job changes state,
refuses any other. The table, by state (`-`: not held, before the hold and after it;
`any`: every held state; the events are Event's):

    -           failed -> WAITING
    WAITING     budget granted, operator retry -> SUBMITTING | budget spent -> DEFERRED | paused -> PAUSED | deadline passed -> -
    DEFERRED    budget granted, operator retry -> SUBMITTING | paused -> PAUSED | deadline passed -> -
    PAUSED      budget granted, operator retry -> SUBMITTING | budget spent -> DEFERRED | deadline passed -> -
    SUBMITTING  created -> RUNNING | connection lost -> SUBMITTING | refused -> -
    RUNNING     failed -> WAITING | connection lost -> SUBMITTING | succeeded, failed for good, exhausted -> -
    any         operator give-up, owner lost, reassigned -> -
"""

from __future__ import annotations

import enum
import logging
import random
from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Generic, TypeVar

from .budget import Budgets
from .deadlines import deadline_passed
from .fields import about, about_job
from .intake import Ending, Intake
from .jobs import Payload, TrackedJob
from .metrics import Metrics
from .outcomes import Letter, Outcomes, final_exception
from .policy import GiveUp, Policies, RetryPolicy, Verdict, classify_retry
from .protocol import REQ, PacketType, build_packet, text
from .uniques import retry_tag, retry_unique

OwnerT = TypeVar("OwnerT", bound=Hashable)
"""Who owns a held job: in gproxy the upstream connection (session.UpstreamLink) it came on."""
RouteT = TypeVar("RouteT", bound=Hashable)
"""Where retries are submitted: in gproxy a config.Route."""

log = logging.getLogger("gproxy.retry")
P = PacketType


# The state machine: its states, what happens to a held job, the table -------------------------


class State(enum.Enum):
    WAITING = "waiting"  # backoff timer running
    DEFERRED = "deferred"  # backoff over, waiting for the function's retry budget
    SUBMITTING = "submitting"  # SUBMIT_JOB queued or sent, JOB_CREATED not yet seen
    RUNNING = "running"  # retry job H2 exists in gearmand
    PAUSED = "paused"  # backoff over, its function's retries paused by an operator


class Event(enum.Enum):
    """What happens to a held job, as far as its state goes: see TRANSITIONS."""

    FAILED = "failed"  # an attempt failed retryably, with attempts left: (another) backoff
    PAUSED = "paused"  # its turn came (backoff over, or first in line) while its function is paused
    BUDGET_GRANTED = "budget granted"  # its turn came (backoff over, resumed, first in line): the budget allows it
    BUDGET_SPENT = "budget spent"  # its turn came, but the budget is spent or older retries wait: in line
    CREATED = "created"  # gearmand acknowledged the retry's submission (JOB_CREATED)
    REFUSED = "refused"  # gearmand refused the submission (ERROR): its last failure
    CONNECTION_LOST = "connection lost"  # the retry connection broke: submitted again
    SUCCEEDED = "succeeded"  # the retry completed: its result is H1's
    FAILED_FOR_GOOD = "failed for good"  # the retry failed in a way no retry mends: its last failure
    EXHAUSTED = "exhausted"  # the retry failed, or was lost, with no attempt left: its last failure
    DEADLINE_PASSED = "deadline passed"  # it waited max_hold_time: its last failure
    OPERATOR_RETRY = "operator retry"  # retried by hand, whatever its backoff, budget or pause
    OPERATOR_GIVE_UP = "operator give-up"  # given up by hand: its last failure
    OWNER_LOST = "owner lost"  # H1's connection is gone: gearmand requeued H1
    REASSIGNED = "reassigned"  # gearmand assigned H1 again (it took the job back)


TRANSITIONS: Final[Mapping[tuple[State | None, Event], State | None]] = MappingProxyType({
    (None, Event.FAILED): State.WAITING,
    (State.WAITING, Event.BUDGET_GRANTED): State.SUBMITTING,
    (State.WAITING, Event.OPERATOR_RETRY): State.SUBMITTING,
    (State.WAITING, Event.BUDGET_SPENT): State.DEFERRED,
    (State.WAITING, Event.PAUSED): State.PAUSED,
    (State.WAITING, Event.DEADLINE_PASSED): None,

    (State.DEFERRED, Event.BUDGET_GRANTED): State.SUBMITTING,
    (State.DEFERRED, Event.OPERATOR_RETRY): State.SUBMITTING,
    (State.DEFERRED, Event.PAUSED): State.PAUSED,
    (State.DEFERRED, Event.DEADLINE_PASSED): None,

    (State.PAUSED, Event.BUDGET_GRANTED): State.SUBMITTING,  # resumed
    (State.PAUSED, Event.OPERATOR_RETRY): State.SUBMITTING,
    (State.PAUSED, Event.BUDGET_SPENT): State.DEFERRED,  # resumed
    (State.PAUSED, Event.DEADLINE_PASSED): None,

    (State.SUBMITTING, Event.CREATED): State.RUNNING,
    (State.SUBMITTING, Event.CONNECTION_LOST): State.SUBMITTING,  # sent again, under a new unique id
    (State.SUBMITTING, Event.REFUSED): None,

    (State.RUNNING, Event.FAILED): State.WAITING,
    (State.RUNNING, Event.CONNECTION_LOST): State.SUBMITTING,  # the next attempt
    (State.RUNNING, Event.SUCCEEDED): None,
    (State.RUNNING, Event.FAILED_FOR_GOOD): None,
    (State.RUNNING, Event.EXHAUSTED): None,

    # In any state a held job may be given up by hand, or lose what it holds.
    **{(state, event): None for state in State for event in (Event.OPERATOR_GIVE_UP, Event.OWNER_LOST, Event.REASSIGNED)},
})
"""(The state a held job is in, or None if it is not held; what happens) -> the state it is
in then, None: held no more. The module docstring shows it by state; the README points here."""
_GIVEN_UP: Final = {
    GiveUp.EXHAUSTED: Event.EXHAUSTED, GiveUp.FINAL: Event.FAILED_FOR_GOOD, GiveUp.REFUSED: Event.REFUSED,
    GiveUp.MAX_HOLD_TIME: Event.DEADLINE_PASSED, GiveUp.OPERATOR: Event.OPERATOR_GIVE_UP,
}
"""The move of a held job given up, by why it is."""
_WAITS: Final = (State.WAITING, State.DEFERRED, State.PAUSED)


class TransitionError(RuntimeError):
    """A move TRANSITIONS does not have: a bug in gproxy, not the network's doing (an event
    that does not fit a job's state is ignored before it gets here)."""


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
    """Changed by HeldJobs.move alone, as TRANSITIONS says."""
    retry_handle: bytes | None = None
    """Its retry job H2's handle, while RUNNING."""
    last_failure: tuple[PacketType, bytes] = (P.WORK_FAIL, b"")
    wait: int = 0
    """Which wait this is (one per failure), so a timer of an earlier wait does nothing."""
    deadline: float = 0.0
    """When the current wait runs out of max_hold_time."""
    next_attempt_at: float | None = None
    """When the backoff ends (while WAITING)."""


# What the caller of a Retrier executes --------------------------------------------------------


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
class NothingHeld(Generic[OwnerT]):
    """The owner connection holds nothing more for us (it may close if its worker left)."""

    owner: OwnerT


Action = SendUpstream[OwnerT] | NothingHeld[OwnerT] | Submit[RouteT] | Wakeup | RecheckBudget
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


# The held jobs and their moves; the events that move them -------------------------------------


class HeldJobs(Generic[OwnerT, RouteT]):
    """Every held job, indexed, and its moves. move() is the one way a held job changes
    state, as TRANSITIONS says; the other methods are moves with what they do besides (a
    backoff's timer, a turn at the budget, a submission, a give-up's last failure and dead
    letter). Which move an event makes is the Retrier's to decide. A job is in the indexes
    exactly while it is held, and in `by_retry_handle` exactly while it is RUNNING."""

    def __init__(self, policies: Policies, rng: random.Random, tag: bytes, outcomes: Outcomes, budgets: Budgets) -> None:
        self.policies, self.rng, self.tag = policies, rng, tag
        self.outcomes, self.metrics, self.budgets = outcomes, outcomes.metrics, budgets
        self.by_key: dict[int, HeldJob[OwnerT, RouteT]] = {}
        self.by_handle: dict[tuple[RouteT, bytes], int] = {}
        """H1's key by its (route, handle)."""
        self.by_retry_handle: dict[tuple[RouteT, bytes], int] = {}
        """A RUNNING job's key by the (route, handle) of its retry job H2."""
        self.by_owner: dict[OwnerT, set[int]] = {}
        self.per_function: Counter[bytes] = Counter()
        self._next_key = 0

    def move(self, job: HeldJob[OwnerT, RouteT], event: Event, retry_handle: bytes | None = None) -> None:
        """`event` happened to `job` (not held yet, or held): it takes the state TRANSITIONS
        says, and is forgotten if that is None. A move that is not in the table (or that
        starts RUNNING without its retry's `retry_handle`) raises TransitionError and
        changes nothing. A job that leaves RUNNING loses its retry's handle."""
        source = job.state if self.by_key.get(job.key) is job else None
        move = (source, event)
        if move not in TRANSITIONS or (TRANSITIONS[move] is State.RUNNING) != (retry_handle is not None):
            where = "not held" if source is None else source.name
            raise TransitionError(f"held job {job.key}: {where}, and {event.value}: no such move")
        target = TRANSITIONS[move]
        if job.retry_handle is not None:  # (no move stays RUNNING)
            self.by_retry_handle.pop((job.route, job.retry_handle), None)
            job.retry_handle = None
        if target is None:
            self._forget(job)
            return
        if source is None:
            self.by_key[job.key] = job
            self.by_handle[(job.route, job.handle)] = job.key
            self.by_owner.setdefault(job.owner, set()).add(job.key)
            self.per_function[job.function] += 1
        if retry_handle is not None:
            job.retry_handle = retry_handle
            self.by_retry_handle[(job.route, retry_handle)] = job.key
        job.state = target

    def _forget(self, job: HeldJob[OwnerT, RouteT]) -> None:
        del self.by_key[job.key]
        if self.by_handle.get((job.route, job.handle)) == job.key:
            del self.by_handle[(job.route, job.handle)]
        owned = self.by_owner[job.owner]
        owned.discard(job.key)
        if not owned:
            del self.by_owner[job.owner]
        self.per_function[job.function] -= 1
        if not self.per_function[job.function]:
            del self.per_function[job.function]

    def hold(
        self, owner: OwnerT, route: RouteT, tracked: TrackedJob, verdict: Verdict, now: float,
        last_failure: tuple[PacketType, bytes] = (P.WORK_FAIL, b""), exception_ends_job: bool = True,
    ) -> list[Action[OwnerT, RouteT]]:
        """An original's failure is held: a new held job, in its first backoff."""
        self._next_key += 1
        job = HeldJob(
            key=self._next_key, owner=owner, route=route, handle=tracked.handle,
            function=tracked.function, unique=tracked.unique, payload=tracked.payload,
            policy=self.policies.for_function(tracked.function), started_at=tracked.started_at,
            exception_ends_job=exception_ends_job, last_failure=last_failure,
        )
        self.metrics.job_outcome(job.function, "retried")
        return self.backoff(job, verdict, now)

    def recheck(self, function: bytes, now: float) -> list[Action[OwnerT, RouteT]]:
        """The budget's look at `function`'s line: the deferred retries it allows are
        submitted, oldest first; one past its deadline is given up."""
        actions: list[Action[OwnerT, RouteT]] = []

        def waits(key: int) -> bool:
            """Is job `key` still deferred? (One past its deadline is given up.)"""
            job = self.by_key.get(key)
            if job is None or job.state is not State.DEFERRED:
                return False  # ended meanwhile
            if deadline_passed(job.deadline, now):
                actions.extend(self.give_up(job, now, GiveUp.MAX_HOLD_TIME))
                return False
            return True

        def go(key: int) -> None:
            actions.append(self.submit(self.by_key[key], Event.BUDGET_GRANTED))

        if (delay := self.budgets.recheck(function, now, waits, go)) is not None:
            actions.append(RecheckBudget(function, delay))
        return actions

    def retry_lost(self, job: HeldJob[OwnerT, RouteT], now: float) -> list[Action[OwnerT, RouteT]]:
        """(retry_connection_lost) `job`'s submission, or its retry job, was lost with the
        retry connection."""
        if job.state is State.SUBMITTING:  # never acknowledged: perhaps never arrived
            return [self.resubmit(job)]
        if job.attempt >= job.policy.max_attempts:  # the retry job existed, and may have run
            return self.give_up(job, now, GiveUp.EXHAUSTED)
        log.info(
            "retry connection lost: resubmitting %s %s as attempt %d of %d",
            text(job.function), text(job.handle), job.attempt + 1, job.policy.max_attempts,
            extra=about_job(job.function, job.handle, attempt=job.attempt + 1),
        )
        return [self.submit(job, Event.CONNECTION_LOST)]

    def reconfigure(self, policies: Policies) -> None:
        """Every held job follows its function's new policy from its next decision on; its
        attempt count and its deadline stay. (A max_attempts at or below a job's count ends
        it at its next failure: the attempt already on its way still runs.)"""
        self.policies = policies
        for job in self.by_key.values():
            job.policy = policies.for_function(job.function)

    def backoff(self, job: HeldJob[OwnerT, RouteT], verdict: Verdict, now: float) -> list[Action[OwnerT, RouteT]]:
        """(failed) The job is held, or held again: a wait for its next attempt starts."""
        self.move(job, Event.FAILED)
        delay = job.policy.delay(verdict, job.attempt, self.rng)
        job.wait += 1
        job.deadline = now + job.policy.max_hold_time
        job.next_attempt_at = now + delay
        self.metrics.count(self.metrics.retries, job.function, verdict.reason.value)
        log.info(
            "retrying %s %s: attempt %d of %d in %.2fs (%s)",
            text(job.function), text(job.handle), job.attempt + 1, job.policy.max_attempts,
            delay, verdict.why,
            extra=about_job(
                job.function, job.handle, attempt=job.attempt + 1, max_attempts=job.policy.max_attempts,
                seconds=round(delay, 3), reason=verdict.reason.value, pattern=verdict.pattern and text(verdict.pattern),
            ),
        )
        # A backoff that ends after the deadline wakes at the deadline, to give up.
        return [Wakeup(job.key, min(delay, job.policy.max_hold_time), job.wait)]

    def turn(self, job: HeldJob[OwnerT, RouteT], now: float, paused: bool) -> list[Action[OwnerT, RouteT]]:
        """Its turn came (its backoff is over, or it is resumed): it waits for resume() if
        its function is `paused`; else its retry is submitted if the budget allows it and no
        older retry of the function waits for the budget; else it waits for the budget, in line."""
        job.next_attempt_at = None
        if paused:
            self.move(job, Event.PAUSED)  # until resume(), or max_hold_time
            return [Wakeup(job.key, job.deadline - now, job.wait)]
        if self.budgets.withdraw(job.function, now):
            return [self.submit(job, Event.BUDGET_GRANTED)]
        self.move(job, Event.BUDGET_SPENT)
        self.metrics.count(self.metrics.deferred, job.function)
        log.info(
            "retry of %s %s deferred: the retry budget of %s is spent",
            text(job.function), text(job.handle), text(job.function),
            extra=about_job(job.function, job.handle, reason="budget"),
        )
        actions: list[Action[OwnerT, RouteT]] = [Wakeup(job.key, job.deadline - now, job.wait)]
        if (delay := self.budgets.defer(job.function, job.key, now)) is not None:
            actions.append(RecheckBudget(job.function, delay))
        return actions

    def submit(self, job: HeldJob[OwnerT, RouteT], event: Event) -> Submit[RouteT]:
        """The job's next attempt: its submission."""
        self.move(job, event)
        job.attempt += 1
        return self._submission(job)

    def resubmit(self, job: HeldJob[OwnerT, RouteT]) -> Submit[RouteT]:
        """(connection lost) Its submission, lost unanswered: sent again, not an attempt."""
        self.move(job, Event.CONNECTION_LOST)
        job.resubmitted += 1
        return self._submission(job)

    def _submission(self, job: HeldJob[OwnerT, RouteT]) -> Submit[RouteT]:
        """The retry's SUBMIT_JOB. Its unique id is never used twice: gearmand would attach
        a new submission to an abandoned retry job, which it drops unrun."""
        unique = retry_unique(job.unique, job.handle, job.attempt + job.resubmitted, self.tag)
        return Submit(
            job.route, job.key, job.function, unique, job.payload, job.policy.retry_priority.submit_type
        )

    def give_up(self, job: HeldJob[OwnerT, RouteT], now: float, why: GiveUp) -> list[Action[OwnerT, RouteT]]:
        """The job is given up: its last failure goes to its owner, and (unless a retry
        failed for good) the job to its dead letter."""
        self.move(job, _GIVEN_UP[why])
        packet = self.outcomes.given_up(job, now, why)
        letter = None if why is GiveUp.FINAL else self.outcomes.dead_letter(job.policy, job, job.attempt, job.last_failure)
        return [*_letter(job.route, letter), SendUpstream(job.owner, packet), *self.nothing_held(job.owner)]

    def nothing_held(self, owner: OwnerT) -> list[Action[OwnerT, RouteT]]:
        """NothingHeld(owner) if it holds nothing more."""
        return [] if self.by_owner.get(owner) else [NothingHeld(owner)]


class Retrier(Generic[OwnerT, RouteT]):
    """Every held job of the process. Each method takes an event and returns the actions.
    Which job an event concerns, and which move it makes of it, is decided here; the moves
    themselves are HeldJobs'."""

    def __init__(
        self, policies: Policies, rng: random.Random | None = None, metrics: Metrics | None = None,
        tag: bytes | None = None,
    ) -> None:
        self.policies = policies
        rng = rng or random.Random()
        self.tag = retry_tag(rng) if tag is None else tag
        """In every retry unique this Retrier submits (see retry_unique)."""
        self.metrics = metrics if metrics is not None else Metrics()
        self.outcomes = Outcomes(self.metrics)
        self.intake = Intake(policies, self.outcomes)
        """Which failures of originals are held."""
        self.budgets = Budgets(policies)
        """The retry budgets, and the jobs deferred for them."""
        self.jobs: HeldJobs[OwnerT, RouteT] = HeldJobs(policies, rng, self.tag, self.outcomes, self.budgets)
        """The held jobs, their indexes, their states and their moves."""
        self.paused: set[bytes] = set()
        """Functions whose retries an operator paused."""

    # -- queries

    @property
    def held(self) -> Mapping[int, HeldJob[OwnerT, RouteT]]:
        """Every held job, by key."""
        return self.jobs.by_key

    @property
    def held_per_function(self) -> Mapping[bytes, int]:
        """How many jobs each function holds now."""
        return self.jobs.per_function

    def holds(self, owner: OwnerT, function: bytes | None = None) -> bool:
        """Does `owner` hold jobs for us (of `function`, if given)?"""
        keys = self.jobs.by_owner.get(owner)
        if not keys:
            return False
        return function is None or any(self.held[key].function == function for key in keys)

    def holder(self, route: RouteT, handle: bytes) -> OwnerT | None:
        """The connection that holds `handle` for a retry, if we hold it."""
        key = self.jobs.by_handle.get((route, handle))
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
        return (route, handle) in self.jobs.by_retry_handle

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
        key = self.jobs.by_handle.get((route, handle))
        if key is not None:
            job = self.held[key]
            log.warning(
                "gearmand assigned held job %s %s again (it took the job back, e.g. a "
                "CAN_DO_TIMEOUT fired): the hold ends, the job runs as gearmand decided",
                text(job.function), text(handle),
                extra=about_job(job.function, handle),
            )
            self.jobs.move(job, Event.REASSIGNED)
            actions = self.jobs.nothing_held(job.owner)
        budget = self.budgets.budget(function, now)
        if not is_retry:
            budget.deposit(now)
        return actions

    def worker_failed(
        self, *, owner: OwnerT, route: RouteT, job: TrackedJob, ptype: PacketType, failure: bytes, now: float,
        exception_ends_job: bool = True,
    ) -> Decision[OwnerT, RouteT]:
        """A worker failed an original job: hold it for a retry, or let the failure pass."""
        taken = self.intake.failed(job, ptype, failure, self.jobs.per_function[job.function])
        if isinstance(taken, Verdict):
            return Decision(True, self.jobs.hold(owner, route, job, taken, now, (ptype, failure), exception_ends_job))
        return Decision(False, _ended(owner, route, taken), taken.instead)

    def final_exception(self, function: bytes, handle: bytes, failure: bytes, exception_ends_job: bool) -> bytes:
        """What ends a job of `function` with the exception `failure` (gproxy's own: a job
        too large to hand over), as the function's final_exception says."""
        return final_exception(self.policies.for_function(function), function, handle, failure, exception_ends_job)

    def retries_disconnects(self, function: bytes) -> bool:
        """Is a job of `function` whose worker vanishes retried as a failure (on_disconnect
        = "retry", enforced), rather than requeued by gearmand?"""
        return self.intake.retries_disconnects(function)

    def disconnects_observed(self, running: Iterable[TrackedJob]) -> None:
        """The worker left jobs running that gearmand requeues: counted as observed where
        on_disconnect = "retry" is only observed."""
        self.intake.disconnects_observed(running)

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
            taken = self.intake.left(job, now, ran, self.jobs.per_function[job.function])
            if isinstance(taken, Verdict):
                actions += self.jobs.hold(owner, route, job, taken, now)
            else:
                actions += _ended(owner, route, taken)
        return actions

    def worker_timed_out(
        self, owner: OwnerT, route: RouteT, job: TrackedJob, now: float
    ) -> list[Action[OwnerT, RouteT]] | None:
        """An original ran past its function's timeout: a retryable failure (reason
        timeout; the worker's late result is the caller's to drop). None in observe mode:
        only counted, and the attempt runs on."""
        taken = self.intake.timed_out(job, now, self.jobs.per_function[job.function])
        if isinstance(taken, Verdict):
            return self.jobs.hold(owner, route, job, taken, now)
        return None if taken is None else _ended(owner, route, taken)

    def timer_fired(self, key: int, wait: int, now: float) -> list[Action[OwnerT, RouteT]]:
        """A Wakeup came: a backoff is over, or a wait has run out of max_hold_time."""
        job = self.held.get(key)
        if job is None or job.wait != wait or job.state not in _WAITS:
            return []
        if deadline_passed(job.deadline, now):
            return self.jobs.give_up(job, now, GiveUp.MAX_HOLD_TIME)
        if job.state is State.WAITING:
            return self.jobs.turn(job, now, job.function in self.paused)
        return [Wakeup(job.key, job.deadline - now, job.wait)]  # woken early: again

    def budget_recheck(self, function: bytes, now: float) -> list[Action[OwnerT, RouteT]]:
        """Submit the deferred retries of `function` that its budget allows now, oldest first."""
        if not self.budgets.deferred(function):
            return []
        if function in self.paused:  # they wait for resume() instead (their deadlines stand)
            for key in self.budgets.drop(function):
                if (job := self.held.get(key)) is not None and job.state is State.DEFERRED:
                    self.jobs.move(job, Event.PAUSED)
            return []
        return self.jobs.recheck(function, now)

    # -- an operator's hand (the admin endpoint)

    def retry_now(self, key: int, now: float) -> list[Action[OwnerT, RouteT]] | None:
        """Held job `key` is retried now, whatever its backoff, budget or pause; None if it
        is not waiting (unknown, or its retry is under way already)."""
        job = self.held.get(key)
        if job is None or job.state not in _WAITS:
            return None
        job.next_attempt_at = None  # (its timers find it under way, and do nothing)
        log.warning(
            "operator: retrying %s %s now, attempt %d of %d",
            text(job.function), text(job.handle), job.attempt + 1, job.policy.max_attempts,
            extra=about_job(job.function, job.handle, attempt=job.attempt + 1, reason="operator"),
        )
        # (A deferred job keeps its place in line, which skips it: it is no longer DEFERRED.)
        return [self.jobs.submit(job, Event.OPERATOR_RETRY)]

    def give_up_now(self, key: int, now: float) -> list[Action[OwnerT, RouteT]] | None:
        """Held job `key` gets its last failure now (and is dead-lettered, if configured);
        None if it is not held."""
        job = self.held.get(key)
        if job is None:
            return None
        log.warning(
            "operator: giving up %s %s after %d attempts; its last failure is forwarded",
            text(job.function), text(job.handle), job.attempt,
            extra=about_job(job.function, job.handle, attempt=job.attempt, reason="operator"),
        )
        return self.jobs.give_up(job, now, GiveUp.OPERATOR)

    def reconfigure(self, policies: Policies) -> None:
        """New policies (a reload), from each decision on (see HeldJobs.reconfigure)."""
        self.policies = self.intake.policies = policies
        self.budgets.reconfigure(policies)
        self.jobs.reconfigure(policies)

    def pause(self, function: bytes) -> None:
        """No retry of `function` starts until resume() (held jobs wait, up to max_hold_time)."""
        if function not in self.paused:
            self.paused.add(function)
            log.warning(
                "operator: retries of %s paused", text(function),
                extra=about(function=text(function), reason="operator"),
            )

    def resume(self, function: bytes, now: float) -> list[Action[OwnerT, RouteT]]:
        """Retries of `function` go on: those paused are submitted, oldest first, as the
        budget allows."""
        if function not in self.paused:
            return []
        self.paused.discard(function)
        waiting = sorted((job for job in self.held.values() if job.function == function and job.state is State.PAUSED),
                         key=lambda job: job.key)
        log.warning(
            "operator: retries of %s resumed (%d paused jobs go on)", text(function), len(waiting),
            extra=about(function=text(function), reason="operator", jobs=len(waiting)),
        )
        actions: list[Action[OwnerT, RouteT]] = []
        for job in waiting:
            actions += self.jobs.turn(job, now, job.function in self.paused)
        return actions

    # -- the retry-client connection

    def retry_created(self, key: int, retry_handle: bytes) -> list[Action[OwnerT, RouteT]]:
        """gearmand created the retry job (JOB_CREATED): it runs as `retry_handle`."""
        job = self.held.get(key)
        if job is not None and job.state is State.SUBMITTING:
            self.jobs.move(job, Event.CREATED, retry_handle)
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
            extra=about_job(job.function, job.handle, reason=text(error)),
        )
        return self.jobs.give_up(job, now, GiveUp.REFUSED)

    def retry_packet(
        self, route: RouteT, ptype: PacketType, args: dict[str, bytes], now: float
    ) -> list[Action[OwnerT, RouteT]]:
        """A packet for a retry job H2, seen on the retry-client connection."""
        key = self.jobs.by_retry_handle.get((route, args.get("handle", b"")))
        job = self.held.get(key) if key is not None else None
        if job is None:
            return []
        if ptype in _RELAYED:
            return [SendUpstream(job.owner, _for_handle(ptype, job.handle, args))]
        if ptype is P.WORK_COMPLETE:
            log.info(
                "retry succeeded: %s %s on attempt %d", text(job.function), text(job.handle), job.attempt,
                extra=about_job(job.function, job.handle, attempt=job.attempt),
            )
            self.metrics.job_ended(job.function, "complete", now - job.started_at)
            self.jobs.move(job, Event.SUCCEEDED)
            return [SendUpstream(job.owner, _for_handle(ptype, job.handle, args)), *self.jobs.nothing_held(job.owner)]
        if ptype not in (P.WORK_FAIL, P.WORK_EXCEPTION):
            return []
        verdict, job.last_failure = classify_retry(job.policy, ptype, args.get("data", b""))
        if verdict is None:
            log.info(
                "retry failed for good: %s %s on attempt %d (not retryable), forwarded",
                text(job.function), text(job.handle), job.attempt,
                extra=about_job(job.function, job.handle, attempt=job.attempt, reason="not retryable"),
            )
            return self.jobs.give_up(job, now, GiveUp.FINAL)
        if job.attempt >= job.policy.max_attempts:
            return self.jobs.give_up(job, now, GiveUp.EXHAUSTED)
        return self.jobs.backoff(job, verdict, now)

    def retry_failed_for_good(self, route: RouteT, retry_handle: bytes, reason: bytes, now: float) -> list[Action[OwnerT, RouteT]]:
        """A retry job went wrong in a way no further attempt would mend (its result is too
        large to relay): the original gets `reason` as a final exception."""
        key = self.jobs.by_retry_handle.get((route, retry_handle))
        job = self.held.get(key) if key is not None else None
        if job is None:
            return []
        log.warning(
            "retry of %s %s failed for good: %s", text(job.function), text(job.handle), text(reason),
            extra=about_job(job.function, job.handle, reason=text(reason)),
        )
        job.last_failure = (P.WORK_EXCEPTION, reason)
        return self.jobs.give_up(job, now, GiveUp.FINAL)

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
            actions += self.jobs.retry_lost(job, now)
        return actions

    def owner_lost(self, owner: OwnerT) -> list[Action[OwnerT, RouteT]]:
        """H1's connection is gone, so gearmand has requeued H1: our retries have no job to
        finish any more. Dropped; whatever runs of them still finishes unseen."""
        for key in list(self.jobs.by_owner.get(owner, ())):
            job = self.held[key]
            log.warning(
                "connection holding %s %s lost: gearmand requeues it, retry abandoned",
                text(job.function), text(job.handle),
                extra=about_job(job.function, job.handle),
            )
            self.jobs.move(job, Event.OWNER_LOST)
        return []


def _ended(owner: OwnerT, route: RouteT, ending: Ending) -> list[Action[OwnerT, RouteT]]:
    """An original that is not held: its dead letter, and gproxy's WORK_FAIL for it."""
    actions: list[Action[OwnerT, RouteT]] = _letter(route, ending.letter)
    if ending.fail is not None:
        actions.append(SendUpstream(owner, ending.fail))
    return actions


def _letter(route: RouteT, letter: Letter | None) -> list[Action[OwnerT, RouteT]]:
    """A dead letter, submitted in the background."""
    return [] if letter is None else [Submit(route, None, letter.function, letter.unique, letter.payload, P.SUBMIT_JOB_BG)]


def _for_handle(ptype: PacketType, handle: bytes, args: dict[str, bytes]) -> bytes:
    """The same packet, about H1 instead of H2, as the worker of H1 would have sent it."""
    return build_packet(REQ, ptype, **{**args, "handle": handle})

