"""The jobs of a chaos run: what each one asks its workers to do, and what should come of it.

A job's payload is `SCRIPT|ID` (the workers' `chaos` functions, see tests/peers/pyworker.py):
attempt k takes the k-th action of SCRIPT, the last one repeating. The client chooses every
script from the seeded RNG, so without faults the outcome of every job is known in advance:
`expect()` computes it, for gproxy's retry settings. Faults change which attempt runs which
action (a killed attempt still counts for the worker), so the checker compares an answer with
the attempt that produced it, and uses `expect()` for the runs to expect and in the calm phase.

Pure: no processes, no clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

MAX_UNIQUE = 63
"""gearmand's longest working unique id (a 64th byte is truncated and breaks coalescing)."""

FUNCTIONS = ("chaos", "chaos_fail", "chaos_py")
ON_FAIL = frozenset({"chaos_fail"})
"""Functions the gproxies are configured to retry a plain WORK_FAIL for (on_fail = true)."""
PERL_FUNCTIONS = frozenset({"chaos", "chaos_fail"})
"""What worker.pl registers; `chaos_py` has actions only python-gearman can do."""
DEAD_LETTER = "chaos_dead"

UNIQUE_KINDS = ("payload", "empty", "max")
"""Foreground unique ids: the payload itself, none at all, exactly 63 bytes."""
BG_UNIQUE_KINDS = ("payload", "max", "random")
"""Background ones; `random`: the library draws one."""


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    fn: str
    script: tuple[str, ...]
    unique_kind: str
    bg: bool
    priority: str = "normal"  # normal, high or low: SUBMIT_JOB(_BG), _HIGH(_BG), _LOW(_BG)

    @property
    def payload(self) -> str:
        return ",".join(self.script) + "|" + self.id

    @property
    def unique(self) -> str | None:
        """What the client sends: None lets the library choose, "" sends none."""
        if self.unique_kind == "payload":
            return self.payload
        if self.unique_kind == "empty":
            return ""
        if self.unique_kind == "max":
            return f"max-{self.id}-".ljust(MAX_UNIQUE, "u")
        return None

    @property
    def kind(self) -> str:
        return ("bg-" if self.bg else "fg-") + self.unique_kind

    def action(self, attempt: int) -> str:
        return self.script[min(attempt, len(self.script)) - 1]

    def spec(self) -> dict[str, object]:
        """The entry for tests/peers/pyjobs.py's job list."""
        return {"id": self.id, "fn": self.fn, "payload": self.payload, "unique": self.unique, "bg": self.bg,
                "priority": self.priority}


def base_action(action: str) -> str:
    return action.removeprefix("stream+")


def outcome_of(fn: str, action: str) -> tuple[str, str | None]:
    """(what the attempt sends: complete/exception/fail, the retry reason if gproxy retries it)."""
    base = base_action(action)
    if base == "ok" or base.startswith("sleep="):
        return "complete", None
    if base in ("retry", "retry+complete", "retry+data"):
        return "exception", "exception"
    if base.startswith("after="):
        return "exception", "worker_hint"
    if base in ("fatal", "plain"):
        return "exception", None
    if base == "fail":
        return "fail", "fail" if fn in ON_FAIL else None
    return "fail", None  # unknown: the worker fails it plainly


@dataclass(frozen=True, slots=True)
class Expectation:
    """A job's fate without faults."""

    attempts: int
    outcome: str  # complete / exception / fail: the final answer (background: the last attempt)
    reasons: tuple[str, ...] = ()  # the retry reason of each attempt that was retried
    exhausted: bool = False


def expect(job: Job, max_attempts: int) -> Expectation:
    reasons: list[str] = []
    attempt = 1
    while True:
        outcome, reason = outcome_of(job.fn, job.action(attempt))
        if reason is None:
            return Expectation(attempt, outcome, tuple(reasons))
        if attempt >= max_attempts:
            return Expectation(attempt, outcome, tuple(reasons), exhausted=True)
        reasons.append(reason)
        attempt += 1


