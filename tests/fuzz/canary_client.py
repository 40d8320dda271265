#!/usr/bin/env python3
"""The canary client: a real pygearman client that submits small `reverse` jobs one after
the other until SIGTERM, and prints one JSON line per job on stdout:
{"i", "ok", "latency", "state", "error"}.

Usage: canary_client.py HOST:PORT [--interval S] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

import gearman
from gearman.constants import JOB_COMPLETE


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    client = gearman.GearmanClient([args.address])
    i = 0
    while True:
        i += 1
        payload = os.urandom(6).hex().encode()
        started = time.monotonic()
        state, error = None, None
        try:
            request = client.submit_job(
                b"reverse", payload, unique=b"canary-%d-%d" % (os.getpid(), i),
                poll_timeout=args.timeout,
            )  # fmt: skip
            state = "TIMEOUT" if request.timed_out else str(request.state)
            ok = request.state == JOB_COMPLETE and request.result == payload[::-1]
            if request.state == JOB_COMPLETE and not ok:
                error = f"wrong result {request.result!r} for {payload!r}"
        except Exception as exc:  # noqa: BLE001 (a lost connection or a protocol error: a failed canary job)
            ok, error = False, f"{type(exc).__name__}: {exc}"
            client = gearman.GearmanClient([args.address])
        latency = time.monotonic() - started
        print(json.dumps({"i": i, "ok": ok, "latency": round(latency, 4), "state": state, "error": error}), flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
