"""The retry connection behind a load balancer whose backend is gone: tries and log lines per minute.

    .venv/bin/python bench/retry_storm.py                     # gproxy 0.2.0 (1b7688c) and this checkout,
                                                              # reset and close, 60 s each: about 5 minutes
    .venv/bin/python bench/retry_storm.py --run new=. --mode close --seconds 20
    .venv/bin/python bench/retry_storm.py --run a=git:HEAD~3 --run b=/some/checkout

Starts, on loopback ports, a real gearmand and, in front of it, a small TCP "load balancer"
of this script's own: it relays every connection to gearmand, except one whose first packet
is OPTION_REQ `exceptions` (gproxy's retry client opens so; workers register first), which
it accepts and resets (`--mode reset`) or closes (`--mode close`: a FIN, then the socket
closed once gproxy has closed its side), as a balancer whose backend is gone may do. Then a
real gproxy process (`python -m gproxy --config ...`, the package imported from the run's
source: a directory that holds `gproxy/`, or `git:REV`, extracted with `git archive REV
gproxy`) with one route to the balancer, a pygearman worker behind it and a pygearman
client on gearmand (tests/peers/): the worker fails the job retryably once (`scripted`,
`retry,ok`), gproxy holds it, and its retry can never be submitted.

Counted for `--seconds` from the first retry connection the balancer accepts: those
connections, the lines gproxy logged (from just before the job was submitted), WARNING and
all, and gproxy's CPU time; each as a figure per minute. Bounded in time; every process it
starts is stopped when it ends, even on error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ports import free_ports

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "tests" / "peers"
SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin"
OLD = "1b7688c"
"""gproxy 0.2.0, which reconnected at once after every lost retry connection."""
HEADER = struct.Struct(">4sII")
OPTION_REQ = 26
RETRY_HELLO = (b"\0REQ", OPTION_REQ, b"exceptions")
FIRST_PACKET_WAIT = 10.0
START_WAIT = 30.0
LINGER_RST = struct.pack("ii", 1, 0)


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what}: nothing listens on {port} after {START_WAIT:g}s")


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes | None:
    """The first line `proc` prints, or None if none comes within `timeout`."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else None


