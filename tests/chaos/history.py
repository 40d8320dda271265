"""What happened in a chaos run: the harness's own events, the workers' attempt records and
the clients' reports, joined into one history per job.

Every time is time.monotonic() (CLOCK_MONOTONIC), which the harness, the workers (Python and
Perl) and the clients all read on the same host, so their records interleave correctly.
The Recorder is written to by the harness's threads while the run goes on; History is built
from everything once the run is over, and is what the checks read.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.scripts import Expectation, Job, expect

SLACK = 0.5
"""Seconds by which a record may lag the packet it belongs to (a worker logs an attempt's end
just before sending its result; a kill in between still interrupts that attempt)."""


@dataclass(slots=True)
class Fault:
    """One injected fault (or an event that acts like one), from `t` until `t_end`."""

    kind: str
    t: float
    t_end: float
    gproxy: str | None = None
    """The gproxy it hit: the one restarted, the one behind the relay, the killed worker's."""
    pid: int | None = None
    """The killed worker's pid."""
    detail: str = ""


@dataclass(slots=True)
class Batch:
    """One client process and the jobs it submitted."""

    label: str
    phase: str
    job_ids: list[str]
    t: float
    out: Path
    report: dict[str, Any] | None = None
    returncode: int | None = None


class Recorder:
    """The harness's log of the run: faults, process starts and exits, phases, samples."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.batches: list[Batch] = []
        self.worker_pids: dict[int, dict[str, Any]] = {}
        """pid -> {"slot", "lib", "gproxy", "t"} for every worker process started."""
        self.rss: list[tuple[float, str, int]] = []
        """(t, phase, VmRSS in KiB) of the long-lived gproxy."""
        self.phase = "setup"
        self.phases: list[tuple[str, float]] = [("setup", self.t0)]

    def event(self, kind: str, **fields: Any) -> None:
        with self._lock:
            self.events.append({"t": time.monotonic(), "kind": kind, **fields})

    def fault(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)
            self.events.append({"t": fault.t, "kind": "fault", **asdict(fault)})

    def batch(self, batch: Batch) -> None:
        with self._lock:
            self.batches.append(batch)

    def worker_started(self, pid: int, slot: int, lib: str, gproxy: str) -> None:
        with self._lock:
            self.worker_pids[pid] = {"slot": slot, "lib": lib, "gproxy": gproxy, "t": time.monotonic()}
            self.events.append({"t": time.monotonic(), "kind": "worker_start", "pid": pid, "slot": slot,
                                "lib": lib, "gproxy": gproxy})

    def enter(self, phase: str) -> None:
        with self._lock:
            self.phase = phase
            self.phases.append((phase, time.monotonic()))
            self.events.append({"t": time.monotonic(), "kind": "phase", "phase": phase})

    def sample_rss(self, kib: int) -> None:
        with self._lock:
            self.rss.append((time.monotonic(), self.phase, kib))

    def dump(self, path: Path) -> None:
        with self._lock, open(path, "w") as f:
            f.writelines(json.dumps(event, default=str) + "\n" for event in sorted(self.events, key=lambda e: e["t"]))

    def rel(self, t: float) -> str:
        return f"+{t - self.t0:8.3f}"


@dataclass(slots=True)
class Attempt:
    """One run of a job by a worker, from its chaos.log records."""

    job: str
    t: float
    lib: str
    pid: int
    gproxy: str | None
    fn: str
    unique: str | None
    handle: str
    n: int
    action: str
    token: str
    t_end: float | None = None
    out: str | None = None
    data: str | None = None


@dataclass(slots=True)
class Answer:
    type: str
    data: str | None
    t: float


@dataclass(slots=True)
class JobHistory:
    job: Job
    phase: str
    batch: str
    expected: Expectation
    submitted_t: float
    created_t: float | None = None
    handle: str | None = None
    answers: list[Answer] = field(default_factory=list)
    data: list[tuple[str, float]] = field(default_factory=list)
    status: list[tuple[int, int, float]] = field(default_factory=list)
    status_at_deadline: dict[str, Any] | None = None
    client_error: str | None = None
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def answer(self) -> Answer | None:
        return self.answers[0] if self.answers else None

    def settled_t(self) -> float | None:
        """When the job was over: its (first) answer; for a background job the last end of
        an attempt (None if the last attempt to start never ended: a killed one that nothing
        followed). An attempt killed earlier has no end but does not keep the job alive."""
        if not self.job.bg:
            return self.answer.t if self.answer else None
        if not self.attempts or self.attempts[-1].t_end is None:
            return None
        return max(a.t_end for a in self.attempts if a.t_end is not None)


class History:
    """Every job of the run with its attempts and answers, and the faults."""

    def __init__(self, recorder: Recorder, jobs: Iterable[tuple[Job, str]], records: list[dict[str, Any]],
                 max_attempts: int, long_lived: str) -> None:
        self.recorder = recorder
        self.faults = sorted(recorder.faults, key=lambda f: f.t)
        self.max_attempts = max_attempts
        self.long_lived = long_lived
        job_phase = {job.id: (job, phase) for job, phase in jobs}
        self.jobs: dict[str, JobHistory] = {}
        for batch in recorder.batches:
            report = batch.report or {}
            by_id = {j["id"]: j for j in report.get("jobs", [])}
            for job_id in batch.job_ids:
                job, phase = job_phase[job_id]
                h = JobHistory(job, phase, batch.label, expect(job, max_attempts), batch.t)
                entry = by_id.get(job_id)
                if entry is None:
                    h.client_error = report.get("error") or f"no report (client exit {batch.returncode})"
                else:
                    h.created_t = entry.get("created_t")
                    h.handle = entry.get("handle")
                    h.answers = [Answer(a["type"], a["data"], a["t"]) for a in entry.get("answers", [])]
                    h.data = [(d["data"], d["t"]) for d in entry.get("data", [])]
                    h.status = [tuple(s) for s in entry.get("status", [])]  # type: ignore[misc]
                    h.status_at_deadline = entry.get("status_at_deadline")
                    h.client_error = report.get("error")
                self.jobs[job_id] = h
        self.tokens: dict[str, Attempt] = {}
        self.unknown_records: list[dict[str, Any]] = []
        ends: dict[str, dict[str, Any]] = {}
        for record in records:
            if record.get("e") == "end":
                ends[record["tok"]] = record
        for record in records:
            if record.get("e") != "start":
                continue
            owner = recorder.worker_pids.get(record["pid"], {})
            attempt = Attempt(
                record["job"], record["t"], record["lib"], record["pid"], owner.get("gproxy"), record["fn"],
                record.get("uniq"), record["handle"], record["n"], record["act"], record["tok"],
            )
            end = ends.get(attempt.token)
            if end is not None:
                attempt.t_end, attempt.out, attempt.data = end["t"], end["out"], end["data"]
            self.tokens[attempt.token] = attempt
            h = self.jobs.get(attempt.job)
            if h is None:
                self.unknown_records.append(record)
            else:
                h.attempts.append(attempt)
        for h in self.jobs.values():
            h.attempts.sort(key=lambda a: a.t)

    def in_phase(self, *phases: str) -> list[JobHistory]:
        return [h for h in self.jobs.values() if h.phase in phases]

    # -- faults and jobs

    def touches(self, fault: Fault, h: JobHistory) -> bool:
        """Could `fault` have made `h` run again? A killed worker: it was running an attempt
        of the job. A gproxy stopped or killed: an attempt of the job had run behind it (so
        that gproxy held the job, or ran it). The relay (in front of the long-lived gproxy):
        an attempt had run behind that gproxy. gearmand restarted: every job alive then."""
        if fault.kind == "gearmand_restart":
            return True
        for a in h.attempts:
            if a.t > fault.t_end + SLACK:
                continue
            if fault.kind in ("kill_worker", "worker_died"):
                if a.pid == fault.pid and (a.t_end is None or a.t_end + SLACK >= fault.t):
                    return True
            elif fault.gproxy is not None and a.gproxy == fault.gproxy:
                return True
        return False

    def faults_during(self, h: JobHistory, start: float, end: float | None) -> list[Fault]:
        last = float("inf") if end is None else end + SLACK
        return [f for f in self.faults if f.t_end >= start and f.t <= last]

    def explaining(self, h: JobHistory, start: float | None = None, end: float | None = None) -> list[Fault]:
        """The faults during [start, end] (default: the job's life) that touch the job."""
        start = h.submitted_t if start is None else start
        end = h.settled_t() if end is None else end
        return [f for f in self.faults_during(h, start, end) if self.touches(f, h)]

    # -- printing

    def describe_fault(self, f: Fault) -> str:
        parts = [f.kind]
        if f.gproxy:
            parts.append(f"gproxy={f.gproxy}")
        if f.pid:
            parts.append(f"pid={f.pid}")
        if f.detail:
            parts.append(f.detail)
        span = f" (until {self.recorder.rel(f.t_end).strip()})" if f.t_end - f.t > 0.05 else ""
        return " ".join(parts) + span

    def timeline(self, h: JobHistory) -> str:
        """Everything known about one job, in time order."""
        job, rel = h.job, self.recorder.rel
        exp = h.expected
        lines = [
            (f"job {job.id} ({job.kind}, {job.fn}, {job.priority}, payload {job.payload!r}, unique {job.unique!r}; "
             f"without faults: {exp.attempts} attempt(s), {exp.outcome}{', exhausted' if exp.exhausted else ''})")
        ]
        items: list[tuple[float, str]] = [(h.submitted_t, f"submitted by client {h.batch}")]
        if h.created_t is not None:
            items.append((h.created_t, f"JOB_CREATED {h.handle}"))
        for a in h.attempts:
            items.append((a.t, (f"attempt {a.n} `{a.action}` on {a.lib} pid {a.pid} behind {a.gproxy}, "
                                f"handle {a.handle}, unique {a.unique!r}, token {a.token}")))
            if a.t_end is not None:
                items.append((a.t_end, f"  attempt {a.n} ({a.token}) ends: {a.out} {a.data!r}"))
        for data, t in h.data:
            items.append((t, f"WORK_DATA {data!r}"))
        for num, den, t in h.status:
            items.append((t, f"WORK_STATUS {num}/{den}"))
        for answer in h.answers:
            items.append((answer.t, f"ANSWER {answer.type} {answer.data!r}"))
        settled = h.settled_t()
        for f in self.faults_during(h, h.submitted_t, settled):
            mark = " [touches this job]" if self.touches(f, h) else ""
            items.append((f.t, f"FAULT {self.describe_fault(f)}{mark}"))
        lines += [f"  {rel(t)} {text}" for t, text in sorted(items, key=lambda i: i[0])]
        if h.client_error:
            lines.append(f"  client error: {h.client_error}")
        if h.status_at_deadline is not None:
            lines.append(f"  unanswered at the client's deadline; GET_STATUS then: {h.status_at_deadline}")
        return "\n".join(lines)


def exception_text(data: str) -> str:
    """The text of an exception payload as the client decoded it: Perl's Gearman::Worker
    freezes its `die` message with Storable (05 0b 0a <len> <text>), which is unwrapped."""
    if data.startswith("\x05\x0b\n") and len(data) >= 4:
        return data[4 : 4 + ord(data[3])]
    return data


def token_of(text: str | None) -> str | None:
    """The attempt token a result, exception or update text ends with (` #<token>`)."""
    if not text:
        return None
    _, sep, token = text.rstrip("\n").rpartition(" #")
    return token if sep and token and " " not in token else None

