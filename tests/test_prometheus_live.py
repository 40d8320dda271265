"""The dashboard and the alert rules, proven against a real Prometheus scraping a real gproxy.

Real workers drive completions, failures, retries, exhaustions, dead letters, retries the
retry budget defers, failures a retry cap rejects (max_held and max_hold_time) and
observe-mode decisions through gproxy; bad input, an unreachable gearmand and a retry
connection that a fault relay resets on arrival add their own series. Prometheus (Debian's
package) scrapes gproxy every second; then every PromQL expression of every dashboard panel
and every alert rule runs through its HTTP API and must be valid and return data, and the
counters must equal what the test drove.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from gproxy.config import Address, Config, Route
from gproxy.core.protocol import REQ, RES, PacketType, build_packet
from gproxy.core.policy import Mode, Policies, RetryPolicy
from gproxy.tls import ListenTls, RouteTls, server_context
from tests.fault_relay import FaultRelay
from tests.gearmand import Gearmand, find_free_port, wait_for
from tests.peer_procs import (
    PeerSet, attempt_count, attempts_log, run_pyburst, run_pyclient, start_pyburst, start_pyclient,
    start_pyworker,
)
from tests.proxy_thread import ProxyThread
from tests.tls_files import make_pki

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "gproxy-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "gproxy-alerts.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
# Enough of each to cross the alert rules' thresholds, so every rule expression has data.
RETRIED_JOBS = 40
EXHAUSTED = 5
PROTOCOL_ERRORS = 7
TLS_FAILURES = 7
# stream_flaky: a budget of BUDGET retries per BUDGET_TTL seconds and nothing per first
# attempt. DEFERRED_JOBS jobs that fail once, all at once (within milliseconds; exact counts
# need them within 0.9 * BUDGET_TTL): BUDGET retries go at once, the others are deferred
# until those leave the window, then complete. The wait overlaps the rest of the workload.
DEFERRED_JOBS = 8
BUDGET = 4
BUDGET_TTL = 4.0
# scripted: a budget of zero and max_held=1. One job is held, deferred until it has waited
# HOLD_TIME (cap max_hold_time); CAPPED jobs that fail meanwhile are not held (cap max_held).
# Both kinds are dead-lettered.
CAPPED = 5
HOLD_TIME = 4.0

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).exists(), reason="needs Debian's prometheus package (make test installs it)"
)


@contextmanager
def prometheus(tmp_path: Path, target: Address) -> Iterator[str]:
    port = find_free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: gproxy\n"
        f"    static_configs:\n      - targets: ['{target.host}:{target.port}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(base, proc, tmp_path), 30, "Prometheus to be ready")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _ready(base: str, proc: subprocess.Popen, tmp_path: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError((tmp_path / "prometheus.log").read_text()[-2000:])
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as exc:  # 400: a PromQL error, with its message
        return json.load(exc)


def scalar(base: str, expr: str) -> float | None:
    result = query(base, expr)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def concrete(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in as an `All` view would."""
    expr = re.sub(r"\$\{?__(rate_)?interval\}?", "1m", expr)
    expr = re.sub(r"\$\{?__range\}?", "5m", expr)
    return re.sub(r"\$\{?(instance|function|datasource)(:\w+)?\}?", ".*", expr)


def panel_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [
        (f"panel {panel.get('title')!r}", concrete(target["expr"]))
        for panel in panels for target in panel.get("targets", []) if target.get("expr")
    ]


def rule_exprs(base: str) -> list[tuple[str, str]]:
    groups = query(base, "up")  # make sure the API answers before asking for rules
    assert groups["status"] == "success"
    with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as reply:
        rules = json.load(reply)["data"]["groups"]
    return [(f"rule {rule['name']!r}", rule["query"]) for group in rules for rule in group["rules"]]


WARMED_UP = {
    "flaky": "0:x", "flaky_hint": "0:x", "stream_flaky": "0:x", "flaky_fail": "0:x", "scripted": "ok|x",
}


