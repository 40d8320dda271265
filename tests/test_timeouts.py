"""Timeouts that gproxy enforces, with a real gearmand and real workers: an attempt that
runs past its function's timeout is retried (reason timeout), its late result is dropped
(never forwarded, never answered with ERROR), and the slow worker serves on. gproxy's clock
is frozen: the timeout fires when the test moves it, not when a loaded machine gets to it."""

from __future__ import annotations

from pathlib import Path

from gproxy.core.policy import RetryPolicy
from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import PeerSet, attempts_log, run_pyclient, start_perlworker, start_pyclient, start_pyworker
from tests.proxy_thread import ProxyThread

WAIT_S = 15.0
POLICY = RetryPolicy(backoff_initial=0.5, jitter=False)


def test_a_job_past_its_function_timeout_gets_its_second_attempts_result_from_the_same_worker(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    timed = RetryPolicy(backoff_initial=0.5, jitter=False, timeout=5.0)
    with ProxyThread.to(gearmand.address, POLICY, {"scripted": timed}, frozen=True) as proxy, PeerSet() as peers:
        worker = peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        # The first attempt sleeps 1.5 s (real time) and completes late; the second is quick.
        client = peers.add(start_pyclient(gearmand.address, "scripted", "sleep=1.5,ok|slow", unique="slow-1"))
        wait_for(lambda: len(attempts_log(tmp_path)) == 1, WAIT_S, "the first attempt to start")
        proxy.advance(5.0)  # past the timeout: the attempt is over for gproxy, the job held
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        proxy.advance(0.5)  # the backoff: the retry waits in gearmand for the busy worker
        run = client.result()
        timeouts = proxy.sample("gproxy_retries_total", function="scripted", reason="timeout")
        again = run_pyclient(gearmand.address, "scripted", "ok|after", unique="after-1")
    assert (run.returncode, run.stdout) == (0, b"ok after 2"), run.stderr  # the late `ok after 1` dropped
    assert [(a.attempt, a.action) for a in attempts_log(tmp_path) if a.unique == "slow-1"] == [(1, "sleep=1.5"), (2, "ok")]
    assert timeouts == 1
    assert (again.returncode, again.stdout) == (0, b"ok after 1")  # the slow worker serves on
    assert "JOB_NOT_FOUND" not in worker.log_text()


def test_a_workers_can_do_timeout_is_enforced_by_gproxy_and_gearmand_never_requeues(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    """Perl's Gearman::Worker registers `block` with CAN_DO_TIMEOUT 2000 (ms). gproxy tells
    gearmand CAN_DO, and times the attempt out itself."""
    path = tmp_path / "release"
    with ProxyThread.to(gearmand.address, POLICY, frozen=True) as proxy, PeerSet() as peers:
        worker = peers.add(start_perlworker(proxy.address, timeouts={"block": "2000"}, state_dir=tmp_path))
        client = peers.add(start_pyclient(gearmand.address, "block", str(path), unique="perl-slow"))
        started = Path(f"{path}.started")
        wait_for(lambda: started.exists() and started.read_text().strip(), WAIT_S, "the first attempt to start")
        first = started.read_text()
        proxy.advance(2.0)
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        path.touch()  # the first attempt ends now (late); the retry will not wait
        proxy.advance(0.5)
        run = client.result()
        again = run_pyclient(gearmand.address, "echo", "still here", unique="perl-after")
        alive = worker.poll() is None
    assert (run.returncode, run.stdout) == (0, b"unblocked"), (run.stderr, worker.log_text())
    assert started.read_text() not in ("", first)  # the result came from the retry, a job of its own
    assert (again.returncode, again.stdout) == (0, b"still here")  # no ERROR killed it
    assert alive
