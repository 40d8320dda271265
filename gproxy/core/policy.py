"""The retry policy of a function, and what a worker's failure means under it.

A `RetryPolicy` is the `[retry]` section of the configuration (a `[functions."NAME"]`
section overrides it for one function; `Policies` resolves the two). `classify` reads a
WORK_EXCEPTION or WORK_FAIL against it: retryable (a `Verdict`, with the worker's own
`after=` hint if it gave one, or the `retry_on` pattern that matched) or not (None: the
failure is forwarded as it came).

Pure data and pure functions: the Retrier (retry.py) acts on them, the configuration
(config.py) builds them, and a Session reads a function's mode and timeout from them.
"""

from __future__ import annotations

import enum
import random
import re
from dataclasses import dataclass, field
from typing import Final

from .protocol import PacketType

P = PacketType
DISCONNECTED: Final = b"gproxy: the worker running this retry disconnected"
"""The failure a gproxy reports for a retry job whose worker left on a connection that it
keeps open for held jobs: every gproxy retries it with reason `disconnect`, as gearmand
would have requeued it."""
TIMED_OUT: Final = b"gproxy: the worker running this retry ran past its timeout"
"""The failure a gproxy reports for a retry job that ran past its function's timeout
behind it: the gproxy that owns the loop retries it with reason `timeout`."""
PATTERN_WINDOW: Final = 4096
"""Bytes at the start of an exception's text that `retry_on` and `fatal_on` patterns are
matched against: where drivers put the error (SQLSTATE, errno, message). A pattern's cost is
bounded by this window, not by the payload, which may be 64 MiB."""


class Mode(enum.Enum):
    ENFORCE = "enforce"
    OBSERVE = "observe"


class OnDisconnect(enum.Enum):
    """What happens to a job whose worker vanishes in the middle of it."""

    REQUEUE = "requeue"  # gearmand's own way: at once, with no limit
    RETRY = "retry"  # a retryable failure: backoff, attempts, dead letter


class FinalException(enum.Enum):
    """How a client hears of a WORK_EXCEPTION that ends its job (not retried, or the last).
    gearmand sends an exception only to clients that asked for exceptions (OPTION_REQ);
    the others (the libgearman CLI, node clients) hear nothing and wait forever."""

    EXCEPTION = "exception"  # as the worker sent it
    FAIL = "fail"  # a WORK_FAIL instead, which every client understands
    BOTH = "both"  # WORK_WARNING with the text, then WORK_FAIL


class Reason(enum.Enum):
    """Why a failure is retried (a metrics label, so the values are stable)."""

    EXCEPTION = "exception"
    FAIL = "fail"
    WORKER_HINT = "worker_hint"
    DISCONNECT = "disconnect"
    TIMEOUT = "timeout"
    PATTERN = "pattern"  # a retry_on pattern matched an exception the worker did not mark


class Priority(enum.Enum):
    """The priority retries are submitted with: gproxy cannot see the original's."""

    NORMAL = "normal"
    HIGH = "high"
    LOW = "low"

    @property
    def submit_type(self) -> PacketType:
        return _SUBMIT_TYPES[self]


_SUBMIT_TYPES: Final = {
    Priority.NORMAL: P.SUBMIT_JOB, Priority.HIGH: P.SUBMIT_JOB_HIGH, Priority.LOW: P.SUBMIT_JOB_LOW,
}


class GiveUp(enum.Enum):
    """Why a held job's last failure is forwarded after all."""

    EXHAUSTED = "exhausted"
    FINAL = "final"  # a retry failed in a way that is not retryable
    REFUSED = "refused"  # gearmand answered the retry's submission with ERROR
    MAX_HELD = "max_held"
    MAX_HOLD_TIME = "max_hold_time"
    OPERATOR = "operator"  # given up by hand (the admin endpoint)


