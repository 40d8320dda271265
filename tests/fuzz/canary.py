"""The canary: a healthy pygearman worker and client on route A, next to the fuzz.

The worker is tests/peers/pyworker.py (client id `canary`); the client (canary_client.py)
submits small `reverse` jobs one after the other and reports each one's outcome and
latency. Every canary job must succeed, and the worst latency stays under a bound.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.peer_procs import PeerProcess, start_pyworker, stop_peer

CLIENT = Path(__file__).with_name("canary_client.py")


@dataclass
class CanaryJob:
    i: int
    ok: bool
    latency: float
    state: str | None
    error: str | None
    at: float


@dataclass
class Canary:
    address: tuple[str, int]
    log_dir: Path
    interval: float = 0.02
    jobs: list[CanaryJob] = field(default_factory=list)
    worker: PeerProcess | None = None
    counting: bool = False
    """Jobs are recorded only while counting (the fuzz phase and the drain after it)."""
    _client: trio.Process | None = None

    async def start_worker(self) -> None:
        self.worker = await trio.to_thread.run_sync(
            lambda: start_pyworker(self.address, client_id="canary", log_dir=self.log_dir)
        )

    async def run_client(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the client until cancelled, recording its jobs."""
        host, port = self.address
        stderr = open(self.log_dir / "canary-client.log", "ab")  # noqa: SIM115, ASYNC230 (closed below)
        try:
            self._client = await trio.lowlevel.open_process(
                [sys.executable, str(CLIENT), f"{host}:{port}", "--interval", str(self.interval)],
                stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
            )  # fmt: skip
            task_status.started()
            assert self._client.stdout is not None
            buffer = b""
            while chunk := await self._client.stdout.receive_some(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    report = json.loads(line)
                    if self.counting:
                        self.jobs.append(CanaryJob(report["i"], report["ok"], report["latency"],
                                                   report["state"], report["error"], trio.current_time()))
        finally:
            if self._client is not None and self._client.returncode is None:
                with trio.CancelScope(shield=True):
                    self._client.send_signal(signal.SIGTERM)
                    with trio.move_on_after(5):
                        await self._client.wait()
                    if self._client.returncode is None:
                        self._client.kill()
                        await self._client.wait()
            stderr.close()

    def stop_worker(self) -> None:
        if self.worker is not None:
            stop_peer(self.worker)

    @property
    def failures(self) -> list[CanaryJob]:
        return [job for job in self.jobs if not job.ok]

    @property
    def worst(self) -> float:
        return max((job.latency for job in self.jobs), default=0.0)

    def percentile(self, q: float) -> float:
        latencies = sorted(job.latency for job in self.jobs)
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]
