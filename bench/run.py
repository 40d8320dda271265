"""Benchmark: the same small-job workload with workers direct, via haproxy (tcp), via relays, via gproxy.

Only the workers go through the hop; clients always talk to gearmand directly. Workloads: `seq`
(one worker, one client submitting jobs one after another), `seq4` (the same client, four
workers behind the hop: every job wakes them all, the NOOP/GRAB_JOB/NO_JOB/PRE_SLEEP exchange
of each sleeping worker crosses the hop with it) and `conc` (C workers and C clients at
once). gproxy runs twice: compiled (`gproxy`) and pure Python (`gproxy-pure`,
GPROXY_NO_EXTENSIONS=1). The CPU each hop's process spends per job (user and system, from
/proc/PID/stat) is measured over the seq4 workload. The setups are interleaved within each
round so drift hits all alike; medians across rounds are reported.
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

SETUPS = ("direct", "haproxy", "epoll-relay", "dataplane-relay", "trio-relay", "gproxy", "gproxy-pure")
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
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
          stop_signal: int = signal.SIGTERM, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server, wait until it accepts on `port`; the stack stops it however we exit."""
    fh = stack.enter_context(open(log, "wb"))
    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})

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


def cpu_ticks(pid: int | None) -> tuple[int, int]:
    """(user, system) clock ticks a process has used; (0, 0) for none (direct)."""
    if pid is None:
        return (0, 0)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))


