"""TCP keepalive on gproxy's connections to gearmand: a gearmand that vanishes without a word
(its host loses power, the network splits: no FIN, no RST) is noticed, its workers' links
close so that they reconnect, and the retry connection starts again.

The partition is real: gearmand runs in a network namespace of the test's own, joined to
this one by a veth pair with link-local addresses, and the link is cut by a blackhole qdisc
on both of its ends (every packet dropped, nothing answered). That needs root and iproute2
(`ip`, `tc`); without them the partition tests are skipped. The test waits for the event
(the close line in the log), never for a fixed time.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from gproxy.config import Address, Config, Keepalive, Route
from gproxy.control import Proxy
from gproxy.core.policy import Policies, RetryPolicy
from tests.fault_relay import FaultRelay
from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import (
    PeerSet,
    flaky_cli_command,
    run_pyclient,
    start_cli_worker,
    start_perlworker,
    start_pyclient,
)
from tests.proxy_thread import ProxyThread

SHORT = Keepalive(idle=1, interval=1, count=2)
"""Given up after 3 s of silence: the partition test's setting."""
TIMED_OUT = "[Errno 110] Connection timed out"
UNANSWERED = re.compile(
    r"gearmand connection lost: (\[Errno 110\] Connection timed out|\[Errno 113\] No route to host)"
    r" \(gearmand's host stopped answering\)$"
)
"""The worker link's close line after a partition. Timed out, or, where the kernel's ARP
entry for gearmand expired meanwhile (after some 30 s), its ARP probes went unanswered
too and the kernel reports the host unreachable."""


# -- the options on a connection gproxy opens


def _options(sock: socket.socket) -> dict[str, int]:
    tcp = socket.IPPROTO_TCP
    return {
        "SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "TCP_KEEPIDLE": sock.getsockopt(tcp, socket.TCP_KEEPIDLE),
        "TCP_KEEPINTVL": sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
        "TCP_KEEPCNT": sock.getsockopt(tcp, socket.TCP_KEEPCNT),
        "TCP_USER_TIMEOUT": sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
    }


async def _connected(keepalive: Keepalive | None) -> dict[str, int]:
    """The options of a connection the Proxy opens to a gearmand (a bare listener here): the
    way of every connection to gearmand, a worker's, a move's, the retry client's, a probe's."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    route = Route(Address("127.0.0.1", 0), Address("127.0.0.1", port))
    config = Config(routes=(route,)) if keepalive is None else Config(routes=(route,), upstream_keepalive=keepalive)
    connection = await Proxy(config).connect(route)
    try:
        return _options(connection.sock)
    finally:
        connection.close()
        await listeners[0].aclose()


async def test_every_connection_to_gearmand_has_keepalive_and_a_user_timeout_to_match() -> None:
    assert await _connected(None) == {
        "SO_KEEPALIVE": 1, "TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 60_000,
    }
    assert await _connected(SHORT) == {
        "SO_KEEPALIVE": 1, "TCP_KEEPIDLE": 1, "TCP_KEEPINTVL": 1, "TCP_KEEPCNT": 2, "TCP_USER_TIMEOUT": 3_000,
    }
    off = await _connected(Keepalive(enabled=False))
    assert (off["SO_KEEPALIVE"], off["TCP_USER_TIMEOUT"]) == (0, 0)  # the system's defaults, untouched


# -- what the log says when a connection breaks


def test_a_broken_connection_that_only_holds_jobs_names_its_cause(
    fresh_gearmand: Gearmand, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The worker's link that breaks closes the pair, and its close line says why (below).
    # One it was moved off, which only holds a retry, breaks alone: the pair goes on.
    # (A gearmand of its own: the job it takes back is left in its queue.)
    gearmand = fresh_gearmand
    caplog.set_level(logging.INFO, logger="gproxy")
    slow = RetryPolicy(backoff_initial=1.0, jitter=False)
    with FaultRelay(gearmand.address) as relay, ProxyThread.to(relay.address, slow, frozen=True) as proxy, \
            PeerSet() as peers:
        peers.add(start_perlworker(proxy.address, state_dir=tmp_path))
        peers.add(start_pyclient(gearmand.address, "flaky", "1:broken-old-link"))
        wait_for(lambda: len(proxy.held()) == 1, 15, "the job to be held")
        assert run_pyclient(gearmand.address, "unregister", "flaky").stdout == b"unregistered"  # a move
        old = proxy.held()[0].owner
        port = int(old.name.split("->")[0])  # (gproxy's end of it, as the relay sees it)
        assert relay.reset(port)
        wait_for(lambda: bool(_lines(caplog, "retry abandoned")), 15, "the held job's connection to be lost")
        lost = _lines(caplog, f"gearmand connection {old.name} lost")
        assert [r.getMessage().split(": ", 1)[1] for r in lost] == [
            f"gearmand connection {old.name} lost: [Errno 104] Connection reset by peer"
        ]
        assert lost[0].created <= _lines(caplog, "retry abandoned")[0].created
        assert not _lines(caplog, "closed:")  # the worker is served on


# -- a real partition


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)


@dataclass
class Partition:
    """A network namespace with gearmand's address in it, reached over a veth pair."""

    namespace: str
    outside: str
    """The veth end in this namespace."""
    inside: str
    host: str
    """gearmand's address, inside."""

    def cut(self) -> None:
        """Drop every packet both ways: the peer is gone without a word."""
        for argv in (
            ["tc", "qdisc", "add", "dev", self.outside, "root", "blackhole"],
            ["ip", "netns", "exec", self.namespace, "tc", "qdisc", "add", "dev", self.inside, "root", "blackhole"],
        ):
            done = _run(*argv)
            assert done.returncode == 0, f"{argv}: {done.stderr}"

    def heal(self) -> None:
        """Let packets through again, if they were cut."""
        _run("tc", "qdisc", "del", "dev", self.outside, "root")
        _run("ip", "netns", "exec", self.namespace, "tc", "qdisc", "del", "dev", self.inside, "root")


