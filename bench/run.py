"""Benchmark: the same small-job workload with workers direct, via haproxy (tcp), via relays, via gproxy.

Only the workers go through the hop; clients always talk to gearmand directly. The setups are
interleaved within each round so drift hits all alike; medians across rounds are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from ports import free_ports  # noqa: E402

SETUPS = ("direct", "haproxy", "epoll-relay", "dataplane-relay", "trio-relay", "gproxy")
CTX = mp.get_context("fork")  # fresh peer processes per measurement, cheaply
SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin"
HAPROXY_CFG = """global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server gearmand 127.0.0.1:{upstream}
"""


def start(stack: contextlib.ExitStack, name: str, argv: list[str], port: int, log: Path,
          stop_signal: int = signal.SIGTERM) -> subprocess.Popen:
    """Start a server, wait until it accepts on `port`; the stack stops it however we exit."""
    fh = stack.enter_context(open(log, "wb"))
    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop() -> None:  # the finally kills even if a signal interrupts the polite wait
        try:
            if proc.poll() is None:
                proc.send_signal(stop_signal)
                proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)

    stack.callback(stop)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # accepting is the one readiness signal all three share
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()[-500:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return proc
        time.sleep(0.05)
    raise RuntimeError(f"{name} not listening on {port} after 10 s")


def _check(procs: list[mp.Process], deadline: float, what: str) -> None:
    """Fail fast when a peer died, instead of waiting out the timeout (a client that sent its
    result exits 0 early; only a crash is non-zero, a worker never exits by itself)."""
    for p in procs:
        if p.exitcode not in (None, 0) or (p.exitcode == 0 and what == "connect"):
            raise RuntimeError(f"{p.name} exited ({p.exitcode}) while waiting for peers to {what}")
    if time.monotonic() > deadline:
        raise TimeoutError(f"peers did not {what} in time")


def measure(worker_port: int, gear_port: int, conc: int, jobs_each: int, tag: str) -> tuple[list[int], float]:
    """`conc` workers (via the hop) and `conc` clients (direct): (all latencies in ns, jobs/s)."""
    function, procs, pipes = f"bench-{tag}".encode(), [], []
    ready = [CTX.Event() for _ in range(2 * conc)]
    go = CTX.Event()
    try:
        for i in range(conc):
            procs.append(CTX.Process(target=peers.worker, args=(worker_port, function, ready[i]), daemon=True))
            rx, tx = CTX.Pipe(duplex=False)
            pipes.append(rx)
            procs.append(CTX.Process(target=peers.client, daemon=True, args=(
                gear_port, function, jobs_each, ready[conc + i], go, tx, f"{tag}-{i}")))
        for p in procs:
            p.start()
        deadline = time.monotonic() + peers.IO_TIMEOUT
        for ev in ready:
            while not ev.wait(0.1):
                _check(procs, deadline, "connect")
        go.set()
        lat: list[int] = []
        t0s, t1s = [], []
        deadline = time.monotonic() + peers.IO_TIMEOUT + jobs_each * 0.01
        for rx in pipes:
            while not rx.poll(0.1):
                _check(procs, deadline, "finish")
            done, t0, t1, res = rx.recv()
            if isinstance(res, str) or done != jobs_each:
                raise RuntimeError(f"a client finished {done}/{jobs_each} jobs: {res if isinstance(res, str) else ''}")
            lat += res
            t0s.append(t0)
            t1s.append(t1)
        return lat, len(lat) / (max(t1s) - min(t0s))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)


def table(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        return "\n".join(["| " + " | ".join(r) + " |" for r in rows[:1]] + ["|---" * len(rows[0]) + "|"]
                         + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def report(res: dict[str, dict[str, list[float]]], c: int) -> str:
    med = {s: {k: statistics.median(v) for k, v in m.items()} for s, m in res.items() if m["seq"]}
    rows = [["setup", "seq median µs/job", "seq p99 µs", "seq jobs/s", f"conc jobs/s (C={c})"]]
    rows += [[s, f"{m['lat']:.1f}", f"{m['p99']:.1f}", f"{m['seq']:.0f}", f"{m['conc']:.0f}"] for s, m in med.items()]
    ratios = [["ratio (median of rounds, min-max)", "seq latency", "seq jobs/s", "conc jobs/s", "added µs/job"]]
    pairs = (("gproxy", "haproxy"), ("gproxy", "epoll-relay"), ("epoll-relay", "haproxy"),
             ("dataplane-relay", "epoll-relay"), ("gproxy", "dataplane-relay"),
             ("gproxy", "trio-relay"), ("trio-relay", "haproxy"), ("gproxy", "direct"), ("haproxy", "direct"))
    for a, b in pairs:
        if a in med and b in med:
            ratios.append([f"{a}/{b}"] + [_ratio(res[a][k], res[b][k]) for k in ("lat", "seq", "conc")]
                          + [f"{med[a]['lat'] - med[b]['lat']:+.1f}"])
    return "\n\n".join([table(rows, False), table(ratios, False), table(rows, True), table(ratios, True)])


def _ratio(a: list[float], b: list[float]) -> str:
    """Ratios of the same round's figures (setups are interleaved within a round): median and range."""
    per_round = [x / y for x, y in zip(a, b, strict=False) if y]
    if not per_round:
        return "-"
    return f"{statistics.median(per_round):.2f} ({min(per_round):.2f}-{max(per_round):.2f})"