def measure(worker_port: int, gear_port: int, workers: int, clients: int, jobs_each: int,
            tag: str) -> tuple[list[int], float]:
    """`workers` workers (via the hop) and `clients` clients (direct): (all latencies in ns, jobs/s)."""
    function, procs, pipes = f"bench-{tag}".encode(), [], []
    ready = [CTX.Event() for _ in range(workers + clients)]
    go = CTX.Event()
    try:
        for i in range(workers):
            procs.append(CTX.Process(target=peers.worker, args=(worker_port, function, ready[i]), daemon=True))
        for i in range(clients):
            rx, tx = CTX.Pipe(duplex=False)
            pipes.append(rx)
            procs.append(CTX.Process(target=peers.client, daemon=True, args=(
                gear_port, function, jobs_each, ready[workers + i], go, tx, f"{tag}-{i}")))
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
    med = {s: {k: statistics.median(v) if v else 0.0 for k, v in m.items()} for s, m in res.items() if m["seq"]}
    rows = [["setup", "seq µs/job", "seq p99 µs", "seq4 µs/job", f"conc jobs/s (C={c})", "CPU µs/job seq4 (user)"]]
    rows += [[s, f"{m['lat']:.1f}", f"{m['p99']:.1f}", f"{m['lat4']:.1f}", f"{m['conc']:.0f}",
              "-" if s == "direct" else f"{m['cpu']:.0f} ({m['user']:.0f})"] for s, m in med.items()]
    ratios = [["ratio (median of rounds, min-max)", "seq latency", "seq4 latency", "conc jobs/s", "CPU/job seq4",
               "user CPU/job seq4"]]
    pairs = (("gproxy", "haproxy"), ("gproxy-pure", "haproxy"), ("gproxy", "gproxy-pure"),
             ("gproxy", "epoll-relay"), ("epoll-relay", "haproxy"), ("dataplane-relay", "epoll-relay"),
             ("gproxy", "trio-relay"), ("trio-relay", "haproxy"), ("gproxy", "direct"), ("haproxy", "direct"))
    for a, b in pairs:
        if a in med and b in med:
            cpu = [_ratio(res[a][k], res[b][k]) if b != "direct" else "-" for k in ("cpu", "user")]
            ratios.append([f"{a}/{b}"] + [_ratio(res[a][k], res[b][k]) for k in ("lat", "lat4", "conc")] + cpu)
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
    ap.add_argument("--workload", choices=("all", "seq", "seq4", "conc"), default="all")
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
    res = {s: {"lat": [], "p99": [], "seq": [], "lat4": [], "conc": [], "cpu": [], "user": []}
           for s in args.only or SETUPS}
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
            **{
                name: start(stack, name, [sys.executable, "-m", "gproxy", "--listen", f"127.0.0.1:{ports[name]}",
                            "--upstream", f"127.0.0.1:{g}", "--log-level", "WARNING"], ports[name],
                            d / f"{name}.out", signal.SIGINT, env={"GPROXY_NO_EXTENSIONS": "1"} if pure else {})
                for name, pure in (("gproxy", False), ("gproxy-pure", True))
            },
        }
        pids = {name: p.pid for name, p in servers.items()}
        pids["direct"] = None  # type: ignore[assignment]
        print("  ".join(f"{n} :{ports['direct' if n == 'gearmand' else n]} pid {p.pid}" for n, p in servers.items())
              + f"  jobs={args.jobs} rounds={args.rounds} concurrency={c} cpus={os.cpu_count()}", flush=True)
        for rnd in range(-1, args.rounds):  # round -1 is a short warm-up, not reported
            n = args.jobs if rnd >= 0 else min(args.jobs, 200)
            for setup in res:
                if setup in failed:
                    continue
                lat, lat4, seq, conc, ticks = [0], [0], 0.0, 0.0, (0, 0)
                try:
                    if args.workload in ("all", "seq"):
                        lat, seq = measure(ports[setup], g, 1, 1, n, f"{setup}-s{rnd}")
                    if args.workload in ("all", "seq4"):
                        before = cpu_ticks(pids[setup])
                        lat4 = measure(ports[setup], g, 4, 1, n, f"{setup}-f{rnd}")[0]
                        after = cpu_ticks(pids[setup])
                        ticks = (after[0] - before[0], after[1] - before[1])
                    if args.workload in ("all", "conc"):
                        conc = measure(ports[setup], g, c, c, max(1, n // c), f"{setup}-c{rnd}")[1]
                except Exception as exc:
                    failed[setup] = f"round {rnd + 1 or 'warm-up'}: {type(exc).__name__}: {exc}"
                    print(f"FAILED {setup}: {failed[setup]}", file=sys.stderr, flush=True)
                if dead := [f"{name}: {(d / f'{name}.out').read_text()[-1000:]}"
                            for name, p in servers.items() if p.poll() is not None]:
                    raise SystemExit("server(s) died:\n" + "\n".join(dead))
                if rnd >= 0 and setup not in failed:
                    lat.sort()
                    lat4.sort()
                    r = res[setup]
                    r["lat"].append(lat[len(lat) // 2] / 1000)
                    r["p99"].append(lat[int(len(lat) * 0.99)] / 1000)
                    r["seq"].append(seq)
                    r["lat4"].append(lat4[len(lat4) // 2] / 1000)
                    r["conc"].append(conc)
                    r["cpu"].append((ticks[0] + ticks[1]) * TICK_US / n)
                    r["user"].append(ticks[0] * TICK_US / n)
                    print(f"round {rnd + 1}/{args.rounds} {setup:15} seq {r['lat'][-1]:7.1f} µs/job   "
                          f"seq4 {r['lat4'][-1]:7.1f} µs/job, CPU {r['cpu'][-1]:5.0f} µs/job "
                          f"(user {r['user'][-1]:4.0f})   conc {conc:6.0f} jobs/s", flush=True)
        for name in ("gproxy", "gproxy-pure"):
            if name in failed:
                print(f"{name} output:\n{(d / f'{name}.out').read_text()[-2000:]}", file=sys.stderr)
    print(f"\nmedians over {args.rounds} rounds of {args.jobs} jobs; {time.monotonic() - began:.1f} s in all\n")
    print(report({s: m for s, m in res.items() if s not in failed}, c))
    for s, why in failed.items():
        print(f"FAILED {s}: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
