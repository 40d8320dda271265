"""The chaos world: real processes on loopback that the run starts, breaks and restarts.

    clients (pyjobs.py) ───────────────▶ gearmand ◀── FaultRelay ◀── gproxy `g1` ◀── workers
                                            ▲                      (long-lived)
                                            └───────────────────── gproxy `g2` ◀── workers
                                                                   (stopped, killed, restarted)

- one gearmand (tests/gearmand.py), restarted only in its own phase;
- two gproxies, each the real `python -m gproxy --config FILE` command with its stderr in a
  file per incarnation: `g1` reaches gearmand through the test's FaultRelay and is never
  stopped (its RSS is watched), `g2` talks to gearmand directly and is the one SIGTERMed
  and killed; each restart keeps its listen and metrics ports, so its workers come back;
- worker slots, each a real library's worker (pygearman `pyworker.py` or Perl
  Gearman::Worker `worker.pl`, both with their chaos functions) behind one gproxy; a
  supervisor thread restarts a worker whose process ended, once its gproxy is up, and records
  an exit it did not cause as a fault `worker_died`;
- clients: `pyjobs.py` processes, each a batch of jobs on one connection to gearmand.

Every process runs in its own process group and is stopped by its group, never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.chaos.history import Batch, Fault, Recorder
from tests.chaos.scripts import DEAD_LETTER, Job
from tests.fault_relay import FaultRelay
from tests.gearmand import Gearmand, find_free_port, wait_for
from tests.peer_procs import (
    PeerProcess,
    start_perlworker,
    start_pyjobs,
    start_pyworker,
    stop_peer,
)

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
START_TIMEOUT = 20.0
WORKER_START_TIMEOUT = 15.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True, slots=True)
class Settings:
    """gproxy's retry settings for the run: realistic, but fast enough for a short run; the
    shipped retry budget is kept."""

    max_attempts: int = 4
    backoff_initial: float = 0.1
    backoff_max: float = 1.0
    grace: float = 3.0
    """shutdown_grace_period: a drain lets held retries and running jobs finish this long."""

    def toml(self, listen: int, upstream: tuple[str, int], metrics: int) -> str:
        return (
            f'listen = "{HOST}:{listen}"\n'
            f'upstream = "{upstream[0]}:{upstream[1]}"\n'
            f'metrics_listen = "{HOST}:{metrics}"\n'
            f"shutdown_grace_period = {self.grace}\n"
            'log_level = "INFO"\n\n'
            "[retry]\n"
            f"max_attempts = {self.max_attempts}\n"
            f"backoff_initial = {self.backoff_initial}\n"
            f"backoff_max = {self.backoff_max}\n"
            f'dead_letter = "{DEAD_LETTER}"\n\n'
            '[functions."chaos_fail"]\n'
            "on_fail = true\n"
        )


class Gproxy:
    """One gproxy command, restartable on the same ports."""

    def __init__(self, name: str, run_dir: Path, upstream: tuple[str, int], settings: Settings, recorder: Recorder) -> None:
        self.name = name
        self.run_dir = run_dir
        self.recorder = recorder
        self.port = find_free_port()
        self.metrics_port = find_free_port()
        self.config = run_dir / f"gproxy-{name}.toml"
        self.config.write_text(settings.toml(self.port, upstream, self.metrics_port))
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.logs: list[Path] = []
        self.up = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        self.incarnation += 1
        log = self.run_dir / f"gproxy-{self.name}-{self.incarnation}.log"
        self.logs.append(log)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gproxy", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, cwd=REPO,
            )

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"gproxy {self.name} exited (rc {self.proc.returncode}):\n{log.read_text()[-3000:]}")
            return "listening on" in log.read_text(errors="replace") and self.http("/healthz")[0] == 200

        wait_for(listening, START_TIMEOUT, f"gproxy {self.name} to listen", interval=0.02)
        self.up.set()
        self.recorder.event("gproxy_start", gproxy=self.name, pid=self.proc.pid, incarnation=self.incarnation)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.up.clear()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM (gproxy drains, then exits): its exit status, None if it outlived
        `timeout` (it is then killed)."""
        assert self.proc is not None
        self.up.clear()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def http(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """(status, body) of GET `path` on the metrics port; (0, error) if unreachable."""
        url = f"http://{HOST}:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except OSError as exc:
            return 0, str(exc)

    def metrics(self) -> Samples:
        status, body = self.http("/metrics")
        if status != 200:
            raise RuntimeError(f"gproxy {self.name} /metrics: {status} {body[:200]}")
        samples: Samples = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def rss_kib(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return int(match.group(1)) if match else None


@dataclass(slots=True)
class WorkerSlot:
    index: int
    lib: str  # "py" (pygearman) or "pl" (Perl Gearman::Worker)
    gproxy: Gproxy
    proc: PeerProcess | None = None
    expected_exit: bool = False
    """Set when the harness itself kills it: its exit is a fault already recorded."""


@dataclass(slots=True)
class World:
    run_dir: Path
    settings: Settings
    recorder: Recorder
    workers_per_gproxy: tuple[str, ...] = ("py", "py", "pl")
    hang_bound: float = 45.0
    """Seconds a foreground job may take, from its submission, before it counts as hung."""
    gearmand: Gearmand = field(init=False)
    relay: FaultRelay = field(init=False)
    g1: Gproxy = field(init=False)
    g2: Gproxy = field(init=False)
    slots: list[WorkerSlot] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    """Held while a worker slot or a gproxy changes (the supervisor and the injector)."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _clients: list[tuple[Batch, PeerProcess]] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "state"

    @property
    def gproxies(self) -> tuple[Gproxy, Gproxy]:
        return (self.g1, self.g2)

    # -- lifecycle

    def start(self) -> None:
        for sub in ("state", "logs", "clients"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self.gearmand = Gearmand(self.run_dir / "gearmand").start()
        self.relay = FaultRelay(self.gearmand.address)
        self.g1 = Gproxy("g1", self.run_dir, self.relay.address, self.settings, self.recorder)
        self.g2 = Gproxy("g2", self.run_dir, self.gearmand.address, self.settings, self.recorder)
        self.recorder.event("world", gearmand=self.gearmand.address, relay=self.relay.address,
                            g1=self.g1.address, g2=self.g2.address, run_dir=str(self.run_dir))
        starters = [threading.Thread(target=g.start) for g in self.gproxies]
        _run_all(starters)
        for gproxy in self.gproxies:
            if not gproxy.up.is_set():
                raise RuntimeError(f"gproxy {gproxy.name} did not start")
        for gproxy in self.gproxies:
            for lib in self.workers_per_gproxy:
                self.slots.append(WorkerSlot(len(self.slots), lib, gproxy))
        _run_all([threading.Thread(target=self.start_worker, args=(slot,)) for slot in self.slots])
        missing = [slot.index for slot in self.slots if slot.proc is None]
        if missing:
            raise RuntimeError(f"worker slots {missing} did not start")
        self._spawn(self._supervise, "supervisor")
        self._spawn(self._sample_rss, "rss")

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        for _, proc in self._clients:
            stop_peer(proc)
        for slot in self.slots:
            if slot.proc is not None:
                slot.expected_exit = True
                stop_peer(slot.proc)
        for gproxy in getattr(self, "g1", None), getattr(self, "g2", None):
            if gproxy is not None and gproxy.proc is not None and gproxy.proc.poll() is None:
                if gproxy.terminate(self.settings.grace + 10) is None:
                    self.recorder.event("gproxy_stop_timeout", gproxy=gproxy.name)
        if hasattr(self, "relay"):
            with contextlib.suppress(Exception):
                self.relay.close()
        if hasattr(self, "gearmand"):
            self.gearmand.stop()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=f"chaos-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    # -- workers

    def start_worker(self, slot: WorkerSlot) -> bool:
        """Start the slot's worker if its gproxy is up; False if not (the supervisor retries)."""
        with self.lock:
            if slot.proc is not None and slot.proc.poll() is None:
                return True  # the injector and the supervisor both restart a killed worker
            if not slot.gproxy.up.is_set():
                return False
            start = start_pyworker if slot.lib == "py" else start_perlworker
            try:
                proc = start(slot.gproxy.address, client_id=f"chaos-{slot.index}", state_dir=self.state_dir,
                             log_dir=self.run_dir / "logs", timeout=WORKER_START_TIMEOUT, chaos=True)
            except (RuntimeError, TimeoutError, OSError) as exc:
                self.recorder.event("worker_start_failed", slot=slot.index, error=str(exc)[:500])
                return False
            slot.proc, slot.expected_exit = proc, False
            self.recorder.worker_started(proc.pid, slot.index, slot.lib, slot.gproxy.name)
            return True

    def kill_worker(self, slot: WorkerSlot) -> int | None:
        """kill -9 the slot's worker (its whole process group); its pid, None if none ran."""
        with self.lock:
            proc = slot.proc
            if proc is None or proc.poll() is not None:
                return None
            slot.expected_exit = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            stop_peer(proc)
            slot.proc = None
            return proc.pid

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            for slot in self.slots:
                with self.lock:
                    proc = slot.proc
                    if proc is not None and proc.poll() is not None:
                        if not slot.expected_exit:
                            now = time.monotonic()
                            tail = proc.log_text()[-1500:]
                            self.recorder.fault(Fault("worker_died", now, now, slot.gproxy.name, proc.pid,
                                                      f"rc {proc.returncode}"))
                            self.recorder.event("worker_exit", pid=proc.pid, rc=proc.returncode, log=tail)
                        stop_peer(proc)
                        slot.proc = None
                    if slot.proc is None and not self._stop.is_set():
                        self.start_worker(slot)

    def all_workers_up(self) -> bool:
        return all(slot.proc is not None and slot.proc.poll() is None for slot in self.slots)

    # -- gproxies

    def _sample_rss(self) -> None:
        while not self._stop.wait(1.0):
            kib = self.g1.rss_kib()
            if kib is not None:
                self.recorder.sample_rss(kib)

    def gauges(self) -> dict[str, float]:
        """Jobs running and held now, per gproxy (sums over functions); -1 if unreachable."""
        out: dict[str, float] = {}
        for gproxy in self.gproxies:
            try:
                samples = gproxy.metrics()
            except RuntimeError:
                out[f"{gproxy.name} running"] = out[f"{gproxy.name} held"] = -1
                continue
            out[f"{gproxy.name} running"] = sum(v for (n, _), v in samples.items() if n == "gproxy_jobs_running")
            out[f"{gproxy.name} held"] = sum(v for (n, _), v in samples.items() if n == "gproxy_jobs_held")
        return out

    def idle(self) -> bool:
        """Nothing queued or running in gearmand (dead letters aside), nothing running or held
        in either gproxy."""
        try:
            status = self.gearmand.status()
        except Exception:
            return False
        if any(total for fn, (total, _, _) in status.items() if fn.startswith("chaos") and fn != DEAD_LETTER):
            return False
        return all(v == 0 for v in self.gauges().values())

    # -- clients

    def submit(self, jobs: list[Job], label: str, phase: str) -> Batch:
        out = self.run_dir / "clients" / f"{label}.json"
        batch = Batch(label, phase, [job.id for job in jobs], time.monotonic(), out)
        proc = start_pyjobs(self.gearmand.address, [job.spec() for job in jobs], out, timeout=self.hang_bound)
        self.recorder.batch(batch)
        self._clients.append((batch, proc))
        return batch

    def clients_running(self) -> int:
        self.reap_clients()
        return len(self._clients)

    def reap_clients(self) -> None:
        for batch, proc in list(self._clients):
            if proc.poll() is not None:
                self._finish(batch, proc)

    def wait_clients(self, timeout: float) -> None:
        """Wait for every client (each ends by its own deadline); stop those that do not."""
        deadline = time.monotonic() + timeout
        while self._clients and time.monotonic() < deadline:
            self.reap_clients()
            time.sleep(0.05)
        for batch, proc in list(self._clients):
            stop_peer(proc)
            self._finish(batch, proc)

    def _finish(self, batch: Batch, proc: PeerProcess) -> None:
        self._clients.remove((batch, proc))
        stop_peer(proc)
        batch.returncode = proc.returncode
        try:
            batch.report = dict(json.loads(batch.out.read_text()))
        except (OSError, ValueError) as exc:
            batch.report = {"error": f"no report: {exc}; {proc.log_text()[-500:]}", "jobs": []}

    def dead_letters(self) -> int:
        return self.gearmand.status().get(DEAD_LETTER, (0, 0, 0))[0]


def _run_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def log_problems(paths: list[Path]) -> list[str]:
    """Lines with a traceback or an ERROR in gproxy logs."""
    found = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            if "Traceback" in line or " ERROR " in line:
                found.append(f"{path.name}: {line}")
    return found


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples) -> Samples:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}