def _free_link_local_net() -> tuple[str, str] | None:
    """Two addresses of a link-local /30 that no route of this machine covers yet
    (169.254.169.0/24 left alone: cloud metadata lives there)."""
    for _ in range(20):
        third = random.choice([n for n in range(1, 255) if n != 169])
        base = 4 * random.randrange(64)
        outside, inside = f"169.254.{third}.{base + 1}", f"169.254.{third}.{base + 2}"
        routes = _run("ip", "-4", "route", "show", "table", "all", "to", "match", inside).stdout.splitlines()
        if not [line for line in routes if not line.startswith("default")]:
            return outside, inside
    return None


@pytest.fixture
def partition() -> Iterator[Partition]:
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs iproute2 (ip, tc)")
    net = _free_link_local_net()
    if net is None:
        pytest.skip("found no free link-local /30 for the test's veth pair")
    tag = secrets.token_hex(3)
    part = Partition(f"gp-{tag}", f"gpo{tag}", f"gpi{tag}", net[1])
    try:
        for argv in (
            ["ip", "netns", "add", part.namespace],
            ["ip", "link", "add", part.outside, "type", "veth", "peer", "name", part.inside, "netns", part.namespace],
            ["ip", "addr", "add", f"{net[0]}/30", "dev", part.outside],
            ["ip", "link", "set", part.outside, "up"],
            ["ip", "-n", part.namespace, "addr", "add", f"{net[1]}/30", "dev", part.inside],
            ["ip", "-n", part.namespace, "link", "set", part.inside, "up"],
            # (the qdisc the cut needs, tried once before anything uses the link)
            ["tc", "qdisc", "add", "dev", part.outside, "root", "blackhole"],
            ["tc", "qdisc", "del", "dev", part.outside, "root"],
        ):
            done = _run(*argv)
            if done.returncode != 0:
                pytest.skip(f"cannot build the partition here: {' '.join(argv)}: {done.stderr.strip()}")
        yield part
    finally:
        _run("ip", "netns", "del", part.namespace)  # (its veth end goes, and the other end with it)
        _run("ip", "link", "del", part.outside)  # (if the namespace never got its end)


