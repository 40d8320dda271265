"""`make demo` (or `python examples/demo.py`): a real gearmand, gproxy in front of it,
libgearman workers behind gproxy, jobs.

First plain jobs flow through the proxy; then a flaky worker, whose first attempt at every
job fails, runs the same jobs directly against gearmand (they all fail) and behind gproxy
(they all succeed on their second attempt). Everything runs on loopback ports chosen at
start and is stopped at the end. gproxy runs from the checkout this file belongs to, installed
or not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
CHECKOUT = Path(__file__).resolve().parent.parent
"""The repository's root: `python -m gproxy` finds the package there, whatever the cwd."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: {what} did not start listening on {HOST}:{port}") from None
            time.sleep(0.02)


def admin(port: int, command: str) -> str:
    """A text admin command, answered up to its closing '.' line."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(command.encode() + b"\n")
        reply = b""
        while not reply.endswith(b".\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.decode()


@contextlib.contextmanager
def process(argv: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[Any]]:
    proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for_worker(port: int, function: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(
        line.split("\t")[0] == function and line.split("\t")[3].strip() != "0"
        for line in admin(port, "status").splitlines()
        if line.count("\t") == 3
    ):
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: no worker registered {function!r}")
        time.sleep(0.02)


# A worker command that fails (exit 1: libgearman sends WORK_FAIL) the first time it sees a
# payload and succeeds the second time: a transient error, like a deadlock or a timeout.
FLAKY_WORKER = r"""
key=$(cat | cksum | cut -d' ' -f1)
if [ -e "$1/$key" ]; then printf 'done on attempt 2'; else : > "$1/$key"; exit 1; fi
"""

GPROXY_CONFIG = """
listen = "{listen}"
upstream = "{upstream}"

[functions."flaky"]
on_fail = true          # this worker's WORK_FAIL means "transient"
backoff_initial = 0.2   # seconds before the first retry
"""


def run_jobs(port: int, function: str, label: str, count: int = 5) -> int:
    """Submit `count` jobs one by one; returns how many succeeded."""
    succeeded = 0
    for n in range(1, count + 1):
        payload = f"{label} job {n}"
        result = subprocess.run(
            ["gearman", "-h", HOST, "-p", str(port), "-f", function, payload],
            capture_output=True, timeout=20, text=True, check=False,
        )
        ok = result.returncode == 0 and result.stdout == "done on attempt 2"
        succeeded += ok
        print(f"  {payload!r:22} => {result.stdout or result.stderr.strip() or 'failed'}")
    return succeeded


def flaky_round(worker_port: int, gearmand_port: int, label: str, tmp: str) -> int:
    """The flaky worker connected to `worker_port`, five jobs from a client of gearmand."""
    state = os.path.join(tmp, label)
    os.mkdir(state)
    worker = ["gearman", "-w", "-h", HOST, "-p", str(worker_port), "-f", "flaky", "--",
              "sh", "-c", FLAKY_WORKER, "flaky", state]
    with process(worker, stderr=subprocess.DEVNULL):
        wait_for_worker(gearmand_port, "flaky")
        return run_jobs(gearmand_port, "flaky", label)


def main() -> int:
    gearmand = shutil.which("gearmand") or "/usr/sbin/gearmand"
    if not os.path.exists(gearmand) or not shutil.which("gearman"):
        print("demo: needs gearmand and the gearman CLI (apt-get install gearman-job-server gearman-tools)")
        return 2
    gearmand_port, proxy_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="gproxy-demo-") as tmp, contextlib.ExitStack() as stack:
        stack.enter_context(process([
            gearmand, f"--listen={HOST}", f"--port={gearmand_port}",
            f"--log-file={tmp}/gearmand.log", f"--pid-file={tmp}/gearmand.pid",
        ]))
        wait_for_port(gearmand_port, "gearmand")
        print(f"gearmand      listening on {HOST}:{gearmand_port}")
        config = os.path.join(tmp, "gproxy.toml")
        with open(config, "w") as f:
            f.write(GPROXY_CONFIG.format(listen=f"{HOST}:{proxy_port}", upstream=f"{HOST}:{gearmand_port}"))
        pythonpath = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
        stack.enter_context(process(
            [sys.executable, "-m", "gproxy", "--config", config], env={**os.environ, "PYTHONPATH": pythonpath},
        ))
        wait_for_port(proxy_port, "gproxy")
        print(f"gproxy        listening on {HOST}:{proxy_port}, proxying to gearmand")
        stack.enter_context(process(
            ["gearman", "-w", "-h", HOST, "-p", str(proxy_port), "-f", "shout", "--", "tr", "a-z", "A-Z"]
        ))
        wait_for_worker(gearmand_port, "shout")
        print("worker        `gearman -w -f shout -- tr a-z A-Z`, connected to gproxy\n")
        print("gearmand's `workers` list, asked through gproxy's port:")
        print("".join(f"    {line}\n" for line in admin(proxy_port, "workers").splitlines()))
        for n in range(1, 6):
            payload = f"hello gearman, job {n}"
            result = subprocess.run(
                ["gearman", "-h", HOST, "-p", str(gearmand_port), "-f", "shout", payload],
                capture_output=True, timeout=10, text=True, check=False,
            )
            print(f"client -> gearmand -> gproxy -> worker: {payload!r:26} => {result.stdout!r}")
            if result.returncode != 0 or result.stdout != payload.upper():
                print(f"demo: job {n} failed: {result.stderr.strip()}")
                return 1
        print("\nall 5 jobs went through gproxy to the worker and back.\n")

        print("A flaky worker (its first attempt at each job fails with WORK_FAIL), directly on gearmand:")
        direct = flaky_round(gearmand_port, gearmand_port, "direct", tmp)
        print(f"  {direct} of 5 jobs succeeded\n")
        print("The same worker behind gproxy (`on_fail = true` for this function), same jobs:")
        proxied = flaky_round(proxy_port, gearmand_port, "proxied", tmp)
        print(f"  {proxied} of 5 jobs succeeded, each on its second attempt (see gproxy's log lines)\n")
        if proxied != 5:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