def drive_the_workload(
    gearmand: Gearmand, proxy: ProxyThread, dead_route: Address, tls_route: Address, tmp_path: Path,
    scraped: Callable[[], None],
) -> None:
    def sample(name: str, **labels: str) -> float | None:
        assert proxy.proxy is not None
        registry = proxy.proxy.metrics.registry
        return proxy.call(lambda: registry.get_sample_value(name, labels))

    # Plain text to a TLS port, first: each refused connection is closed a moment after the
    # peer reads the alert, long before the file descriptors are counted out below.
    for _ in range(TLS_FAILURES):
        with socket.create_connection(tls_route.host_port) as plain:
            plain.sendall(build_packet(REQ, PacketType.ECHO_REQ, data=b"in clear"))
            with contextlib.suppress(ConnectionResetError):  # (closed with the packet unread)
                plain.recv(1)
    with PeerSet() as peers:
        for n in range(2):
            peers.add(start_pyworker(proxy.address, state_dir=tmp_path))  # one attempt count
        # One good job per function first: its series exist, at zero, before they grow;
        # a counter first seen at 3 shows no increase() to Prometheus.
        for function, payload in WARMED_UP.items():
            assert run_pyclient(gearmand.address, function, payload, unique=f"warm-{function}").returncode == 0
        scraped()
        # Cap max_hold_time: the zero budget defers this job's retry until it has waited
        # HOLD_TIME; then its failure goes to the client. It runs while the rest goes on.
        held = start_pyclient(gearmand.address, "scripted", "retry|held", unique="live-held")
        wait_for(
            lambda: sample("gproxy_retries_deferred_total", function="scripted") == 1,
            10, "the scripted job to be held and deferred",
        )
        # Cap max_held: while that job is held, each failure of scripted is forwarded at once.
        capped = run_pyburst(gearmand.address, "scripted", CAPPED, "retry|capped {i}", unique="live-cap-{i}")
        assert capped.states == ["FAILED"] * CAPPED, capped.report
        assert sample("gproxy_jobs_held", function="scripted") == 1, "the held job ended too soon"
        assert sample("gproxy_retry_cap_rejections_total", function="scripted", cap="max_hold_time") == 0
        # Deferrals: all fail at once, the budget lets BUDGET retries through, the others wait.
        deferred = start_pyburst(gearmand.address, "stream_flaky", DEFERRED_JOBS, "1:x", unique="live-d-{i}")
        for n in range(RETRIED_JOBS):  # each fails twice, then completes: 80 retries
            assert run_pyclient(gearmand.address, "flaky", "2:x", unique=f"live-{n}").stdout == b"ok after 3"
        for n in range(EXHAUSTED):  # exhausted after 2 attempts, dead-lettered
            assert run_pyclient(gearmand.address, "flaky_hint", "9:x", unique=f"live-ex-{n}").returncode == 1
        for n in range(3):  # observe mode: forwarded, counted as observed
            assert run_pyclient(gearmand.address, "flaky_fail", "9:x", unique=f"live-o-{n}").returncode == 1
        for n in range(3):
            assert run_pyclient(gearmand.address, "fatal", "x", unique=f"live-f-{n}").returncode == 1
        burst = deferred.result()
        assert burst.states == ["COMPLETE"] * DEFERRED_JOBS, burst.report
        assert {job["result"] for job in burst.jobs} == {"ok after 2"}
        assert held.result().returncode == 1  # the last failure, after HOLD_TIME
    # What the workers saw: each deferred job ran twice; no scripted job ran a retry.
    assert [attempt_count(tmp_path, f"live-d-{n}") for n in range(DEFERRED_JOBS)] == [2] * DEFERRED_JOBS
    scripted = sorted((a.unique, a.attempt) for a in attempts_log(tmp_path) if a.unique != "warm-scripted")
    assert scripted == sorted([("live-held", 1)] + [(f"live-cap-{n}", 1) for n in range(CAPPED)])
    for _ in range(PROTOCOL_ERRORS):
        with socket.create_connection(proxy.address) as bad:
            bad.sendall(b"\0REQ" + struct.pack(">II", 99, 0))
            bad.recv(1)
    with socket.create_connection((dead_route.host, dead_route.port)) as lost:  # gearmand down
        lost.recv(1)
    # gproxy out of file descriptors (this process's: gproxy runs in a thread here): a worker
    # waits to be accepted, each accept() that fails is counted, and it is served once there
    # is room again.
    with descriptors_exhausted(spare=1):
        waiting = socket.create_connection(proxy.address, timeout=10)
        wait_for(
            lambda: (sample("gproxy_resource_exhausted_total", resource="file_descriptors") or 0) >= 1,
            10, "accept() to fail for want of a descriptor",
        )
    with waiting:
        echo = build_packet(REQ, PacketType.ECHO_REQ, data=b"room again")
        waiting.sendall(echo)
        assert waiting.recv(64) == build_packet(RES, PacketType.ECHO_RES, data=b"room again")


