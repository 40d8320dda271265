"""Prometheus metrics on a registry of gproxy's own.

What changes per packet or per job (packet counts, job outcomes, job and attempt durations)
or is state anyway (jobs running and held, connections) is kept as plain numbers: nothing on
the hot path but an integer increment (prometheus-client objects take a lock per update).
Counters of rarer events (retries and their reasons) are prometheus-client objects.

What is state (jobs running and held, budget balances, connections, ejected workers) has an
owner elsewhere, and a scrape reads it from there (`LiveState`, given by `read_from`): no
count of it is kept here to drift from the truth.

A scrape copies the plain numbers on the loop (a snapshot, well under a millisecond) and
renders the text in a thread (tens of milliseconds at the label cap), so traffic never waits
for Prometheus. Function names come from the network, so the `function` label has a cap;
beyond it every new function is counted as `__other__`.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .limits import RESOURCES
from .protocol import PacketType

OTHER = "__other__"
OUTCOMES = ("complete", "fail", "exception", "retried", "dead_lettered")
REASONS = ("exception", "fail", "worker_hint", "disconnect", "timeout", "pattern")
CAPS = ("max_held", "max_hold_time")
PROTOCOL_ERRORS = ("bad_magic", "unknown_type", "oversized", "malformed", "mid_packet")
DIRECTIONS = ("to_gearmand", "from_gearmand")
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DEFAULT_MAX_FUNCTIONS = 200
MAX_LABEL_BYTES = 96
"""A longer function name is shown as its first 80 bytes, `…` and 8 hex digits of its SHA-1:
names come from the network, and every series repeats its labels on each scrape."""


class LiveState(Protocol):
    """What a scrape reads from the owners of the facts, at scrape time (for a proxy:
    gproxy.scrape.ProxyState, reading its pairs, its Retrier and its retry clients)."""

    def running(self) -> Mapping[bytes, int]:
        """Jobs assigned to workers now, per function."""

    def held(self) -> Mapping[bytes, int]:
        """Jobs held for a retry now, per function."""

    def budget_balance(self, functions: list[bytes]) -> Mapping[bytes, float]:
        """What each of `functions`' retry budget allows now."""

    def connections(self) -> Mapping[str, int]:
        """Open connections by side: "worker" and "upstream"."""

    def ejected(self) -> Mapping[bytes, int]:
        """Workers ejected now, by the function of the failure that ejected them."""


