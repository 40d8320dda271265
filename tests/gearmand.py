"""Run a real gearmand (Debian's 1.1.20) on loopback for tests, synchronously.

Why synchronous: the pytest fixture is session-scoped and pytest-trio's async fixtures are
function-scoped, so the server is managed with plain subprocess/socket calls.

Facts this module relies on (checked against /usr/sbin/gearmand 1.1.20 here):
- It runs as root without `--user`; only the default pid file (/var/gearmand.pid) and log
  file (/var/log/gearmand.log) need care, so both are put in a private directory.
- It sets SO_REUSEADDR on the listener, so a restart on the same port works at once even
  with connections in TIME_WAIT.
- On EADDRINUSE it does not exit: it retries bind() silently for 20+ seconds (sleeps of
  1, 2, 4, ... s) and a SIGTERM that arrives during that phase is lost. So a port clash is
  detected here by asking `getpid` on the port and comparing with our child's pid, and
  stop() escalates to SIGKILL.
- The admin `create function NAME` command drops the last character of NAME (1.1.20 bug).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from gproxy.core.protocol import REQ, RES, Framer, Packet, PacketType, build_packet

GEARMAND_BIN = "/usr/sbin/gearmand"
PERL_GEARMAND_BIN = "/usr/bin/gearmand"  # Debian's gearman-server: Perl Gearman::Server
HOST = "127.0.0.1"

# Admin commands whose reply is a list terminated by a line ".", per the protocol notes §2.
_LIST_COMMANDS = ("workers", "status", "prioritystatus", "show")


class GearmandError(RuntimeError):
    """gearmand could not be started or did not answer as expected."""


def find_free_port(host: str = HOST) -> int:
    """Return a port that was free a moment ago (bind to port 0, read it, close).

    Racy by nature; Gearmand.start() detects a clash and picks another port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def admin(address: tuple[str, int], command: str, timeout: float = 5.0) -> str:
    """Send one text admin command to a gearmand (or anything that relays one) and return
    the reply without line terminators.

    List commands (workers, status, prioritystatus, show ...) are read up to the line ".",
    which is not included in the result; other commands return their single OK/ERR line.
    An ERR line ends any reply. Raises GearmandError on timeout or early close.
    """
    is_list = command.split(" ", 1)[0].lower() in _LIST_COMMANDS
    deadline = time.monotonic() + timeout
    buf = b""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(command.encode() + b"\n")
        while True:
            lines = buf.split(b"\n")
            complete = [ln.rstrip(b"\r") for ln in lines[:-1]]
            if complete:
                if complete[0].startswith(b"ERR") or not is_list:
                    return complete[0].decode("utf-8", "replace")
                if b"." in complete:
                    body = complete[: complete.index(b".")]
                    return "\n".join(ln.decode("utf-8", "replace") for ln in body)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GearmandError(f"admin {command!r} to {address}: timeout, got {buf!r}")
            s.settimeout(remaining)
            try:
                chunk = s.recv(65536)
            except socket.timeout as exc:
                raise GearmandError(f"admin {command!r} to {address}: timeout, got {buf!r}") from exc
            if not chunk:
                raise GearmandError(f"admin {command!r} to {address}: closed, got {buf!r}")
            buf += chunk


