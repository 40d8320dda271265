"""What retries need from the job server: priorities, a persistent queue across a restart,
and a second server implementation (the Perl Gearman::Server), with real peers.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from gproxy.core.policy import Priority, RetryPolicy
from tests.gearmand import Gearmand, PerlGearmanServer, wait_for
from tests.peer_procs import (
    PeerSet,
    run_pyburst,
    run_pyclient,
    seen_uniques,
    start_perlworker,
    start_pyclient,
    start_pyworker,
)
from tests.proxy_thread import ProxyThread

WAIT_S = 15.0
FAST = RetryPolicy(backoff_initial=0.05, jitter=False)


@pytest.mark.parametrize(
    "priority, order",
    [("high", ["prio-a", "prio-b", "prio-c"]), ("normal", ["prio-b", "prio-c", "prio-a"])],
)
def test_retries_go_with_the_configured_priority(
    fresh_gearmand: Gearmand, tmp_path: Path, priority: str, order: list[str]
) -> None:
    gearmand = fresh_gearmand
    policy = replace(FAST, backoff_initial=2.0, retry_priority=Priority(priority))
    with ProxyThread.to(gearmand.address, policy, frozen=True) as proxy, PeerSet() as peers:
        first = start_pyworker(proxy.address, state_dir=tmp_path)
        a = peers.add(start_pyclient(gearmand.address, "scripted", "retry,ok|a", unique="prio-a"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "A to be held")
        first.stop()  # its connection stays open for A; B and C queue up meanwhile
        b = peers.add(start_pyclient(gearmand.address, "scripted", "ok|b", unique="prio-b"))
        gearmand.wait_for_queue("scripted", total=2)  # A (held, so running) and B
        c = peers.add(start_pyclient(gearmand.address, "scripted", "ok|c", unique="prio-c"))
        gearmand.wait_for_queue("scripted", total=3)  # and C
        proxy.advance(2.0)
        gearmand.wait_for_queue("scripted", total=4)  # and A's retry
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        assert [client.result().returncode for client in (a, b, c)] == [0, 0, 0]
    assert seen_uniques(tmp_path) == ["prio-a", *order]


def test_dead_letters_survive_a_gearmand_restart_with_a_persistent_queue(tmp_path: Path) -> None:
    # gearmand's persistent queues key their rows on (function, unique): dead letters with
    # an empty unique kept 1 of 20 across a restart.
    db = tmp_path / "queue.sqlite"
    gearmand = Gearmand(tmp_path / "gearmand", extra_args=["-q", "libsqlite3", f"--libsqlite3-db={db}"]).start()
    try:
        policy = replace(FAST, max_attempts=2, dead_letter="dead.{function}")
        with ProxyThread.to(gearmand.address, policy) as proxy, PeerSet() as peers:
            peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
            run = run_pyburst(gearmand.address, "scripted", 20, "retry|dead {i}", unique="dead-{i}", timeout=WAIT_S)
            assert run.states == ["FAILED"] * 20, run.stderr
            gearmand.wait_for_queue("dead.scripted", total=20)
        gearmand.restart()
        assert gearmand.status()["dead.scripted"][0] == 20
    finally:
        gearmand.stop()


@pytest.fixture
def perl_server_proxy(perl_gearmand: PerlGearmanServer, caplog: pytest.LogCaptureFixture):  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, "gproxy")
    with ProxyThread.to(perl_gearmand.address, replace(FAST, max_attempts=2)) as proxy:
        yield proxy


def test_behind_gproxy_the_perl_job_server_passes_jobs_and_retries_them(
    perl_gearmand: PerlGearmanServer, perl_server_proxy: ProxyThread, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The Perl Gearman::Server knows no GRAB_JOB_UNIQ (it answers ERROR server_error):
    gproxy falls back to the worker's own GRAB_JOB, and since WORK_FAIL, not WORK_EXCEPTION,
    ends a job there, it lets a forwarded exception's WORK_FAIL through."""
    server, proxy = perl_gearmand.address, perl_server_proxy
    with PeerSet() as peers:
        worker = peers.add(start_perlworker(proxy.address, state_dir=tmp_path))
        assert run_pyclient(server, "reverse", "abc").stdout == b"cba"
        retried = run_pyclient(server, "flaky", "1:perl server")
        plain = run_pyclient(server, "die_plain", "x", exceptions=True, exception_final=False)
        exhausted = run_pyclient(server, "flaky", "5:perl server", exceptions=True, exception_final=False)
        assert run_pyclient(server, "reverse", "still there").stdout == b"ereht llits"
        assert len(proxy.held()) == 0 and worker.poll() is None, worker.log_text()
    assert (retried.returncode, retried.stdout) == (0, b"ok after 2"), retried.stderr
    # An unmarked exception and an exhausted retry end as they would without gproxy there:
    # the exception, then the WORK_FAIL that ends the job.
    for run, text in ((plain, "boom: unmarked"), (exhausted, "RETRY: transient failure 2")):
        assert run.report["ended_by"] == "WORK_FAIL", run.stderr
        assert text in run.report["exception"]
    warnings = [r.getMessage() for r in caplog.records if "does not know GRAB_JOB_UNIQ" in r.getMessage()]
    assert len(warnings) == 1 and str(server[1]) in warnings[0]
