"""How the retry budget shapes a burst and an outage: gproxy's own Retrier in a simulated world.

The Retrier (gproxy/core/retry.py) is pure, so it runs here on a simulated clock: a gearmand-like
FIFO queue per function, a number of workers, jobs that take a while, a dependency that may
be down. Every decision is the real code's; only time and the workers are simulated, so an
hour of outage takes a second. Used to choose the budget's defaults (see the README's
"Retry budget"), and to answer "what would this setting do" for a given load.

    python bench/retry_budget.py                 # the two scenarios, with and without a budget
    python bench/retry_budget.py --ratio 0.1 --floor 2 --ttl 10
"""

from __future__ import annotations

import argparse
import heapq
import logging
import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from gproxy.core.jobs import TrackedJob
from gproxy.core.protocol import PacketType
from gproxy.core.policy import Policies, RetryPolicy
from gproxy.core.retry import RecheckBudget, Retrier, SendUpstream, Submit, Wakeup

P = PacketType
OWNER, ROUTE, FUNCTION = "worker-connection", "route", b"job"
NO_BUDGET = {"budget_ratio": 0.0, "budget_min_per_second": 1e9}


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    run: Callable[[], None] = field(compare=False)


@dataclass
class Job:
    number: int
    handle: bytes
    submitted: float
    attempts: int = 0
    outcome: str = ""
    finished: float = 0.0


@dataclass
class Result:
    jobs: list[Job]
    calls: int  # attempts that reached the dependency while it was down
    retries: int  # retry attempts run, all told
    max_retries_per_window: int
    max_held: int
    deferred: int
    end: float

    def line(self, name: str) -> str:
        done = sum(job.outcome == "complete" for job in self.jobs)
        slowest = max((job.finished - job.submitted for job in self.jobs), default=0.0)
        return (
            f"{name:<34} {done:>5}/{len(self.jobs):<5} {self.calls:>8} {self.retries:>8}"
            f" {self.max_retries_per_window:>10} {self.max_held:>6} {self.deferred:>8} {slowest:>9.1f}"
        )


HEADER = (
    f"{'':<34} {'complete':>11} {'dep.calls':>8} {'retries':>8} {'max/10s':>10}"
    f" {'held':>6} {'deferred':>8} {'slowest s':>9}"
)


class World:
    """One function, `workers` workers, a FIFO queue, gproxy's Retrier holding the failures."""

    def __init__(self, policy: RetryPolicy, workers: int, runtime: float,
                 fails: Callable[[Job, float], bool], seed: int = 1) -> None:
        self.retrier = Retrier(Policies(policy), random.Random(seed))
        self.now = 0.0
        self.events: list[_Event] = []
        self.seq = itertools.count()
        self.queue: deque[tuple[Job, int | None]] = deque()  # (job, retry key or None)
        self.idle = workers
        self.runtime = runtime
        self.fails = fails
        self.jobs: list[Job] = []
        self.by_handle: dict[bytes, Job] = {}
        self.retry_handles = itertools.count(1)
        self.calls = self.retries = self.max_held = 0
        self.retry_times: list[float] = []

    def at(self, time: float, run: Callable[[], None]) -> None:
        heapq.heappush(self.events, _Event(time, next(self.seq), run))

    def submit(self, time: float) -> None:
        def arrive() -> None:
            job = Job(len(self.jobs), b"H:%d" % len(self.jobs), self.now)
            self.jobs.append(job)
            self.by_handle[job.handle] = job
            self.queue.append((job, None))
            self.dispatch()
        self.at(time, arrive)

    def dispatch(self) -> None:
        while self.idle and self.queue:
            job, key = self.queue.popleft()
            self.idle -= 1
            self.start(job, key)

    def start(self, job: Job, key: int | None) -> None:
        job.attempts += 1
        if key is None:
            self.execute(self.retrier.job_assigned(ROUTE, job.handle, FUNCTION, False, self.now))
        else:
            self.retries += 1
            self.retry_times.append(self.now)
        failed = self.fails(job, self.now)
        if failed and self.down(self.now):
            self.calls += 1

        def end() -> None:
            self.idle += 1
            if key is None:
                tracked = TrackedJob(job.handle, FUNCTION, b"u%d" % job.number, b"", OWNER, job.submitted)
                if failed:
                    decision = self.retrier.worker_failed(
                        owner=OWNER, route=ROUTE, job=tracked, ptype=P.WORK_EXCEPTION,
                        failure=b"RETRY: dependency down", now=self.now,
                    )
                    if not decision.held:
                        self.finish(job, "failed")
                    self.execute(decision.actions)
                else:
                    self.finish(job, "complete")
            else:
                ptype, data = (P.WORK_EXCEPTION, b"RETRY: again") if failed else (P.WORK_COMPLETE, b"ok")
                handle = b"R:%d" % key
                self.execute(self.retrier.retry_packet(ROUTE, ptype, {"handle": handle, "data": data}, self.now))
            self.dispatch()
        self.at(self.now + self.runtime, end)

    def execute(self, actions: list) -> None:
        for action in actions:
            if type(action) is Wakeup:
                self.at(self.now + action.delay, lambda a=action: self.execute(
                    self.retrier.timer_fired(a.key, a.wait, self.now)))
            elif type(action) is RecheckBudget:
                self.at(self.now + action.delay, lambda a=action: self.execute(
                    self.retrier.budget_recheck(a.function, self.now)))
            elif type(action) is Submit and action.key is not None:
                held = self.retrier.held[action.key]
                self.retrier.retry_created(action.key, b"R:%d" % action.key)
                self.queue.append((self.by_handle[held.handle], action.key))
            elif type(action) is SendUpstream:
                handle = action.data[12:].split(b"\0", 1)[0]
                ptype = PacketType(int.from_bytes(action.data[4:8], "big"))
                self.finish(self.by_handle[handle], "complete" if ptype is P.WORK_COMPLETE else "failed")
        self.max_held = max(self.max_held, len(self.retrier.held))
        self.dispatch()

    def finish(self, job: Job, outcome: str) -> None:
        job.outcome, job.finished = outcome, self.now

    def down(self, time: float) -> bool:
        return False

    def run(self) -> Result:
        while self.events:
            event = heapq.heappop(self.events)
            self.now = event.time
            event.run()
        deferred = self.retrier.metrics.registry.get_sample_value(
            "gproxy_retries_deferred_total", {"function": FUNCTION.decode()}
        ) or 0
        return Result(self.jobs, self.calls, self.retries, _max_in_window(self.retry_times, 10.0),
                      self.max_held, int(deferred), self.now)


