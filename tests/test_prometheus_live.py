"""The dashboard and the alert rules, proven against a real Prometheus scraping a real gproxy.

A real worker drives completions, failures, retries, exhaustions, dead letters, budget
rejections and observe-mode decisions through gproxy; bad input and an unreachable gearmand
add their own series. Prometheus (Debian's package) scrapes gproxy every second; then every
PromQL expression of every dashboard panel and every alert rule runs through its HTTP API
and must be valid and return data, and the counters must equal what the test drove.
"""

from __future__ import annotations

import json
import re
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
from gproxy.retry import Mode, Policies, RetryPolicy
from tests.gearmand import Gearmand, find_free_port, wait_for
from tests.peer_procs import PeerSet, run_pyclient, start_pyworker
from tests.proxy_thread import ProxyThread

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "gproxy-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "gproxy-alerts.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
# Enough of each to cross the alert rules' thresholds, so every rule expression has data.
RETRIED_JOBS = 40
EXHAUSTED = 5
REJECTED = 12
PROTOCOL_ERRORS = 7

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


WARMED_UP = ("flaky", "flaky_hint", "stream_flaky", "flaky_fail")


def drive_the_workload(
    gearmand: Gearmand, proxy: ProxyThread, dead_route: Address, tmp_path: Path, scraped: Callable[[], None]
) -> None:
    with PeerSet() as peers:
        for n in range(2):
            peers.add(start_pyworker(proxy.address, state_dir=tmp_path))  # one attempt count
        # One good job per function first: its series exist, at zero, before they grow;
        # a counter first seen at 3 shows no increase() to Prometheus.
        for function in WARMED_UP:
            assert run_pyclient(gearmand.address, function, "0:x", unique=f"warm-{function}").returncode == 0
        scraped()
        for n in range(RETRIED_JOBS):  # each fails twice, then completes: 80 retries
            assert run_pyclient(gearmand.address, "flaky", "2:x", unique=f"live-{n}").stdout == b"ok after 3"
        for n in range(EXHAUSTED):  # exhausted after 2 attempts, dead-lettered
            assert run_pyclient(gearmand.address, "flaky_hint", "9:x", unique=f"live-ex-{n}").returncode == 1
        for n in range(REJECTED):  # retry budget of zero: forwarded, counted as rejected
            assert run_pyclient(gearmand.address, "stream_flaky", "9:x", unique=f"live-b-{n}").returncode == 1
        for n in range(3):  # observe mode: forwarded, counted as observed
            assert run_pyclient(gearmand.address, "flaky_fail", "9:x", unique=f"live-o-{n}").returncode == 1
        for n in range(3):
            assert run_pyclient(gearmand.address, "fatal", "x", unique=f"live-f-{n}").returncode == 1
    for _ in range(PROTOCOL_ERRORS):
        with socket.create_connection(proxy.address) as bad:
            bad.sendall(b"\0REQ" + struct.pack(">II", 99, 0))
            bad.recv(1)
    with socket.create_connection((dead_route.host, dead_route.port)) as lost:  # gearmand down
        lost.recv(1)


def test_every_panel_and_rule_expression_returns_data(gearmand: Gearmand, tmp_path: Path) -> None:
    fast = RetryPolicy(backoff_initial=0.01, jitter=False)
    policies = Policies(fast, {
        b"flaky_hint": replace(fast, max_attempts=2, dead_letter="dead.{function}"),
        b"stream_flaky": replace(fast, budget_min=0, budget_ratio=0.0),
        b"flaky_fail": replace(fast, on_fail=True, mode=Mode.OBSERVE),
    })
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()[1]
    routes = (
        Route(Address("127.0.0.1", 0), Address(*gearmand.address)),
        Route(Address("127.0.0.1", 0), Address("127.0.0.1", dead)),
    )
    config = Config(routes=routes, policies=policies, metrics_listen=Address("127.0.0.1", 0))
    with ProxyThread(config) as proxy, prometheus(tmp_path, proxy.proxy.metrics_address) as base:
        def scraped() -> None:
            """Wait for a scrape that saw everything done so far."""
            now = time.time()
            wait_for(
                lambda: (scalar(base, "max(timestamp(gproxy_connections))") or 0) > now + 1,
                30, "a scrape of what was driven",
            )

        # Counters must be seen before they grow, or rate() and increase() see no change.
        scraped()
        drive_the_workload(gearmand, proxy, proxy.proxy.listen_addresses[1], tmp_path, scraped)
        scraped()

        assert scalar(base, 'sum(gproxy_retries_total{function="flaky"})') == 2 * RETRIED_JOBS
        assert scalar(base, 'sum(gproxy_jobs_total{function="flaky",outcome="complete"})') == RETRIED_JOBS + 1
        assert scalar(base, 'sum(gproxy_jobs_total{function="flaky",outcome="retried"})') == RETRIED_JOBS
        assert scalar(base, 'sum(gproxy_retries_exhausted_total{function="flaky_hint"})') == EXHAUSTED
        assert scalar(base, 'sum(gproxy_jobs_total{function="flaky_hint",outcome="dead_lettered"})') == EXHAUSTED
        assert scalar(base, 'sum(gproxy_retry_budget_rejections_total{function="stream_flaky"})') == REJECTED
        assert scalar(base, 'sum(gproxy_retries_observed_total{function="flaky_fail"})') == 3
        assert scalar(base, 'sum(gproxy_jobs_total{function="fatal",outcome="exception"})') == 3
        assert scalar(base, 'sum(gproxy_protocol_errors_total{reason="unknown_type"})') == PROTOCOL_ERRORS
        assert scalar(base, f'gproxy_upstream_up{{upstream="127.0.0.1:{dead}"}}') == 0

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

        try:
            wait_for(all_return_data, 30, "every expression to return data")
        except TimeoutError:
            pytest.fail("expressions without data:\n" + "\n".join(empty))