def parse_status(reply: str) -> dict[str, tuple[int, int, int]]:
    """Parse an admin `status` reply into {function: (total, running, workers)}."""
    result: dict[str, tuple[int, int, int]] = {}
    for line in reply.splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            result[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
    return result


def parse_workers(reply: str) -> list[tuple[str, str, list[str]]]:
    """Parse an admin `workers` reply into [(ip, client_id, [functions])].

    Lines look like `FD IP CLIENT_ID : F1 F2`; client connections show no functions.
    """
    result: list[tuple[str, str, list[str]]] = []
    for line in reply.splitlines():
        head, _, funcs = line.partition(" :")
        fields = head.split(" ")
        if len(fields) >= 3:
            result.append((fields[1], fields[2], funcs.split()))
    return result


def status(address: tuple[str, int], timeout: float = 5.0) -> dict[str, tuple[int, int, int]]:
    """Admin `status` at address, parsed (see parse_status)."""
    return parse_status(admin(address, "status", timeout))


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.01
) -> None:
    """Poll an observable condition until it holds; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_for_workers(
    address: tuple[str, int], function: str, count: int = 1, timeout: float = 10.0
) -> None:
    """Wait until gearmand's `status` shows at least `count` workers for `function`.

    This is how a worker without a ready signal (the `gearman -w` CLI) is known to have
    registered: gearmand lists a function's workers as soon as it processed their CAN_DO.
    """
    wait_for(
        lambda: status(address).get(function, (0, 0, 0))[2] >= count,
        timeout,
        f"{count} worker(s) for {function!r} at {address}",
    )


def wait_for_queue(
    address: tuple[str, int],
    function: str,
    total: int,
    running: int | None = None,
    timeout: float = 10.0,
) -> None:
    """Wait until `status` shows exactly `total` jobs (and `running` running) for function.

    A function gearmand does not list counts as 0 jobs.
    """

    def ok() -> bool:
        t, r, _ = status(address).get(function, (0, 0, 0))
        return t == total and (running is None or r == running)

    wait_for(ok, timeout, f"{function!r} at {address} to have total={total} running={running}")


class Gearmand:
    """One gearmand child process on 127.0.0.1, with its log and pid file in `workdir`.

    Use start()/stop()/restart(); `address` stays the same across restart(). `host`: another
    address to listen on; `wrapper`: a command that runs gearmand (e.g. `ip netns exec NS`,
    which execs it, so the child's pid is still gearmand's).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        verbose: str = "INFO",
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
        host: str = HOST,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="gearmand-"))
        self.host = host
        self.wrapper = list(wrapper)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.verbose = verbose
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "gearmand.log"
        self.pid_path = self.workdir / "gearmand.pid"
        self.stderr_path = self.workdir / "gearmand.stderr"

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, port: int | None = None) -> "Gearmand":
        """Start gearmand and wait until it answers `getpid` with its own pid.

        Without `port` a free one is picked, retrying with a new port on a clash. With a
        port (as restart() does) it keeps waiting for gearmand's own bind retries.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise GearmandError("gearmand already running")
        fixed = port is not None
        for _attempt in range(1 if fixed else 5):
            self.port = port if fixed else find_free_port()
            self._spawn()
            outcome = self._wait_ready(keep_waiting_on_clash=fixed)
            if outcome == "ready":
                return self
            self._kill()
            if outcome != "clash" or fixed:
                break
        raise GearmandError(
            f"gearmand did not come up on {self.host}:{self.port} ({outcome}).\n{self.log_tail()}"
        )

    def _spawn(self) -> None:
        argv = [
            *self.wrapper,
            GEARMAND_BIN,
            f"--listen={self.host}",
            f"--port={self.port}",
            f"--log-file={self.log_path}",
            f"--pid-file={self.pid_path}",
            f"--verbose={self.verbose}",
            *self.extra_args,
        ]
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
            )

    def _wait_ready(self, keep_waiting_on_clash: bool) -> str:
        """Return "ready", "clash" (something else answers on our port), "died" or "timeout".

        Polls `getpid` every 10 ms: connection refused means gearmand is not listening yet.
        """
        assert self.proc is not None
        expected = f"OK {self.proc.pid}"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return "died"
            try:
                reply: str | None = admin(self.address, "getpid", timeout=1.0)
            except ConnectionRefusedError:
                reply = None
            except (OSError, GearmandError):
                reply = "not gearmand"
            if reply == expected:
                return "ready"
            if reply is not None and not keep_waiting_on_clash:
                return "clash"
            time.sleep(0.01)
        return "timeout"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL (a SIGTERM during startup is lost)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self.proc = None

    def _kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port (jobs and registrations are lost)."""
        port = self.port
        self.stop()
        self.start(port)

    def __enter__(self) -> "Gearmand":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queries -----------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """(host, port) clients and workers connect to."""
        if self.port is None:
            raise GearmandError("gearmand was never started")
        return (self.host, self.port)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def admin(self, command: str, timeout: float = 5.0) -> str:
        """Send a text admin command (`status`, `workers`, ...); see module function admin()."""
        return admin(self.address, command, timeout)

    def status(self) -> dict[str, tuple[int, int, int]]:
        """{function: (total, running, workers)} from `status`."""
        return parse_status(self.admin("status"))

    def clients_of(self, unique: str) -> int:
        """How many clients wait on the job with this unique id (GET_STATUS_UNIQUE)."""
        request = build_packet(REQ, PacketType.GET_STATUS_UNIQUE, unique=unique.encode())
        framer = Framer(RES)
        with socket.create_connection(self.address, timeout=5.0) as s:
            s.sendall(request)
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    raise GearmandError(f"GET_STATUS_UNIQUE {unique!r}: connection closed")
                for frame in framer.receive(chunk):
                    if isinstance(frame, Packet) and frame.type is PacketType.STATUS_RES_UNIQUE:
                        return int(frame.args()["client_count"])

    def workers(self) -> list[tuple[str, str, list[str]]]:
        """[(ip, client_id, functions)] from `workers`."""
        return parse_workers(self.admin("workers"))

    def wait_for_workers(self, function: str, count: int = 1, timeout: float = 10.0) -> None:
        wait_for_workers(self.address, function, count, timeout)

    def wait_for_queue(
        self, function: str, total: int, running: int | None = None, timeout: float = 10.0
    ) -> None:
        wait_for_queue(self.address, function, total, running, timeout)

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of gearmand's log and stderr, for error messages."""
        out = []
        for path in (self.log_path, self.stderr_path):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                continue
            out.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(out)