class NothingLive:
    """The LiveState of metrics no proxy reads from yet: nothing running, held or open."""

    def running(self) -> Mapping[bytes, int]:
        return {}

    def held(self) -> Mapping[bytes, int]:
        return {}

    def budget_balance(self, functions: list[bytes]) -> Mapping[bytes, float]:
        return {}

    def connections(self) -> Mapping[str, int]:
        return {"worker": 0, "upstream": 0}

    def ejected(self) -> Mapping[bytes, int]:
        return {}


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, max_functions: int = DEFAULT_MAX_FUNCTIONS
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        """Everything, read live (tests, and any in-process reader); a scrape renders a snapshot."""
        self.max_functions = max_functions
        self._functions: dict[bytes, str] = {}
        self._stats: dict[str, JobStats] = {}
        """Per label: outcomes and durations, plain numbers."""
        self._per_job: dict[bytes, JobStats] = {}
        """The stats of each labelled function, looked up once per function, not per job."""
        self._objects = r = CollectorRegistry(auto_describe=True)
        self.retries = Counter("gproxy_retries", "Retry attempts scheduled, by why.", ["function", "reason"], registry=r)
        self.exhausted = Counter("gproxy_retries_exhausted", "Jobs that failed every attempt allowed.", ["function"], registry=r)
        self.deferred = Counter("gproxy_retries_deferred", "Retries that waited for the retry budget after their backoff.", ["function"], registry=r)
        self.cap_rejections = Counter("gproxy_retry_cap_rejections", "Retryable failures forwarded because a cap was reached: max_held (jobs held at once) or max_hold_time (a wait too long).", ["function", "cap"], registry=r)
        self.observed = Counter("gproxy_retries_observed", "Failures observe mode would have retried.", ["function"], registry=r)
        self.ejections = Counter("gproxy_worker_ejections", "Workers ejected (given no jobs for a while) after failing eject_after jobs in a row, by the function of the last failure.", ["function"], registry=r)
        self.upstream_connect_errors = Counter("gproxy_upstream_connect_errors", "Failed connections to gearmand.", registry=r)
        self.protocol_errors = Counter("gproxy_protocol_errors", "Connections closed for bad input, by reason.", ["reason"], registry=r)
        self.upstream_up = Gauge("gproxy_upstream_up", "1 if the last connection to this gearmand succeeded.", ["upstream"], registry=r)
        self.resource_exhausted = Counter("gproxy_resource_exhausted", "Connections to gearmand gproxy could not open, and accept() calls that failed, for want of its own resources, by resource.", ["resource"], registry=r)
        self.retry_connection_up = Gauge("gproxy_retry_connection_up", "0 while gproxy cannot keep its retry connection to this gearmand (from the first failure until a connection has proved itself), else 1.", ["upstream"], registry=r)
        self.reload_successful = Gauge("gproxy_config_last_reload_successful", "1 if the last reload of the config file (or the start) succeeded, 0 if it was refused.", registry=r)
        self.reload_success_time = Gauge("gproxy_config_last_reload_success_timestamp_seconds", "When the config in force was loaded (the start, or the last reload that succeeded), in seconds since the epoch.", registry=r)
        self.build_info = Gauge("gproxy_build_info", "1, labelled with gproxy's version and which data plane runs: compiled (the fast path) or pure (Python).", ["version", "data_plane"], registry=r)
        self.tls_handshake_failures = Counter("gproxy_tls_handshake_failures", "TLS handshakes that failed: side=\"downstream\" a worker's with gproxy (address: the route's listen address), side=\"upstream\" gproxy's with gearmand (address: the route's gearmand).", ["side", "address"], registry=r)
        self.retry_reconnects = Counter("gproxy_retry_reconnects", "Tries to connect to this gearmand again for retries, after a failure or a loss.", ["upstream"], registry=r)
        for reason in PROTOCOL_ERRORS:
            self.protocol_errors.labels(reason)
        for resource in RESOURCES:
            self.resource_exhausted.labels(resource)
        # Read at scrape time.
        self.packets: dict[str, list[int]] = {d: [0] * (max(PacketType) + 1) for d in DIRECTIONS}
        self.live: LiveState = NothingLive()
        """Where a scrape reads what is state (see read_from)."""
        self.registry.register(_Live(self))

    def read_from(self, live: LiveState) -> None:
        """Scrapes read jobs running and held, budget balances, connections and ejected
        workers from `live` (the owners of those facts) from now on."""
        self.live = live

    def function(self, name: bytes) -> str:
        """The label for a function name: itself, until the cap is reached."""
        label = self._functions.get(name)
        if label is None:
            if len(self._functions) >= self.max_functions:
                return OTHER
            label = self._functions[name] = _label(name)
            self._stats.setdefault(label, JobStats())  # zero-valued series, so rates and alerts see them start
            for reason in REASONS:
                self.retries.labels(label, reason)
            for counter in (self.exhausted, self.deferred, self.observed, self.ejections):
                counter.labels(label)
            for cap in CAPS:
                self.cap_rejections.labels(label, cap)
        return label

    def labelled(self) -> list[bytes]:
        """The function names that have a label of their own."""
        return list(self._functions)

    def job_ended(self, function: bytes, outcome: str, duration: float) -> None:
        stats = self._per_job.get(function) or self._stats_of(function)
        stats.outcomes[outcome] += 1
        stats.jobs[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
        stats.jobs_seconds += duration

    def job_outcome(self, function: bytes, outcome: str) -> None:
        """A job retried or dead-lettered (not an end: counted, not timed)."""
        (self._per_job.get(function) or self._stats_of(function)).outcomes[outcome] += 1

    def attempt_ended(self, function: bytes, duration: float) -> None:
        stats = self._per_job.get(function) or self._stats_of(function)
        stats.attempts[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
        stats.attempts_seconds += duration

    def _stats_of(self, function: bytes) -> JobStats:
        label = self.function(function)
        stats = self._stats.setdefault(label, JobStats())
        if label != OTHER:
            self._per_job[function] = stats
        return stats

    def count(self, metric: Counter, function: bytes, *labels: str) -> None:
        metric.labels(self.function(function), *labels).inc()

    # -- scrapes

    def snapshot(self) -> Snapshot:
        """Everything read at scrape time, copied: cheap, and taken on the loop."""
        live = self.live
        running, held, balance = dict(live.running()), dict(live.held()), dict(live.budget_balance(self.labelled()))
        ejected = dict(live.ejected())
        for name in (*running, *held, *balance, *ejected):
            self.function(name)  # a function seen only here gets its label now, as ever
        return Snapshot(
            {direction: list(counts) for direction, counts in self.packets.items()},
            dict(self._functions), running, held, balance, dict(live.connections()),
            {label: stats.copy() for label, stats in self._stats.items()}, ejected,
        )

    def render(self, snapshot: Snapshot) -> bytes:
        """The exposition text of `snapshot` and the prometheus-client counters (which are
        safe to read from another thread): for a thread, off the loop."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(self._objects, snapshot))
        return generate_latest(registry)


def _label(name: bytes) -> str:
    if len(name) <= MAX_LABEL_BYTES:
        return name.decode("utf-8", "replace")
    digest = hashlib.sha1(name).hexdigest()[:8]
    return f"{name[:80].decode('utf-8', 'replace')}…{digest}"


def _buckets() -> list[int]:
    return [0] * (len(DURATION_BUCKETS) + 1)


@dataclass(slots=True)
class JobStats:
    """One label's jobs: outcomes, and job and attempt durations by bucket (not cumulative;
    the last one is +Inf) with their sums."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    jobs: list[int] = field(default_factory=_buckets)
    jobs_seconds: float = 0.0
    attempts: list[int] = field(default_factory=_buckets)
    attempts_seconds: float = 0.0

    def copy(self) -> JobStats:
        return JobStats(dict(self.outcomes), list(self.jobs), self.jobs_seconds, list(self.attempts), self.attempts_seconds)


@dataclass(frozen=True, slots=True)
class Snapshot:
    packets: dict[str, list[int]]
    labels: dict[bytes, str]
    running: dict[bytes, int]
    held: dict[bytes, int]
    budget_balance: dict[bytes, float]
    connections: dict[str, int]
    stats: dict[str, JobStats]
    ejected: dict[bytes, int]


class _Live(Collector):
    """The registry's view: a fresh snapshot on every collect."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics._objects.collect()
        yield from _families(self.metrics.snapshot())


class _Fixed(Collector):
    def __init__(self, objects: CollectorRegistry, snapshot: Snapshot) -> None:
        self.objects, self.snapshot = objects, snapshot

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self.objects.collect()
        yield from _families(self.snapshot)


def _families(snap: Snapshot) -> Iterator[Metric]:
    jobs = CounterMetricFamily("gproxy_jobs", "Jobs by final outcome, and jobs retried or dead-lettered.", labels=["function", "outcome"])
    job_duration = HistogramMetricFamily("gproxy_job_duration_seconds", "From assignment to the final outcome, retries included.", labels=["function"])
    attempt_duration = HistogramMetricFamily("gproxy_attempt_duration_seconds", "One attempt, from assignment to the worker's result.", labels=["function"])
    for label, stats in sorted(snap.stats.items()):
        for outcome, value in stats.outcomes.items():
            jobs.add_metric([label, outcome], value)
        job_duration.add_metric([label], _cumulative(stats.jobs), stats.jobs_seconds)
        attempt_duration.add_metric([label], _cumulative(stats.attempts), stats.attempts_seconds)
    yield from (jobs, job_duration, attempt_duration)
    packets = CounterMetricFamily("gproxy_packets", "Packets forwarded, by direction and type.", labels=["direction", "type"])
    for direction, counts in snap.packets.items():
        for ptype in PacketType:
            packets.add_metric([direction, ptype.name], counts[ptype])
    yield packets
    yield _per_function("gproxy_jobs_running", "Jobs assigned to workers behind gproxy now.", snap, snap.running)
    yield _per_function("gproxy_jobs_held", "Jobs held for a retry now.", snap, snap.held)
    yield _per_function("gproxy_retry_budget_balance", "Retries the retry budget allows right now.", snap, snap.budget_balance)
    yield _per_function("gproxy_worker_ejected", "Workers ejected now, by the function of the failure that ejected them.", snap, snap.ejected)
    connections = GaugeMetricFamily("gproxy_connections", "Open connections, by side.", labels=["side"])
    for side, value in snap.connections.items():
        connections.add_metric([side], value)
    yield connections


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    bounds = [*map(_bound, DURATION_BUCKETS), "+Inf"]
    total, buckets = 0, []
    for bound, count in zip(bounds, counts, strict=True):
        total += count
        buckets.append((bound, float(total)))
    return buckets


def _bound(value: float) -> str:
    return repr(float(value))


def _per_function(name: str, documentation: str, snap: Snapshot, values: Mapping[bytes, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["function"])
    totals: dict[str, float] = dict.fromkeys(snap.labels.values(), 0)
    for function, value in values.items():
        label = snap.labels.get(function, OTHER)
        totals[label] = totals.get(label, 0) + value
    for label, value in sorted(totals.items()):
        family.add_metric([label], value)
    return family
