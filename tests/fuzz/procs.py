"""gproxy as the command it ships as: one subprocess, its config file written here, its
log (stderr) captured to a file that the checks read.

`src` picks which gproxy to run: the directory that holds the `gproxy` package (default:
this repository's). Pointing it at an export of another commit (`git archive HEAD gproxy |
tar -x -C DIR`) runs the same fuzz or replay against that version, e.g. to show that a
regression file fails before a fix and passes after it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
_LISTENING = re.compile(r"listening on (\S+):(\d+), proxying to gearmand (\S+):(\d+)")
_METRICS = re.compile(r"metrics on http://(\S+):(\d+)/metrics")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class RetrySettings:
    """Retries for the few functions whose retries the fuzz can resolve (see runner)."""

    functions: tuple[str, ...] = ()
    max_attempts: int = 3
    backoff_initial: float = 0.05
    max_hold_time: float = 5.0


def config_text(
    upstreams: list[tuple[str, int]],
    *,
    max_packet_size: int,
    log_level: str = "DEBUG",
    retry: RetrySettings | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    lines = [
        f"max_packet_size = {max_packet_size}",
        f'log_level = "{log_level}"',
        'metrics_listen = "127.0.0.1:0"',
        "shutdown_grace_period = 0",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    for host, port in upstreams:
        lines += ["", "[[routes]]", 'listen = "127.0.0.1:0"', f'upstream = "{host}:{port}"']
    lines += ["", "[retry]", "max_attempts = 1", "jitter = false"]
    retry = retry or RetrySettings()
    for function in retry.functions:
        lines += [
            "",
            f'[functions."{function}"]',
            f"max_attempts = {retry.max_attempts}",
            f"backoff_initial = {retry.backoff_initial}",
            f"max_hold_time = {retry.max_hold_time}",
        ]
    return "\n".join(lines) + "\n"


@dataclass
class Gproxy:
    """`python -m gproxy --config FILE` with every route on a free port."""

    workdir: Path
    config: str
    src: Path = REPO
    proc: subprocess.Popen[bytes] | None = None
    routes: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    """upstream -> listen address."""
    metrics: tuple[str, int] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "gproxy.log"

    def version(self) -> str:
        """What `gproxy --version` says of the gproxy this runs: which data plane, and whether
        it is a checked build."""
        env = dict(os.environ, PYTHONPATH=str(self.src))
        ran = subprocess.run([PYTHON, "-m", "gproxy", "--version"], env=env, capture_output=True, text=True, timeout=60)
        return ran.stdout.strip() or ran.stderr.strip()

    def start(self, timeout: float = 15.0) -> Gproxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "gproxy.toml"
        config_path.write_text(self.config)
        env = dict(os.environ, PYTHONPATH=str(self.src), PYTHONUNBUFFERED="1")
        wanted = self.config.count("[[routes]]")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "gproxy", "--config", str(config_path)],
                cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            self.routes = {
                (m[3], int(m[4])): (m[1], int(m[2])) for m in _LISTENING.finditer(text)
            }
            found = _METRICS.search(text)
            if len(self.routes) == wanted and found:
                self.metrics = (found[1], int(found[2]))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"gproxy did not start:\n{self.log_text()[-3000:]}")

    def listen(self, upstream: tuple[str, int]) -> tuple[str, int]:
        return self.routes[upstream]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    # -- what /proc says

    def rss(self) -> int:
        """Resident set size in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