# Seeded generation ----------------------------------------------------------------------

_FIRST = (("sleep", 26), ("ok", 14), ("retry", 18), ("after", 10), ("fail", 10), ("fatal", 5), ("plain", 5), ("py", 12))
_LATER = (("sleep", 30), ("ok", 30), ("retry", 14), ("after", 8), ("fail", 8), ("fatal", 3), ("plain", 3), ("py", 4))


@dataclass(slots=True)
class JobMaker:
    """Draws jobs from its own RNG: the same seed gives the same jobs in the same order."""

    rng: random.Random
    prefix: str = "j"
    count: int = 0
    made: list[Job] = field(default_factory=list)

    def job(self) -> Job:
        rng = self.rng
        self.count += 1
        job_id = f"{self.prefix}{self.count}"
        bg = rng.random() < 0.2
        fn = rng.choices(FUNCTIONS, weights=(60, 20, 20))[0]
        unique_kind = rng.choice(BG_UNIQUE_KINDS if bg else UNIQUE_KINDS)
        script = tuple(self._action(fn, _FIRST if i == 0 else _LATER) for i in range(rng.randint(1, 4)))
        priority = rng.choices(("normal", "high", "low"), weights=(75, 15, 10))[0]
        job = Job(job_id, fn, script, unique_kind, bg, priority)
        while unique_kind == "payload" and len(job.payload) > MAX_UNIQUE:
            job = Job(job_id, fn, job.script[:-1] or ("ok",), unique_kind, bg, priority)
        self.made.append(job)
        return job

    def batch(self, size: int) -> list[Job]:
        return [self.job() for _ in range(size)]

    def _action(self, fn: str, weights: tuple[tuple[str, int], ...]) -> str:
        rng = self.rng
        name = rng.choices([n for n, _ in weights], weights=[w for _, w in weights])[0]
        if name == "py":
            name = rng.choice(("retry+complete", "retry+data")) if fn == "chaos_py" else "retry"
        elif name == "sleep":
            name = f"sleep={rng.choice((0.1, 0.2, 0.3, 0.5, 0.8, 1.0))}"
        elif name == "after":
            name = f"after={rng.choice((0.1, 0.2, 0.4))}"
        if rng.random() < 0.15:
            name = "stream+" + name
        return name


def calm_jobs(prefix: str = "q") -> list[Job]:
    """The calm phase's known set: every path a job can take, twice, all kinds of unique."""
    scripts = [
        ("chaos", "ok"), ("chaos", "stream+ok"), ("chaos", "sleep=0.2"), ("chaos", "retry,ok"),
        ("chaos", "after=0.1,ok"), ("chaos", "stream+retry,ok"), ("chaos", "fatal"), ("chaos", "plain"),
        ("chaos", "fail"), ("chaos", "retry"), ("chaos", "retry,fatal"), ("chaos", "after=0.1,plain"),
        ("chaos_fail", "fail,ok"), ("chaos_fail", "fail"), ("chaos_fail", "fail,fail,stream+ok"),
        ("chaos_fail", "retry,fail,ok"), ("chaos_py", "retry+complete,ok"), ("chaos_py", "retry+data,ok"),
        ("chaos_py", "retry+complete"), ("chaos_py", "stream+retry+data,ok"),
    ]
    background = [("chaos", "retry,ok"), ("chaos_fail", "fail,ok"), ("chaos", "ok"), ("chaos", "retry")]
    jobs = []
    for round_ in range(2):
        for i, (fn, script) in enumerate(scripts):
            kind = UNIQUE_KINDS[(i + round_) % 3]
            jobs.append(Job(f"{prefix}{len(jobs) + 1}", fn, tuple(script.split(",")), kind, False))
        for i, (fn, script) in enumerate(background):
            kind = BG_UNIQUE_KINDS[(i + round_) % 3]
            jobs.append(Job(f"{prefix}{len(jobs) + 1}", fn, tuple(script.split(",")), kind, True))
    return jobs
