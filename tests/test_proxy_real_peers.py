"""gproxy between real Gearman libraries and a real gearmand: nobody can tell it is there.

Workers connect through gproxy; clients connect to gearmand directly unless a test says
otherwise. Each library asks for jobs its own way: libgearman with GRAB_JOB_ALL, pygearman
with GRAB_JOB_UNIQ, Perl Gearman::Worker with GRAB_JOB.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from gproxy.config import Address, Config, Route
from tests.gearmand import Gearmand, admin, parse_workers, wait_for
from tests.peer_procs import (
    PeerProcess,
    PeerSet,
    run_cli_client,
    run_pyclient,
    start_cli_worker,
    start_perlworker,
    start_pyclient,
    start_pyworker,
)
from tests.proxy_thread import ProxyThread

WAIT_S = 10.0

# `block` for the libgearman CLI worker: same contract as the pyworker's (see tests/peers).
BLOCK_SH = [
    "sh", "-c",
    'read -r p || true; printf started > "$p.started"; '
    'while [ ! -e "$p" ]; do sleep 0.01; done; printf unblocked',
]


def wait_file(path: Path) -> bytes:
    wait_for(path.exists, WAIT_S, f"{path} to appear")
    return path.read_bytes()


def test_libgearman_worker_and_clients_through_the_proxy(gearmand: Gearmand, proxy: ProxyThread) -> None:
    with PeerSet() as peers:
        peers.add(start_cli_worker(proxy.address, "cli-wc", ["wc", "-c"], admin_address=gearmand.address))
        direct = run_cli_client(gearmand.address, "cli-wc", "hello")
        via_proxy = run_cli_client(proxy.address, "cli-wc", b"a\0b")
    assert (direct.returncode, direct.stdout.strip()) == (0, b"5"), direct.stderr
    assert (via_proxy.returncode, via_proxy.stdout.strip()) == (0, b"3"), via_proxy.stderr


@pytest.mark.parametrize("size", [0, 1, 3 * 1024 * 1024 + 7])
def test_payloads_with_nul_bytes_of_several_mib(
    gearmand: Gearmand, proxy: ProxyThread, tmp_path: Path, size: int
) -> None:
    payload = (b"\0head\0" + bytes(range(256)) * (size // 256 + 1))[:size]
    out = tmp_path / "result"
    with PeerSet() as peers:
        peers.add(start_pyworker(proxy.address))
        run = run_pyclient(proxy.address, "reverse", payload, out=out, timeout=60)
    assert (run.returncode, run.state) == (0, "COMPLETE"), run.stderr
    assert out.read_bytes() == payload[::-1]


def test_data_warning_and_status_stream_to_the_client(gearmand: Gearmand, proxy: ProxyThread) -> None:
    with PeerSet() as peers:
        peers.add(start_pyworker(proxy.address))
        run = run_pyclient(gearmand.address, "stream", "x")
    assert (run.returncode, run.stdout) == (0, b"done"), run.stderr
    assert run.report["data_updates"] == ["part1", "part2"]
    assert run.report["warning_updates"] == ["careful"]
    assert run.report["status_updates"] == [[1, 2], [2, 2]]


def test_perl_grab_job_worker_gets_a_plain_job_assign(gearmand: Gearmand, proxy: ProxyThread) -> None:
    # Perl's worker breaks on anything but JOB_ASSIGN after GRAB_JOB: it working proves the
    # JOB_ASSIGN_UNIQ from upstream was turned back into what it asked for.
    with PeerSet() as peers:
        peers.add(start_perlworker(proxy.address))
        runs = [run_cli_client(gearmand.address, "reverse", f"job {n}\0".encode()) for n in range(3)]
    assert [(r.returncode, r.stdout) for r in runs] == [(0, f"\0{n} boj".encode()) for n in range(3)]


WORKERS: dict[str, Callable[[tuple[str, int], Gearmand], PeerProcess]] = {
    "GRAB_JOB (Perl)": lambda at, g: start_perlworker(at),
    "GRAB_JOB_UNIQ (pygearman)": lambda at, g: start_pyworker(at),
    "GRAB_JOB_ALL (libgearman)": lambda at, g: start_cli_worker(at, "block", BLOCK_SH, admin_address=g.address),
}


@pytest.mark.parametrize("start_worker", WORKERS.values(), ids=WORKERS.keys())
def test_every_assigned_job_is_tracked_until_it_ends(
    gearmand: Gearmand, proxy: ProxyThread, tmp_path: Path, start_worker
) -> None:
    gate, unique = tmp_path / "gate", f"tracked-{tmp_path.name}"[-63:]
    with PeerSet() as peers:
        peers.add(start_worker(proxy.address, gearmand))
        client = peers.add(start_pyclient(gearmand.address, "block", str(gate), unique=unique))
        wait_file(Path(f"{gate}.started"))
        (job,) = proxy.tracked_jobs()
        assert (job.function, job.unique, job.payload) == (b"block", unique.encode(), str(gate).encode())
        assert job.handle.startswith(b"H:")
        gate.touch()
        run = client.result()
    assert (run.returncode, run.stdout) == (0, b"unblocked"), run.stderr
    assert run.report["handle"] == job.handle.decode()
    wait_for(lambda: proxy.tracked_jobs() == [], WAIT_S, "the finished job to be forgotten")


def test_background_jobs_pass_through(gearmand: Gearmand, proxy: ProxyThread, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with PeerSet() as peers:
        peers.add(start_pyworker(proxy.address))
        run = run_pyclient(gearmand.address, "block", str(gate), unique="bg-through-proxy", background=True)
        assert run.returncode == 0, run.stderr
        assert wait_file(Path(f"{gate}.started")) == b"bg-through-proxy"
        gearmand.wait_for_queue("block", total=1, running=1)
        gate.touch()
        gearmand.wait_for_queue("block", total=0)


def test_admin_commands_through_the_proxy_port(gearmand: Gearmand, proxy: ProxyThread) -> None:
    with PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, client_id="through-gproxy"))
        for command in ("status", "version", "getpid", "show jobs", "maxqueue reverse"):
            assert admin(proxy.address, command) == admin(gearmand.address, command), command
        workers = parse_workers(admin(proxy.address, "workers"))
        assert any(
            client_id == "through-gproxy" and {"reverse", "echo", "stream", "block"} <= set(functions)
            for _, client_id, functions in workers
        ), workers
    for flag in ("--status", "--workers", "--server-version"):
        result = subprocess.run(
            ["gearadmin", "-h", proxy.address[0], "-p", str(proxy.address[1]), flag],
            capture_output=True, timeout=WAIT_S,
        )
        assert result.returncode == 0 and result.stdout, (flag, result.stderr)


def test_worker_lost_mid_job_is_requeued_by_gearmand(
    gearmand: Gearmand, proxy: ProxyThread, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with PeerSet() as peers:
        doomed = start_pyworker(proxy.address)
        client = peers.add(start_pyclient(gearmand.address, "block", str(gate), unique="lost-worker"))
        wait_file(Path(f"{gate}.started"))
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait(WAIT_S)
        # gproxy closes the worker's gearmand connection; gearmand puts the job back in the queue.
        gearmand.wait_for_queue("block", total=1, running=0)
        wait_for(lambda: proxy.tracked_jobs() == [], WAIT_S, "the lost worker's job to be released")
        Path(f"{gate}.started").unlink()
        peers.add(start_pyworker(proxy.address))
        wait_file(Path(f"{gate}.started"))
        gate.touch()
        run = client.result()
    assert (run.returncode, run.stdout) == (0, b"unblocked"), run.stderr


def test_gearmand_restarted_under_the_proxy(fresh_gearmand: Gearmand, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "gproxy")
    with ProxyThread.to(fresh_gearmand.address) as proxy, PeerSet() as peers:
        worker = peers.add(start_pyworker(proxy.address))
        assert run_pyclient(fresh_gearmand.address, "echo", "before").stdout == b"before"
        fresh_gearmand.restart()
        # gproxy closes the worker's side when gearmand goes; the worker reconnects through it.
        worker.wait_for_line("reconnected", WAIT_S)
        after = run_pyclient(fresh_gearmand.address, "echo", "after")
    assert (after.returncode, after.stdout) == (0, b"after"), after.stderr
    assert any("gearmand closed the connection" in r.getMessage() for r in caplog.records)


def test_one_process_serves_several_routes(gearmand: Gearmand, fresh_gearmand: Gearmand) -> None:
    routes = tuple(
        Route(Address("127.0.0.1", 0), Address(*server.address)) for server in (gearmand, fresh_gearmand)
    )
    with ProxyThread(Config(routes=routes)) as proxy, PeerSet() as peers:
        first, second = (listen.host_port for listen in proxy.proxy.listen_addresses)
        peers.add(start_cli_worker(first, "route-a", ["printf", "a"], admin_address=gearmand.address))
        peers.add(start_cli_worker(second, "route-b", ["printf", "b"], admin_address=fresh_gearmand.address))
        assert run_cli_client(gearmand.address, "route-a", "x").stdout == b"a"
        assert run_cli_client(fresh_gearmand.address, "route-b", "x").stdout == b"b"
        assert "route-b" not in gearmand.status() and "route-a" not in fresh_gearmand.status()


def test_a_job_too_large_for_the_worker_is_failed_and_the_worker_keeps_its_connection(
    gearmand: Gearmand, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A job of exactly max_packet_size bytes arrives as a JOB_ASSIGN a few bytes larger. It
    # used to close the worker's pair; gearmand requeued it to the next worker, and so on.
    caplog.set_level(logging.WARNING, "gproxy")
    limit = 64 * 1024
    with ProxyThread.to(gearmand.address, max_packet_size=limit) as proxy, PeerSet() as peers:
        worker = peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        big = run_pyclient(gearmand.address, "reverse", b"x" * limit, exceptions=True)
        small = run_pyclient(gearmand.address, "reverse", "abc")
        assert proxy.sample("gproxy_connections", side="worker") == 1
        assert worker.poll() is None
    assert big.state == "FAILED" and f"exceeds max_packet_size {limit}" in big.report["exception"], big.stderr
    assert small.stdout == b"cba"
    assert "reconnect" not in worker.log_text()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "reverse" in warnings[0] and f"over max_packet_size {limit}" in warnings[0]
