#!/usr/bin/env python3
"""A real python-gearman worker (pygearman 0.2.6) for integration tests.

Usage: pyworker.py HOST:PORT [--client-id ID] [--no-echo] [--state-dir DIR] [--chaos]

Why this library: python-gearman only sends GRAB_JOB_UNIQ and expects JOB_ASSIGN_UNIQ, and it
sends PRE_SLEEP after every job: a proxy must keep that exchange intact.

Functions (bytes names; pygearman on py3.11 needs bytes names and payloads):
  reverse  payload reversed (binary safe)
  echo     payload unchanged
  stream   WORK_DATA part1, WORK_DATA part2, WORK_WARNING careful, WORK_STATUS 1/2, 2/2,
           then completes with b"done"
  block    payload is a path P: writes the job's unique to P.started, waits (10 ms polls,
           up to 60 s) until P exists, returns b"unblocked" (fails the job on timeout)
  unique   returns the unique id it received
  unregister  unregisters the function named by the payload (RESET_ABILITIES + CAN_DOs)
  unregister_status  the same, then WORK_STATUS 1/2, in the same write, then completes
--option NAME (repeatable) sends OPTION_REQ NAME after the registration on every connection
and logs each OPTION_RES it receives (`pyworker: OPTION_RES NAME` on stderr).

Retry-test functions (payload `N:rest`, N decimal). Each attempt appends one line
`<unique>\\n` to DIR/seen.log, so a test can prove which unique the worker saw each time,
and one byte to DIR/flaky-<sha1(unique) hex>; the file offset after that O_APPEND write
is the attempt number (1, 2, ...), atomic even with several workers sharing DIR:
  flaky           attempt <= N: WORK_EXCEPTION `RETRY: transient failure <attempt>` then
                  WORK_FAIL; else completes with `ok after <attempt>`
  flaky_hint      the same with the exception `RETRY after=0.2: rate limited`
  flaky_fail      attempt <= N: a plain WORK_FAIL (the handler raises, see below)
  stream_flaky    every attempt first sends WORK_DATA `data <attempt>` and WORK_STATUS
                  <attempt>/10, then behaves like flaky
  fatal           always WORK_EXCEPTION `FATAL: broken input` then WORK_FAIL (any payload)
  plain_exception always WORK_EXCEPTION `boom` then WORK_FAIL (any payload)
  scripted        payload `SCRIPT|rest`, SCRIPT a comma-separated list of actions: attempt
                  k (counted per unique as above) takes action k, the last action repeating
                  for later attempts. Every attempt also appends one line
                  `<time> <unique> <attempt> <action> <handle>` to DIR/attempts.log (one
                  O_APPEND write; <time> is time.monotonic(), i.e. CLOCK_MONOTONIC, which
                  the test process can compare with its own time.monotonic()), written
                  before the action runs, so an attempt that hangs or exits is logged too.
                  A payload without `|` or with an unknown action fails the job (WORK_FAIL).
                  Actions (<attempt> is the attempt number):
    ok              completes with `ok after <attempt>`
    retry           WORK_EXCEPTION `RETRY: scripted <attempt>`, WORK_FAIL, nothing more
    after=S         WORK_EXCEPTION `RETRY after=S: scripted <attempt>`, WORK_FAIL
    fatal           WORK_EXCEPTION `FATAL: scripted <attempt>`, WORK_FAIL
    plain           WORK_EXCEPTION `boom <attempt>` (unmarked), WORK_FAIL
    fail            a plain WORK_FAIL (the handler raises, like flaky_fail)
    retry+complete  what a python-gearman handler does when it reports an exception and
                    then returns: send_job_exception(`RETRY: scripted <attempt>`) and
                    return `late <attempt>`. On the wire (logging relay, gearmand 1.1.20):
                    WORK_EXCEPTION h `RETRY: scripted <attempt>`, WORK_FAIL h,
                    WORK_COMPLETE h `late <attempt>`, PRE_SLEEP, all for the same handle h;
                    gearmand ends the job at the WORK_EXCEPTION and answers both the
                    WORK_FAIL and the WORK_COMPLETE with ERROR JOB_NOT_FOUND `Job given in
                    work result not found` (two such lines in this worker's log).
    retry+data      send_job_exception(`RETRY: scripted <attempt>`), then
                    send_job_data(`late data <attempt>`), then nothing more. On the wire:
                    WORK_EXCEPTION h, WORK_FAIL h, WORK_DATA h `late data <attempt>`,
                    PRE_SLEEP; gearmand answers the WORK_FAIL with ERROR JOB_NOT_FOUND `Job
                    given in work result not found` and the WORK_DATA with ERROR
                    JOB_NOT_FOUND `Job does not exist on server`.
    hang            blocks (50 ms sleeps) up to 120 s, then fails (WORK_FAIL): for tests
                    that kill the worker mid-job (gearmand then requeues the job)
    exit            os._exit(3) mid-job: the process dies holding the job
    sleep=S         sleeps S seconds, then completes with `ok after <attempt>`
--state-dir defaults to a private temp dir removed at exit.

Chaos functions (registered only with --chaos; tests/chaos uses them): `chaos`, `chaos_fail`
(the chaos tier configures on_fail for it) and `chaos_py` (actions only this library can do).
Payload `SCRIPT|JOB` as for `scripted`, but the attempt counter is keyed by the whole payload
(DIR/chaos-<sha1(payload) hex>), not by the unique: an empty unique is shared by many jobs,
and Perl's worker.pl, which never sees a unique, keeps the same counter for the same job.
Each attempt draws a token `py<pid>-<n>-<4 hex>` that ends every text the attempt sends, so
the client's answer names the attempt that produced it. Each attempt appends JSON lines to
DIR/chaos.log (one O_APPEND write each; `t` is time.monotonic()):
  {"e": "start", "t", "lib": "py", "pid", "fn", "job": JOB, "uniq", "handle", "n": attempt,
   "act": action, "tok"}                    before the action runs;
  {"e": "end", "t", "tok", "out": "complete"|"exception"|"fail", "data": text}
                                            just before the attempt's final packet is sent.
Actions: `ok` -> `ok after <n> #<tok>`; `sleep=S` the same after S seconds; `retry` ->
exception `RETRY: scripted <n> #<tok>`; `after=S` -> `RETRY after=S: scripted <n> #<tok>`;
`fatal` -> `FATAL: scripted <n> #<tok>`; `plain` -> `boom <n> #<tok>`; `fail` -> a plain
WORK_FAIL; chaos_py only: `retry+complete` (the exception, then `late <n> #<tok>` as a
WORK_COMPLETE) and `retry+data` (the exception, then WORK_DATA `late data <n> #<tok>`).
Any action may be prefixed `stream+`: WORK_DATA `data <n> #<tok>` and WORK_STATUS <n>/10 go
first. An unknown action fails the attempt (WORK_FAIL, end record with out "fail").

How pygearman fails a job (read from gearman/worker.py 0.2.6):
- a handler that raises makes on_job_exception() send WORK_FAIL alone (no exception);
- worker.send_job_exception(job, data) sends WORK_EXCEPTION *and* WORK_FAIL, but if the
  handler then returns, on_job_complete() also sends WORK_COMPLETE for the dead handle
  (gearmand answers ERROR JOB_NOT_FOUND), and if it raises, a second WORK_FAIL follows.
So the exception functions call send_job_exception() and then raise JobAlreadyFinished,
which Worker.on_job_exception() swallows: exactly WORK_EXCEPTION, WORK_FAIL, like Perl's
Gearman::Worker and python-gearman's documented exception path. gearmand treats the
WORK_EXCEPTION as final and answers the WORK_FAIL with ERROR JOB_NOT_FOUND; this worker
logs that and keeps working (see Worker.on_gearman_error for the library bug avoided).

Ready signal: after (re)connecting, the worker sends its usual RESET_ABILITIES + CAN_DOs
and then one ECHO_REQ; gearmand answers packets of a connection in order, so the ECHO_RES
proves the registration was processed (also through a proxy). It then prints `ready`
(first time) or `reconnected` (later) on stdout. --no-echo keeps the library's exact
packet sequence and prints `ready` as soon as the registration bytes were written.

If the server goes away the library raises ServerUnavailable; like a supervised production
worker, this script reconnects (pygearman allows one connect per second). SIGTERM exits 0.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, NoReturn

import gearman
from gearman.errors import ServerUnavailable
from gearman.protocol import GEARMAN_COMMAND_ECHO_REQ, GEARMAN_COMMAND_OPTION_REQ
from gearman.worker_handler import GearmanWorkerCommandHandler

BLOCK_TIMEOUT_S = 60.0
BLOCK_POLL_S = 0.01
SEEN_LOG = "seen.log"
ATTEMPTS_LOG = "attempts.log"
HANG_TIMEOUT_S = 120.0
HANG_POLL_S = 0.05
SCRIPTED_EXIT_CODE = 3
CHAOS_LOG = "chaos.log"


class JobAlreadyFinished(Exception):
    """Raised by a handler that already sent the job's final packets itself, so that the
    library sends nothing more for that handle (see the module doc)."""


class TransientFailure(Exception):
    """Raised by flaky_fail: the library's default exception path sends a plain WORK_FAIL."""


