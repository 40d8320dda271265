"""CPU per read of a Pair (framing, Session, commands) against blind forwarding, in one
data plane with real sockets and warm caches: what gproxy's own work costs each packet.

    .venv/bin/python bench/per_read.py            # 3,000 jobs of 7 packets, 5 runs

Both handlers get the same packets, a sequential worker's: NOOP, GRAB_JOB_UNIQ,
JOB_ASSIGN_UNIQ, WORK_COMPLETE, GRAB_JOB_UNIQ, NO_JOB, PRE_SLEEP. Each is written to one
side, served by one `DataPlane.poll(0)` (timed) and read from the other side.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataplane_relay import Forward  # noqa: E402

from gproxy.config import Address, Route  # noqa: E402
from gproxy.handshake import Transport  # noqa: E402
from gproxy.dataplane import DataPlane  # noqa: E402
from gproxy.core.metrics import Metrics  # noqa: E402
from gproxy.pair import Pair, PairSet  # noqa: E402
from gproxy.core.protocol import REQ, RES, PacketType, build_packet  # noqa: E402
from gproxy.core.policy import Policies  # noqa: E402
from gproxy.core.retry import Retrier  # noqa: E402
from gproxy.core.session import Session  # noqa: E402

P = PacketType
ROUTE = Route(Address("127.0.0.1", 0), Address("127.0.0.1", 4730))


def packets(jobs: int) -> list[tuple[str, bytes]]:
    """(side it comes from, packet): "w" the worker, "g" gearmand."""
    out = []
    for n in range(jobs):
        handle = b"H:bench:%d" % n
        out += [
            ("g", build_packet(RES, P.NOOP)),
            ("w", build_packet(REQ, P.GRAB_JOB_UNIQ)),
            ("g", build_packet(RES, P.JOB_ASSIGN_UNIQ, handle=handle, function=b"f", unique=b"u-%d" % n,
                               data=b"0123456789abcdef")),
            ("w", build_packet(REQ, P.WORK_COMPLETE, handle=handle, data=b"done")),
            ("w", build_packet(REQ, P.GRAB_JOB_UNIQ)),
            ("g", build_packet(RES, P.NO_JOB)),
            ("w", build_packet(REQ, P.PRE_SLEEP)),
        ]
    return out


def per_read_us(kind: str, script: list[tuple[str, bytes]]) -> float:
    plane = DataPlane()
    worker, worker_peer = socket.socketpair()
    upstream, upstream_peer = socket.socketpair()
    if kind == "pair":
        metrics = Metrics()
        retrier = Retrier(Policies(), metrics=metrics)
        pair = Pair("bench", Session("up", route=ROUTE, retrier=retrier, metrics=metrics), plane,
                    SimpleNamespace(post=lambda item: None), PairSet())  # type: ignore[arg-type]
        pair.start(Transport(worker), "worker", Transport(upstream))
    else:
        forward = Forward()
        a, b = plane.add(worker, forward, "worker"), plane.add(upstream, forward, "gearmand")
        forward.other[a], forward.other[b] = b, a
    spent = 0
    for side, packet in script:
        source, sink = (worker_peer, upstream_peer) if side == "w" else (upstream_peer, worker_peer)
        source.send(packet)
        start = time.perf_counter_ns()
        plane.poll(0)
        spent += time.perf_counter_ns() - start
        sink.recv(65536)
    plane.close()
    worker_peer.close()
    upstream_peer.close()
    return spent / len(script) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    args = parser.parse_args()
    script = packets(args.jobs)
    for kind, what in (("forward", "blind forwarding"), ("pair", "a Pair (retries and metrics on)")):
        runs = [per_read_us(kind, script) for _ in range(5)]
        print(f"{what}: {statistics.median(runs):.2f} µs per read, poll included "
              f"(median of 5 runs; range {min(runs):.2f}-{max(runs):.2f})")


if __name__ == "__main__":
    main()
