"""The retry-test functions of the real peers, proven directly against gearmand (no proxy).

This is the baseline gproxy's retries are measured against: without gproxy a retryable
failure reaches the client on the first attempt and gearmand never runs the job again.
Each test also checks the peer-side bookkeeping (attempt counters, seen.log) that the
retry tests through gproxy rely on, and whether the worker survives its failure.

Observed packet sequences (logging relay, gearmand 1.1.20), worker -> gearmand:
- pyworker exception functions: WORK_EXCEPTION <payload>, WORK_FAIL; gearmand answers the
  WORK_FAIL with ERROR JOB_NOT_FOUND (the exception already ended the job).
- pyworker flaky_fail (handler raises): WORK_FAIL alone.
- Perl die: WORK_EXCEPTION <Storable::nfreeze(\\$msg)>, WORK_FAIL, GRAB_JOB; the ERROR
  JOB_NOT_FOUND is read as the answer to GRAB_JOB and the worker dies (exit 255).
- libgearman command exiting non-zero: WORK_FAIL (stdout it printed goes first as WORK_DATA).
gearmand -> client: a client with OPTION_REQ exceptions gets WORK_EXCEPTION and nothing
after it; one without gets WORK_FAIL `handle\\0` (stray NUL) instead.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.gearmand import Gearmand
from tests.peer_procs import (
    PeerSet,
    attempt_count,
    flaky_cli_command,
    run_cli_client,
    run_pyclient,
    seen_uniques,
    start_cli_worker,
    start_perlworker,
    start_pyworker,
)

WAIT_S = 10.0

# nfreeze(\"RETRY: transient failure 1\n") by Storable 3.26: 0x05 = network order, major 2;
# 0x0b = minor 11; 0x0a = SX_SCALAR with a one-byte length (0x1b = 27), then the raw text.
PERL_RETRY_1 = b"\x05\x0b\x0a\x1bRETRY: transient failure 1\n"


def _assert_alive(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    assert proc.poll() is None, f"worker exited (rc={proc.returncode})"


@pytest.mark.parametrize(
    ("function", "exception"),
    [
        ("flaky", "RETRY: transient failure 1"),
        ("flaky_hint", "RETRY after=0.2: rate limited"),
        ("stream_flaky", "RETRY: transient failure 1"),
    ],
)
def test_pyworker_retryable_exception_fails_without_proxy(
    gearmand: Gearmand, tmp_path: Path, function: str, exception: str
) -> None:
    """N=1: the first attempt ends the job with the RETRY exception; gearmand does not retry.
    The same unique submitted again is attempt 2 and completes: the counter is per unique."""
    unique = f"direct-{function}-1"
    with PeerSet() as peers:
        worker = peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        first = run_pyclient(gearmand.address, function, "1:x", unique=unique, exceptions=True)
        assert first.returncode == 1, first.stderr
        report = first.report
        assert report["state"] == "FAILED"
        assert report["exception"] == exception
        assert report["exception_updates"] == [exception]
        assert report["stray_nul_fail"] is False
        if function == "stream_flaky":
            assert report["data_updates"] == ["data 1"]
            assert report["status_updates"] == [[1, 10]]
        assert seen_uniques(tmp_path) == [unique]
        assert attempt_count(tmp_path, unique) == 1
        gearmand.wait_for_queue(function, total=0)  # not requeued

        _assert_alive(worker)  # it logged the ERROR JOB_NOT_FOUND and carried on
        second = run_pyclient(gearmand.address, function, "1:x", unique=unique, exceptions=True)
        assert (second.returncode, second.stdout) == (0, b"ok after 2"), second.stderr
        if function == "stream_flaky":
            assert second.report["data_updates"] == ["data 2"]
            assert second.report["status_updates"] == [[2, 10]]
        assert seen_uniques(tmp_path) == [unique, unique]
    assert "JOB_NOT_FOUND" in worker.log_text()


def test_exception_without_option_reaches_client_as_fail(gearmand: Gearmand, tmp_path: Path) -> None:
    """A client without OPTION_REQ exceptions gets WORK_FAIL `handle\\0`, never the payload."""
    with PeerSet() as peers:
        peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        run = run_pyclient(gearmand.address, "flaky", "1:x", unique="direct-flaky-noopt")
    assert run.returncode == 1, run.stderr
    assert run.state == "FAILED"
    assert run.report["stray_nul_fail"] is True
    assert run.report["exception"] is None
    assert seen_uniques(tmp_path) == ["direct-flaky-noopt"]


def test_pyworker_flaky_fail_sends_plain_fail(gearmand: Gearmand, tmp_path: Path) -> None:
    """flaky_fail: a plain WORK_FAIL (no exception, no stray NUL), then success on attempt 2."""
    unique = "direct-flaky_fail-1"
    with PeerSet() as peers:
        worker = peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        first = run_pyclient(gearmand.address, "flaky_fail", "1:x", unique=unique, exceptions=True)
        assert first.returncode == 1, first.stderr
        assert first.state == "FAILED"
        assert first.report["exception_updates"] == []
        assert first.report["stray_nul_fail"] is False
        assert seen_uniques(tmp_path) == [unique]
        _assert_alive(worker)
        second = run_pyclient(gearmand.address, "flaky_fail", "1:x", unique=unique)
        assert (second.returncode, second.stdout) == (0, b"ok after 2"), second.stderr
    assert "JOB_NOT_FOUND" not in worker.log_text()  # nothing was sent twice


@pytest.mark.parametrize(
    ("function", "exception"),
    [("fatal", "FATAL: broken input"), ("plain_exception", "boom")],
)
def test_pyworker_non_retryable_exceptions(
    gearmand: Gearmand, tmp_path: Path, function: str, exception: str
) -> None:
    """fatal / plain_exception fail every attempt, whatever the payload."""
    unique = f"direct-{function}-1"
    with PeerSet() as peers:
        worker = peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        for attempt in (1, 2):
            run = run_pyclient(gearmand.address, function, "0:x", unique=unique, exceptions=True)
            assert run.returncode == 1, run.stderr
            assert run.state == "FAILED"
            assert run.report["exception"] == exception
            assert attempt_count(tmp_path, unique) == attempt
            _assert_alive(worker)
    assert seen_uniques(tmp_path) == [unique, unique]


def test_pyworker_flaky_counts_attempts_per_unique(gearmand: Gearmand, tmp_path: Path) -> None:
    """Counters are per unique: another unique starts again at attempt 1."""
    with PeerSet() as peers:
        peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        a = run_pyclient(gearmand.address, "flaky", "0:x", unique="direct-count-a")
        b = run_pyclient(gearmand.address, "flaky", "0:x", unique="direct-count-b")
    assert (a.returncode, a.stdout) == (0, b"ok after 1"), a.stderr
    assert (b.returncode, b.stdout) == (0, b"ok after 1"), b.stderr
    assert seen_uniques(tmp_path) == ["direct-count-a", "direct-count-b"]


def test_perl_worker_flaky_dies_after_its_own_work_fail(gearmand: Gearmand, tmp_path: Path) -> None:
    """Perl's die: the client sees the Storable-frozen message (not the text), and the worker
    dies on the ERROR JOB_NOT_FOUND that answers its WORK_FAIL. A new worker on the same
    state dir completes the same payload at attempt 2 (the counter is keyed by payload)."""
    payload = "1:perl-direct"
    with PeerSet() as peers:
        worker = peers.add(start_perlworker(gearmand.address, state_dir=tmp_path))
        run = run_pyclient(gearmand.address, "flaky", payload, unique="direct-perl-1", exceptions=True)
        assert run.returncode == 1, run.stderr
        assert run.state == "FAILED"
        assert run.report["exception"] == PERL_RETRY_1.decode()
        assert attempt_count(tmp_path, payload) == 1
        assert worker.wait(WAIT_S) == 255, worker.log_text()
        log = worker.log_text()
        assert "Job 'flaky' died: RETRY: transient failure 1" in log
        assert "unexpected packet type: error [JOB_NOT_FOUND" in log

        peers.add(start_perlworker(gearmand.address, state_dir=tmp_path))
        again = run_pyclient(gearmand.address, "flaky", payload, unique="direct-perl-2")
    assert (again.returncode, again.stdout) == (0, b"ok after 2"), again.stderr


def test_cli_worker_failing_command_sends_work_fail(gearmand: Gearmand, tmp_path: Path) -> None:
    """libgearman turns the non-zero exit into WORK_FAIL; both clients see a plain failure."""
    payload = "1:cli-direct"
    with PeerSet() as peers:
        worker = peers.add(
            start_cli_worker(gearmand.address, "flaky_cli", flaky_cli_command(tmp_path))
        )
        run = run_pyclient(gearmand.address, "flaky_cli", payload, unique="direct-cli-1", exceptions=True)
        assert run.returncode == 1, run.stderr
        assert run.state == "FAILED"
        assert run.report["exception_updates"] == []
        assert run.report["data_updates"] == []  # the failing attempt printed nothing
        assert run.report["stray_nul_fail"] is False
        assert attempt_count(tmp_path, payload) == 1
        _assert_alive(worker)
        ok = run_pyclient(gearmand.address, "flaky_cli", payload, unique="direct-cli-1")
        assert (ok.returncode, ok.stdout) == (0, b"ok after 2"), ok.stderr

        cli = run_cli_client(gearmand.address, "flaky_cli", "1:cli-client", timeout=WAIT_S)
        assert (cli.returncode, cli.stdout, cli.stderr) == (1, b"", b"Job failed\n")
        assert attempt_count(tmp_path, "1:cli-client") == 1
        _assert_alive(worker)
    assert "flaky_cli: transient failure 1" in worker.log_text()


def test_cli_flaky_counter_is_binary_safe(tmp_path: Path) -> None:
    """The command alone (no gearmand): a payload with NULs is counted by its sha1."""
    payload = b"2:\0bin\0"
    results = [
        subprocess.run(flaky_cli_command(tmp_path), input=payload, capture_output=True, timeout=WAIT_S)
        for _ in range(3)
    ]
    assert [r.returncode for r in results] == [1, 1, 0]
    assert results[2].stdout == b"ok after 3"
    assert attempt_count(tmp_path, payload) == 3
    bad = subprocess.run(flaky_cli_command(tmp_path), input=b"x:1", capture_output=True, timeout=WAIT_S)
    assert bad.returncode == 2
    # Only the counter is left: the payload temp file is removed, the bad payload counts nothing.
    assert [p.name for p in tmp_path.iterdir()] == [f"flaky-{hashlib.sha1(payload).hexdigest()}"]
