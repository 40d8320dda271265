#!/usr/bin/env python3
"""A real python-gearman client (pygearman 0.2.6) for integration tests.

Usage: pyclient.py HOST:PORT FUNCTION [--background] [--unique U] [--priority P]
                   [--payload-file F | --payload-hex HEX | --payload STR]
                   [--out FILE] [--timeout S] [--exceptions [--keep-after-exception]]

Foreground: waits for the outcome. The result goes raw to --out (or stdout); stderr gets one
JSON line {"state", "handle", "unique", "data_updates", "warning_updates", "status",
"status_updates", "exception", "exception_updates", "stray_nul_fail", "ended_by",
"result_len", "elapsed", "error"} so tests can check streamed updates
(byte strings are decoded as UTF-8 with backslash escapes). Exit 0 on COMPLETE, 1 on FAILED
or any error (connection lost, protocol error), 2 on timeout.
Background: exits 0 once JOB_CREATED arrived and prints the handle on stdout (2 on timeout).

pygearman replaces an empty --unique with a random 32-hex-digit one (so it cannot submit an
empty unique); it keeps only the last WORK_STATUS, so this script records all of them.
By default the client does not set OPTION_REQ exceptions, so a worker's WORK_EXCEPTION
reaches it as WORK_FAIL (gearmand 1.1.20 appends a stray NUL to that handle; see the protocol
notes). --exceptions sends OPTION_REQ `exceptions` first on the connection; gearmand then
forwards the WORK_EXCEPTION itself and no WORK_FAIL (the exception is final), so this script
treats a WORK_EXCEPTION as the end of the job: state FAILED, payload in "exception" (the
library would only store it and keep waiting). "exception_updates" lists every
WORK_EXCEPTION payload received (the library keeps only the last; it has no such list).
--keep-after-exception (with --exceptions) keeps waiting after a WORK_EXCEPTION for the
packet that ends the job, for the Perl Gearman::Server, where WORK_EXCEPTION is relayed but
only the worker's following WORK_FAIL ends the job; against gearmand 1.1.20 the client then
waits until its --timeout. "ended_by" names the packet that ended the job (WORK_COMPLETE,
WORK_FAIL or WORK_EXCEPTION; null if none did).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

import gearman
from gearman.client_handler import GearmanClientCommandHandler
from gearman.protocol import GEARMAN_COMMAND_OPTION_REQ
from gearman.constants import (
    JOB_COMPLETE,
    JOB_CREATED,
    JOB_FAILED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_NONE,
)

_STATE_NAMES = {JOB_COMPLETE: "COMPLETE", JOB_FAILED: "FAILED", JOB_CREATED: "CREATED"}
_PRIORITIES = {"normal": PRIORITY_NONE, "high": PRIORITY_HIGH, "low": PRIORITY_LOW}


class _Handler(GearmanClientCommandHandler):
    """Records every WORK_STATUS (the library keeps only the last) and a stray-NUL WORK_FAIL;
    with --exceptions, sets OPTION_REQ exceptions and ends the job on WORK_EXCEPTION."""

    def initial_state(
        self, exceptions: bool = False, exception_final: bool = True, **kwargs: Any
    ) -> None:
        super().initial_state(**kwargs)
        self.exceptions_option = exceptions
        self.exception_final = exception_final
        if exceptions:  # sent before any SUBMIT_JOB: gearmand handles a connection in order
            self.send_command(GEARMAN_COMMAND_OPTION_REQ, option_name=b"exceptions")

    def recv_option_res(self, option_name: bytes) -> bool:
        return True

    def recv_work_exception(self, job_handle: bytes, data: bytes) -> bool:
        request = self.handle_to_request_map[job_handle]
        request.__dict__.setdefault("exception_updates", []).append(self.decode_data(data))
        result = super().recv_work_exception(job_handle, data)
        if self.exceptions_option and self.exception_final:
            request.state = JOB_FAILED  # gearmand sends nothing after it (see module doc)
            request.ended_by = "WORK_EXCEPTION"
        return result

    def recv_work_complete(self, job_handle: bytes, data: bytes) -> bool:
        result = super().recv_work_complete(job_handle, data)
        self.handle_to_request_map[job_handle].ended_by = "WORK_COMPLETE"
        return result

    def recv_work_status(self, job_handle: bytes, numerator: bytes, denominator: bytes) -> bool:
        request = self.handle_to_request_map[job_handle]
        request.__dict__.setdefault("status_updates", []).append([int(numerator), int(denominator)])
        return super().recv_work_status(job_handle, numerator, denominator)

    def recv_work_fail(self, job_handle: bytes) -> bool:
        # gearmand 1.1.20 turns WORK_EXCEPTION into WORK_FAIL "handle\0" for clients without
        # the exceptions option; without this the library raises KeyError on that handle.
        if job_handle not in self.handle_to_request_map and job_handle.endswith(b"\0"):
            job_handle = job_handle.rstrip(b"\0")
            self.handle_to_request_map[job_handle].stray_nul_fail = True
        result = super().recv_work_fail(job_handle)
        self.handle_to_request_map[job_handle].ended_by = "WORK_FAIL"
        return result


class Client(gearman.GearmanClient):
    command_handler_class = _Handler


def _text(value: bytes | str | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value  # the library's generated unique is a str


def _payload(args: argparse.Namespace) -> bytes:
    if args.payload_file is not None:
        with open(args.payload_file, "rb") as f:
            return f.read()
    if args.payload_hex is not None:
        return bytes.fromhex(args.payload_hex)
    if args.payload is not None:
        return args.payload.encode()
    return b""


def _report(**fields: Any) -> None:
    print(json.dumps(fields), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="HOST:PORT of gearmand or of the proxy")
    parser.add_argument("function")
    parser.add_argument("--background", action="store_true")
    parser.add_argument("--unique", default=None)
    parser.add_argument("--priority", choices=sorted(_PRIORITIES), default="normal")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--payload-file")
    src.add_argument("--payload-hex")
    src.add_argument("--payload")
    parser.add_argument("--out", help="write the result here (raw bytes) instead of stdout")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument(
        "--exceptions", action="store_true", help="send OPTION_REQ exceptions (see above)"
    )
    parser.add_argument(
        "--keep-after-exception",
        action="store_true",
        help="with --exceptions: a WORK_EXCEPTION does not end the job (see above)",
    )
    args = parser.parse_args(argv)
    if args.keep_after_exception and not args.exceptions:
        parser.error("--keep-after-exception needs --exceptions")

    # Backstop in case the library blocks outside its own poll timeout (e.g. in connect()).
    signal.signal(signal.SIGALRM, lambda *_: (_report(state="TIMEOUT", error="watchdog"), sys.exit(2)))
    signal.alarm(int(args.timeout) + 5)

    client = Client([args.address])
    client.handler_initial_state["exceptions"] = args.exceptions
    client.handler_initial_state["exception_final"] = not args.keep_after_exception
    unique = args.unique.encode() if args.unique is not None else None
    started = time.monotonic()
    try:
        request = client.submit_job(
            args.function.encode(),
            _payload(args),
            unique=unique,
            priority=_PRIORITIES[args.priority],
            background=args.background,
            wait_until_complete=not args.background,
            poll_timeout=args.timeout,
        )
    except Exception as exc:  # any library/connection error is a test-visible failure
        _report(state="ERROR", error=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        signal.alarm(0)

    job = request.job
    fields: dict[str, Any] = {
        "state": "TIMEOUT" if request.timed_out else _STATE_NAMES.get(request.state, str(request.state)),
        "handle": _text(job.handle),
        "unique": _text(job.unique),
        "data_updates": [_text(d) for d in request.data_updates],
        "warning_updates": [_text(w) for w in request.warning_updates],
        "status": (
            {"numerator": request.status["numerator"], "denominator": request.status["denominator"]}
            if request.status
            else None
        ),
        "status_updates": getattr(request, "status_updates", []),
        "exception": _text(request.exception),
        "exception_updates": [_text(e) for e in getattr(request, "exception_updates", [])],
        "stray_nul_fail": getattr(request, "stray_nul_fail", False),
        "ended_by": getattr(request, "ended_by", None),
        "result_len": None if request.result is None else len(request.result),
        "elapsed": round(time.monotonic() - started, 3),
    }
    _report(**fields)
    if request.timed_out:
        return 2
    if args.background:
        print(job.handle.decode("utf-8", "backslashreplace"), flush=True)
        return 0
    if request.state != JOB_COMPLETE:
        return 1
    result = request.result or b""
    if args.out:
        with open(args.out, "wb") as f:
            f.write(result)
    else:
        sys.stdout.buffer.write(result)
        sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
