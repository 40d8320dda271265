"""The resource monitor: gproxy's RSS, open file descriptors, CPU time and /metrics, and what
its log says about every closed connection.

Everything here reads what gproxy shows from outside (procfs, its HTTP endpoint, its log
file); nothing reaches into the process.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from tests.fuzz.procs import Gproxy
from tests.fuzz.wire import reason_of

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_CLOSE = re.compile(
    r"^(?P<time>\S+ \S+) (?P<level>[A-Z]+) gproxy\.pair: peer (?P<peer>\S+) \(via (?P<via>\S+) to gearmand "
    r"(?P<upstream>\S+)\): closed: (?P<reason>.*)$"
)
_EXCEPTION = re.compile(r"^[\s|+]*((?:\w+\.)*\w*(?:Error|Exception|Interrupt|Exit)\b.*)$")
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) (?P<logger>\S+): ")


@dataclass
class Scrape:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    size: int
    seconds: float

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for (metric, labels), value in self.samples.items():
            if metric == name:
                out[dict(labels).get(label, "")] = value
        return out


def scrape(address: tuple[str, int], timeout: float = 30.0) -> Scrape:
    """GET /metrics, parsed (every sample; label values unescaped only as far as needed)."""
    started = time.monotonic()
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: fuzz\r\n\r\n")
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    raw = b"".join(chunks)
    seconds = time.monotonic() - started
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"/metrics answered {head[:100]!r}")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in body.decode("utf-8", "replace").splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = tuple(sorted(_LABEL.findall(match[2] or "")))
        try:
            samples[(match[1], labels)] = float(match[3])
        except ValueError:
            continue
    return Scrape(samples, len(body), seconds)


@dataclass
class Resources:
    rss: int
    fds: int
    cpu: float
    worker_connections: float
    upstream_connections: float
    protocol_errors: dict[str, float]
    held: float

    def describe(self) -> str:
        return (
            f"RSS {self.rss / 2**20:.1f} MiB, {self.fds} fds, connections worker "
            f"{self.worker_connections:g} upstream {self.upstream_connections:g}, held {self.held:g}"
        )


def resources(gproxy: Gproxy) -> Resources:
    assert gproxy.metrics is not None
    s = scrape(gproxy.metrics)
    return Resources(
        rss=gproxy.rss(),
        fds=gproxy.fds(),
        cpu=gproxy.cpu_seconds(),
        worker_connections=s.value("gproxy_connections", side="worker"),
        upstream_connections=s.value("gproxy_connections", side="upstream"),
        protocol_errors={
            k: v for k, v in s.by_label("gproxy_protocol_errors_total", "reason").items() if k
        },
        held=sum(s.by_label("gproxy_jobs_held", "function").values()),
    )


@dataclass
class CloseLine:
    level: str
    peer: str
    via: str
    upstream: str
    reason: str
    line_no: int
    time: float = 0.0
    """Wall-clock time of the record (logging's asctime: local time, milliseconds)."""

    @property
    def port(self) -> int | None:
        host, _, port = self.peer.rpartition(":")
        return int(port) if port.isdigit() and host else None

    @property
    def protocol_reason(self) -> str | None:
        return reason_of(self.reason)


def exception_line(traceback: str) -> str:
    """The line of a traceback that says what was raised (the last such line)."""
    found = [m[1] for line in traceback.splitlines() if (m := _EXCEPTION.match(line)) and ":" in m[1]]
    return found[-1] if found else traceback.splitlines()[-1]


@dataclass
class LogReport:
    closes: list[CloseLine] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Records at ERROR or CRITICAL."""
    warnings_by_reason: Counter[str] = field(default_factory=Counter)
    """WARNING close lines for bad input, by the metric reason their wording stands for."""
    other_warnings: list[str] = field(default_factory=list)
    retry_lost: list[str] = field(default_factory=list)
    """Lines for gproxy's retry connections lost, at any level: one WARNING when an outage
    starts, DEBUG while it lasts (each for bad input is counted in the metric all the same)."""
    records: int = 0


def read_log(text: str, start_line: int = 0) -> LogReport:
    """What gproxy's log says, from line `start_line` on."""
    report = LogReport()
    lines = text.splitlines()
    for number, line in enumerate(lines[start_line:], start_line):
        if "Traceback" in line:
            end = number + 1
            while end < len(lines) and not _RECORD.match(lines[end]):
                end += 1
            report.tracebacks.append("\n".join(lines[number:end]))
        record = _RECORD.match(line)
        if record is None:
            continue
        report.records += 1
        level = record["level"]
        if level in ("ERROR", "CRITICAL"):
            report.errors.append(line)
        close = _CLOSE.match(line)
        if close is not None:
            entry = CloseLine(
                close["level"], close["peer"], close["via"], close["upstream"], close["reason"], number,
                _wall(close["time"]),
            )
            report.closes.append(entry)
            reason = entry.protocol_reason
            if reason is not None and level == "WARNING":
                report.warnings_by_reason[reason] += 1
            continue
        if "retry client to gearmand" in line and " lost (" in line:
            report.retry_lost.append(line)
        if level == "WARNING":
            report.other_warnings.append(line)
    return report


def _wall(asctime: str) -> float:
    stamp, _, millis = asctime.partition(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis or 0) / 1000


def retry_losses(report: LogReport) -> tuple[list[str], Counter[str]]:
    """gproxy's retry connections lost, and how many of them were lost for bad input, by reason."""
    lost = report.retry_lost
    bad: Counter[str] = Counter()
    for line in lost:
        reason = reason_of("protocol error " + line.split(" lost (", 1)[1])
        if reason not in (None, "unclassified"):
            bad[reason] += 1  # type: ignore[index]
    return lost, bad


def agreement(
    delta: dict[str, float], closes: Counter[str], retry: Counter[str], unnamed: int, quiet: int = 0
) -> list[str]:
    """Where gproxy_protocol_errors_total's increase (`delta`, by reason) disagrees with the
    WARNING lines for bad input: close lines (`closes`) and retry connections lost for bad
    input (`retry`). Each mismatch says what explains it when something does: the retry
    connection's bad input uncounted, `unnamed` WARNING close lines that name no reason, or
    `quiet` refusals logged below WARNING (after the other side had closed)."""
    out = []
    reasons = sorted(set(delta) | set(closes) | set(retry))
    logged = {r: closes.get(r, 0) + retry.get(r, 0) for r in reasons}
    missing = sum(delta.values()) - sum(logged.values())
    for r in reasons:
        if delta.get(r, 0) == logged[r]:
            continue
        line = f"{r}: metric +{delta.get(r, 0):g}, WARNING close lines {closes.get(r, 0)}"
        if retry.get(r):
            line += f" and lost retry connections {retry[r]}"
        if retry.get(r) and delta.get(r, 0) == closes.get(r, 0):
            line += " (retry_counted: the retry connection's are not counted)"
        elif unnamed and missing == unnamed:
            line += f" ({unnamed} WARNING close lines name no reason)"
        elif quiet:
            line += f" ({quiet} refusals logged below WARNING after the other side closed)"
        out.append(line)
    return out



def tcp_ports(pid: int, remote_port: int) -> list[int]:
    """Local ports of process `pid`'s TCP connections to `remote_port` (IPv4, from procfs)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return []
    ports = []
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.split(":")[1], 16) == remote_port:
                ports.append(int(local.split(":")[1], 16))
    return ports