class _Handler(GearmanWorkerCommandHandler):
    """Worker handler that adds one ECHO_REQ after the registration (see module doc)."""

    def initial_state(self, abilities: Any = None, client_id: Any = None) -> None:
        self.set_client_id(client_id)
        self.set_abilities(abilities)
        for option in self.connection_manager.options:
            self.send_command(GEARMAN_COMMAND_OPTION_REQ, option_name=option)
        if self.connection_manager.use_echo:
            self.send_command(GEARMAN_COMMAND_ECHO_REQ, data=b"pyworker-ready")
        self._sleep()

    def recv_echo_res(self, data: bytes) -> bool:
        self.connection_manager.registered()
        return True

    def recv_option_res(self, option_name: bytes) -> bool:
        """Logged, so a test can count them: the library itself has no handler and would
        raise UnknownCommandError on an OPTION_RES (e.g. one it never asked for)."""
        print(f"pyworker: OPTION_RES {option_name.decode()}", file=sys.stderr, flush=True)
        return True


class Worker(gearman.GearmanWorker):
    command_handler_class = _Handler

    def __init__(self, host_list: list[str], use_echo: bool, state_dir: str, options: list[bytes]) -> None:
        super().__init__(host_list)
        self.use_echo = use_echo
        self.options = options
        self.state_dir = state_dir
        self.registrations = 0
        self._pending_plain_ready = False
        self.chaos_attempts = 0

    def registered(self) -> None:
        """The server has processed our CAN_DOs: tell the test harness."""
        self.registrations += 1
        print("ready" if self.registrations == 1 else "reconnected", flush=True)

    def establish_connection(self, current_connection: Any) -> Any:
        was_connected = current_connection.connected
        conn = super().establish_connection(current_connection)
        if not was_connected and not self.use_echo:
            self._pending_plain_ready = True
        return conn

    def after_poll(self, any_activity: bool) -> bool:
        # --no-echo: report once the registration left our output buffer.
        if self._pending_plain_ready and not any(c.writable() for c in self.connection_list):
            self._pending_plain_ready = False
            self.registered()
        return True

    def on_gearman_error(self, error_code: bytes, error_text: bytes) -> bool:
        """Log it and keep reading. The library returns False here, which stops its loop over
        the packets already parsed from one read: a NOOP that arrived in the same read as the
        ERROR JOB_NOT_FOUND (the answer to the WORK_FAIL after a WORK_EXCEPTION) would sit
        unprocessed until more bytes arrive, and the worker would not grab the next job."""
        print(f"pyworker: server error {error_code!r}: {error_text!r}", file=sys.stderr, flush=True)
        return True

    def on_job_exception(self, current_job: Any, exc_info: Any) -> bool:
        if isinstance(exc_info[1], JobAlreadyFinished):
            return False  # the handler already sent WORK_EXCEPTION + WORK_FAIL
        return bool(super().on_job_exception(current_job, exc_info))


