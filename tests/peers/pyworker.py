#!/usr/bin/env python3
"""A real python-gearman worker (pygearman 0.2.6) for integration tests.

Usage: pyworker.py HOST:PORT [--client-id ID] [--no-echo]

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
import os
import signal
import sys
import time
from typing import Any

import gearman
from gearman.errors import ServerUnavailable
from gearman.protocol import GEARMAN_COMMAND_ECHO_REQ
from gearman.worker_handler import GearmanWorkerCommandHandler

BLOCK_TIMEOUT_S = 60.0
BLOCK_POLL_S = 0.01


class _Handler(GearmanWorkerCommandHandler):
    """Worker handler that adds one ECHO_REQ after the registration (see module doc)."""

    def initial_state(self, abilities: Any = None, client_id: Any = None) -> None:
        self.set_client_id(client_id)
        self.set_abilities(abilities)
        if self.connection_manager.use_echo:
            self.send_command(GEARMAN_COMMAND_ECHO_REQ, data=b"pyworker-ready")
        self._sleep()

    def recv_echo_res(self, data: bytes) -> bool:
        self.connection_manager.registered()
        return True


class Worker(gearman.GearmanWorker):
    command_handler_class = _Handler

    def __init__(self, host_list: list[str], use_echo: bool) -> None:
        super().__init__(host_list)
        self.use_echo = use_echo
        self.registrations = 0
        self._pending_plain_ready = False

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


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="HOST:PORT of gearmand or of the proxy")
    parser.add_argument("--client-id", default=None)
    parser.add_argument("--no-echo", action="store_true", help="do not send the readiness ECHO_REQ")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _on_sigterm)
    worker = Worker([args.address], use_echo=not args.no_echo)
    if args.client_id is not None:
        worker.set_client_id(args.client_id.encode())
    worker.register_task(b"reverse", do_reverse)
    worker.register_task(b"echo", do_echo)
    worker.register_task(b"stream", do_stream)
    worker.register_task(b"block", do_block)
    worker.register_task(b"unique", do_unique)
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