@pytest.fixture
def gearmand_beyond(partition: Partition, tmp_path: Path) -> Iterator[Gearmand]:
    """A gearmand of its own in the partition's namespace (stopped before the namespace goes)."""
    server = Gearmand(
        tmp_path / "gearmand", host=partition.host, wrapper=["ip", "netns", "exec", partition.namespace]
    )
    server.start(4730)
    try:
        yield server
    finally:
        partition.heal()  # (cut off, gearmand took over 5 s to stop, and was killed)
        server.stop()


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [record for record in list(caplog.records) if text in record.getMessage()]


def _detection(
    partition: Partition, gearmand: Gearmand, keepalive: Keepalive, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, bound: float,
) -> tuple[float, float]:
    """A worker sleeps on its gearmand link after a job that was retried once (so the retry
    connection is open and idle too); then the partition. Returns the seconds from the cut
    to the worker's close line and to the retry connection's, and those lines."""
    caplog.set_level(logging.INFO, logger="gproxy")
    policies = Policies(RetryPolicy(on_fail=True, backoff_initial=0.02, jitter=False))
    config = Config(
        routes=(Route(Address("127.0.0.1", 0), Address(*gearmand.address)),),
        policies=policies, upstream_keepalive=keepalive,
    )
    with ProxyThread(config) as proxy, PeerSet() as peers:
        peers.add(start_cli_worker(proxy.address, "ka_flaky", flaky_cli_command(tmp_path), admin_address=gearmand.address))
        run = run_pyclient(gearmand.address, "ka_flaky", "1:partition")
        assert (run.returncode, run.stdout) == (0, b"ok after 2"), run.stderr  # its retry went out
        pair_lost = f"to gearmand {partition.host}:4730): closed: gearmand connection lost"
        retry_lost = f"retry client to gearmand {partition.host}:4730 lost"
        assert not _lines(caplog, pair_lost) and not _lines(caplog, retry_lost)

        cut_at = time.time()
        partition.cut()
        wait_for(
            lambda: bool(_lines(caplog, pair_lost) and _lines(caplog, retry_lost)),
            bound, f"gproxy to notice the partition ({keepalive})", interval=0.05,
        )
    pair, retry = _lines(caplog, pair_lost)[0], _lines(caplog, retry_lost)[0]
    return pair.created - cut_at, retry.created - cut_at, pair.getMessage(), retry.getMessage()


def _report(keepalive: Keepalive, pair: float, retry: float, pair_line: str, retry_line: str) -> None:
    print(f"\nwith {keepalive} the partition was noticed after {pair:.1f}s on the worker's link and "
          f"{retry:.1f}s on the retry connection:\n  {pair_line}\n  {retry_line}")


def test_a_gearmand_cut_off_without_a_word_is_noticed_on_the_worker_link_and_the_retry_connection(
    partition: Partition, gearmand_beyond: Gearmand, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pair, retry, pair_line, retry_line = _detection(partition, gearmand_beyond, SHORT, tmp_path, caplog, bound=20)
    _report(SHORT, pair, retry, pair_line, retry_line)
    assert pair_line.endswith(f"gearmand connection lost: {TIMED_OUT} (gearmand's host stopped answering)")
    assert f" lost ({TIMED_OUT}); " in retry_line
    # Silent for up to idle + interval * count = 3 s after the last word before the cut,
    # and the kernel's timers are coarse: generously bounded.
    assert pair < 10 and retry < 10


@pytest.mark.skipif(not os.environ.get("GPROXY_SLOW"), reason="about a minute: set GPROXY_SLOW=1 to run it")
@pytest.mark.timeout(300)
def test_with_the_shipped_defaults_a_partition_is_noticed_in_about_a_minute(
    partition: Partition, gearmand_beyond: Gearmand, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    defaults = Keepalive()
    pair, retry, pair_line, retry_line = _detection(partition, gearmand_beyond, defaults, tmp_path, caplog, bound=150)
    _report(defaults, pair, retry, pair_line, retry_line)
    assert UNANSWERED.search(pair_line), pair_line
    assert re.search(r" lost \(\[Errno 11[03]\] [^)]*\); ", retry_line), retry_line
    assert pair < 2 * defaults.deadline and retry < 2 * defaults.deadline
