"""A held job is gproxy's alone: what its worker sends afterwards, a worker leaving, a move
to a fresh gearmand connection and gearmand taking the job back never finish it wrongly.
Real gearmand, real worker libraries (pygearman, Perl Gearman::Worker).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gproxy.core.policy import RetryPolicy
from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import (
    PeerSet,
    attempts_log,
    run_pyclient,
    seen_uniques,
    start_perlworker,
    start_pyclient,
    start_pyworker,
)
from tests.proxy_thread import ProxyThread

WAIT_S = 15.0
FAST = RetryPolicy(backoff_initial=0.05, jitter=False)


@pytest.mark.parametrize("late", ["retry+complete", "retry+data"])
def test_what_a_worker_sends_after_its_retryable_exception_never_reaches_the_client(
    gearmand: Gearmand, tmp_path: Path, late: str
) -> None:
    # python-gearman: send_job_exception() and then return: WORK_EXCEPTION, WORK_FAIL and a
    # WORK_COMPLETE (or WORK_DATA) for the same handle. Forwarded, the WORK_COMPLETE would
    # finish the held job with the failed attempt's result.
    with ProxyThread.to(gearmand.address, FAST) as proxy, PeerSet() as peers:
        worker = peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        run = run_pyclient(gearmand.address, "scripted", f"{late},ok|x", unique=f"late-{late}")
        assert len(proxy.held()) == 0
    assert (run.returncode, run.stdout) == (0, b"ok after 2"), run.stderr
    assert run.report["data_updates"] == []  # no `late data 1` either
    assert "JOB_NOT_FOUND" not in worker.log_text()  # nothing reached gearmand to earn one
    assert seen_uniques(tmp_path) == [f"late-{late}"] * 2


def test_a_perl_worker_whose_unmarked_exception_is_forwarded_keeps_serving(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    # Gearman::Worker follows its WORK_EXCEPTION with WORK_FAIL; gearmand answers that with
    # ERROR JOB_NOT_FOUND and the worker exits. Directly against gearmand:
    with PeerSet() as peers:
        direct = peers.add(start_perlworker(gearmand.address, state_dir=tmp_path / "direct"))
        assert run_pyclient(gearmand.address, "die_plain", "x", exceptions=True).state == "FAILED"
        direct.wait(WAIT_S)
        assert direct.returncode != 0
    # Behind gproxy the trailing WORK_FAIL is dropped: the client sees the same exception,
    # and the worker takes the next job.
    with ProxyThread.to(gearmand.address, FAST) as proxy, PeerSet() as peers:
        worker = peers.add(start_perlworker(proxy.address, state_dir=tmp_path / "proxied"))
        failed = run_pyclient(gearmand.address, "die_plain", "x", exceptions=True)
        assert b"boom: unmarked" in failed.report["exception"].encode()
        assert run_pyclient(gearmand.address, "reverse", "abc").stdout == b"cba"
        assert worker.poll() is None, worker.log_text()


def test_a_retry_job_whose_worker_leaves_is_retried_by_its_owner_not_as_an_original(
    fresh_gearmand: Gearmand, tmp_path: Path
) -> None:
    gearmand = fresh_gearmand
    policy = replace(FAST, max_attempts=3)
    with ProxyThread.to(gearmand.address, policy) as proxy, PeerSet() as peers:
        first = start_pyworker(proxy.address, state_dir=tmp_path)
        # Job A is held on the worker's gearmand connection for 30 s.
        peers.add(start_pyclient(gearmand.address, "scripted", "after=30,ok|a", unique="iso-a"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "job A to be held")
        # Job B fails once, and its retry (a retry job, unique gpr:2:iso-b) runs on the same
        # worker, on the same connection, and hangs there.
        client = peers.add(start_pyclient(gearmand.address, "scripted", "retry,hang,ok|b", unique="iso-b"))
        wait_for(lambda: [a.action for a in attempts_log(tmp_path) if a.unique == "iso-b"] == ["retry", "hang"],
                 WAIT_S, "B's retry to run")
        os.killpg(first.pid, signal.SIGKILL)  # the connection stays open: it holds A and B
        first.wait(WAIT_S)
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        run = client.result()
        assert len(proxy.held()) == 1  # A, still waiting for its 30 s
        counts = {outcome: proxy.sample("gproxy_jobs_total", function="scripted", outcome=outcome)
                  for outcome in ("retried", "complete")}
        disconnects = proxy.sample("gproxy_retries_total", function="scripted", reason="disconnect")
    assert (run.returncode, run.stdout) == (0, b"ok after 3"), run.stderr
    # The worker saw B's original unique every time, and B ran max_attempts times, no more.
    assert [u for u in seen_uniques(tmp_path) if u != "iso-a"] == ["iso-b"] * 3
    assert counts == {"retried": 2, "complete": 1}  # A and B held once each; B completed once
    assert disconnects == 1


def test_updates_sent_with_a_move_reach_the_client_of_the_job_they_belong_to(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    slow = replace(FAST, backoff_initial=1.0)
    with ProxyThread.to(gearmand.address, slow, frozen=True) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        client = peers.add(start_pyclient(gearmand.address, "scripted", "retry,ok|m", unique="move-status"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        # One write: RESET_ABILITIES, CAN_DOs (which move the worker to a fresh connection)
        # and a WORK_STATUS for the job that still runs on the old one.
        status = run_pyclient(gearmand.address, "unregister_status", "echo")
        proxy.advance(1.0)
        run = client.result()
    assert status.stdout == b"unregistered" and status.report["status_updates"] == [[1, 2]], status.stderr
    assert run.stdout == b"ok after 2", run.stderr


def test_a_move_replays_the_workers_options_without_answering_it_twice(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    # pygearman has no handler for an OPTION_RES it did not expect: it would raise.
    slow = replace(FAST, backoff_initial=1.0)
    with ProxyThread.to(gearmand.address, slow, frozen=True) as proxy, PeerSet() as peers:
        worker = peers.add(start_pyworker(proxy.address, state_dir=tmp_path, options=["exceptions"]))
        client = peers.add(start_pyclient(gearmand.address, "scripted", "retry,ok|o", unique="move-option"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        assert run_pyclient(gearmand.address, "unregister", "echo").stdout == b"unregistered"
        proxy.advance(1.0)
        run = client.result()
        assert worker.poll() is None
    assert run.stdout == b"ok after 2", run.stderr
    assert worker.log_text().count("OPTION_RES exceptions") == 1


def upstream_connections(proxy: ProxyThread) -> float | None:
    return proxy.sample("gproxy_connections", side="upstream")


def test_the_connection_a_worker_was_moved_off_closes_once_it_owns_nothing(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    slow = replace(FAST, backoff_initial=1.0)
    with ProxyThread.to(gearmand.address, slow, frozen=True) as proxy, PeerSet() as peers:
        peers.add(start_perlworker(proxy.address, state_dir=tmp_path))
        client = peers.add(start_pyclient(gearmand.address, "flaky", "1:retired"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        assert run_pyclient(gearmand.address, "unregister", "flaky").stdout == b"unregistered"
        # The fresh connection is opened by the control plane after the move: waited for.
        wait_for(lambda: upstream_connections(proxy) == 2, WAIT_S, "the fresh connection beside the old one")
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path / "py"))
        proxy.thaw()
        assert client.result().stdout == b"ok after 2"
        wait_for(lambda: upstream_connections(proxy) == 3, WAIT_S,
                 "the old connection to close (Perl's new one, pygearman's, retries)")


def test_a_can_do_timeout_never_makes_gearmand_take_a_held_job_back(
    fresh_gearmand: Gearmand, tmp_path: Path
) -> None:
    """gearmand 1.1.20 keeps one CAN_DO_TIMEOUT timer per connection (the value is read in
    milliseconds, at least 1000), armed for the first job it assigns there and re-armed,
    still pointing at that job, for the next one; a PRE_SLEEP cancels it. So a worker that
    failed job A (held by gproxy) and then ran job B for over a second used to get A
    requeued behind gproxy's back. gproxy now registers the function with CAN_DO and times
    attempts out itself: gearmand has no timer, and A stays where gproxy holds it."""
    gearmand = fresh_gearmand
    slow = replace(FAST, backoff_initial=3.0)
    gate = tmp_path / "gate"
    with ProxyThread.to(gearmand.address, slow, frozen=True) as proxy, PeerSet() as peers:
        # Both queued before the worker comes: it takes A (flaky) first, then B (block).
        client = peers.add(start_pyclient(gearmand.address, "flaky", "2:not taken back", exceptions=True))
        gearmand.wait_for_queue("flaky", total=1)
        blocker = peers.add(start_pyclient(gearmand.address, "block", str(gate)))
        gearmand.wait_for_queue("block", total=1)
        worker = peers.add(start_perlworker(
            proxy.address, state_dir=tmp_path / "perl", timeouts={"flaky": "30", "block": "30"}
        ))
        wait_for(lambda: gate.with_suffix(".started").exists(), WAIT_S, "B to start")
        assert [job.key for job in proxy.held()] == [1]
        # No event to wait for: the absence of one. gearmand's timer would fire after 1 s.
        time.sleep(1.5)
        gearmand.wait_for_queue("flaky", total=1, running=1)  # A: still assigned, held by gproxy
        gate.touch()  # B completes (gproxy's clock stands still: its own timeout never came)
        assert blocker.result().stdout == b"unblocked"
        proxy.advance(3.0)  # A's retry: it fails again, held afresh
        wait_for(lambda: [job.attempt for job in proxy.held()] == [2] and proxy.held()[0].state.value == "waiting",
                 WAIT_S, "A's second attempt to fail")
        proxy.advance(6.0)
        run = client.result()
        assert len(proxy.held()) == 0 and proxy.sample("gproxy_jobs_held", function="flaky") == 0
        assert worker.poll() is None, worker.log_text()
    assert (run.returncode, run.stdout) == (0, b"ok after 3"), run.stderr