class PerlGearmanServer(Gearmand):
    """The Perl job server (Debian `gearman-server`, Gearman::Server 1.130, /usr/bin/gearmand)
    on 127.0.0.1, with the same interface as Gearmand.

    Why: a second, independent server implementation with different semantics, to show
    what a Gearman peer does when the server is not gearmand.

    Facts this class relies on (read in its source, checked against 1.130 here):
    - Started as `/usr/bin/gearmand --port=N --listen=127.0.0.1 --pidfile=P` (also --debug=1,
      which only logs connects); it stays in the foreground, has no log file (warnings go
      to stderr) and dies at once on SIGTERM (no handler).
    - It writes the pid file only after binding its listener (SO_REUSEADDR, so a restart on
      the same port works at once); if the port is taken it dies with "Error creating
      socket". So readiness is: the pid file holds our child's pid, then `status` answers.
    - There is no `getpid` (`ERR unknown_command`). `status` lists `FUNC\\tTOTAL\\tRUNNING\\t
      WORKERS` lines ending with `.`, as gearmand's (parse_status works unchanged; functions
      with neither workers nor jobs are not listed); `workers` lists `FD IP CLIENT_ID :
      FUNCS` ("-" when no client id was set, also for client and admin connections), so
      parse_workers works too. `version` answers `v1.130.1`.
    Protocol behaviour (tests/test_peers_extra.py shows each with real peers):
    - WORK_EXCEPTION does not end the job: it is relayed to clients that set OPTION_REQ
      `exceptions` (to no one else), and the worker's following WORK_FAIL ends the job and
      reaches every client (a plain WORK_FAIL, no stray NUL). So the Perl Gearman::Worker,
      which sends WORK_EXCEPTION + WORK_FAIL when its handler dies, gets no ERROR and survives
      here (against gearmand 1.1.20 it dies).
    - It knows neither GRAB_JOB_UNIQ nor GRAB_JOB_ALL: the packet type has no entry in
      Gearman::Util's table, the CMD_ method lookup dies inside an eval, and the server
      answers `ERROR server_error` with the Perl error text (`Can't locate object method
      "CMD_" via package "Gearman::Server::Client" ...`). pygearman's worker, which sends only
      GRAB_JOB_UNIQ, therefore never gets a job from it; the Perl worker (GRAB_JOB) does.
    - CAN_DO_TIMEOUT takes the value in seconds (a Danga::Socket timer; "1" failed the job
      after 1.0 s) and, when it fires, sends WORK_FAIL to the job's clients and ends the
      job (gearmand 1.1.20 requeues it instead); the worker's late WORK_COMPLETE is then
      accepted silently (no ERROR), so the Perl worker survives that too.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        debug: bool = False,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
    ) -> None:
        super().__init__(workdir, extra_args=extra_args, startup_timeout=startup_timeout)
        self.debug = debug
        self.pid_path = self.workdir / "perl-gearmand.pid"
        self.stderr_path = self.workdir / "perl-gearmand.stderr"
        self.log_path = self.stderr_path  # its only log

    def _spawn(self) -> None:
        self.pid_path.unlink(missing_ok=True)  # a stale pid file must not look like readiness
        argv = [
            PERL_GEARMAND_BIN,
            f"--port={self.port}",
            f"--listen={HOST}",
            f"--pidfile={self.pid_path}",
            *(["--debug=1"] if self.debug else []),
            *self.extra_args,
        ]
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
            )

    def _wait_ready(self, keep_waiting_on_clash: bool) -> str:
        """Return "ready", "clash" (the port was taken), "died" or "timeout".

        Polls every 10 ms: first for the pid file (written after the bind), then for an
        answer to `status` (connection refused cannot happen once bound, but the event loop
        may not run yet; the admin call then just waits for the reply).
        """
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return "clash" if b"Error creating socket" in self._stderr_bytes() else "died"
            try:
                bound = self.pid_path.read_text().strip() == str(self.proc.pid)
            except FileNotFoundError:
                bound = False
            if bound:
                try:
                    admin(self.address, "status", timeout=max(0.1, deadline - time.monotonic()))
                    return "ready"
                except (OSError, GearmandError):
                    pass
            time.sleep(0.01)
        return "timeout"

    def _stderr_bytes(self) -> bytes:
        try:
            return self.stderr_path.read_bytes()
        except FileNotFoundError:
            return b""

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the server's stderr (its only log), for error messages."""
        text = self._stderr_bytes().decode("utf-8", "replace").splitlines()[-lines:]
        return f"--- {self.stderr_path} ---\n" + "\n".join(text)
