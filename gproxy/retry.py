"""Retry policy and the retry state machine: events in, actions out.

Pure: no sockets, no clock (an event that ends a job carries `now`), randomness injected. The trio layer
feeds events (a worker's failure, a timer, a reply on a retry-client connection, a lost
connection) and executes the actions this returns.

A held job ("hold and shadow", see the README): the worker's failure of the original job H1
is not forwarded, so H1 stays assigned to its upstream connection; after a backoff a retry
job H2 is submitted (same function and payload, a unique id that marks it as a retry), and
H2's updates and outcome are replayed on H1's connection as H1's. Only the last failure, or
a non-retryable one, reaches gearmand as H1's failure.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Final, Hashable

from .jobs import TrackedJob
from .metrics import Metrics
from .protocol import REQ, PacketType, build_packet

log = logging.getLogger("gproxy.retry")
P = PacketType
MAX_UNIQUE: Final = 63
"""gearmand truncates a 64-byte unique to 63 and then fails to coalesce; longer is refused."""


class Mode(enum.Enum):
    ENFORCE = "enforce"
    OBSERVE = "observe"


class Reason(enum.Enum):
    """Why a failure is retried (a metrics label later, so the values are stable)."""

    EXCEPTION = "exception"
    FAIL = "fail"
    WORKER_HINT = "worker_hint"
    DISCONNECT = "disconnect"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    exception_marker: bytes = b"RETRY"
    fatal_marker: bytes = b"FATAL"
    on_fail: bool = False
    max_attempts: int = 5
    backoff_initial: float = 1.0
    backoff_multiplier: float = 2.0
    backoff_max: float = 60.0
    jitter: bool = True
    dead_letter: str = ""
    budget_ratio: float = 0.5
    budget_min: int = 10
    mode: Mode = Mode.ENFORCE

    def backoff(self, failed_attempt: int, rng: random.Random) -> float:
        """Delay before attempt `failed_attempt + 1`: exponential, capped; with jitter, a
        uniform draw from the upper half, so retries of a burst spread but never bunch at 0."""
        delay = min(
            self.backoff_max, self.backoff_initial * self.backoff_multiplier ** (failed_attempt - 1)
        )
        return rng.uniform(delay / 2, delay) if self.jitter else delay

    def dead_letter_function(self, function: bytes) -> bytes | None:
        if not self.dead_letter:
            return None
        return self.dead_letter.replace("{function}", function.decode("utf-8", "replace")).encode()


@dataclass(frozen=True, slots=True)
class Policies:
    """The `[retry]` defaults and the `[functions."NAME"]` overrides, resolved per function."""

    default: RetryPolicy = RetryPolicy()
    functions: dict[bytes, RetryPolicy] = field(default_factory=dict)

    def for_function(self, function: bytes) -> RetryPolicy:
        return self.functions.get(function, self.default)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A failure the worker marked retryable; `delay` is the worker's own hint, if any."""

    reason: Reason
    delay: float | None = None


_HINT: Final = re.compile(rb"\s*after=(\d+(?:\.\d+)?)")


def classify(policy: RetryPolicy, ptype: PacketType, payload: bytes) -> Verdict | None:
    """Is this WORK_EXCEPTION / WORK_FAIL retryable? None means: forward it as it is."""
    if ptype is P.WORK_FAIL:
        return Verdict(Reason.FAIL) if policy.on_fail else None
    text = exception_text(payload)
    if policy.fatal_marker and text.startswith(policy.fatal_marker):
        return None
    if not text.startswith(policy.exception_marker):
        return None
    hint = _HINT.match(text, len(policy.exception_marker))
    if hint is None:
        return Verdict(Reason.EXCEPTION)
    return Verdict(Reason.WORKER_HINT, min(float(hint.group(1)), policy.backoff_max))


def exception_text(payload: bytes) -> bytes:
    """The text of an exception payload. Perl's Gearman::Worker sends `die` messages frozen
    with Storable (network order): a scalar is unwrapped so its marker can be read."""
    if len(payload) < 4 or payload[0] != 0x05:
        return payload
    kind, rest = payload[2], payload[3:]
    if kind in (0x0A, 0x17):  # SX_SCALAR, SX_UTF8STR: one length byte
        return rest[1 : 1 + rest[0]]
    if kind in (0x01, 0x18) and len(rest) >= 4:  # SX_LSCALAR, SX_LUTF8STR: four length bytes
        return rest[4 : 4 + int.from_bytes(rest[:4], "big")]
    return payload


