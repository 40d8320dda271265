"""One chaos run, phase by phase, and its report.

1. setup: gearmand, the relay, both gproxies, the workers (world.py);
2. warm-up: client load, no faults; then the long-lived gproxy's RSS is the baseline;
3. chaos: client load and the fault injector (faults.py) for `seconds`;
4. quiesce: no new jobs; every client ends (answered, or its bound passed); gearmand, the
   gproxies and the workers come to rest; gauges read;
5. calm: a known set of jobs (scripts.calm_jobs) with no faults, gproxy's counters read
   before and after, RSS sampled;
6. restart: gearmand restarted; both gproxies must still run, be ready, and serve again;
7. the history is built (history.py) and every invariant checked (checks.py).

Decisions come from RNGs seeded from the seed, one per concern (jobs, load, faults), so the
same seed gives the same jobs and the same faults in the same order; timing may differ.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tests.chaos import checks
from tests.chaos.faults import FaultInjector
from tests.chaos.history import Fault, History, Recorder
from tests.chaos.scripts import Job, JobMaker, calm_jobs
from tests.chaos.world import Samples, Settings, World, delta, log_problems
from tests.gearmand import wait_for
from tests.peer_procs import chaos_log

QUIESCE_TIMEOUT = 40.0
REREGISTER_TIMEOUT = 30.0
TIMELINES_SHOWN = 8


@dataclass(frozen=True, slots=True)
class Options:
    seconds: float
    seed: int
    warmup: float = 4.0
    hang_bound: float = 45.0
    fault_gap: tuple[float, float] = (1.0, 3.0)
    max_clients: int = 4
    batch: tuple[int, int] = (3, 8)
    batch_gap: tuple[float, float] = (0.4, 1.2)
    spike: float = 0.08
    """Chance that a batch is a burst (`spike_size` jobs): the queue backs up for a while."""
    spike_size: tuple[int, int] = (20, 30)
    run_dir: Path | None = None
    keep: bool = False


class Load:
    """Client batches from a thread: each batch a pyjobs.py process, at most `max_clients`
    at once, now and then a burst that backs the queue up. Sizes, gaps and jobs are drawn
    in the same order whatever the timing."""

    def __init__(self, world: World, maker: JobMaker, rng: random.Random, options: Options) -> None:
        self.world, self.maker, self.rng, self.options = world, maker, rng, options
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)
        self.batches = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            size = self.rng.randint(*self.options.batch)
            spike = self.rng.randint(*self.options.spike_size)
            if self.rng.random() < self.options.spike:
                size = spike
            gap = self.rng.uniform(*self.options.batch_gap)
            while self.world.clients_running() >= self.options.max_clients:
                if self._stop.wait(0.05):
                    return
            self.batches += 1
            self.world.submit(self.maker.batch(size), f"c{self.batches}", self.world.recorder.phase)
            if self._stop.wait(gap):
                return


def run(options: Options, out: TextIO = sys.stdout) -> bool:
    started = time.monotonic()
    run_dir = options.run_dir or Path(tempfile.mkdtemp(prefix=f"gproxy-chaos-{options.seed}-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"gproxy chaos run: seed {options.seed}, chaos phase {options.seconds:g}s, run dir {run_dir}", file=out, flush=True)
    recorder = Recorder()
    settings = Settings()
    world = World(run_dir, settings, recorder, hang_bound=options.hang_bound)
    maker = JobMaker(random.Random(f"jobs-{options.seed}"), "j")
    load = Load(world, maker, random.Random(f"load-{options.seed}"), options)
    injector = FaultInjector(world, random.Random(f"faults-{options.seed}"), options.fault_gap)
    phase_jobs: list[tuple[Job, str]] = []
    gauges: dict[str, dict[str, float]] = {}
    deltas: dict[str, Samples] = {}
    dead_letters = 0
    restart: dict[str, Any] = {}
    aborted: str | None = None
    try:
        world.start()
        _say(out, recorder, f"world up: {len(world.slots)} workers "
                            f"({', '.join(f'{s.lib}@{s.gproxy.name}' for s in world.slots)})")
        recorder.enter("warmup")
        load.start()
        time.sleep(options.warmup)
        _sample_rss(world)
        recorder.enter("chaos")
        _say(out, recorder, "chaos")
        injector.start()
        time.sleep(options.seconds)
        injector.stop()
        recorder.enter("quiesce")
        load.stop()
        _say(out, recorder, f"quiesce: {len(maker.made)} jobs in {load.batches} batches, {len(recorder.faults)} faults")
        world.wait_clients(options.hang_bound + 20)
        idle = _wait(world.idle, QUIESCE_TIMEOUT)
        gauges["after the chaos"] = world.gauges()
        if not idle:
            recorder.event("not_idle", status=str(world.gearmand.status()))
        _wait(world.all_workers_up, REREGISTER_TIMEOUT)
        phase_jobs += [(job, "chaos") for job in maker.made]

        recorder.enter("calm")
        _say(out, recorder, "calm")
        _sample_rss(world)
        before = {g.name: g.metrics() for g in world.gproxies}
        dl_before = world.dead_letters()
        jobs = calm_jobs()
        phase_jobs += [(job, "calm") for job in jobs]
        world.submit(jobs, "calm", "calm")
        world.wait_clients(options.hang_bound + 10)
        _wait(world.idle, QUIESCE_TIMEOUT)
        _sample_rss(world)
        deltas = {g.name: delta(before[g.name], g.metrics()) for g in world.gproxies}
        dead_letters = world.dead_letters() - dl_before
        _sample_rss(world)

        recorder.enter("restart")
        _say(out, recorder, "gearmand restart")
        restart = _restart_phase(world, recorder, phase_jobs)
        gauges["at the end"] = world.gauges()
        recorder.enter("end")
    except Exception as exc:  # the world could not be run: report what is known, and fail
        aborted = f"{type(exc).__name__}: {exc}"
        recorder.event("aborted", error=aborted)
    finally:
        injector.stop()
        load.stop()
        world.close()
    recorder.dump(run_dir / "events.jsonl")
    history = History(recorder, phase_jobs, chaos_log(world.state_dir), settings.max_attempts, "g1")
    exits = [e for e in recorder.events if e["kind"] == "worker_exit"]
    logs = [path for g in (getattr(world, "g1", None), getattr(world, "g2", None)) if g for path in g.logs]
    results = [
        checks.answered_once(history),
        checks.none_lost(history),
        checks.none_hung(history, options.hang_bound),
        checks.background_executed(history),
        checks.answers_match(history),
        checks.updates_match(history),
        checks.beyond_max_attempts(history),
        checks.reruns_after_answer(history),
        checks.extra_runs(history),
        checks.clean_logs(log_problems(logs), len(logs)),
        checks.gauges_zero(gauges),
        checks.rss_flat(recorder.rss),
        checks.calm_exact(history),
        checks.calm_counters(history, deltas, dead_letters),
        checks.restart_phase(history, restart),
        checks.drains_exit_0(history),
        checks.workers_died_only_when_killed(history, exits),
        checks.unknown_attempts(history),
        checks.harness_ok(injector.errors + ([f"aborted: {aborted}"] if aborted else [])),
    ]
    ok = all(c.ok for c in results)
    kept = not ok or options.keep or options.run_dir is not None
    _report(out, options, history, results, time.monotonic() - started, run_dir, kept)
    if not kept:
        shutil.rmtree(run_dir, ignore_errors=True)
    return ok


def _restart_phase(world: World, recorder: Recorder, phase_jobs: list[tuple[Job, str]]) -> dict[str, Any]:
    """Restart gearmand; both gproxies must keep running and serve jobs again."""
    pids = {g.name: g.pid for g in world.gproxies}
    t = time.monotonic()
    world.gearmand.restart()
    recorder.fault(Fault("gearmand_restart", t, time.monotonic(), None, None, f"port {world.gearmand.port}"))
    slots = len(world.slots)

    def reregistered() -> bool:
        try:
            return world.gearmand.status().get("chaos", (0, 0, 0))[2] >= slots
        except Exception:
            return False

    back = _wait(reregistered, REREGISTER_TIMEOUT)
    result: dict[str, Any] = {"reregistered": f"{time.monotonic() - t:.1f}" if back else "never", "notes": []}
    served: set[str] = set()
    count = 0
    for round_ in range(3):
        jobs = []
        for i in range(12):
            count += 1
            script = ("sleep=0.3",) if i % 4 else ("retry", "ok")
            jobs.append(Job(f"r{count}", "chaos", script, ("payload", "empty", "max")[i % 3], False))
        phase_jobs += [(job, "restart") for job in jobs]
        world.submit(jobs, f"restart{round_ + 1}", "restart")
        world.wait_clients(world.hang_bound + 10)
        ids = {job.id for job, phase in phase_jobs if phase == "restart"}
        served |= {recorder.worker_pids.get(r["pid"], {}).get("gproxy", "?")
                   for r in chaos_log(world.state_dir) if r.get("e") == "start" and r.get("job") in ids}
        if {"g1", "g2"} <= served:
            break
    result["survived"] = all(g.proc is not None and g.proc.poll() is None and g.pid == pids[g.name] for g in world.gproxies)
    readiness = {g.name: g.http("/readyz") for g in world.gproxies}
    result["ready"] = all(status == 200 for status, _ in readiness.values())
    result["notes"] = [f"{name} /readyz: {status} {body.strip()}" for name, (status, body) in readiness.items() if status != 200]
    _wait(world.idle, QUIESCE_TIMEOUT)
    return result


def _report(out: TextIO, options: Options, history: History, results: list[checks.Check], elapsed: float,
            run_dir: Path, kept: bool) -> None:
    jobs = list(history.jobs.values())
    chaos = history.in_phase("chaos")
    p = lambda *a: print(*a, file=out)
    p("")
    p(f"summary (seed {options.seed}):")
    p(f"  jobs: {len(jobs)} ({len(chaos)} under chaos, {len(history.in_phase('calm'))} calm, "
      f"{len(history.in_phase('restart'))} after the gearmand restart)")
    p(f"  chaos jobs by kind: {_fmt(Counter(h.job.kind for h in chaos))}")
    p(f"  chaos jobs by function: {_fmt(Counter(h.job.fn for h in chaos))}; by priority: "
      f"{_fmt(Counter(h.job.priority for h in chaos))}")
    p(f"  faults: {len(history.faults)}: {_fmt(Counter(f.kind for f in history.faults))}")
    p(f"  answers: {_fmt(Counter(h.answer.type for h in jobs if h.answer))}; "
      f"unanswered foreground: {sum(1 for h in jobs if not h.job.bg and not h.answer)}")
    attempts = [a for h in jobs for a in h.attempts]
    p(f"  runs: {len(attempts)} ({_fmt(Counter(a.lib for a in attempts))}; behind "
      f"{_fmt(Counter(a.gproxy or '?' for a in attempts))})")
    causes: Counter[str] = Counter()
    extra = 0
    for h in chaos:
        more = len(h.attempts) - h.expected.attempts
        if more > 0:
            extra += more
            causes.update(checks._causes(history, h) or ["unexplained"])
    p(f"  duplicates: {extra} runs beyond the fault-free count in "
      f"{sum(1 for h in chaos if len(h.attempts) > h.expected.attempts)} jobs; causes (jobs): {_fmt(causes) or 'none'}"
      + (f" (timelines: {run_dir / 'duplicates.txt'})" if kept else ""))
    with open(run_dir / "duplicates.txt", "w") as f:
        for h in chaos:
            if len(h.attempts) > h.expected.attempts:
                f.write(history.timeline(h) + "\n\n")
    rss = history.recorder.rss
    if rss:
        warm = [k for _, ph, k in rss if ph == "warmup"]
        calm = [k for _, ph, k in rss if ph == "calm"]
        p(f"  RSS of g1: after warm-up {warm[-1] / 1024 if warm else 0:.1f} MiB, calm "
          f"{max(calm) / 1024 if calm else 0:.1f} MiB, peak {max(k for _, _, k in rss) / 1024:.1f} MiB")
    p(f"  runtime: {elapsed:.1f}s")
    p("")
    p("checks:")
    for check in results:
        p(check.line())
    failed = [c for c in results if not c.ok]
    if failed:
        timelines = run_dir / "timelines.txt"
        with open(timelines, "w") as f:
            for check in failed:
                f.writelines(f"{check.name}: {job_id}: {why}\n{history.timeline(history.jobs[job_id])}\n\n" for job_id, why in check.offenders)
        p("")
        p(f"FAILED, seed {options.seed} (rerun: python -m tests.chaos --seconds {options.seconds:g} "
          f"--seed {options.seed}); run dir kept: {run_dir}")
        for check in failed:
            p(f"--- {check.line()}")
            for note in check.notes:
                p(f"    {note}")
            for job_id, why in check.offenders[:TIMELINES_SHOWN]:
                p(f"  {job_id}: {why}")
                p("    " + history.timeline(history.jobs[job_id]).replace("\n", "\n    "))
            if len(check.offenders) > TIMELINES_SHOWN:
                p(f"  ... {len(check.offenders) - TIMELINES_SHOWN} more in {timelines}")
    else:
        p("")
        p(f"PASSED, seed {options.seed}" + (f"; run dir kept: {run_dir}" if kept else ""))
    out.flush()


def _say(out: TextIO, recorder: Recorder, text: str) -> None:
    print(f"{recorder.rel(time.monotonic())} {text}", file=out, flush=True)


def _sample_rss(world: World) -> None:
    kib = world.g1.rss_kib()
    if kib is not None:
        world.recorder.sample_rss(kib)


def _wait(predicate: Any, timeout: float) -> bool:
    try:
        wait_for(predicate, timeout, "chaos world", interval=0.2)
        return True
    except TimeoutError:
        return False


def _fmt(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common())