@contextmanager
def retry_connection_down(
    gearmand: Gearmand, relay: FaultRelay, route: Address, base: str, state_dir: Path
) -> Iterator[None]:
    """A held retry whose every retry connection the relay accepts and resets (a load
    balancer whose backend is gone), until a scrape has seen the connection down while
    gproxy tries again; on leaving, the relay lets it through and the job completes."""
    upstream = f"{relay.address[0]}:{relay.address[1]}"
    with PeerSet() as peers:
        # The only worker of `chaos`: the job is held on this route, and its retry runs here.
        peers.add(start_pyworker(route.host_port, chaos=True, state_dir=state_dir))
        assert len(relay.connections()) == 1
        relay.refuse_next(1_000_000)  # from now on, every new connection: the retry client's
        client = peers.add(start_pyclient(gearmand.address, "chaos", "retry,ok|outage", unique="live-outage"))
        wait_for(
            lambda: scalar(base, f'gproxy_retry_connection_up{{upstream="{upstream}"}}') == 0
            and (scalar(base, f'gproxy_retry_reconnects_total{{upstream="{upstream}"}}') or 0) >= 1,
            30, "a scrape of the retry connection down while gproxy tries again",
        )
        yield
        relay.refuse_next(0)
        run = client.result()
    assert run.returncode == 0 and run.stdout.startswith(b"ok after 2 "), (run.stdout, run.stderr)
    assert relay.refused >= 2, "gproxy tried once only"


