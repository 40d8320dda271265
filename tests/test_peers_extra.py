"""The extra real-peer capabilities, proven directly against the servers (no proxy).

- pyworker's `scripted` function: each action does what its docstring says, against
  gearmand 1.1.20, including the packets gearmand refuses (ERROR JOB_NOT_FOUND, logged by
  the worker) and a worker that dies or is killed holding a job (gearmand requeues it with
  the same handle);
- worker.pl's `die_plain` and `--timeout` (CAN_DO_TIMEOUT);
- pyburst.py, many jobs on one client connection;
- the Perl job server (Gearman::Server), where WORK_EXCEPTION does not end a job.

Measured with a logging relay (gearmand 1.1.20), worker -> gearmand:
- scripted `retry+complete`: WORK_EXCEPTION h `RETRY: scripted 1`, WORK_FAIL h,
  WORK_COMPLETE h `late 1`, PRE_SLEEP; gearmand answers the WORK_FAIL and the WORK_COMPLETE
  with ERROR JOB_NOT_FOUND `Job given in work result not found`.
- scripted `retry+data`: WORK_EXCEPTION h, WORK_FAIL h, WORK_DATA h `late data 1`, PRE_SLEEP;
  ERROR JOB_NOT_FOUND for the WORK_FAIL and (`Job does not exist on server`) the WORK_DATA.
- worker.pl --timeout block=30: CAN_DO_TIMEOUT `block\\x0030` (after SET_CLIENT_ID, in place of
  that function's CAN_DO). gearmand reads the value as milliseconds, raised to at least
  1000: "30" requeued the job 1.0 s after the assignment, "1500" after 1.5 s, "2500" after
  2.5 s; "0" sets no timer.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.gearmand import Gearmand, PerlGearmanServer, wait_for
from tests.peer_procs import (
    PeerSet,
    attempt_count,
    attempts_log,
    run_pyburst,
    run_pyclient,
    seen_uniques,
    start_perlworker,
    start_pyclient,
    start_pyworker,
)

WAIT_S = 10.0

# Storable::nfreeze(\$msg) as Gearman::Worker sends it for a die (see test_flaky_peers_direct):
# 05 0b = network order 2.11, 0a = scalar with a one-byte length, then the text.
PERL_RETRY_1 = b"\x05\x0b\x0a\x1bRETRY: transient failure 1\n"
PERL_BOOM = b"\x05\x0b\x0a\x0fboom: unmarked\n"

# Binary packet types used by the raw-socket test (protocol notes §1).
GRAB_JOB = 9
NO_JOB = 10
ERROR = 19
GRAB_JOB_UNIQ = 30


def _assert_alive(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    assert proc.poll() is None, f"worker exited (rc={proc.returncode})"


def _wait_file(path: Path, timeout: float = WAIT_S) -> bytes:
    wait_for(path.exists, timeout, f"{path} to appear")
    return path.read_bytes()


# -- pyworker `scripted` against gearmand -------------------------------------------------


@pytest.mark.parametrize(
    ("action", "exception"),
    [
        ("retry", "RETRY: scripted 1"),
        ("after=0.5", "RETRY after=0.5: scripted 1"),
        ("fatal", "FATAL: scripted 1"),
        ("plain", "boom 1"),
        ("fail", None),
    ],
)
def test_scripted_failure_then_ok(
    gearmand: Gearmand, tmp_path: Path, action: str, exception: str | None
) -> None:
    """Script `<action>,ok`: attempt 1 fails as the action says (exception + WORK_FAIL, or a
    plain WORK_FAIL for `fail`), the same unique again is attempt 2 and completes; the
    attempt bookkeeping (counter, seen.log, attempts.log) records both."""
    unique = f"extra-scripted-{action}"
    payload = f"{action},ok|x"
    with PeerSet() as peers:
        worker = peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        first = run_pyclient(gearmand.address, "scripted", payload, unique=unique, exceptions=True)
        assert first.returncode == 1, first.stderr
        assert first.state == "FAILED"
        assert first.report["exception"] == exception
        assert first.report["ended_by"] == ("WORK_FAIL" if exception is None else "WORK_EXCEPTION")
        gearmand.wait_for_queue("scripted", total=0)  # gearmand does not retry
        _assert_alive(worker)

        second = run_pyclient(gearmand.address, "scripted", payload, unique=unique)
        assert (second.returncode, second.stdout) == (0, b"ok after 2"), second.stderr
    log = attempts_log(tmp_path)
    assert [(a.unique, a.attempt, a.action) for a in log] == [(unique, 1, action), (unique, 2, "ok")]
    assert log[0].handle == first.report["handle"]
    assert log[1].handle == second.report["handle"]
    assert log[0].time < log[1].time
    assert attempt_count(tmp_path, unique) == 2
    assert seen_uniques(tmp_path) == [unique, unique]
    # The WORK_FAIL after an exception is refused (the exception ended the job); the second
    # job was handled after that ERROR on the same connection, so the count is final.
    expected_errors = 0 if exception is None else 1
    assert worker.log_text().count("JOB_NOT_FOUND") == expected_errors, worker.log_text()


def test_scripted_retry_complete_sends_three_final_packets(gearmand: Gearmand, tmp_path: Path) -> None:
    """`retry+complete` (send_job_exception, then return): WORK_EXCEPTION, WORK_FAIL and
    WORK_COMPLETE for one handle. gearmand ends the job at the exception, so the client
    never sees `late 1`, and both later packets get ERROR JOB_NOT_FOUND; the worker goes on."""
    unique = "extra-scripted-retry+complete"
    payload = "retry+complete,ok|x"
    with PeerSet() as peers:
        worker = peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        first = run_pyclient(gearmand.address, "scripted", payload, unique=unique, exceptions=True)
        assert first.returncode == 1, first.stderr
        assert first.report["exception"] == "RETRY: scripted 1"
        assert first.report["ended_by"] == "WORK_EXCEPTION"
        assert first.report["result_len"] is None

        # A client without the exceptions option gets the stray-NUL WORK_FAIL, not `late 2`.
        noopt = run_pyclient(gearmand.address, "scripted", "retry+complete|y", unique=f"{unique}-noopt")
        assert noopt.returncode == 1, noopt.stderr
        assert noopt.report["stray_nul_fail"] is True
        assert noopt.report["result_len"] is None

        _assert_alive(worker)
        second = run_pyclient(gearmand.address, "scripted", payload, unique=unique)
        assert (second.returncode, second.stdout) == (0, b"ok after 2"), second.stderr
    refused = [ln for ln in worker.log_text().splitlines() if "JOB_NOT_FOUND" in ln]
    assert len(refused) == 4, worker.log_text()  # WORK_FAIL + WORK_COMPLETE, twice
    assert all("Job given in work result not found" in ln for ln in refused)
    assert [a.action for a in attempts_log(tmp_path)] == ["retry+complete", "retry+complete", "ok"]


def test_scripted_retry_data_after_the_end_is_refused(gearmand: Gearmand, tmp_path: Path) -> None:
    """`retry+data`: the WORK_DATA sent after WORK_EXCEPTION + WORK_FAIL never reaches the
    client (the job is gone) and gets ERROR JOB_NOT_FOUND `Job does not exist on server`."""
    unique = "extra-scripted-retry+data"
    with PeerSet() as peers:
        worker = peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        run = run_pyclient(gearmand.address, "scripted", "retry+data|x", unique=unique, exceptions=True)
        assert run.returncode == 1, run.stderr
        assert run.report["exception"] == "RETRY: scripted 1"
        assert run.report["data_updates"] == []
        _assert_alive(worker)
        ok = run_pyclient(gearmand.address, "scripted", "ok|x", unique=f"{unique}-next")
        assert (ok.returncode, ok.stdout) == (0, b"ok after 1"), ok.stderr
    log = worker.log_text()
    assert log.count("Job given in work result not found") == 1, log  # the WORK_FAIL
    assert log.count("Job does not exist on server") == 1, log  # the WORK_DATA


@pytest.mark.parametrize(("action", "exit_code"), [("exit", 3), ("hang", 0)])
def test_scripted_worker_lost_mid_job_is_requeued(
    gearmand: Gearmand, tmp_path: Path, action: str, exit_code: int
) -> None:
    """`exit` (the worker dies) and `hang` (the test stops it with SIGTERM): gearmand requeues
    the job silently, with the same handle, and a second worker completes it (attempt 2)."""
    unique = f"extra-scripted-lost-{action}"
    with PeerSet() as peers:
        first = peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        client = peers.add(
            start_pyclient(gearmand.address, "scripted", f"{action},ok|x", unique=unique, timeout=WAIT_S)
        )
        wait_for(lambda: len(attempts_log(tmp_path)) == 1, WAIT_S, f"the `{action}` attempt")
        if action == "hang":
            gearmand.wait_for_queue("scripted", total=1, running=1)
            assert first.stop() == exit_code, first.log_text()
        else:
            assert first.wait(WAIT_S) == exit_code, first.log_text()
        peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        run = client.result()
    assert (run.returncode, run.stdout) == (0, b"ok after 2"), run.stderr
    log = attempts_log(tmp_path)
    assert [(a.attempt, a.action) for a in log] == [(1, action), (2, "ok")]
    assert log[0].handle == log[1].handle == run.report["handle"]


def test_scripted_sleep_then_complete(gearmand: Gearmand, tmp_path: Path) -> None:
    """`sleep=0.3`: completes after sleeping; the client waited at least that long after the
    attempt was logged."""
    with PeerSet() as peers:
        peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        run = run_pyclient(gearmand.address, "scripted", "sleep=0.3|x", unique="extra-scripted-sleep")
        finished = time.monotonic()
    assert (run.returncode, run.stdout) == (0, b"ok after 1"), run.stderr
    assert run.report["elapsed"] >= 0.3
    (attempt,) = attempts_log(tmp_path)
    assert attempt.action == "sleep=0.3"
    assert finished - attempt.time >= 0.3  # the worker's monotonic clock is ours


# -- Perl worker: die_plain and --timeout against gearmand ---------------------------------


def test_perl_die_plain_kills_worker_on_gearmand(gearmand: Gearmand) -> None:
    """die_plain: the client sees the frozen unmarked message; gearmand refuses the WORK_FAIL
    that follows and the Perl worker dies on that ERROR (exit 255)."""
    with PeerSet() as peers:
        worker = peers.add(start_perlworker(gearmand.address))
        run = run_pyclient(gearmand.address, "die_plain", "x", unique="extra-die-plain", exceptions=True)
        assert run.returncode == 1, run.stderr
        assert run.report["exception"] == PERL_BOOM.decode()
        assert run.report["ended_by"] == "WORK_EXCEPTION"
        assert worker.wait(WAIT_S) == 255, worker.log_text()
    log = worker.log_text()
    assert "Job 'die_plain' died: boom: unmarked" in log
    assert "unexpected packet type: error [JOB_NOT_FOUND" in log


@pytest.mark.parametrize(("value", "expected_s"), [("30", 1.0), ("1500", 1.5)])
def test_perl_timeout_requeues_after_milliseconds(
    gearmand: Gearmand, tmp_path: Path, value: str, expected_s: float
) -> None:
    """--timeout block=VALUE: gearmand requeues the held job VALUE ms after assigning it
    ("30" is raised to the 1000 ms minimum). The worker's late WORK_COMPLETE is refused (it
    dies on the ERROR) and another worker completes the job under the same handle."""
    gearmand.wait_for_queue("block", total=0)  # the session server holds no stale block job
    gate = tmp_path / "gate"
    with PeerSet() as peers:
        perl = peers.add(start_perlworker(gearmand.address, timeouts={"block": value}))
        client = peers.add(start_pyclient(gearmand.address, "block", str(gate), timeout=WAIT_S))
        handle = _wait_file(Path(f"{gate}.started")).decode()
        assigned = time.monotonic()
        gearmand.wait_for_queue("block", total=1, running=0, timeout=expected_s + 5)
        waited = time.monotonic() - assigned
        # Never before the timeout; and read as seconds it would take 30 s or more. (No tight
        # upper bound: a loaded machine may be late, and that proves nothing about the unit.)
        assert expected_s - 0.25 <= waited < 10, waited
        wait_for(
            lambda: f"Worker timeout reached on job, requeueing: {handle}" in gearmand.log_tail(400),
            WAIT_S,
            "gearmand to log the timeout",
        )

        gate.touch()  # the Perl handler returns; its WORK_COMPLETE is for a requeued job
        assert perl.wait(WAIT_S) == 255, perl.log_text()
        assert "unexpected packet type: error [JOB_NOT_FOUND" in perl.log_text()
        peers.add(start_pyworker(gearmand.address))  # takes the requeued job; gate exists
        run = client.result()
    assert (run.returncode, run.stdout) == (0, b"unblocked"), run.stderr
    assert run.report["handle"] == handle


# -- pyburst -------------------------------------------------------------------------------


def test_pyburst_ten_reverse_jobs(gearmand: Gearmand) -> None:
    """Ten jobs in flight on one connection, each with its own unique and result."""
    with PeerSet() as peers:
        peers.add(start_pyworker(gearmand.address))
        run = run_pyburst(gearmand.address, "reverse", 10, "job-{i}", unique="extra-burst-{i}")
    assert run.returncode == 0, (run.stdout, run.stderr)
    jobs = run.jobs
    assert [j["i"] for j in jobs] == list(range(10))
    assert run.states == ["COMPLETE"] * 10
    assert [j["result"] for j in jobs] == [f"job-{i}"[::-1] for i in range(10)]
    assert [j["unique"] for j in jobs] == [f"extra-burst-{i}" for i in range(10)]
    assert len({j["handle"] for j in jobs}) == 10
    assert all(j["exception"] is None for j in jobs)


def test_pyburst_exceptions_end_each_job(gearmand: Gearmand, tmp_path: Path) -> None:
    """--exceptions: every WORK_EXCEPTION ends its job (FAILED, payload kept); exit 1."""
    with PeerSet() as peers:
        peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        run = run_pyburst(
            gearmand.address, "scripted", 3, "fatal|{i}", unique="extra-burst-exc-{i}", exceptions=True
        )
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert run.states == ["FAILED"] * 3
    assert [j["exception"] for j in run.jobs] == ["FATAL: scripted 1"] * 3


def test_pyburst_background_at_a_rate(gearmand: Gearmand) -> None:
    """--background --rate 20: five jobs take at least 4/20 s to submit; all are accepted
    and the worker drains them."""
    with PeerSet() as peers:
        peers.add(start_pyworker(gearmand.address))
        run = run_pyburst(
            gearmand.address, "reverse", 5, "bg-{i}", unique="extra-burst-bg-{i}", background=True, rate=20
        )
        assert run.returncode == 0, (run.stdout, run.stderr)
        assert run.report["submitted"] == 5
        assert len(set(run.report["handles"])) == 5
        assert run.report["elapsed"] >= 4 / 20
        gearmand.wait_for_queue("reverse", total=0)


# -- the Perl job server (Gearman::Server) -------------------------------------------------


def test_perl_server_reverse_and_admin(perl_gearmand: PerlGearmanServer) -> None:
    """The Perl worker and pyclient work through Gearman::Server; its admin replies parse
    with the gearmand helpers."""
    with PeerSet() as peers:
        peers.add(start_perlworker(perl_gearmand.address, client_id="perl-w1"))
        run = run_pyclient(perl_gearmand.address, "reverse", "hello", timeout=WAIT_S)
        assert (run.returncode, run.stdout) == (0, b"olleh"), run.stderr
        assert perl_gearmand.status()["reverse"] == (0, 0, 1)
        workers = {cid: funcs for _ip, cid, funcs in perl_gearmand.workers()}
        assert set(workers["perl-w1"]) >= {"reverse", "echo", "flaky", "die_plain", "block"}
    assert perl_gearmand.admin("version") == "v1.130.1"


def test_perl_server_exception_is_not_final(perl_gearmand: PerlGearmanServer, tmp_path: Path) -> None:
    """Gearman::Server relays the Perl worker's WORK_EXCEPTION to a client with the exceptions
    option and ends the job only at the WORK_FAIL after it, which it accepts: the worker
    survives and completes the next attempt. A client without the option sees a plain
    WORK_FAIL (no stray NUL, unlike gearmand 1.1.20)."""
    address = perl_gearmand.address
    with PeerSet() as peers:
        worker = peers.add(start_perlworker(address, state_dir=tmp_path))
        run = run_pyclient(address, "flaky", "1:a", exceptions=True, exception_final=False, timeout=WAIT_S)
        assert run.returncode == 1, run.stderr
        assert run.report["exception_updates"] == [PERL_RETRY_1.decode()]
        assert run.report["ended_by"] == "WORK_FAIL"  # the exception did not end the job
        _assert_alive(worker)

        plain = run_pyclient(address, "flaky", "1:b", timeout=WAIT_S)
        assert plain.returncode == 1, plain.stderr
        assert plain.report["ended_by"] == "WORK_FAIL"
        assert plain.report["exception"] is None
        assert plain.report["stray_nul_fail"] is False

        again = run_pyclient(address, "flaky", "1:a", timeout=WAIT_S)
        assert (again.returncode, again.stdout) == (0, b"ok after 2"), again.stderr
        _assert_alive(worker)
    assert attempt_count(tmp_path, "1:a") == 2
    assert "unexpected packet type" not in worker.log_text()


def _read_packet(sock: socket.socket, deadline: float) -> tuple[bytes, int, bytes]:
    """One binary packet (magic, type, payload) from sock, TimeoutError after `deadline`."""
    buf = b""
    while len(buf) < 12 or len(buf) < 12 + struct.unpack(">I", buf[8:12])[0]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"incomplete packet {buf!r}")
        sock.settimeout(remaining)
        chunk = sock.recv(1 if len(buf) < 12 else 12 + struct.unpack(">I", buf[8:12])[0] - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    magic, ptype, _size = struct.unpack(">4sII", buf[:12])
    return magic, ptype, buf[12:]


def test_perl_server_refuses_grab_job_uniq(perl_gearmand: PerlGearmanServer) -> None:
    """GRAB_JOB_UNIQ is unknown to Gearman::Server: `ERROR server_error` (the Perl error
    text); the connection stays usable, a plain GRAB_JOB right after gets NO_JOB."""
    deadline = time.monotonic() + WAIT_S
    with socket.create_connection(perl_gearmand.address, timeout=WAIT_S) as sock:
        sock.sendall(struct.pack(">4sII", b"\0REQ", GRAB_JOB_UNIQ, 0))
        sock.sendall(struct.pack(">4sII", b"\0REQ", GRAB_JOB, 0))
        magic, ptype, payload = _read_packet(sock, deadline)
        assert (magic, ptype) == (b"\0RES", ERROR), payload
        code, _, text = payload.partition(b"\0")
        assert code == b"server_error"
        assert b"Can't locate object method" in text
        assert _read_packet(sock, deadline)[:2] == (b"\0RES", NO_JOB)
