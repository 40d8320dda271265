#!/usr/bin/env python3
"""A real python-gearman client (pygearman 0.2.6) that submits many jobs at once.

Usage: pyburst.py HOST:PORT FUNCTION --count N --payload TEMPLATE [--unique TEMPLATE]
                  [--timeout S] [--exceptions] [--background [--rate R]]

TEMPLATE: `{i}` is replaced by the job index 0..N-1 (the only placeholder; other braces are
kept as they are). Names and payloads go to the library as bytes, as pyclient.py does.

Why: one client connection with many jobs in flight is what a proxy sees from a busy web
front end; pyclient.py submits one job per process.

Foreground: all N jobs are submitted at once (submit_multiple_jobs, wait_until_complete=False,
which returns once every JOB_CREATED arrived), then the script waits for all of them to end
or for --timeout (one deadline for the whole run), and prints one JSON line on stdout:
  {"jobs": [{"i", "unique", "handle", "state", "result", "exception"}...], "elapsed"}
state is COMPLETE, FAILED or TIMEOUT (also for a job whose JOB_CREATED never came). Byte
strings are decoded as UTF-8 with backslash escapes. --exceptions sends OPTION_REQ
`exceptions` first and treats a WORK_EXCEPTION as the end of its job (state FAILED, payload in
"exception"), exactly as pyclient.py does (its command handler is reused). Exit 0 if every
job completed, 1 otherwise.

Without --unique the library gives every job a random unique. A unique TEMPLATE without
`{i}` makes gearmand coalesce the jobs onto one handle; the library then tracks only the last
request of that handle and the others end as TIMEOUT, so keep `{i}` in it.

Background: N background jobs, all at once, or with --rate R paced at R per second: job i is
submitted at start + i/R (time.monotonic deadlines; the pacing is the point, not a
synchronisation), each waiting for its JOB_CREATED. Prints
  {"submitted": K, "handles": [...], "elapsed"}
and exits 0 if all N were accepted within --timeout, 1 otherwise.

A library or connection error prints {"error": ...} (plus what was known) and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

# pyclient.py lives next to this script (sys.path[0] when run as a script).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pyclient import Client, _text  # noqa: E402

from gearman.constants import JOB_COMPLETE, JOB_CREATED, JOB_FAILED  # noqa: E402
from gearman.job import GearmanJobRequest  # noqa: E402


def _expand(template: str, i: int) -> str:
    return template.replace("{i}", str(i))


def _job_state(request: GearmanJobRequest) -> str:
    if request.state == JOB_COMPLETE:
        return "COMPLETE"
    if request.state == JOB_FAILED:
        return "FAILED"
    return "TIMEOUT"


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        {
            "task": args.function.encode(),
            "data": _expand(args.payload, i).encode(),
            "unique": None if args.unique is None else _expand(args.unique, i).encode(),
        }
        for i in range(args.count)
    ]


def run_foreground(client: Client, args: argparse.Namespace) -> int:
    started = time.monotonic()
    requests: list[GearmanJobRequest] = []
    try:
        requests = client.submit_multiple_jobs(
            _jobs(args), wait_until_complete=False, poll_timeout=args.timeout
        )
        remaining = args.timeout - (time.monotonic() - started)
        pending = [r for r in requests if r.state == JOB_CREATED]
        if pending and remaining > 0:
            # The library's own loop: it returns when every request is COMPLETE/FAILED
            # (a WORK_EXCEPTION counts with --exceptions, see pyclient.py) or at the deadline.
            client.wait_until_jobs_completed(pending, poll_timeout=remaining)
        error = None
    except Exception as exc:  # any library/connection error is a test-visible failure
        error = f"{type(exc).__name__}: {exc}"
    jobs = [
        {
            "i": i,
            "unique": _text(r.job.unique),
            "handle": _text(r.job.handle),
            "state": _job_state(r),
            "result": _text(r.result),
            "exception": _text(r.exception),
        }
        for i, r in enumerate(requests)
    ]
    fields: dict[str, Any] = {"jobs": jobs, "elapsed": round(time.monotonic() - started, 3)}
    if error is not None:
        fields["error"] = error
    _emit(**fields)
    ok = error is None and len(jobs) == args.count and all(j["state"] == "COMPLETE" for j in jobs)
    return 0 if ok else 1


def run_background(client: Client, args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.timeout
    handles: list[str | None] = []
    error = None
    try:
        if args.rate is None:
            requests = client.submit_multiple_jobs(
                _jobs(args), background=True, wait_until_complete=False, poll_timeout=args.timeout
            )
            handles = [_text(r.job.handle) for r in requests if r.state == JOB_CREATED]
        else:
            for i, job in enumerate(_jobs(args)):
                due = started + i / args.rate
                now = time.monotonic()
                if due >= deadline or now >= deadline:
                    break
                if due > now:
                    time.sleep(due - now)
                request = client.submit_job(
                    job["task"],
                    job["data"],
                    unique=job["unique"],
                    background=True,
                    wait_until_complete=False,
                    poll_timeout=max(0.0, deadline - time.monotonic()),
                )
                if request.state != JOB_CREATED:
                    break  # not accepted before the deadline
                handles.append(_text(request.job.handle))
    except Exception as exc:  # any library/connection error is a test-visible failure
        error = f"{type(exc).__name__}: {exc}"
    fields: dict[str, Any] = {
        "submitted": len(handles),
        "handles": handles,
        "elapsed": round(time.monotonic() - started, 3),
    }
    if error is not None:
        fields["error"] = error
    _emit(**fields)
    return 0 if error is None and len(handles) == args.count else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="HOST:PORT of gearmand or of the proxy")
    parser.add_argument("function")
    parser.add_argument("--count", type=int, required=True, help="number of jobs N")
    parser.add_argument("--payload", required=True, help="payload TEMPLATE ({i} = job index)")
    parser.add_argument("--unique", default=None, help="unique TEMPLATE ({i} = job index)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole run")
    parser.add_argument(
        "--exceptions", action="store_true", help="send OPTION_REQ exceptions (see above)"
    )
    parser.add_argument("--background", action="store_true")
    parser.add_argument("--rate", type=float, default=None, help="background jobs per second")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.rate is not None and (not args.background or args.rate <= 0):
        parser.error("--rate needs --background and a positive value")

    # Backstop in case the library blocks outside its own poll timeout (e.g. in connect()).
    def watchdog(*_: Any) -> None:
        _emit(error="watchdog")
        sys.exit(1)

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(int(args.timeout) + 5)

    client = Client([args.address])
    client.handler_initial_state["exceptions"] = args.exceptions
    try:
        if args.background:
            return run_background(client, args)
        return run_foreground(client, args)
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main())
