"""Prometheus metrics on a registry of gproxy's own.

Counters that change per job are prometheus-client objects. What changes per packet (packet
counts) or is state anyway (jobs running and held, connections) is kept as plain numbers and
read only when Prometheus scrapes: nothing on the hot path but an integer increment.
Function names come from the network, so the `function` label has a cap; beyond it every new
function is counted as `__other__`.
"""

from __future__ import annotations

import hashlib
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .protocol import PacketType

OTHER = "__other__"
OUTCOMES = ("complete", "fail", "exception", "retried", "dead_lettered")
REASONS = ("exception", "fail", "worker_hint", "disconnect")
CAPS = ("max_held", "max_hold_time")
PROTOCOL_ERRORS = ("bad_magic", "unknown_type", "oversized", "malformed", "mid_packet")
DIRECTIONS = ("to_gearmand", "from_gearmand")
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DEFAULT_MAX_FUNCTIONS = 200
MAX_LABEL_BYTES = 96
"""A longer function name is shown as its first 80 bytes, `…` and 8 hex digits of its SHA-1:
names come from the network, and every series repeats its labels on each scrape."""


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, max_functions: int = DEFAULT_MAX_FUNCTIONS
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.max_functions = max_functions
        self._functions: dict[bytes, str] = {}
        self._per_job: dict[bytes, _PerJob] = {}
        r = self.registry
        self.jobs = Counter("gproxy_jobs", "Jobs by final outcome, and jobs retried or dead-lettered.", ["function", "outcome"], registry=r)
        self.retries = Counter("gproxy_retries", "Retry attempts scheduled, by why.", ["function", "reason"], registry=r)
        self.exhausted = Counter("gproxy_retries_exhausted", "Jobs that failed every attempt allowed.", ["function"], registry=r)
        self.deferred = Counter("gproxy_retries_deferred", "Retries that waited for the retry budget after their backoff.", ["function"], registry=r)
        self.cap_rejections = Counter("gproxy_retry_cap_rejections", "Retryable failures forwarded because a cap was reached: max_held (jobs held at once) or max_hold_time (a wait too long).", ["function", "cap"], registry=r)
        self.observed = Counter("gproxy_retries_observed", "Failures observe mode would have retried.", ["function"], registry=r)
        self.job_duration = Histogram("gproxy_job_duration_seconds", "From assignment to the final outcome, retries included.", ["function"], buckets=DURATION_BUCKETS, registry=r)
        self.attempt_duration = Histogram("gproxy_attempt_duration_seconds", "One attempt, from assignment to the worker's result.", ["function"], buckets=DURATION_BUCKETS, registry=r)
        self.upstream_connect_errors = Counter("gproxy_upstream_connect_errors", "Failed connections to gearmand.", registry=r)
        self.protocol_errors = Counter("gproxy_protocol_errors", "Connections closed for bad input, by reason.", ["reason"], registry=r)
        self.upstream_up = Gauge("gproxy_upstream_up", "1 if the last connection to this gearmand succeeded.", ["upstream"], registry=r)
        for reason in PROTOCOL_ERRORS:
            self.protocol_errors.labels(reason)
        # Read at scrape time.
        self.packets: dict[str, list[int]] = {d: [0] * (max(PacketType) + 1) for d in DIRECTIONS}
        self.running: Tally[bytes] = Tally()
        self.held: Callable[[], Mapping[bytes, int]] = dict
        self.budget_balance: Callable[[], Mapping[bytes, float]] = dict
        self.connections: Callable[[], Mapping[str, int]] = lambda: {"worker": 0, "upstream": 0}
        r.register(_StateCollector(self))

    def function(self, name: bytes) -> str:
        """The label for a function name: itself, until the cap is reached."""
        label = self._functions.get(name)
        if label is None:
            if len(self._functions) >= self.max_functions:
                return OTHER
            label = self._functions[name] = _label(name)
            for outcome in OUTCOMES:  # zero-valued series, so rates and alerts see them start
                self.jobs.labels(label, outcome)
            for reason in REASONS:
                self.retries.labels(label, reason)
            for counter in (self.exhausted, self.deferred, self.observed):
                counter.labels(label)
            for cap in CAPS:
                self.cap_rejections.labels(label, cap)
        return label

    def labelled(self) -> list[bytes]:
        """The function names that have a label of their own."""
        return list(self._functions)

    def job_ended(self, function: bytes, outcome: str, duration: float) -> None:
        per_job = self._per_job.get(function) or self._per_job_for(function)
        per_job.outcomes[outcome].inc()
        per_job.job_duration.observe(duration)

    def attempt_ended(self, function: bytes, duration: float) -> None:
        (self._per_job.get(function) or self._per_job_for(function)).attempt_duration.observe(duration)

    def _per_job_for(self, function: bytes) -> _PerJob:
        """The children recorded for every job, looked up once per function, not per job."""
        label = self.function(function)
        per_job = _PerJob(
            {outcome: self.jobs.labels(label, outcome) for outcome in OUTCOMES},
            self.job_duration.labels(label),
            self.attempt_duration.labels(label),
        )
        if label != OTHER:
            self._per_job[function] = per_job
        return per_job

    def count(self, metric: Counter, function: bytes, *labels: str) -> None:
        metric.labels(self.function(function), *labels).inc()


def _label(name: bytes) -> str:
    if len(name) <= MAX_LABEL_BYTES:
        return name.decode("utf-8", "replace")
    digest = hashlib.sha1(name).hexdigest()[:8]
    return f"{name[:80].decode('utf-8', 'replace')}…{digest}"


@dataclass(frozen=True, slots=True)
class _PerJob:
    outcomes: dict[str, Any]
    job_duration: Any
    attempt_duration: Any


class _StateCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        m = self.metrics
        packets = CounterMetricFamily("gproxy_packets", "Packets forwarded, by direction and type.", labels=["direction", "type"])
        for direction, counts in m.packets.items():
            for ptype in PacketType:
                packets.add_metric([direction, ptype.name], counts[ptype])
        yield packets
        yield _per_function("gproxy_jobs_running", "Jobs assigned to workers behind gproxy now.", m, m.running)
        yield _per_function("gproxy_jobs_held", "Jobs held for a retry now.", m, m.held())
        yield _per_function(
            "gproxy_retry_budget_balance", "Retries the retry budget allows right now.", m, m.budget_balance()
        )
        connections = GaugeMetricFamily("gproxy_connections", "Open connections, by side.", labels=["side"])
        for side, value in m.connections().items():
            connections.add_metric([side], value)
        yield connections


def _per_function(name: str, documentation: str, metrics: Metrics, values: Mapping[bytes, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["function"])
    totals: dict[str, float] = {label: 0 for label in metrics._functions.values()}
    for function, value in values.items():
        label = metrics.function(function)
        totals[label] = totals.get(label, 0) + value
    for label, value in sorted(totals.items()):
        family.add_metric([label], value)
    return family
