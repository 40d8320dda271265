"""The `gproxy` command as an operator runs it: it starts, says where it listens, and stops."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys

from tests.gearmand import Gearmand
from tests.peer_procs import PeerSet, run_cli_client, start_cli_worker

GPROXY = [sys.executable, "-m", "gproxy"]


def test_the_command_proxies_and_stops_on_sigint(gearmand: Gearmand) -> None:
    host, port = gearmand.address
    proc = subprocess.Popen(
        [*GPROXY, "--listen", "127.0.0.1:0", "--upstream", f"{host}:{port}"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stderr.readline()
        listening = re.search(r"listening on 127\.0\.0\.1:(\d+), proxying to gearmand", line)
        assert listening, line
        proxy_address = ("127.0.0.1", int(listening.group(1)))
        with PeerSet() as peers:
            peers.add(start_cli_worker(proxy_address, "cli-cmd", ["printf", "ok"], admin_address=gearmand.address))
            assert run_cli_client(gearmand.address, "cli-cmd", "x").stdout == b"ok"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def test_a_listen_address_in_use_is_one_clear_line_and_exit_1(gearmand: Gearmand) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*GPROXY, "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:4730"],
            capture_output=True, text=True, timeout=10,
        )
    assert result.returncode == 1
    assert "cannot start: [Errno 98]" in result.stderr and "in use" in result.stderr


def test_a_metrics_address_in_use_is_one_clear_line_and_exit_1(gearmand: Gearmand) -> None:
    host, port = gearmand.address
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        result = subprocess.run(
            [*GPROXY, "--listen", "127.0.0.1:0", "--upstream", f"{host}:{port}",
             "--metrics-listen", f"127.0.0.1:{metrics_port}"],
            capture_output=True, text=True, timeout=10,
        )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line or "Traceback" in line]
    assert len(errors) == 1 and "cannot start: [Errno 98]" in errors[0], result.stderr
