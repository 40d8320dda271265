#!/usr/bin/env python3
"""A real python-gearman client (pygearman 0.2.6) that runs a list of jobs and reports
every packet each job received, with its time: the chaos tier's client (tests/chaos).

Usage: pyjobs.py HOST:PORT --jobs FILE --out FILE [--timeout S] [--linger S] [--exceptions]

--jobs: a JSON list of {"id", "fn", "payload", "unique", "bg", "priority"} ("priority" normal,
high or low, optional: SUBMIT_JOB, _HIGH, _LOW and their _BG forms); "unique" null lets the library
draw a random one, "" sends an empty unique (pygearman would replace an empty unique with a
random one; this client keeps it empty, so the SUBMIT_JOB carries none, which gearmand never
coalesces), any other string is sent as it is. Background jobs (bg true) are submitted first,
all at once, then the foreground ones, all at once, on the same connection.

Foreground jobs are waited for up to --timeout seconds from their submission (one deadline);
then each job still unanswered is asked about with GET_STATUS (known/running, kept in
"status_at_deadline"), so a job gearmand still has ("hung") can be told from one it has lost.
After the last answer the client keeps reading for --linger seconds, so a second answer to a
job would still be seen. With --exceptions the client sends OPTION_REQ exceptions first and a
WORK_EXCEPTION ends its job (as pyclient.py does, whose command handler is reused).

Every WORK_COMPLETE / WORK_FAIL / WORK_EXCEPTION received is recorded in the job's "answers"
(a job answered exactly once has one), with WORK_DATA in "data" and WORK_STATUS in "status".
Times are time.monotonic() (CLOCK_MONOTONIC: comparable across processes on one host).
Writes to --out one JSON object:
  {"submitted_t", "created_t", "finished_t", "error",
   "jobs": [{"id", "handle", "unique", "bg", "created_t", "answers": [{"type", "data", "t"}],
             "data": [{"data", "t"}], "status": [[num, den, t]], "status_at_deadline"}]}
Byte strings are decoded as UTF-8 with backslash escapes. Exit 0 unless the library raised.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gearman.constants import (
    JOB_COMPLETE,
    JOB_CREATED,
    JOB_FAILED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_NONE,
)
from pyclient import Client, _Handler, _text

_ENDED = (JOB_COMPLETE, JOB_FAILED)
_PRIORITIES = {"normal": PRIORITY_NONE, "high": PRIORITY_HIGH, "low": PRIORITY_LOW}


class _RecordingHandler(_Handler):
    """Records every job packet with its time; a second answer to a job is recorded, not
    passed to the library (which would raise on a request it considers finished)."""

    records: dict[bytes, dict[str, Any]]

    def initial_state(self, records: dict[bytes, dict[str, Any]] | None = None, **kwargs: Any) -> None:
        super().initial_state(**kwargs)
        self.records = records if records is not None else {}

    def _record(self, handle: bytes) -> dict[str, Any] | None:
        return self.records.get(handle.rstrip(b"\0"))

    def recv_job_created(self, job_handle: bytes) -> bool:
        result = super().recv_job_created(job_handle)
        request = self.handle_to_request_map[job_handle]
        request.created_t = time.monotonic()
        self.records[job_handle] = request.record
        request.record["handle"] = _text(job_handle)
        request.record["created_t"] = request.created_t
        return result

    def _answer(self, kind: str, job_handle: bytes, data: bytes | None) -> bool:
        """Record the answer; True if the library may see it (the first one)."""
        record = self._record(job_handle)
        if record is None:  # not ours (cannot happen with gearmand): keep it, visibly
            record = self.records.setdefault(job_handle, {"id": None, "answers": [], "data": [], "status": []})
        record["answers"].append({"type": kind, "data": _text(data), "t": time.monotonic()})
        return len(record["answers"]) == 1

    def recv_work_complete(self, job_handle: bytes, data: bytes) -> bool:
        if self._answer("complete", job_handle, data):
            return super().recv_work_complete(job_handle, data)
        return True

    def recv_work_fail(self, job_handle: bytes) -> bool:
        if self._answer("fail", job_handle, None):
            return super().recv_work_fail(job_handle)
        return True

    def recv_work_exception(self, job_handle: bytes, data: bytes) -> bool:
        if self._answer("exception", job_handle, data):
            return super().recv_work_exception(job_handle, data)
        return True

    def recv_work_data(self, job_handle: bytes, data: bytes) -> bool:
        record = self._record(job_handle)
        if record is not None:
            record["data"].append({"data": _text(data), "t": time.monotonic()})
            if record["answers"]:
                return True  # after the answer: recorded, not for the library
        return super().recv_work_data(job_handle, data)

    def recv_work_status(self, job_handle: bytes, numerator: bytes, denominator: bytes) -> bool:
        record = self._record(job_handle)
        if record is not None:
            record["status"].append([int(numerator), int(denominator), time.monotonic()])
            if record["answers"]:
                return True
        return super().recv_work_status(job_handle, numerator, denominator)


class JobsClient(Client):
    command_handler_class = _RecordingHandler

    def _create_request_from_dictionary(self, job_info: dict[str, Any], background: bool = False, max_retries: int = 0) -> Any:
        request = super()._create_request_from_dictionary(job_info, background, max_retries)
        if job_info.get("unique") == b"":
            request.job.unique = b""  # the library drew a random one; we want none
        request.record = job_info["record"]
        return request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="HOST:PORT of gearmand")
    parser.add_argument("--jobs", required=True, help="JSON list of jobs (see above)")
    parser.add_argument("--out", required=True, help="where the JSON report goes")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answers")
    parser.add_argument("--linger", type=float, default=0.3, help="seconds to keep reading after the last answer")
    parser.add_argument("--exceptions", action="store_true", help="send OPTION_REQ exceptions")
    args = parser.parse_args(argv)

    with open(args.jobs) as f:
        specs = json.load(f)
    report: dict[str, Any] = {"submitted_t": time.monotonic(), "created_t": None, "finished_t": None, "error": None}
    records = [
        {"id": spec["id"], "handle": None, "unique": spec["unique"], "bg": bool(spec["bg"]), "created_t": None,
         "answers": [], "data": [], "status": [], "status_at_deadline": None}
        for spec in specs
    ]
    report["jobs"] = records

    def write_report() -> None:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f)
        os.replace(tmp, args.out)

    # Backstop in case the library blocks outside its own poll timeouts (e.g. in connect()).
    def watchdog(*_: Any) -> None:
        report["error"] = "watchdog"
        write_report()
        os._exit(1)

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(int(args.timeout) + 30)

    client = JobsClient([args.address])
    client.handler_initial_state["exceptions"] = args.exceptions
    client.handler_initial_state["records"] = {}
    deadline = time.monotonic() + args.timeout
    jobs = [
        {"task": spec["fn"].encode(), "data": spec["payload"].encode(),
         "unique": None if spec["unique"] is None else spec["unique"].encode(), "record": record,
         "priority": _PRIORITIES[spec.get("priority", "normal")]}
        for spec, record in zip(specs, records)
    ]
    background = [job for job in jobs if job["record"]["bg"]]
    foreground = [job for job in jobs if not job["record"]["bg"]]
    status = 0
    try:
        requests = []
        if background:
            requests += client.submit_multiple_jobs(background, background=True, wait_until_complete=False,
                                                    poll_timeout=max(0.0, deadline - time.monotonic()))
        if foreground:
            requests += client.submit_multiple_jobs(foreground, wait_until_complete=False,
                                                    poll_timeout=max(0.0, deadline - time.monotonic()))
        report["created_t"] = time.monotonic()
        pending = [r for r in requests if not r.background and r.state == JOB_CREATED]
        if pending and deadline > time.monotonic():
            client.wait_until_jobs_completed(pending, poll_timeout=deadline - time.monotonic())
        unanswered = [r for r in requests if not r.background and r.state == JOB_CREATED]
        if unanswered:
            client.get_job_statuses(unanswered, poll_timeout=5.0)
            for request in unanswered:
                st = request.status or {}
                request.record["status_at_deadline"] = {"known": st.get("known"), "running": st.get("running")}
        if args.linger > 0:  # a second answer to any job would arrive now
            until = time.monotonic() + args.linger
            client.poll_connections_until_stopped(
                client.connection_list, lambda any_activity: time.monotonic() < until, timeout=args.linger
            )
        for request in requests:
            if request.state not in _ENDED and not request.background and not request.record["answers"]:
                request.record.setdefault("state", "unanswered")
    except Exception as exc:  # any library/connection error is visible in the report
        report["error"] = f"{type(exc).__name__}: {exc}"
        status = 1
    finally:
        signal.alarm(0)
    report["finished_t"] = time.monotonic()
    write_report()
    return status


if __name__ == "__main__":
    sys.exit(main())
