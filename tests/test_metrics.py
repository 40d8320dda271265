"""Metrics: counted from what real workers do through gproxy, and served over HTTP."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from gproxy.config import Address, Config, Route
from gproxy.core.metrics import OTHER, Metrics
from gproxy.core.policy import Mode, Policies, RetryPolicy
from gproxy.core.protocol import PacketType
from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import PeerSet, run_pyclient, start_pyworker
from tests.proxy_thread import ProxyThread
from tests.raw_worker import worker_with_jobs

FAST = RetryPolicy(backoff_initial=0.01, jitter=False)


def proxy_with_metrics(upstream: tuple[str, int], policy: RetryPolicy = FAST, **functions: RetryPolicy) -> ProxyThread:
    route = Route(Address("127.0.0.1", 0), Address(*upstream))
    policies = Policies(policy, {name.encode(): p for name, p in functions.items()})
    return ProxyThread(Config(routes=(route,), policies=policies, metrics_listen=Address("127.0.0.1", 0)))


def http_get(address: Address, path: str) -> tuple[int, str]:
    with socket.create_connection((address.host, address.port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: gproxy\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def sample(proxy: ProxyThread, name: str, **labels: str) -> float | None:
    return proxy.call(lambda: proxy.proxy.metrics.registry.get_sample_value(name, labels))


def test_counters_match_what_the_workers_did(gearmand: Gearmand, tmp_path: Path) -> None:
    exhausting = replace(FAST, max_attempts=2, dead_letter="dead.{function}")
    observing = replace(FAST, mode=Mode.OBSERVE)
    with proxy_with_metrics(gearmand.address, flaky_hint=exhausting, stream_flaky=observing) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        for n in range(4):  # four jobs that succeed on their third attempt
            assert run_pyclient(gearmand.address, "flaky", "2:x", unique=f"m-{n}").stdout == b"ok after 3"
        assert run_pyclient(gearmand.address, "flaky_hint", "5:x", unique="m-exhaust").returncode == 1
        assert run_pyclient(gearmand.address, "stream_flaky", "1:x", unique="m-observe").returncode == 1
        assert run_pyclient(gearmand.address, "reverse", "abc").stdout == b"cba"

        assert sample(proxy, "gproxy_jobs_total", function="flaky", outcome="complete") == 4
        assert sample(proxy, "gproxy_jobs_total", function="flaky", outcome="retried") == 4
        assert sample(proxy, "gproxy_retries_total", function="flaky", reason="exception") == 8
        assert sample(proxy, "gproxy_attempt_duration_seconds_count", function="flaky") == 12
        assert sample(proxy, "gproxy_job_duration_seconds_count", function="flaky") == 4
        assert sample(proxy, "gproxy_retries_total", function="flaky_hint", reason="worker_hint") == 1
        assert sample(proxy, "gproxy_retries_exhausted_total", function="flaky_hint") == 1
        assert sample(proxy, "gproxy_jobs_total", function="flaky_hint", outcome="exception") == 1
        assert sample(proxy, "gproxy_jobs_total", function="flaky_hint", outcome="dead_lettered") == 1
        assert sample(proxy, "gproxy_retries_observed_total", function="stream_flaky") == 1
        assert sample(proxy, "gproxy_jobs_total", function="stream_flaky", outcome="exception") == 1
        assert sample(proxy, "gproxy_jobs_total", function="reverse", outcome="complete") == 1
        assert sample(proxy, "gproxy_jobs_running", function="flaky") == 0
        assert sample(proxy, "gproxy_jobs_held", function="flaky") == 0
        assert sample(proxy, "gproxy_connections", side="worker") == 1
        assert sample(proxy, "gproxy_packets_total", direction="to_gearmand", type="WORK_EXCEPTION") == 8 + 2 + 1
        assert sample(proxy, "gproxy_upstream_up", upstream=f"{gearmand.address[0]}:{gearmand.address[1]}") == 1

        status, text = http_get(proxy.proxy.metrics_address, "/metrics")
        assert status == 200
        assert 'gproxy_jobs_total{function="flaky",outcome="complete"} 4.0' in text
        assert http_get(proxy.proxy.metrics_address, "/healthz") == (200, "ok\n")
        assert http_get(proxy.proxy.metrics_address, "/readyz") == (200, "ready\n")
        assert http_get(proxy.proxy.metrics_address, "/nope")[0] == 404


def test_readiness_fails_while_gearmand_is_unreachable(fresh_gearmand: Gearmand) -> None:
    with proxy_with_metrics(fresh_gearmand.address) as proxy:
        fresh_gearmand.stop()
        status, body = http_get(proxy.proxy.metrics_address, "/readyz")
        assert status == 503 and "unreachable" in body
        assert http_get(proxy.proxy.metrics_address, "/healthz")[0] == 200
        assert sample(proxy, "gproxy_upstream_connect_errors_total") >= 1


def test_function_labels_are_capped() -> None:
    metrics = Metrics(max_functions=2)
    labels = [metrics.function(name) for name in (b"a", b"b", b"c", b"d", b"a")]
    assert labels == ["a", "b", OTHER, OTHER, "a"]
    metrics.job_ended(b"c", "complete", 0.1)
    metrics.job_ended(b"d", "complete", 0.1)
    assert metrics.registry.get_sample_value("gproxy_jobs_total", {"function": OTHER, "outcome": "complete"}) == 2


def test_a_long_function_name_is_shortened_in_its_label() -> None:
    # Three 200 kB names grew /metrics from 35 kB to 38 MB.
    metrics = Metrics()
    names = [bytes([65 + n]) * 200_000 for n in range(3)]
    labels = [metrics.function(name) for name in names]
    assert all(len(label.encode()) <= 100 for label in labels) and len(set(labels)) == 3
    assert labels[0].startswith("A" * 80 + "…")
    assert metrics.function(b"x" * 96) == "x" * 96  # up to 96 bytes: as it is
    for name in names:
        metrics.job_ended(name, "complete", 0.1)
    assert len(generate_latest(metrics.registry)) < 200_000


@given(st.lists(st.sampled_from([0.0, 0.005, 0.0051, 0.3, 1.0, 2.5, 299.0, 300.0, 301.0, 1e6]) | st.floats(0, 400), max_size=30))
def test_durations_kept_as_plain_numbers_render_as_prometheus_clients_histogram(durations: list[float]) -> None:
    """Per-job metrics are plain numbers (no lock per update); what a scrape shows must be
    what prometheus-client's own Histogram would have shown."""
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.parser import text_string_to_metric_families

    from gproxy.core.metrics import DURATION_BUCKETS

    metrics = Metrics()
    reference = Histogram("gproxy_job_duration_seconds", "x", ["function"], buckets=DURATION_BUCKETS, registry=None)
    metrics.function(b"f")  # zero-valued series from the start, in both
    reference.labels("f")
    for duration in durations:
        metrics.job_ended(b"f", "complete", duration)
        reference.labels("f").observe(duration)

    def samples(text: bytes) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for family in text_string_to_metric_families(text.decode())
            if family.name == "gproxy_job_duration_seconds"
            for s in family.samples if not s.name.endswith("_created")
        }

    reference_registry = CollectorRegistry()
    reference_registry.register(reference)
    ours, theirs = samples(metrics.render(metrics.snapshot())), samples(generate_latest(reference_registry))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key]), key
    assert metrics.registry.get_sample_value("gproxy_jobs_total", {"function": "f", "outcome": "complete"}) == len(durations)


