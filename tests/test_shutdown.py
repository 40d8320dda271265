"""Graceful shutdown of the `gproxy` command, with real workers and a real gearmand.

SIGTERM: gproxy stops accepting and stops handing out jobs, lets running jobs and held
retries finish within the grace period, hands back the rest (gearmand requeues it) and
exits 0. Nothing is lost either way.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import PeerSet, seen_uniques, start_pyclient, start_pyworker
from tests.proxy_thread import ProxyThread

WAIT_S = 15.0


@contextmanager
def gproxy(gearmand: Gearmand, tmp_path: Path, grace: float) -> Iterator[tuple[subprocess.Popen, tuple[str, int]]]:
    host, port = gearmand.address
    config = tmp_path / "gproxy.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\nupstream = "{host}:{port}"\nshutdown_grace_period = {grace}\n'
        "[retry]\nbackoff_initial = 0.5\njitter = false\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "gproxy", "--config", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        listening = re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.stderr.readline())
        assert listening
        yield proc, ("127.0.0.1", int(listening.group(1)))
    finally:
        proc.kill()
        proc.wait(WAIT_S)


def refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_running_jobs_and_held_retries_then_exits_0(gearmand: Gearmand, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with ExitStack() as stack, gproxy(gearmand, tmp_path, grace=30) as (proc, address), PeerSet() as peers:
        for _ in range(2):  # one will be busy with the blocking job
            peers.add(start_pyworker(address, state_dir=tmp_path))
        running = peers.add(start_pyclient(gearmand.address, "block", str(gate), unique="drain-block"))
        wait_for(Path(f"{gate}.started").exists, WAIT_S, "the running job")
        held = peers.add(start_pyclient(gearmand.address, "flaky", "1:drain", unique="drain-held"))
        wait_for(lambda: len(seen_uniques(tmp_path)) == 1, WAIT_S, "the failed first attempt")
        # The retry runs on another worker, behind a gproxy of its own (as in production:
        # that gproxy shows it the original unique id).
        other = stack.enter_context(ProxyThread.to(gearmand.address))
        peers.add(start_pyworker(other.address, state_dir=tmp_path))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: refused(address), WAIT_S, "gproxy to stop accepting")
        assert held.result().stdout == b"ok after 2"  # the held retry finished during the drain
        assert proc.poll() is None  # still waiting for the running job
        gate.touch()
        assert running.result().stdout == b"unblocked"
        assert proc.wait(WAIT_S) == 0
        assert time.monotonic() - started < 30
    log = proc.stderr.read()
    assert "drained: every job finished" in log, log


def test_jobs_still_running_after_the_grace_period_are_handed_back(gearmand: Gearmand, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with gproxy(gearmand, tmp_path, grace=0.5) as (proc, address), PeerSet() as peers:
        peers.add(start_pyworker(address, state_dir=tmp_path))
        client = peers.add(start_pyclient(gearmand.address, "block", str(gate), unique="grace-over"))
        wait_for(Path(f"{gate}.started").exists, WAIT_S, "the running job")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
        # gearmand got the job back when gproxy's connection closed; another worker runs it.
        gearmand.wait_for_queue("block", total=1, running=0)
        Path(f"{gate}.started").unlink()
        peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        wait_for(Path(f"{gate}.started").exists, WAIT_S, "the job to run again")
        gate.touch()
        assert client.result().stdout == b"unblocked"
    assert "handed back to gearmand" in proc.stderr.read()
