"""gproxy's own limits are gproxy's: a real `gproxy` process short of file descriptors, in
front of a real gearmand that is up and idle the whole time.

The test sets gproxy's soft RLIMIT_NOFILE from outside (prlimit, as `ulimit -n` or systemd's
LimitNOFILE would have at its start) to exactly what it holds idle, two descriptors for each
of SERVED workers, and one more. That one is what makes the test exact: each further worker
is accepted on it, and gproxy's connection to gearmand for it fails with EMFILE; with none to
spare, accept() itself fails. Both must be logged as gproxy's own limit and counted in
gproxy_resource_exhausted_total, never as gearmand unreachable, and gproxy must serve again
as soon as descriptors are free.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gproxy.config import Address
from gproxy.core.protocol import REQ, RES, Framer, PacketType, build_packet
from tests.gearmand import Gearmand, wait_for
from tests.test_metrics import http_get
from tests.peer_procs import PeerSet, start_pyclient, start_pyworker

WAIT_S = 15.0
SERVED = 4
"""Workers gproxy has descriptors for."""
SURPLUS = 5
"""Workers beyond those, one at a time: each is accepted, then closed."""
FUNCTION = b"resource_limits"


@dataclass
class Gproxy:
    proc: subprocess.Popen[bytes]
    log_path: Path
    address: tuple[str, int]
    metrics: tuple[str, int]

    def log(self) -> str:
        return self.log_path.read_text()

    def descriptors(self) -> list[int]:
        return sorted(int(fd) for fd in os.listdir(f"/proc/{self.proc.pid}/fd"))

    def limit_descriptors(self, soft: int) -> None:
        _, hard = resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))

    def get(self, path: str) -> tuple[int, str]:
        """One request, read to its end: gproxy closes the connection after answering, so
        its descriptor is free again when this returns."""
        return http_get(Address(*self.metrics), path)

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@contextmanager
def gproxy(gearmand: Gearmand, tmp_path: Path, settings: str = "") -> Iterator[Gproxy]:
    host, port = gearmand.address
    config = tmp_path / "gproxy.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\nupstream = "{host}:{port}"\nmetrics_listen = "127.0.0.1:0"\n{settings}'
    )
    log_path = tmp_path / "gproxy.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gproxy", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )
    try:
        wait_for(lambda: "metrics on http" in log_path.read_text() or proc.poll() is not None, WAIT_S, "gproxy to start")
        text = log_path.read_text()
        listening = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        metrics = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", text)
        assert listening and metrics, text
        yield Gproxy(proc, log_path, ("127.0.0.1", int(listening[1])), ("127.0.0.1", int(metrics[1])))
    finally:
        proc.kill()
        proc.wait(WAIT_S)


def worker(address: tuple[str, int]) -> socket.socket:
    """A worker that registers, goes to sleep and asks for an echo: answered through gearmand
    if gproxy serves it."""
    s = socket.create_connection(address, timeout=WAIT_S)
    s.sendall(
        build_packet(REQ, PacketType.CAN_DO, function=FUNCTION)
        + build_packet(REQ, PacketType.PRE_SLEEP)
        + build_packet(REQ, PacketType.ECHO_REQ, data=b"served?")
    )
    return s


def served(s: socket.socket) -> bool:
    """True once gearmand's echo arrives through gproxy; False if gproxy closes the worker."""
    framer = Framer(RES)
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:  # closed with the worker's packets unread
            return False
        if not chunk:
            return False
        if any(frame.type is PacketType.ECHO_RES for frame in framer.receive(chunk)):
            return True


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_out_of_file_descriptors_is_gproxys_own_limit_not_gearmand(gearmand: Gearmand, tmp_path: Path) -> None:
    upstream = f"{gearmand.address[0]}:{gearmand.address[1]}"
    with gproxy(gearmand, tmp_path) as running, ExitStack() as stack:
        assert running.get("/readyz") == (200, "ready\n")
        idle = running.descriptors()
        assert idle == list(range(len(idle))), idle  # no gap: what is free is above them
        limit = len(idle) + 2 * SERVED + 1
        running.limit_descriptors(limit)

        workers = [stack.enter_context(worker(running.address)) for _ in range(SERVED)]
        assert all(served(w) for w in workers)

        # Accepted on the spare descriptor, then closed: gearmand's connection is one too many.
        for _ in range(SURPLUS):
            with worker(running.address) as surplus:
                assert not served(surplus)
        log = running.log()
        refusals = [line for line in log.splitlines() if ": closed: " in line]
        assert len(refusals) == SURPLUS, log
        for line in refusals:
            assert f"to gearmand {upstream}): closed: gproxy cannot open a connection to gearmand: " in line, line
            assert "[Errno 24] Too many open files (gproxy's own limit: " in line, line
            assert "LimitNOFILE" in line and "ulimit -n" in line, line
        assert "unreachable" not in log, log

        samples = running.samples()
        assert sample(samples, "gproxy_resource_exhausted_total", resource="file_descriptors") == SURPLUS
        for other in ("memory", "buffers", "local_ports"):
            assert sample(samples, "gproxy_resource_exhausted_total", resource=other) == 0
        assert sample(samples, "gproxy_upstream_up", upstream=upstream) == 1
        assert sample(samples, "gproxy_upstream_connect_errors_total") == 0
        assert sample(samples, "gproxy_connections", side="worker") == SERVED

        # The readiness probe cannot connect either, and says whose limit it is.
        status, body = running.get("/readyz")
        assert status == 503, body
        assert body.startswith(f"gproxy cannot open a connection to gearmand {upstream}: [Errno 24]"), body
        assert "gproxy's own limit" in body and "unreachable" not in body, body

        # Not one descriptor to spare: accept() itself fails, and the worker waits in the
        # listen queue until gproxy has room (a served worker leaves): then it is served.
        running.limit_descriptors(limit - 1)
        waiting = stack.enter_context(worker(running.address))
        wait_for(lambda: "cannot accept" in running.log(), WAIT_S, "accept() to fail")
        [line] = [line for line in running.log().splitlines() if "cannot accept" in line]
        assert "[Errno 24] Too many open files (gproxy's own limit: " in line, line
        workers.pop().close()
        assert served(waiting)
        workers.append(waiting)

        # Room again (a raised limit): everything as it was, gearmand never blamed.
        running.limit_descriptors(limit + 4)
        samples = running.samples()
        assert sample(samples, "gproxy_resource_exhausted_total", resource="file_descriptors") >= SURPLUS + 2
        assert sample(samples, "gproxy_upstream_up", upstream=upstream) == 1
        assert sample(samples, "gproxy_upstream_connect_errors_total") == 0
        assert running.get("/readyz") == (200, "ready\n")
        fresh = stack.enter_context(worker(running.address))
        assert served(fresh)
        assert all(w.fileno() != -1 for w in workers)
        assert "unreachable" not in running.log()