# Retry unique ids --------------------------------------------------------------------------
# `gpr:<attempt>:<original unique>`; for an empty original, `gpr:<attempt>@<hash of the
# handle>` (empty uniques never coalesce, so each retry needs its own); for an original too
# long to fit, `gpr:<attempt>#<hash of the original>`. A gproxy in front of the worker that
# runs a retry strips the marking, so the worker sees the original unique on every attempt
# (except in the `#` case, where the worker sees the retry unique itself).
_RETRY_UNIQUE: Final = re.compile(rb"gpr:(\d+)([:@#])(.*)", re.DOTALL)


def retry_unique(unique: bytes, handle: bytes, attempt: int) -> bytes:
    prefix = b"gpr:%d" % attempt
    if not unique:
        return prefix + b"@" + hashlib.sha1(handle).hexdigest()[:32].encode()
    if len(prefix) + 1 + len(unique) <= MAX_UNIQUE:
        return prefix + b":" + unique
    return prefix + b"#" + hashlib.sha1(unique).hexdigest().encode()


def parse_retry_unique(unique: bytes) -> tuple[int, bytes] | None:
    """(attempt, the unique to show the worker) for a retry's unique, None for any other."""
    match = _RETRY_UNIQUE.fullmatch(unique)
    if match is None:
        return None
    attempt, kind, rest = match.groups()
    shown = rest if kind == b":" else b"" if kind == b"@" else unique
    return int(attempt), shown


# The state machine --------------------------------------------------------------------------


class State(enum.Enum):
    WAITING = "waiting"  # backoff timer running
    SUBMITTING = "submitting"  # SUBMIT_JOB sent, JOB_CREATED not yet seen
    RUNNING = "running"  # retry job H2 exists in gearmand


@dataclass(slots=True)
class HeldJob:
    key: int
    owner: Hashable
    """The upstream connection that owns H1: only it can finish H1."""
    route: Hashable
    """Where retries are submitted: the gearmand that H1 lives in."""
    handle: bytes
    function: bytes
    unique: bytes
    payload: bytes
    policy: RetryPolicy
    started_at: float
    attempt: int = 1
    """Attempts made so far, the original included."""
    state: State = State.WAITING
    retry_handle: bytes | None = None
    last_failure: tuple[PacketType, bytes] = (P.WORK_FAIL, b"")


@dataclass(frozen=True, slots=True)
class Wakeup:
    key: int
    delay: float


@dataclass(frozen=True, slots=True)
class Submit:
    """Submit a job on the route's retry-client connection; `key` None: background, no reply wanted."""

    route: Hashable
    key: int | None
    function: bytes
    unique: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class SendUpstream:
    """Packets for H1 on the connection that owns it."""

    owner: Hashable
    data: bytes


@dataclass(frozen=True, slots=True)
class Released:
    """The owner connection holds nothing more for us (it may close if its worker left)."""

    owner: Hashable


Action = Wakeup | Submit | SendUpstream | Released

_RELAYED: Final = {P.WORK_DATA, P.WORK_WARNING, P.WORK_STATUS}