class _Live:
    """A LiveState: jobs running of three functions, nothing else."""

    def running(self) -> dict[bytes, int]:
        return {b"a": 1, b"b": 2, b"c": 3}

    def held(self) -> dict[bytes, int]:
        return {}

    def budget_balance(self, functions: list[bytes]) -> dict[bytes, float]:
        return dict.fromkeys(functions, 1.0)

    def connections(self) -> dict[str, int]:
        return {"worker": 0, "upstream": 0}

    def ejected(self) -> dict[bytes, int]:
        return {}


def test_what_a_scrape_reads_from_the_owners_is_capped_too() -> None:
    metrics = Metrics(max_functions=1)
    metrics.read_from(_Live())
    value = metrics.registry.get_sample_value
    assert value("gproxy_jobs_running", {"function": "a"}) == 1
    assert value("gproxy_jobs_running", {"function": OTHER}) == 5
    assert value("gproxy_retry_budget_balance", {"function": "a"}) == 1.0
    assert value("gproxy_retry_budget_balance", {"function": "b"}) is None


def test_jobs_running_and_held_are_read_from_the_pairs_and_the_retrier(gearmand: Gearmand) -> None:
    function = b"gauged"
    with ProxyThread.to(gearmand.address, RetryPolicy(on_fail=True, backoff_initial=30.0, jitter=False),
                        frozen=True) as proxy:
        worker = worker_with_jobs(proxy.address, gearmand.address, function)
        handles = worker.handles

        def gauges() -> tuple[float | None, ...]:
            return (proxy.sample("gproxy_jobs_running", function="gauged"), proxy.sample("gproxy_jobs_held", function="gauged"),
                    proxy.sample("gproxy_connections", side="worker"), proxy.sample("gproxy_connections", side="upstream"))

        assert gauges() == (2, 0, 1, 1)
        worker.send(PacketType.WORK_FAIL, handle=handles[0])  # held for 30 s
        wait_for(lambda: len(proxy.held()) == 1, 10, "the failed job to be held")
        assert gauges() == (1, 1, 1, 1)
        worker.send(PacketType.WORK_COMPLETE, handle=handles[1], data=b"done")
        wait_for(lambda: not proxy.tracked_jobs(), 10, "the job to end")
        assert gauges() == (0, 1, 1, 1)
        assert proxy.call(proxy.proxy.operator.give_up_now, proxy.held()[0].key)  # type: ignore[union-attr]
        assert gauges() == (0, 0, 1, 1)
        worker.sock.close()