CAPS: Final = (GiveUp.MAX_HELD, GiveUp.MAX_HOLD_TIME)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    exception_marker: bytes = b"RETRY"
    fatal_marker: bytes = b"FATAL"
    retry_on: tuple[re.Pattern[bytes], ...] = ()
    """Patterns that make an exception retryable as the marker does, for workers that
    cannot be changed (the driver's own text, e.g. a deadlock's SQLSTATE 40001)."""
    fatal_on: tuple[re.Pattern[bytes], ...] = ()
    """Patterns that make an exception final, whatever else it says (the marker included)."""
    on_fail: bool = False
    max_attempts: int = 5
    backoff_initial: float = 1.0
    backoff_multiplier: float = 2.0
    backoff_max: float = 60.0
    jitter: bool = True
    dead_letter: str = ""
    budget_ratio: float = 0.2
    budget_min_per_second: float = 10.0
    budget_ttl: float = 10.0
    max_held: int = 1000
    max_hold_time: float = 600.0
    retry_priority: Priority = Priority.NORMAL
    mode: Mode = Mode.ENFORCE
    on_disconnect: OnDisconnect = OnDisconnect.REQUEUE
    final_exception: FinalException = FinalException.EXCEPTION
    timeout: float = 0.0
    eject_after: int = 0
    eject_for: float = 30.0
    eject_for_max: float = 600.0

    def backoff(self, failed_attempt: int, rng: random.Random) -> float:
        """Delay before attempt `failed_attempt + 1`: exponential, capped; with jitter, a
        uniform draw from the upper half, so retries of a burst spread but never bunch at 0."""
        delay = min(
            self.backoff_max, self.backoff_initial * self.backoff_multiplier ** (failed_attempt - 1)
        )
        return rng.uniform(delay / 2, delay) if self.jitter else delay

    def delay(self, verdict: Verdict, failed_attempt: int, rng: random.Random) -> float:
        """The wait before the next attempt. A worker's `after=` hint is a minimum: jitter
        goes above it (up to half again), never below."""
        if verdict.delay is None:
            return self.backoff(failed_attempt, rng)
        return rng.uniform(verdict.delay, verdict.delay * 1.5) if self.jitter else verdict.delay

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
    """A retryable failure; `delay` is the worker's own hint, if any; `pattern` the
    `retry_on` pattern that made it retryable, if that was it."""

    reason: Reason
    delay: float | None = None
    pattern: bytes | None = None

    @property
    def why(self) -> str:
        """For log lines: the reason, and the pattern that matched."""
        if self.pattern is None:
            return self.reason.value
        return f'{self.reason.value} "{self.pattern.decode("utf-8", "replace")}"'  # (as it is written)


_HINT: Final = re.compile(rb"\s*after=(\d+(?:\.\d+)?)")


def classify(policy: RetryPolicy, ptype: PacketType, payload: bytes) -> Verdict | None:
    """Is this WORK_EXCEPTION / WORK_FAIL retryable? None means: forward it as it is."""
    if ptype is P.WORK_FAIL:
        return Verdict(Reason.FAIL) if policy.on_fail else None
    text = exception_text(payload)
    if policy.fatal_marker and text.startswith(policy.fatal_marker):
        return None
    if policy.fatal_on and matching(policy.fatal_on, text) is not None:
        return None
    if not text.startswith(policy.exception_marker):
        if policy.retry_on and (pattern := matching(policy.retry_on, text)) is not None:
            return Verdict(Reason.PATTERN, pattern=pattern.pattern)
        return None
    hint = _HINT.match(text, len(policy.exception_marker))
    if hint is None:
        return Verdict(Reason.EXCEPTION)
    return Verdict(Reason.WORKER_HINT, min(float(hint.group(1)), policy.backoff_max))


def classify_retry(policy: RetryPolicy, ptype: PacketType, payload: bytes) -> tuple[Verdict | None, tuple[PacketType, bytes]]:
    """Is a retry job's WORK_EXCEPTION / WORK_FAIL retryable (None: no), and the failure it
    leaves its held job with. A gproxy in front of the retry's worker reports a vanished
    worker (DISCONNECTED) and a timeout (TIMED_OUT): both leave a WORK_FAIL, as gearmand's
    --job-retries would end the job. A vanished worker's job is retried at once, as
    gearmand would requeue it, unless the function retries disconnects as failures."""
    if ptype is P.WORK_EXCEPTION and payload == DISCONNECTED:
        retried = policy.on_disconnect is OnDisconnect.RETRY
        return Verdict(Reason.DISCONNECT, None if retried else 0.0), (P.WORK_FAIL, b"")
    if ptype is P.WORK_EXCEPTION and payload == TIMED_OUT:
        return Verdict(Reason.TIMEOUT), (P.WORK_FAIL, b"")  # it ran past its timeout behind a gproxy
    return classify(policy, ptype, payload), (ptype, payload)


def matching(patterns: tuple[re.Pattern[bytes], ...], text: bytes) -> re.Pattern[bytes] | None:
    """The first of `patterns` found in the first PATTERN_WINDOW bytes of `text`."""
    for pattern in patterns:
        if pattern.search(text, 0, PATTERN_WINDOW) is not None:
            return pattern
    return None


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