class Retrier:
    """Every held job of the process. Each method takes an event and returns the actions."""

    def __init__(
        self, policies: Policies, rng: random.Random | None = None, metrics: Metrics | None = None
    ) -> None:
        self.policies = policies
        self.rng = rng or random.Random()
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.held = lambda: self._held_per_function
        self.held: dict[int, HeldJob] = {}
        self._by_retry_handle: dict[tuple[Hashable, bytes], int] = {}
        self._held_per_function: Counter[bytes] = Counter()
        self._next_key = 0

    # -- queries

    def holds(self, owner: Hashable, function: bytes | None = None) -> bool:
        """Does `owner` hold jobs for us (of `function`, if given)?"""
        return any(
            job.owner == owner and (function is None or job.function == function)
            for job in self.held.values()
        )

    # -- events

    def worker_failed(
        self,
        *,
        owner: Hashable,
        route: Hashable,
        job: TrackedJob,
        ptype: PacketType,
        failure: bytes,
        running: int,
    ) -> list[Action] | None:
        """A worker failed an original job. None: forward the failure. Else it is held."""
        function, handle = job.function, job.handle
        policy = self.policies.for_function(function)
        verdict = classify(policy, ptype, failure)
        name = function.decode("utf-8", "replace")
        if verdict is None:
            return None
        if policy.mode is Mode.OBSERVE:
            log.info("observe: would retry %s %s (%s)", name, _text(handle), verdict.reason.value)
            self.metrics.count(self.metrics.observed, function)
            return None
        if policy.max_attempts <= 1:
            log.info("retry exhausted: %s %s after 1 attempt, failure forwarded", name, _text(handle))
            self.metrics.count(self.metrics.exhausted, function)
            return None
        budget = max(policy.budget_min, policy.budget_ratio * running)
        if self._held_per_function[function] >= budget:
            self.metrics.count(self.metrics.budget_rejections, function)
            log.warning(
                "retry budget exhausted for %s (%d held, budget %g): %s failure forwarded",
                name, self._held_per_function[function], budget, _text(handle),
            )
            return None
        return [self._hold(owner, route, job, verdict, (ptype, failure))]

    def worker_left(self, owner: Hashable, route: Hashable, running: list[TrackedJob]) -> list[Action]:
        """The worker of `owner` disconnected while `owner` holds retries for us, so `owner`
        stays open and gearmand cannot requeue the jobs the worker was still running: they
        are retried here at once instead, as gearmand would have done."""
        return [self._hold(owner, route, job, Verdict(Reason.DISCONNECT, 0.0)) for job in running]

    def timer_fired(self, key: int) -> list[Action]:
        job = self.held.get(key)
        if job is None or job.state is not State.WAITING:
            return []
        job.attempt += 1
        job.state = State.SUBMITTING
        unique = retry_unique(job.unique, job.handle, job.attempt)
        return [Submit(job.route, job.key, job.function, unique, job.payload)]

    def retry_created(self, key: int, retry_handle: bytes) -> list[Action]:
        job = self.held.get(key)
        if job is None:
            return []
        job.state, job.retry_handle = State.RUNNING, retry_handle
        self._by_retry_handle[(job.route, retry_handle)] = key
        return []

    def retry_rejected(self, key: int, error: bytes, now: float) -> list[Action]:
        """gearmand refused the retry submission (e.g. a full queue): give up on this job."""
        job = self.held.get(key)
        if job is None:
            return []
        log.warning(
            "retry of %s %s refused by gearmand (%s): last failure forwarded",
            _text(job.function), _text(job.handle), _text(error),
        )
        return self._give_up(job, now)

    def retry_packet(
        self, route: Hashable, ptype: PacketType, args: dict[str, bytes], now: float
    ) -> list[Action]:
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
                _text(job.function), _text(job.handle), job.attempt,
            )
            self.metrics.job_ended(job.function, "complete", now - job.started_at)
            return self._finish(job, _for_handle(ptype, job.handle, args))
        if ptype not in (P.WORK_FAIL, P.WORK_EXCEPTION):
            return []
        failure = args.get("data", b"")
        job.last_failure = (ptype, failure)
        del self._by_retry_handle[(job.route, args["handle"])]
        verdict = classify(job.policy, ptype, failure)
        if verdict is None:
            log.info(
                "retry failed for good: %s %s on attempt %d (not retryable), forwarded",
                _text(job.function), _text(job.handle), job.attempt,
            )
            return self._give_up(job, now, exhausted=False)
        if job.attempt >= job.policy.max_attempts:
            return self._give_up(job, now)
        return [self._schedule(job, verdict)]

    def retry_connection_lost(self, route: Hashable, now: float) -> list[Action]:
        """The retry-client connection to `route` broke. gearmand abandons the retry jobs that
        were submitted on it (a queued one is dropped when a worker would take it, even if a
        new client attached to its unique id meanwhile), so each is submitted again as the
        next attempt, with a new unique id; one that has no attempt left is given up."""
        actions: list[Action] = []
        for job in [job for job in self.held.values() if job.route == route]:
            if job.state is State.WAITING:
                continue
            if job.retry_handle is not None:
                del self._by_retry_handle[(job.route, job.retry_handle)]
            job.retry_handle = None
            if job.attempt >= job.policy.max_attempts:
                actions += self._give_up(job, now)
                continue
            job.attempt += 1
            job.state = State.SUBMITTING
            log.info(
                "retry connection lost: resubmitting %s %s as attempt %d of %d",
                _text(job.function), _text(job.handle), job.attempt, job.policy.max_attempts,
            )
            unique = retry_unique(job.unique, job.handle, job.attempt)
            actions.append(Submit(job.route, job.key, job.function, unique, job.payload))
        return actions

    def owner_lost(self, owner: Hashable) -> list[Action]:
        """H1's connection is gone, so gearmand has requeued H1: our retries have no job to
        finish any more. Dropped; whatever runs of them still finishes unseen."""
        for job in [job for job in self.held.values() if job.owner == owner]:
            log.warning(
                "connection holding %s %s lost: gearmand requeues it, retry abandoned",
                _text(job.function), _text(job.handle),
            )
            self._forget(job)
        return []

    # -- internals

    def _hold(
        self,
        owner: Hashable,
        route: Hashable,
        tracked: TrackedJob,
        verdict: Verdict,
        last_failure: tuple[PacketType, bytes] = (P.WORK_FAIL, b""),
    ) -> Wakeup:
        self._next_key += 1
        job = HeldJob(
            key=self._next_key, owner=owner, route=route, handle=tracked.handle,
            function=tracked.function, unique=tracked.unique, payload=tracked.payload,
            policy=self.policies.for_function(tracked.function), started_at=tracked.started_at,
            last_failure=last_failure,
        )
        self.held[job.key] = job
        self._held_per_function[job.function] += 1
        self.metrics.count(self.metrics.jobs, job.function, "retried")
        return self._schedule(job, verdict)

    def _schedule(self, job: HeldJob, verdict: Verdict) -> Wakeup:
        delay = verdict.delay if verdict.delay is not None else job.policy.backoff(job.attempt, self.rng)
        job.state, job.retry_handle = State.WAITING, None
        self.metrics.count(self.metrics.retries, job.function, verdict.reason.value)
        log.info(
            "retrying %s %s: attempt %d of %d in %.2fs (%s)",
            _text(job.function), _text(job.handle), job.attempt + 1, job.policy.max_attempts,
            delay, verdict.reason.value,
        )
        return Wakeup(job.key, delay)

    def _give_up(self, job: HeldJob, now: float, exhausted: bool = True) -> list[Action]:
        ptype, failure = job.last_failure
        outcome = "exception" if ptype is P.WORK_EXCEPTION else "fail"
        self.metrics.job_ended(job.function, outcome, now - job.started_at)
        if exhausted:
            self.metrics.count(self.metrics.exhausted, job.function)
            log.warning(
                "retry exhausted: %s %s failed %d attempts, last failure forwarded",
                _text(job.function), _text(job.handle), job.attempt,
            )
        if ptype is P.WORK_EXCEPTION:
            packet = build_packet(REQ, P.WORK_EXCEPTION, handle=job.handle, data=failure)
        else:
            packet = build_packet(REQ, P.WORK_FAIL, handle=job.handle)
        actions = self._finish(job, packet)
        dead_letter = job.policy.dead_letter_function(job.function)
        if exhausted and dead_letter:
            self.metrics.count(self.metrics.jobs, job.function, "dead_lettered")
            actions.insert(0, Submit(job.route, None, dead_letter, b"", job.payload))
        return actions

    def _finish(self, job: HeldJob, packet: bytes) -> list[Action]:
        self._forget(job)
        actions: list[Action] = [SendUpstream(job.owner, packet)]
        if not self.holds(job.owner):
            actions.append(Released(job.owner))
        return actions

    def _forget(self, job: HeldJob) -> None:
        del self.held[job.key]
        if job.retry_handle is not None:
            self._by_retry_handle.pop((job.route, job.retry_handle), None)
        self._held_per_function[job.function] -= 1
        if not self._held_per_function[job.function]:
            del self._held_per_function[job.function]


def _for_handle(ptype: PacketType, handle: bytes, args: dict[str, bytes]) -> bytes:
    """The same packet, about H1 instead of H2, as the worker of H1 would have sent it."""
    return build_packet(REQ, ptype, **{**args, "handle": handle})


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")
