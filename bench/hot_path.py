"""What one job costs the pure Session, without sockets: CPU per assignment and peak memory
of a large one.

    .venv/bin/python bench/hot_path.py              # 20,000 jobs, an 8 MiB one
    .venv/bin/python bench/hot_path.py --mib 32

Runs the real Session: a worker's GRAB_JOB (sent upstream as GRAB_JOB_UNIQ), gearmand's
JOB_ASSIGN_UNIQ (handed back as the JOB_ASSIGN the worker asked for) and the worker's
WORK_COMPLETE. Reports µs per job (median of 5 runs) and, for one job of `--mib` MiB, the
peak of memory allocated beyond the packet gearmand sent (tracemalloc).
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

from gproxy.config import Address, Route
from gproxy.core.commands import SendDownstream
from gproxy.core.protocol import REQ, RES, PacketType, build_packet
from gproxy.core.session import Session

P = PacketType
ROUTE = Route(Address("127.0.0.1", 0), Address("127.0.0.1", 4730))
GRAB = build_packet(REQ, P.GRAB_JOB)


def one_job(session: Session, n: int, payload: bytes) -> None:
    handle = b"H:bench:%d" % n
    session.from_downstream(GRAB, 0.0)
    assign = build_packet(RES, P.JOB_ASSIGN_UNIQ, handle=handle, function=b"bench", unique=b"u-%d" % n, data=payload)
    session.from_upstream(session.current, assign, 0.0)
    session.from_downstream(build_packet(REQ, P.WORK_COMPLETE, handle=handle, data=b"ok"), 0.0)


def per_job_us(jobs: int) -> float:
    session = Session("bench", route=ROUTE)
    payload = b"x" * 16
    handles = [b"H:bench:%d" % n for n in range(jobs)]
    assigns = [
        build_packet(RES, P.JOB_ASSIGN_UNIQ, handle=h, function=b"bench", unique=b"u-%d" % n, data=payload)
        for n, h in enumerate(handles)
    ]
    completes = [build_packet(REQ, P.WORK_COMPLETE, handle=h, data=b"ok") for h in handles]
    start = time.perf_counter()
    for assign, complete in zip(assigns, completes, strict=True):
        session.from_downstream(GRAB, 0.0)
        session.from_upstream(session.current, assign, 0.0)
        session.from_downstream(complete, 0.0)
    return (time.perf_counter() - start) / jobs * 1e6


def peak_beyond_packet(mib: int) -> int:
    session = Session("bench", route=ROUTE)
    assign = build_packet(RES, P.JOB_ASSIGN_UNIQ, handle=b"H:big", function=b"bench", unique=b"u", data=b"x" * (mib << 20))
    session.from_downstream(GRAB, 0.0)
    tracemalloc.start()
    tracemalloc.reset_peak()
    (command,) = session.from_upstream(session.current, assign, 0.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(command, SendDownstream)
    handed = command.data
    assert handed[:4] == RES and len(handed) == len(assign) - 2  # the unique id and its NUL cut
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--mib", type=int, default=8)
    args = parser.parse_args()
    peak = peak_beyond_packet(args.mib)  # first: tracemalloc, once started, stays costly
    print(f"a {args.mib} MiB assignment: {peak / (1 << 20):.1f} MiB allocated at peak beyond the packet")
    runs = [per_job_us(args.jobs) for _ in range(5)]
    print(f"Session, per job (grab, assignment, completion): {statistics.median(runs):.2f} µs "
          f"(median of 5 runs of {args.jobs}; range {min(runs):.2f}-{max(runs):.2f})")


if __name__ == "__main__":
    main()
