"""on_disconnect = "retry": a job that kills its worker, with a real gearmand and real
pygearman workers that a supervisor restarts, as production restarts crashed workers.

Without gproxy, or with the default "requeue", gearmand requeues such a job at once and
without limit (no --job-retries here, as by default): it crash-loops every worker in turn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from gproxy.core.policy import OnDisconnect, RetryPolicy
from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import PeerProcess, attempts_log, run_pyclient, start_pyclient, start_pyworker, stop_peer
from tests.proxy_thread import ProxyThread

POISON = "exit|poison"
"""The pyworker's `scripted` function exits (os._exit) in the middle of every attempt."""
CRASHES = RetryPolicy(
    backoff_initial=0.5, jitter=False, max_attempts=3, dead_letter="crashdl.{function}",
    on_disconnect=OnDisconnect.RETRY,
)


@contextmanager
def supervised(start: Callable[[], PeerProcess], count: int) -> Iterator[list[int]]:
    """`count` workers, each started again whenever it exits; yields the list of restarts
    (one entry, the exit code, per restart)."""
    restarts: list[int] = []
    stopping = threading.Event()
    current: list[PeerProcess] = []
    lock = threading.Lock()

    def keep(slot: int) -> None:
        while not stopping.is_set():
            proc = current[slot]
            code = proc.poll()
            if code is None:
                stopping.wait(0.02)
                continue
            with lock:
                if stopping.is_set():
                    return
                restarts.append(code)
                current[slot] = start()

    current.extend(start() for _ in range(count))
    threads = [threading.Thread(target=keep, args=(slot,), daemon=True) for slot in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield restarts
    finally:
        with lock:
            stopping.set()
        for thread in threads:
            thread.join(10)
        for proc in current:
            stop_peer(proc)


def poison_attempts(state_dir: Path) -> list[float]:
    return [a.time for a in attempts_log(state_dir) if a.unique == "poison-1"]


def test_a_job_that_kills_its_worker_runs_max_attempts_times_with_backoff_then_is_dead_lettered(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    with ProxyThread.to(gearmand.address, RetryPolicy(), {"scripted": CRASHES}) as proxy, supervised(
        lambda: start_pyworker(proxy.address, state_dir=tmp_path), count=2
    ) as restarts:
        poison = start_pyclient(gearmand.address, "scripted", POISON, unique="poison-1", timeout=60)
        # Other jobs keep flowing meanwhile, on the workers that are up.
        others = [run_pyclient(gearmand.address, "scripted", f"ok|fine {n}", unique=f"fine-{n}") for n in range(6)]
        run = poison.result()
        gearmand.wait_for_queue("crashdl.scripted", total=1, running=0)  # no worker: it stays queued
        wait_for(lambda: len(restarts) == 3, 10, "the supervisor to see the third worker exit")
        retried = proxy.sample("gproxy_retries_total", function="scripted", reason="disconnect")
        exhausted = proxy.sample("gproxy_retries_exhausted_total", function="scripted")
    assert [(r.returncode, r.stdout) for r in others] == [(0, b"ok after 1")] * 6
    assert (run.returncode, run.state) == (1, "FAILED"), run.stderr
    times = poison_attempts(tmp_path)
    assert len(times) == 3 and restarts == [3, 3, 3]  # each attempt killed one worker (os._exit(3))
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0, gaps  # the backoff, doubling (no jitter)
    assert (retried, exhausted) == (2, 1)


def test_by_default_gearmand_requeues_a_job_that_kills_its_worker_again_and_again(
    fresh_gearmand: Gearmand, tmp_path: Path
) -> None:
    with ProxyThread.to(fresh_gearmand.address, RetryPolicy(backoff_initial=0.5, jitter=False)) as proxy, supervised(
        lambda: start_pyworker(proxy.address, state_dir=tmp_path), count=2
    ):
        poison = start_pyclient(fresh_gearmand.address, "scripted", POISON, unique="poison-1", timeout=60)
        try:
            wait_for(lambda: len(poison_attempts(tmp_path)) >= 8, 40, "the poison job to run 8 times")
            assert poison.poll() is None  # its client still waits: the loop has no end
            assert proxy.call(lambda: dict(proxy.proxy.retrier.held)) == {}
        finally:
            stop_peer(poison)
    times = poison_attempts(tmp_path)
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) < 0.5  # at once, no backoff