def test_the_retry_connection_and_a_move_say_gproxys_own_limit_too(gearmand: Gearmand, tmp_path: Path) -> None:
    """The two other ways gproxy connects to gearmand, with not one descriptor to spare: the
    retry client for a held job, and a worker's move to a fresh connection (pygearman's
    unregister: RESET_ABILITIES while a job is held). Then room again: nothing is lost."""
    upstream = f"{gearmand.address[0]}:{gearmand.address[1]}"
    with gproxy(gearmand, tmp_path, "[retry]\nbackoff_initial = 0.05\njitter = false\n") as running, PeerSet() as peers:
        peers.add(start_pyworker(running.address, state_dir=tmp_path))
        held = running.descriptors()
        assert held == list(range(len(held))), held  # no gap below the limit: none to spare
        running.limit_descriptors(len(held))

        flaky = peers.add(start_pyclient(gearmand.address, "flaky", "1:limits", unique="limits-held"))
        wait_for(lambda: "cannot connect" in running.log(), WAIT_S, "the retry client to try")
        [line] = [line for line in running.log().splitlines() if "cannot connect" in line]
        assert f"retry client to gearmand {upstream}: cannot connect ([Errno 24] Too many open files (gproxy's own limit: " in line, line

        unregister = peers.add(start_pyclient(gearmand.address, "unregister", "echo", unique="limits-move"))
        wait_for(lambda: ": closed: " in running.log(), WAIT_S, "the move to fail")
        line = next(line for line in running.log().splitlines() if ": closed: " in line)
        assert "closed: gproxy cannot open a fresh connection to gearmand: [Errno 24] Too many open files (gproxy's own limit: " in line, line

        running.limit_descriptors(len(held) + 16)
        assert flaky.result().stdout.startswith(b"ok after "), flaky.result()
        assert unregister.result().stdout == b"unregistered"
        samples = running.samples()
        assert sample(samples, "gproxy_resource_exhausted_total", resource="file_descriptors") >= 2
        assert sample(samples, "gproxy_upstream_up", upstream=upstream) == 1
        assert sample(samples, "gproxy_upstream_connect_errors_total") == 0
        log = running.log()
        assert "unreachable" not in log, log
        closed = [line for line in log.splitlines() if ": closed: " in line]
        assert all("gproxy's own limit" in line for line in closed), closed  # (pygearman's reconnects, if any)
