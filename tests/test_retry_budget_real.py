"""The retry budget against a real gearmand and real pygearman workers: a burst with the
shipped defaults, and an outage in which the budget paces retries while new jobs flow.
"""

from __future__ import annotations

from pathlib import Path

from gproxy.core.budget import SLICES
from gproxy.core.policy import RetryPolicy
from tests.gearmand import Gearmand
from tests.peer_procs import PeerSet, attempts_log, run_pyburst, start_pyburst, start_pyworker
from tests.proxy_thread import ProxyThread

WAIT_S = 60.0


def test_a_burst_of_jobs_that_each_fail_twice_all_succeed_with_the_shipped_defaults(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    # 40 jobs queued for 2 workers, each failing transiently twice: with 0.1's budget (a cap
    # on jobs held at once) 30 of 40 clients got the failure.
    with ProxyThread.to(gearmand.address) as proxy, PeerSet() as peers:
        burst = peers.add(start_pyburst(
            gearmand.address, "scripted", 40, "retry,retry,ok|burst {i}", unique="burst-{i}", timeout=WAIT_S,
        ))
        gearmand.wait_for_queue("scripted", total=40)
        for _ in range(2):
            peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        run = burst.result()
        held = proxy.call(lambda: len(proxy.proxy.retrier.held))
    assert run.states == ["COMPLETE"] * 40, run.stderr
    assert {job["result"] for job in run.jobs} == {"ok after 3"}
    assert held == 0
    attempts = attempts_log(tmp_path)
    assert len(attempts) == 120 and {a.unique for a in attempts} == {f"burst-{i}" for i in range(40)}


def test_in_an_outage_retries_stay_within_the_budget_while_first_attempts_go_on(
    fresh_gearmand: Gearmand, tmp_path: Path
) -> None:
    """Every job fails (its dependency is down) for 10 s at 12 new jobs a second, with the
    shipped defaults: first attempts keep their pace, and retries, which the backoff alone
    would send at twice that rate by the end, are held to the budget (10 per second plus
    0.2 per first attempt, over 10 s windows)."""
    gearmand = fresh_gearmand
    policy = RetryPolicy()
    rate, count = 12.0, 120
    with ProxyThread.to(gearmand.address) as proxy, PeerSet() as peers:
        for _ in range(2):
            peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        load = run_pyburst(
            gearmand.address, "scripted", count, "retry|outage {i}", unique="outage-{i}",
            background=True, rate=rate, timeout=WAIT_S,
        )
        assert load.returncode == 0, load.stderr
        deferred = proxy.call(lambda: proxy.proxy.metrics.registry.get_sample_value(
            "gproxy_retries_deferred_total", {"function": "scripted"}))
    attempts = attempts_log(tmp_path)
    firsts = sorted(a.time for a in attempts if a.attempt == 1)
    retries = sorted(a.time for a in attempts if a.attempt > 1)
    # First attempts are never deferred: every job ran while the budget held retries back.
    assert len(firsts) == count
    assert deferred is not None and deferred > 0  # the budget did bite
    span = policy.budget_ttl * (SLICES - 1) / SLICES
    floor = policy.budget_min_per_second * policy.budget_ttl
    worst = float("-inf")
    for start in retries:
        inside = sum(1 for t in retries if start <= t <= start + span)
        earned = sum(1 for t in firsts if start - policy.budget_ttl - 0.5 <= t <= start + span)
        worst = max(worst, inside - (floor + policy.budget_ratio * earned))
    print(f"outage: {len(firsts)} first attempts, {len(retries)} retries, {deferred:g} deferred, "
          f"most retries in {span:g} s beyond the budget: {worst:+.1f}")
    # A retry runs a moment after gproxy submits it; allow one that slipped into a window.
    assert worst <= 1, f"retries exceeded the budget by {worst}"
