"""The real-peer helpers, proven directly against gearmand (no proxy in between).

If these fail, the integration tests through gproxy cannot be trusted either.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import (
    PeerSet,
    run_cli_client,
    run_pyclient,
    start_cli_worker,
    start_perlworker,
    start_pyclient,
    start_pyworker,
)

WAIT_S = 10.0


def _wait_file(path: Path, timeout: float = WAIT_S) -> bytes:
    wait_for(path.exists, timeout, f"{path} to appear")
    return path.read_bytes()


def test_pyworker_reverse_3mib_with_nuls(gearmand: Gearmand, tmp_path: Path) -> None:
    payload = b"\0\0head" + bytes(range(256)) * (3 * 4096) + b"tail\0"
    out = tmp_path / "result"
    with PeerSet() as peers:
        peers.add(start_pyworker(gearmand.address))
        run = run_pyclient(gearmand.address, "reverse", payload, out=out, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.state == "COMPLETE"
    assert out.read_bytes() == payload[::-1]


def test_stream_updates_reach_pyclient(gearmand: Gearmand) -> None:
    with PeerSet() as peers:
        peers.add(start_pyworker(gearmand.address))
        run = run_pyclient(gearmand.address, "stream", "x")
    assert run.returncode == 0, run.stderr
    assert run.stdout == b"done"
    report = run.report
    assert report["data_updates"] == ["part1", "part2"]
    assert report["warning_updates"] == ["careful"]
    assert report["status_updates"] == [[1, 2], [2, 2]]
    assert report["status"] == {"numerator": 2, "denominator": 2}


def test_pyworker_sees_unique(gearmand: Gearmand) -> None:
    with PeerSet() as peers:
        peers.add(start_pyworker(gearmand.address))
        run = run_pyclient(gearmand.address, "unique", "x", unique="direct-unique-1")
    assert run.returncode == 0, run.stderr
    assert run.stdout == b"direct-unique-1"


def test_perl_worker_reverse_via_cli_client(gearmand: Gearmand) -> None:
    with PeerSet() as peers:
        peers.add(start_perlworker(gearmand.address))
        text = run_cli_client(gearmand.address, "reverse", "hello")
        binary = run_cli_client(gearmand.address, "reverse", b"a\0b\0\0c")
        dash = run_cli_client(gearmand.address, "reverse", "-x")
    assert (text.returncode, text.stdout) == (0, b"olleh"), text.stderr
    assert (dash.returncode, dash.stdout) == (0, b"x-"), dash.stderr
    assert (binary.returncode, binary.stdout) == (0, b"c\0\0b\0a"), binary.stderr


def test_cli_worker_wc_with_pyclient(gearmand: Gearmand) -> None:
    with PeerSet() as peers:
        peers.add(start_cli_worker(gearmand.address, "wc", ["wc", "-c"]))
        run = run_pyclient(gearmand.address, "wc", b"12345\0")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == b"6"


def test_background_job_completed_by_pyworker(gearmand: Gearmand, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with PeerSet() as peers:
        peers.add(start_pyworker(gearmand.address))
        run = run_pyclient(gearmand.address, "block", str(gate), unique="bg-direct-1", background=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(b"H:")
        assert _wait_file(Path(f"{gate}.started")) == b"bg-direct-1"
        gearmand.wait_for_queue("block", total=1, running=1)
        gate.touch()
        gearmand.wait_for_queue("block", total=0)


def test_perl_worker_block_reports_handle(gearmand: Gearmand, tmp_path: Path) -> None:
    """Perl's Gearman::Job has no unique (JOB_ASSIGN carries none): `.started` holds the handle."""
    gate = tmp_path / "gate"
    with PeerSet() as peers:
        peers.add(start_perlworker(gearmand.address))
        client = peers.add(start_pyclient(gearmand.address, "block", str(gate), timeout=30))
        started = _wait_file(Path(f"{gate}.started"))
        gate.touch()
        run = client.result()
    assert run.returncode == 0, run.stderr
    assert run.stdout == b"unblocked"
    assert started.decode() == run.report["handle"]


def test_workers_exit_cleanly_on_sigterm(gearmand: Gearmand) -> None:
    py = start_pyworker(gearmand.address)
    perl = start_perlworker(gearmand.address)
    assert py.stop() == 0, py.log_text()
    assert perl.stop() == 0, perl.log_text()


def test_pyclient_timeout_exit_code(gearmand: Gearmand) -> None:
    run = run_pyclient(gearmand.address, "no-worker-pyclient-timeout", "x", timeout=0.5)
    assert run.returncode == 2
    assert run.state == "TIMEOUT"


def test_cli_client_is_bounded_by_timeout(gearmand: Gearmand) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli_client(gearmand.address, "no-worker-cli-timeout", "x", timeout=0.5)


def test_pyworker_reconnects_after_gearmand_restart(fresh_gearmand: Gearmand) -> None:
    with PeerSet() as peers:
        worker = peers.add(start_pyworker(fresh_gearmand.address))
        fresh_gearmand.restart()
        worker.wait_for_line("reconnected", WAIT_S)
        run = run_pyclient(fresh_gearmand.address, "echo", "after restart")
    assert (run.returncode, run.stdout) == (0, b"after restart"), run.stderr


def _grabs(server: Gearmand, start: int) -> set[str]:
    text = server.log_path.read_text(errors="replace")[start:]
    return set(re.findall(r"Received GEARMAN_(GRAB_JOB\w*)", text))


def test_grab_variant_of_each_library(tmp_path: Path) -> None:
    """gearmand's DEBUG log names each packet: check which GRAB each real library sends."""
    with Gearmand(tmp_path / "gearmand", verbose="DEBUG") as server:
        cases = [
            ("GRAB_JOB_UNIQ", lambda: start_pyworker(server.address), "echo"),
            ("GRAB_JOB", lambda: start_perlworker(server.address), "echo"),
            ("GRAB_JOB_ALL", lambda: start_cli_worker(server.address, "cat", ["cat"]), "cat"),
        ]
        for expected, start, function in cases:
            offset = len(server.log_path.read_text(errors="replace"))
            with PeerSet() as peers:
                peers.add(start())
                run = run_pyclient(server.address, function, "ping")
                assert (run.returncode, run.stdout) == (0, b"ping"), run.stderr
            wait_for(lambda: expected in _grabs(server, offset), WAIT_S, f"{expected} in the log")
            assert _grabs(server, offset) == {expected}