@contextmanager
def descriptors_exhausted(spare: int) -> Iterator[None]:
    """This process's file limit lowered to its highest open descriptor, every free one
    below taken, and `spare` of them given back; all as it was on leaving."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
    taken: list[int] = []
    try:
        while True:
            try:
                taken.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                break
        for _ in range(spare):
            os.close(taken.pop())
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_every_panel_and_rule_expression_returns_data(
    gearmand: Gearmand, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fast = RetryPolicy(backoff_initial=0.01, jitter=False)
    policies = Policies(fast, {
        b"flaky_hint": replace(fast, max_attempts=2, dead_letter="dead.{function}"),
        b"stream_flaky": replace(
            fast, budget_ratio=0.0, budget_min_per_second=BUDGET / BUDGET_TTL, budget_ttl=BUDGET_TTL
        ),
        b"scripted": replace(
            fast, budget_ratio=0.0, budget_min_per_second=0.0, max_held=1, max_hold_time=HOLD_TIME,
            dead_letter="dead.{function}",
        ),
        b"flaky_fail": replace(fast, on_fail=True, mode=Mode.OBSERVE),
    })
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()[1]
    relay = FaultRelay(gearmand.address)  # the third route's gearmand, for its retry connection
    routes = (
        Route(Address("127.0.0.1", 0), Address(*gearmand.address)),
        Route(Address("127.0.0.1", 0), Address("127.0.0.1", dead)),
        Route(Address("127.0.0.1", 0), Address(*relay.address)),
        Route(Address("127.0.0.1", 0), Address("localhost", gearmand.address[1])),  # workers speak TLS
    )
    pki = make_pki(tmp_path / "pki")
    listen_tls = ListenTls(cert=str(pki.server.both), context=server_context(str(pki.server.both), None, None))
    config = Config(
        routes=routes, policies=policies, metrics_listen=Address("127.0.0.1", 0),
        tls={routes[3]: RouteTls(listen=listen_tls)},
    )
    caplog.set_level(logging.WARNING, "gproxy.retry")
    with relay, ProxyThread(config) as proxy, prometheus(tmp_path, proxy.proxy.metrics_address) as base:
        # A reload refused (this proxy has no config file to read again): the reload alert's data.
        assert proxy.call(proxy.proxy.reloader.reload)[0] is False  # type: ignore[union-attr]
        def scraped() -> None:
            """Wait for a scrape that saw everything done so far."""
            now = time.time()
            wait_for(
                lambda: (scalar(base, "max(timestamp(gproxy_connections))") or 0) > now + 1,
                30, "a scrape of what was driven",
            )

        # Counters must be seen before they grow, or rate() and increase() see no change.
        scraped()
        drive_the_workload(
            gearmand, proxy, proxy.proxy.listen_addresses[1], proxy.proxy.listen_addresses[3], tmp_path, scraped,
        )
        scraped()

        assert scalar(base, 'sum(gproxy_retries_total{function="flaky"})') == 2 * RETRIED_JOBS
        assert scalar(base, 'sum(gproxy_jobs_total{function="flaky",outcome="complete"})') == RETRIED_JOBS + 1
        assert scalar(base, 'sum(gproxy_jobs_total{function="flaky",outcome="retried"})') == RETRIED_JOBS
        assert scalar(base, 'sum(gproxy_retries_exhausted_total{function="flaky_hint"})') == EXHAUSTED
        assert scalar(base, 'sum(gproxy_jobs_total{function="flaky_hint",outcome="dead_lettered"})') == EXHAUSTED
        # The budget: BUDGET retries of stream_flaky went at once, the rest were deferred
        # and completed; none of the other functions came near theirs.
        assert scalar(base, 'sum(gproxy_retries_deferred_total{function="stream_flaky"})') == DEFERRED_JOBS - BUDGET
        assert scalar(base, 'sum(gproxy_retries_total{function="stream_flaky"})') == DEFERRED_JOBS
        assert scalar(base, 'sum(gproxy_jobs_total{function="stream_flaky",outcome="complete"})') == DEFERRED_JOBS + 1
        assert scalar(base, 'sum(gproxy_retries_deferred_total{function!~"stream_flaky|scripted"})') == 0
        assert scalar(base, 'sum(gproxy_retry_budget_balance{function="scripted"})') == 0
        balance = scalar(base, 'sum(gproxy_retry_budget_balance{function="stream_flaky"})')
        assert balance is not None and 0 <= balance <= BUDGET
        # The caps: one job waited HOLD_TIME, CAPPED were not held; all dead-lettered.
        assert scalar(base, 'sum(gproxy_retries_deferred_total{function="scripted"})') == 1
        assert scalar(base, 'sum(gproxy_retry_cap_rejections_total{function="scripted",cap="max_hold_time"})') == 1
        assert scalar(base, 'sum(gproxy_retry_cap_rejections_total{function="scripted",cap="max_held"})') == CAPPED
        assert scalar(base, 'sum(gproxy_jobs_total{function="scripted",outcome="dead_lettered"})') == CAPPED + 1
        assert scalar(base, 'sum(gproxy_jobs_total{function="scripted",outcome="retried"})') == 1
        assert scalar(base, 'sum(gproxy_retry_cap_rejections_total{function!="scripted"})') == 0
        assert scalar(base, 'sum(gproxy_retries_observed_total{function="flaky_fail"})') == 3
        assert scalar(base, 'sum(gproxy_jobs_total{function="fatal",outcome="exception"})') == 3
        assert scalar(base, 'sum(gproxy_protocol_errors_total{reason="unknown_type"})') == PROTOCOL_ERRORS
        assert scalar(base, 'sum(gproxy_tls_handshake_failures_total{side="downstream"})') == TLS_FAILURES
        assert scalar(base, f'gproxy_upstream_up{{upstream="127.0.0.1:{dead}"}}') == 0
        # gproxy's own limit is not gearmand's: its route stayed up.
        assert (scalar(base, 'sum(gproxy_resource_exhausted_total{resource="file_descriptors"})') or 0) >= 1
        assert scalar(base, f'gproxy_upstream_up{{upstream="{gearmand.address[0]}:{gearmand.address[1]}"}}') == 1

        expressions = panel_exprs() + rule_exprs(base)
        assert len(expressions) >= 20
        empty: list[str] = []

        def all_return_data() -> bool:
            empty.clear()
            for name, expr in expressions:
                reply = query(base, expr)
                assert reply["status"] == "success", (name, expr, reply.get("error"))
                if not reply["data"]["result"]:
                    empty.append(f"{name}: {expr}")
            return not empty

        # The retry connection's outage lasts while the expressions run: its gauge is 0 only then.
        retry_route = proxy.proxy.listen_addresses[2]
        with retry_connection_down(gearmand, relay, retry_route, base, tmp_path / "retry-route"):
            try:
                wait_for(all_return_data, 30, "every expression to return data")
            except TimeoutError:
                pytest.fail("expressions without data:\n" + "\n".join(empty))
    # One outage, one WARNING, however many tries it took.
    retry_client = f"retry client to gearmand {relay.address[0]}:{relay.address[1]} "
    lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith(retry_client)]
    assert len(lost) == 1 and lost[0].startswith(retry_client + "lost ("), lost