@contextmanager
def process(argv: list[str], *, what: str, **popen: object) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own group, stopped on leaving: SIGTERM, a second one (gproxy
    drains its held jobs after the first), then SIGKILL; each wait bounded."""
    proc = subprocess.Popen(argv, start_new_session=True, **popen)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            with suppress(subprocess.TimeoutExpired):
                proc.wait(wait)


# -- the balancer


class Balancer:
    """Relays to `upstream`, but resets or closes every connection that opens with
    OPTION_REQ `exceptions`. An asyncio loop in a thread of its own."""

    def __init__(self, upstream: tuple[str, int], mode: str) -> None:
        self.upstream, self.mode = upstream, mode
        self.retry_accepts: list[float] = []
        """time.monotonic() of each retry connection accepted (written by the loop's thread)."""
        self.relayed = 0
        self.first_retry = threading.Event()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)

    def __enter__(self) -> Balancer:
        self._thread.start()
        if not self._ready.wait(START_WAIT):
            raise SystemExit("the balancer did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await asyncio.wait_for(reader.readexactly(HEADER.size), FIRST_PACKET_WAIT)
            magic, kind, size = HEADER.unpack(header)
            body = await asyncio.wait_for(reader.readexactly(size), FIRST_PACKET_WAIT) if size <= 1 << 20 else b""
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            writer.close()
            return
        if (magic, kind, body) == RETRY_HELLO:
            self.retry_accepts.append(time.monotonic())
            self.first_retry.set()
            await self._refuse(reader, writer)
            return
        self.relayed += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        up_writer.write(header + body)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        writer.close()
        up_writer.close()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            writer.transport.abort()
            return
        # A FIN now; the socket is closed once gproxy has closed its side (closing with its
        # bytes unread would send a reset instead).
        try:
            writer.write_eof()
            async with asyncio.timeout(FIRST_PACKET_WAIT):
                while await reader.read(65536):
                    pass
        except (OSError, TimeoutError):
            pass
        writer.close()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except OSError:
            writer.close()


# -- one run


@dataclass(frozen=True)
class Result:
    label: str
    source: str
    mode: str
    seconds: float
    retry_connections: int
    warnings: int
    lines: int
    cpu: float
    """gproxy's CPU seconds (user and system)."""
    kinds: list[tuple[str, int]]

    def per_minute(self, count: float) -> float:
        return count * 60 / self.seconds


def cpu_seconds(pid: int) -> float:
    """CPU time used by process `pid` so far (utime + stime of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gproxy_env(source: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(source)}


def check_source(source: Path) -> None:
    """The gproxy a process started with gproxy_env(source) imports is source's."""
    found = subprocess.run(
        [sys.executable, "-c", "import gproxy; print(gproxy.__file__)"],
        env=gproxy_env(source), cwd=source, capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(source.resolve()):
        raise SystemExit(f"{source}: python imports gproxy from {found}, not from there")


def measure(label: str, source: Path, mode: str, seconds: float, gearmand_bin: str) -> Result:
    with tempfile.TemporaryDirectory(prefix="gstorm-") as tmp, ExitStack() as stack:
        d = Path(tmp)
        g, proxy_port = free_ports(2)
        gearmand = stack.enter_context(process(
            [gearmand_bin, "--listen=127.0.0.1", f"--port={g}", f"--log-file={d}/gearmand.log",
             f"--pid-file={d}/gearmand.pid"],
            what="gearmand", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        wait_port(g, gearmand, "gearmand")
        balancer = stack.enter_context(Balancer(("127.0.0.1", g), mode))
        config = d / "gproxy.toml"
        config.write_text(
            f'listen = "127.0.0.1:{proxy_port}"\nupstream = "127.0.0.1:{balancer.port}"\nlog_level = "INFO"\n'
            "[retry]\nbackoff_initial = 0.1\njitter = false\n"
        )
        log_path = d / "gproxy.log"
        log = stack.enter_context(open(log_path, "wb"))
        gproxy = stack.enter_context(process(
            [sys.executable, "-m", "gproxy", "--config", str(config)],
            what="gproxy", env=gproxy_env(source), cwd=source, stdout=subprocess.DEVNULL, stderr=log,
        ))
        wait_port(proxy_port, gproxy, "gproxy")
        worker = stack.enter_context(process(
            [sys.executable, str(PEERS / "pyworker.py"), f"127.0.0.1:{proxy_port}", "--state-dir", str(d)],
            what="worker", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        ))
        if read_line(worker, START_WAIT) != b"ready":  # (once its registration went through)
            raise SystemExit("the worker did not get ready")
        before = log_path.stat().st_size
        stack.enter_context(process(
            [sys.executable, str(PEERS / "pyclient.py"), f"127.0.0.1:{g}", "scripted", "--payload", "retry,ok|storm",
             "--unique", "storm", "--timeout", str(seconds + 60)],
            what="client", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        if not balancer.first_retry.wait(START_WAIT):
            raise SystemExit(f"{label}: no retry connection within {START_WAIT:g}s; gproxy's log:\n"
                             + log_path.read_text(errors="replace")[-3000:])
        start, cpu_before = balancer.retry_accepts[0], cpu_seconds(gproxy.pid)
        time.sleep(max(0.0, start + seconds - time.monotonic()))  # the measurement itself
        end, cpu = start + seconds, cpu_seconds(gproxy.pid) - cpu_before
        retry_connections = sum(1 for t in list(balancer.retry_accepts) if t < end)
        with open(log_path, "rb") as f:
            f.seek(before)
            text = f.read().decode("utf-8", "replace")
        if gproxy.poll() is not None:
            raise SystemExit(f"{label}: gproxy exited ({gproxy.returncode}) during the measurement")
    lines = text.splitlines()
    warnings = [line for line in lines if " WARNING " in line]
    kinds = Counter(_kind(line) for line in warnings).most_common(3)
    return Result(label, str(source), mode, seconds, retry_connections, len(warnings), len(lines), cpu, kinds)


def _kind(line: str) -> str:
    """A WARNING line without its time, ports and figures: what kind of line it is."""
    message = line.split(" WARNING ", 1)[1]
    return re.sub(r"\d+(\.\d+)?", "N", message)[:110]


def source_dir(spec: str, stack: ExitStack) -> Path:
    """A directory holding gproxy/: `spec` itself, or `git:REV` extracted from this repository."""
    if not spec.startswith("git:"):
        path = Path(spec).resolve()
        if not (path / "gproxy" / "__init__.py").exists():
            raise SystemExit(f"{spec}: no gproxy/ package there")
        return path
    rev = spec.removeprefix("git:")
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"gproxy-{rev}-")))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "gproxy"], capture_output=True, timeout=60, check=False
    )
    if archive.returncode != 0:
        raise SystemExit(f"git archive {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True, timeout=60)
    return tmp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", metavar="LABEL=SOURCE",
                        help=f"a gproxy to measure: a directory holding gproxy/, or git:REV (default: old=git:{OLD} new=.)")
    parser.add_argument("--mode", action="append", choices=("reset", "close"),
                        help="what the balancer does to a retry connection (default: both)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each run is counted (default 60)")
    args = parser.parse_args()
    gearmand_bin = shutil.which("gearmand", path=SBIN)
    if gearmand_bin is None:
        raise SystemExit("gearmand not found: apt-get install gearman-job-server")
    runs = [spec.split("=", 1) for spec in args.run or [f"old=git:{OLD}", f"new={ROOT}"]]
    if any(len(run) != 2 for run in runs):
        raise SystemExit("--run takes LABEL=SOURCE")
    results = []
    with ExitStack() as stack:
        sources = {label: source_dir(spec, stack) for label, spec in runs}
        for source in sources.values():
            check_source(source)
        for mode in args.mode or ["reset", "close"]:
            for label, source in sources.items():
                result = measure(label, source, mode, args.seconds, gearmand_bin)
                print(f"{label} ({mode}): {result.retry_connections} retry connections, "
                      f"{result.warnings} WARNING lines, {result.lines} lines, {result.cpu:.1f}s of CPU in {args.seconds:g}s",
                      flush=True)
                results.append(result)
    specs = dict(runs)
    print(f"\nPer minute, counted for {args.seconds:g}s from the first retry connection:\n")
    print("| gproxy | balancer | retry connections | WARNING lines | log lines | gproxy CPU |")
    print("|---|---|---|---|---|---|")
    for r in results:
        name = f"{r.label} ({specs[r.label]})" if specs[r.label].startswith("git:") else r.label
        print(f"| {name} | {r.mode} | {r.per_minute(r.retry_connections):,.0f} "
              f"| {r.per_minute(r.warnings):,.0f} | {r.per_minute(r.lines):,.0f} | {r.per_minute(r.cpu):.1f} s |")
    print("\nThe WARNING lines, by kind:")
    for r in results:
        for kind, count in r.kinds:
            print(f"  {r.label} ({r.mode}) {count:>6} x {kind}")


if __name__ == "__main__":
    main()