def do_reverse(worker: Worker, job: Any) -> bytes:
    return bytes(job.data[::-1])


def do_echo(worker: Worker, job: Any) -> bytes:
    return bytes(job.data)


def do_stream(worker: Worker, job: Any) -> bytes:
    worker.send_job_data(job, b"part1")
    worker.send_job_data(job, b"part2")
    worker.send_job_warning(job, b"careful")
    worker.send_job_status(job, 1, 2)
    worker.send_job_status(job, 2, 2)
    return b"done"


def do_block(worker: Worker, job: Any) -> bytes:
    path = os.fsdecode(job.data)
    unique = job.unique if job.unique is not None else b""
    tmp = path + ".started.tmp"
    with open(tmp, "wb") as f:
        f.write(unique)
    os.replace(tmp, path + ".started")  # atomic: a reader never sees a half-written file
    deadline = time.monotonic() + BLOCK_TIMEOUT_S
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{path} did not appear within {BLOCK_TIMEOUT_S}s")
        time.sleep(BLOCK_POLL_S)
    return b"unblocked"


def do_unique(worker: Worker, job: Any) -> bytes:
    return job.unique if job.unique is not None else b""


def _append(path: str, data: bytes) -> int:
    """Append `data` with one O_APPEND write and return the file offset after it, i.e. the
    file's size right after our write even if other processes append concurrently."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        return os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)


def _attempt(worker: Worker, job: Any) -> int:
    """Record this attempt (seen.log line, per-unique counter); return its number (1-based)."""
    unique = job.unique if job.unique is not None else b""
    _append(os.path.join(worker.state_dir, SEEN_LOG), unique + b"\n")
    key = hashlib.sha1(unique).hexdigest()
    return _append(os.path.join(worker.state_dir, f"flaky-{key}"), b"x")


def _failures_wanted(job: Any) -> int:
    """N of an `N:rest` payload (ValueError, hence WORK_FAIL, on anything else)."""
    head, sep, _rest = bytes(job.data).partition(b":")
    if not sep:
        raise ValueError(f"payload {bytes(job.data)[:40]!r} is not N:rest")
    return int(head)


def _exception(worker: Worker, job: Any, payload: bytes) -> NoReturn:
    """WORK_EXCEPTION payload then WORK_FAIL, and nothing else for this handle."""
    worker.send_job_exception(job, payload)
    raise JobAlreadyFinished()


def _flaky(worker: Worker, job: Any, exception_payload: bytes | None) -> bytes:
    """Fail the first N attempts (with that exception, or a plain WORK_FAIL if None)."""
    wanted = _failures_wanted(job)
    attempt = _attempt(worker, job)
    if attempt <= wanted:
        if exception_payload is None:
            raise TransientFailure(f"attempt {attempt}")
        _exception(worker, job, exception_payload.replace(b"<attempt>", str(attempt).encode()))
    return f"ok after {attempt}".encode()


def do_flaky(worker: Worker, job: Any) -> bytes:
    return _flaky(worker, job, b"RETRY: transient failure <attempt>")


def do_flaky_hint(worker: Worker, job: Any) -> bytes:
    return _flaky(worker, job, b"RETRY after=0.2: rate limited")


def do_flaky_fail(worker: Worker, job: Any) -> bytes:
    return _flaky(worker, job, None)


def do_stream_flaky(worker: Worker, job: Any) -> bytes:
    wanted = _failures_wanted(job)
    attempt = _attempt(worker, job)
    worker.send_job_data(job, f"data {attempt}".encode())
    worker.send_job_status(job, attempt, 10)
    if attempt <= wanted:
        _exception(worker, job, f"RETRY: transient failure {attempt}".encode())
    return f"ok after {attempt}".encode()


def do_fatal(worker: Worker, job: Any) -> bytes:
    _attempt(worker, job)
    _exception(worker, job, b"FATAL: broken input")


def do_unregister(worker: Worker, job: Any) -> bytes:
    """Drop the ability named by the payload, mid-job: python-gearman then sends
    RESET_ABILITIES and a CAN_DO for each function it keeps, on its open connection."""
    worker.unregister_task(bytes(job.data))
    return b"unregistered"


def do_unregister_status(worker: Worker, job: Any) -> bytes:
    """Like unregister, then one WORK_STATUS 1/2 for this job: pygearman writes what a handler
    sends in one go, so RESET_ABILITIES, the CAN_DOs and the WORK_STATUS leave in one write."""
    worker.unregister_task(bytes(job.data))
    worker.send_job_status(job, 1, 2)
    return b"unregistered"


def do_plain_exception(worker: Worker, job: Any) -> bytes:
    _attempt(worker, job)
    _exception(worker, job, b"boom")


def _log_attempt(worker: Worker, job: Any, attempt: int, action: bytes) -> None:
    """One attempts.log line (see the module doc), a single O_APPEND write so that lines of
    workers sharing the state dir never interleave. Spaces cannot occur in the time, the
    attempt, the action (split on commas, no spaces) or the handle, so a reader splits the
    first field off the left and the last three off the right: the unique may hold spaces."""
    unique = (job.unique if job.unique is not None else b"").replace(b"\n", b"\\n")
    handle = bytes(job.handle)
    line = b"%.6f %s %d %s %s\n" % (time.monotonic(), unique, attempt, action, handle)
    _append(os.path.join(worker.state_dir, ATTEMPTS_LOG), line)


def _scripted_action(job: Any, attempt: int) -> bytes:
    """The action for this attempt, from a `SCRIPT|rest` payload (rest only tells payloads
    apart)."""
    script, sep, _rest = bytes(job.data).partition(b"|")
    actions = [a.strip() for a in script.split(b",")]
    if not sep or not all(actions):
        raise ValueError(f"payload {bytes(job.data)[:40]!r} is not SCRIPT|rest")
    return actions[min(attempt, len(actions)) - 1]


def do_scripted(worker: Worker, job: Any) -> bytes:
    """Attempt k takes action k of the script (see the module doc for each action)."""
    attempt = _attempt(worker, job)
    action = _scripted_action(job, attempt)
    _log_attempt(worker, job, attempt, action)
    name, _, arg = action.partition(b"=")
    n = str(attempt).encode()
    if action == b"ok":
        return b"ok after " + n
    if action == b"retry":
        _exception(worker, job, b"RETRY: scripted " + n)
    if name == b"after" and arg:
        _exception(worker, job, b"RETRY after=" + arg + b": scripted " + n)
    if action == b"fatal":
        _exception(worker, job, b"FATAL: scripted " + n)
    if action == b"plain":
        _exception(worker, job, b"boom " + n)
    if action == b"fail":
        raise TransientFailure(f"scripted {attempt}")
    if action == b"retry+complete":
        # The library sends WORK_EXCEPTION + WORK_FAIL here, and WORK_COMPLETE for our
        # return value afterwards (on_job_complete): the python-gearman handler pattern.
        worker.send_job_exception(job, b"RETRY: scripted " + n)
        return b"late " + n
    if action == b"retry+data":
        worker.send_job_exception(job, b"RETRY: scripted " + n)
        worker.send_job_data(job, b"late data " + n)
        raise JobAlreadyFinished()
    if action == b"hang":
        deadline = time.monotonic() + HANG_TIMEOUT_S
        while time.monotonic() < deadline:
            time.sleep(HANG_POLL_S)
        raise TimeoutError(f"scripted hang gave up after {HANG_TIMEOUT_S}s")
    if action == b"exit":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(SCRIPTED_EXIT_CODE)
    if name == b"sleep" and arg:
        time.sleep(float(arg))
        return b"ok after " + n
    raise ValueError(f"unknown scripted action {action!r}")


def _chaos_record(worker: Worker, record: dict[str, Any]) -> None:
    """One chaos.log line, a single O_APPEND write (see the module doc)."""
    line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    _append(os.path.join(worker.state_dir, CHAOS_LOG), line)


def _chaos_end(worker: Worker, token: str, out: str, data: bytes) -> bytes:
    _chaos_record(worker, {"e": "end", "t": time.monotonic(), "tok": token, "out": out,
                           "data": data.decode("utf-8", "backslashreplace")})
    return data


def do_chaos(worker: Worker, job: Any) -> bytes:
    """The chaos functions (see the module doc): the scripted actions, each attempt's texts
    ending with its token, the attempt counted per payload and logged to chaos.log."""
    payload = bytes(job.data)
    script, sep, job_id = payload.partition(b"|")
    key = hashlib.sha1(payload).hexdigest()
    attempt = _append(os.path.join(worker.state_dir, f"chaos-{key}"), b"x")
    actions = [a.strip() for a in script.split(b",")]
    action = actions[min(attempt, len(actions)) - 1] if sep and all(actions) else b"?"
    worker.chaos_attempts += 1
    token = f"py{os.getpid()}-{worker.chaos_attempts}-{secrets.token_hex(2)}"
    unique = job.unique if job.unique is not None else b""
    _chaos_record(worker, {
        "e": "start", "t": time.monotonic(), "lib": "py", "pid": os.getpid(),
        "fn": bytes(job.task).decode("utf-8", "backslashreplace"),
        "job": job_id.decode("utf-8", "backslashreplace"),
        "uniq": unique.decode("utf-8", "backslashreplace"),
        "handle": bytes(job.handle).decode("utf-8", "backslashreplace"),
        "n": attempt, "act": action.decode("utf-8", "backslashreplace"), "tok": token,
    })
    tail = f"{attempt} #{token}".encode()
    if action.startswith(b"stream+"):
        action = action[len(b"stream+"):]
        worker.send_job_data(job, b"data " + tail)
        worker.send_job_status(job, attempt, 10)
    name, _, arg = action.partition(b"=")
    python_only = job.task == b"chaos_py"
    if action == b"ok":
        return _chaos_end(worker, token, "complete", b"ok after " + tail)
    if name == b"sleep" and arg:
        time.sleep(float(arg))
        return _chaos_end(worker, token, "complete", b"ok after " + tail)
    exception = {
        b"retry": b"RETRY: scripted ",
        b"fatal": b"FATAL: scripted ",
        b"plain": b"boom ",
    }.get(action)
    if name == b"after" and arg:
        exception = b"RETRY after=" + arg + b": scripted "
    if exception is not None:
        _exception(worker, job, _chaos_end(worker, token, "exception", exception + tail))
    if python_only and action == b"retry+complete":
        worker.send_job_exception(job, _chaos_end(worker, token, "exception", b"RETRY: scripted " + tail))
        return b"late " + tail  # the library sends it as a WORK_COMPLETE of the dead handle
    if python_only and action == b"retry+data":
        worker.send_job_exception(job, _chaos_end(worker, token, "exception", b"RETRY: scripted " + tail))
        worker.send_job_data(job, b"late data " + tail)
        raise JobAlreadyFinished()
    _chaos_end(worker, token, "fail", b"")
    raise TransientFailure(f"chaos action {action!r}, attempt {attempt}")


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="HOST:PORT of gearmand or of the proxy")
    parser.add_argument("--client-id", default=None)
    parser.add_argument("--no-echo", action="store_true", help="do not send the readiness ECHO_REQ")
    parser.add_argument("--state-dir", default=None, help="attempt counters and seen.log")
    parser.add_argument("--option", action="append", default=[], help="send OPTION_REQ OPTION at each connect")
    parser.add_argument("--chaos", action="store_true", help="also register the chaos functions")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _on_sigterm)
    state_dir = args.state_dir
    if state_dir is None:
        state_dir = tempfile.mkdtemp(prefix="pyworker-state-")
        atexit.register(shutil.rmtree, state_dir, True)
    os.makedirs(state_dir, exist_ok=True)
    worker = Worker([args.address], use_echo=not args.no_echo, state_dir=state_dir,
                    options=[option.encode() for option in args.option])
    if args.client_id is not None:
        worker.set_client_id(args.client_id.encode())
    worker.register_task(b"reverse", do_reverse)
    worker.register_task(b"echo", do_echo)
    worker.register_task(b"stream", do_stream)
    worker.register_task(b"block", do_block)
    worker.register_task(b"unique", do_unique)
    worker.register_task(b"flaky", do_flaky)
    worker.register_task(b"flaky_hint", do_flaky_hint)
    worker.register_task(b"flaky_fail", do_flaky_fail)
    worker.register_task(b"stream_flaky", do_stream_flaky)
    worker.register_task(b"fatal", do_fatal)
    worker.register_task(b"plain_exception", do_plain_exception)
    worker.register_task(b"unregister", do_unregister)
    worker.register_task(b"unregister_status", do_unregister_status)
    worker.register_task(b"scripted", do_scripted)
    if args.chaos:
        for name in (b"chaos", b"chaos_fail", b"chaos_py"):
            worker.register_task(name, do_chaos)
    down = False
    while True:
        try:
            worker.work()
        except ServerUnavailable as exc:
            if not down:  # once per outage, not once per retry
                print(f"pyworker: {exc}; reconnecting", file=sys.stderr, flush=True)
            down = True
            time.sleep(0.1)
        else:
            down = False


if __name__ == "__main__":
    sys.exit(main())
