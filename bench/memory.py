"""What gproxy's memory costs: idle, per idle worker connection, per held job.

    .venv/bin/python bench/memory.py                        # 1,000 connections, 10,000 held jobs
    .venv/bin/python bench/memory.py --connections 200 --held 2000

Starts a gearmand and a gproxy (the production entry point, `python -m gproxy`) on free
loopback ports, and reads gproxy's RSS (VmRSS) at each step:
1. idle, after start;
2. with `--connections` workers connected, each registered (CAN_DO) and asleep (PRE_SLEEP);
3. with `--held` jobs (payload `--payload` bytes) held for a retry: workers grab them and
   fail each with `RETRY`, and a backoff of an hour keeps every one held.
Reports each RSS and the cost per connection and per held job (beyond its payload).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gproxy.core.protocol import REQ, RES, Framer, PacketType, build_packet
from ports import free_ports

P = PacketType
SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin"
FUNCTION = b"membench"


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmRSS")


def settle(pid: int) -> int:
    """RSS once it stops moving (gproxy trims freed memory a second after closes)."""
    last, same = rss(pid), 0
    while same < 5:
        time.sleep(0.2)
        now = rss(pid)
        same = same + 1 if abs(now - last) < 64 * 1024 else 0
        last = now
    return last


def read_packets(sock: socket.socket, framer: Framer, count: int) -> list:  # type: ignore[type-arg]
    frames: list = []  # type: ignore[type-arg]
    while len(frames) < count:
        data = sock.recv(1 << 20)
        if not data:
            raise SystemExit("connection closed")
        frames += framer.receive(data)
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--held", type=int, default=10_000)
    parser.add_argument("--payload", type=int, default=100)
    args = parser.parse_args()
    gearmand_bin = shutil.which("gearmand", path=SBIN)
    if gearmand_bin is None:
        raise SystemExit("gearmand not found: apt-get install gearman-job-server")
    with tempfile.TemporaryDirectory(prefix="gmem-") as tmp:
        d = Path(tmp)
        g, proxy_port = free_ports(2)
        config = d / "gproxy.toml"
        config.write_text(
            f'listen = "127.0.0.1:{proxy_port}"\nupstream = "127.0.0.1:{g}"\nlog_level = "WARNING"\n'
            "[retry]\nbackoff_initial = 3600\nbackoff_max = 3600\nmax_hold_time = 7200\njitter = false\n"
            f"max_held = {args.held * 2}\n"
        )
        procs = [
            subprocess.Popen([gearmand_bin, "--listen=127.0.0.1", f"--port={g}", f"--log-file={d}/gearmand.log",
                              "--threads=0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        try:
            wait_port(g)
            with open(d / "gproxy.log", "wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "gproxy", "--config", str(config)],
                                              stdout=subprocess.DEVNULL, stderr=log))
            wait_port(proxy_port)
            pid = procs[1].pid
            idle = settle(pid)

            workers = []
            for _ in range(args.connections):
                sock = socket.create_connection(("127.0.0.1", proxy_port))
                sock.sendall(build_packet(REQ, P.CAN_DO, function=FUNCTION) + build_packet(REQ, P.PRE_SLEEP))
                workers.append(sock)
            with_connections = settle(pid)

            client = socket.create_connection(("127.0.0.1", g))
            payload = b"p" * args.payload
            for start in range(0, args.held, 1000):
                batch = range(start, min(args.held, start + 1000))
                client.sendall(b"".join(build_packet(REQ, P.SUBMIT_JOB_BG, function=FUNCTION, unique=b"u%d" % n,
                                                     data=payload) for n in batch))
                read_packets(client, Framer(RES), len(batch))
            worker = workers[0]
            framer = Framer(RES, 1 << 30)
            read_packets(worker, framer, 0)
            held = 0
            while held < args.held:
                batch = min(500, args.held - held)
                worker.sendall(build_packet(REQ, P.GRAB_JOB_UNIQ) * batch)
                frames = [f for f in read_packets(worker, framer, batch) if f.type is P.JOB_ASSIGN_UNIQ]
                worker.sendall(b"".join(build_packet(REQ, P.WORK_EXCEPTION, handle=f.args()["handle"], data=b"RETRY: bench")
                                        for f in frames))
                held += len(frames)
            with_held = settle(pid)
        finally:  # (held jobs would make gproxy drain for its grace period: a second signal cuts it)
            for proc in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(2)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    proc.wait(10)
    mib = 1 << 20
    print(f"gproxy RSS idle: {idle / mib:.1f} MiB")
    print(f"with {args.connections} idle worker connections: {with_connections / mib:.1f} MiB "
          f"({(with_connections - idle) / args.connections / 1024:.1f} KiB per connection, its gearmand one included)")
    print(f"with {args.held} jobs held for a retry ({args.payload}-byte payloads): {with_held / mib:.1f} MiB "
          f"({(with_held - with_connections) / args.held / 1024:.2f} KiB per held job, "
          f"{(with_held - with_connections) / args.held / 1024 - args.payload / 1024:.2f} KiB beyond its payload)")


if __name__ == "__main__":
    main()