def _on_sigterm(*_: object) -> None:
    """Turn SIGTERM into SystemExit so the cleanup runs; ignore repeats so they can't cut it short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(143)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000, help="jobs per measurement (default 2000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, each runs every setup (default 5)")
    ap.add_argument("--concurrency", type=int, default=4, help="workers = clients when concurrent (default 4)")
    ap.add_argument("--only", choices=SETUPS, action="append", help="run just this setup (repeatable)")
    ap.add_argument("--workload", choices=("both", "seq", "conc"), default="both")
    ap.add_argument("--quick", action="store_true", help="1000 jobs, 3 rounds (about 10 s)")
    args = ap.parse_args()
    if args.quick:
        args.jobs, args.rounds = 1000, 3
    for tool, pkg in (("haproxy", "haproxy"), ("gearmand", "gearman-job-server")):
        if not shutil.which(tool, path=SBIN):
            print(f"{tool} not found: apt-get install {pkg}", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    c, began = args.concurrency, time.monotonic()
    res = {s: {"lat": [], "p99": [], "seq": [], "conc": []} for s in args.only or SETUPS}
    failed: dict[str, str] = {}
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="gbench-") as tmp:
        d = Path(tmp)
        ports = dict(zip(SETUPS, free_ports(len(SETUPS)), strict=True))
        g = ports["direct"]
        (d / "haproxy.cfg").write_text(HAPROXY_CFG.format(port=ports["haproxy"], upstream=g))
        servers = {
            "gearmand": start(stack, "gearmand", [shutil.which("gearmand", path=SBIN), "--listen=127.0.0.1",
                              f"--port={g}", f"--log-file={d}/gearmand.log", f"--pid-file={d}/gearmand.pid"],
                              g, d / "gearmand.out"),
            "haproxy": start(stack, "haproxy", [shutil.which("haproxy", path=SBIN), "-db", "-f", f"{d}/haproxy.cfg"],
                             ports["haproxy"], d / "haproxy.out"),
            "epoll-relay": start(stack, "epoll-relay", [sys.executable, str(Path(__file__).parent / "epoll_relay.py"),
                                 str(ports["epoll-relay"]), str(g)], ports["epoll-relay"], d / "epoll-relay.out",
                                 signal.SIGINT),
            "dataplane-relay": start(stack, "dataplane-relay", [sys.executable, str(Path(__file__).parent / "dataplane_relay.py"),
                                     str(ports["dataplane-relay"]), str(g)], ports["dataplane-relay"],
                                     d / "dataplane-relay.out", signal.SIGINT),
            "trio-relay": start(stack, "trio-relay", [sys.executable, str(Path(__file__).parent / "relay.py"),
                                str(ports["trio-relay"]), str(g)], ports["trio-relay"], d / "trio-relay.out",
                                signal.SIGINT),
            "gproxy": start(stack, "gproxy", [sys.executable, "-m", "gproxy", "--listen", f"127.0.0.1:{ports['gproxy']}",
                            "--upstream", f"127.0.0.1:{g}", "--log-level", "WARNING"], ports["gproxy"],
                            d / "gproxy.out", signal.SIGINT),
        }
        print("  ".join(f"{n} :{ports['direct' if n == 'gearmand' else n]} pid {p.pid}" for n, p in servers.items())
              + f"  jobs={args.jobs} rounds={args.rounds} concurrency={c} cpus={os.cpu_count()}", flush=True)
        for rnd in range(-1, args.rounds):  # round -1 is a short warm-up, not reported
            n = args.jobs if rnd >= 0 else min(args.jobs, 200)
            for setup in res:
                if setup in failed:
                    continue
                lat, seq, conc = [0], 0.0, 0.0
                try:
                    if args.workload != "conc":
                        lat, seq = measure(ports[setup], g, 1, n, f"{setup}-s{rnd}")
                    if args.workload != "seq":
                        conc = measure(ports[setup], g, c, max(1, n // c), f"{setup}-c{rnd}")[1]
                except Exception as exc:
                    failed[setup] = f"round {rnd + 1 or 'warm-up'}: {type(exc).__name__}: {exc}"
                    print(f"FAILED {setup}: {failed[setup]}", file=sys.stderr, flush=True)
                if dead := [f"{name}: {(d / f'{name}.out').read_text()[-1000:]}"
                            for name, p in servers.items() if p.poll() is not None]:
                    raise SystemExit("server(s) died:\n" + "\n".join(dead))
                if rnd >= 0 and setup not in failed:
                    lat.sort()
                    r = res[setup]
                    r["lat"].append(lat[len(lat) // 2] / 1000)
                    r["p99"].append(lat[int(len(lat) * 0.99)] / 1000)
                    r["seq"].append(seq)
                    r["conc"].append(conc)
                    print(f"round {rnd + 1}/{args.rounds} {setup:10} seq {r['lat'][-1]:7.1f} µs/job "
                          f"{seq:6.0f} jobs/s   conc {conc:6.0f} jobs/s", flush=True)
        if "gproxy" in failed:
            print(f"gproxy output:\n{(d / 'gproxy.out').read_text()[-2000:]}", file=sys.stderr)
    print(f"\nmedians over {args.rounds} rounds of {args.jobs} jobs; {time.monotonic() - began:.1f} s in all\n")
    print(report({s: m for s, m in res.items() if s not in failed}, c))
    for s, why in failed.items():
        print(f"FAILED {s}: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