def _max_in_window(times: list[float], width: float) -> int:
    best, start = 0, 0
    for end in range(len(times)):
        while times[end] - times[start] > width:
            start += 1
        best = max(best, end - start + 1)
    return best


def burst(policy: RetryPolicy, jobs: int = 40, workers: int = 2, failures: int = 2) -> Result:
    """`jobs` queued at once for `workers` workers; each fails its first `failures` attempts."""
    world = World(policy, workers, runtime=0.01, fails=lambda job, now: job.attempts <= failures)
    for _ in range(jobs):
        world.submit(0.0)
    return world.run()


def outage(policy: RetryPolicy, rate: float = 5.0, minutes: float = 5.0, workers: int = 20) -> Result:
    """`rate` jobs/s for 10 minutes; the dependency is down for `minutes` from t=60 s."""
    start, stop = 60.0, 60.0 + minutes * 60

    class Outage(World):
        def down(self, time: float) -> bool:
            return start <= time < stop

    world = Outage(policy, workers, runtime=0.05, fails=lambda job, now: start <= now < stop)
    for n in range(int(600 * rate)):
        world.submit(n / rate)
    return world.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float)
    parser.add_argument("--floor", type=float, help="budget_min_per_second")
    parser.add_argument("--ttl", type=float)
    parser.add_argument("--rate", type=float, default=5.0, help="outage scenario: jobs per second")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the Retrier logs every decision; the table says enough
    base = RetryPolicy()
    candidates = {"shipped defaults": base, "no budget": replace(base, **NO_BUDGET)}
    if args.ratio is not None or args.floor is not None or args.ttl is not None:
        candidates["asked for"] = replace(
            base,
            budget_ratio=base.budget_ratio if args.ratio is None else args.ratio,
            budget_min_per_second=base.budget_min_per_second if args.floor is None else args.floor,
            budget_ttl=base.budget_ttl if args.ttl is None else args.ttl,
        )
    print(f"burst: 40 jobs queued, 2 workers, every job fails twice (defaults: {_describe(base)})")
    print(HEADER)
    for name, policy in candidates.items():
        print(burst(policy).line(name))
    print(f"\noutage: {args.rate:g} jobs/s for 10 min, the dependency down for 5 min from t=60 s, 20 workers")
    print(HEADER)
    for name, policy in candidates.items():
        print(outage(policy, rate=args.rate).line(name))


def _describe(policy: RetryPolicy) -> str:
    return (f"ratio {policy.budget_ratio:g}, floor {policy.budget_min_per_second:g}/s, ttl {policy.budget_ttl:g} s, "
            f"max_attempts {policy.max_attempts}, max_hold_time {policy.max_hold_time:g} s, max_held {policy.max_held}")


if __name__ == "__main__":
    main()
