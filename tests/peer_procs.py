"""Start the real Gearman peers (tests/peers/*, the `gearman` CLI) as subprocesses.

Why subprocesses: the peers are blocking libraries (pygearman, Perl Gearman::Worker,
libgearman) that must talk to gearmand or to gproxy over real TCP, exactly as in production.

Rules kept here:
- every process runs in its own session/process group, and stop_peer() signals the whole
  group (the `gearman -w` CLI forks one child per job), SIGTERM first, then SIGKILL;
- every wait has a deadline; readiness is an event (a `ready` line on stdout) or an
  observable condition polled every 10 ms (gearmand's admin `status`), never a fixed sleep;
- stderr of long-running peers goes to a log file (a pipe nobody reads could fill up and
  block the peer); `log_text()` shows it in assertion messages.

Addresses are (host, port) tuples or "host:port" strings.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence, TypeVar, Union

from tests.gearmand import status, wait_for

PEERS_DIR = Path(__file__).resolve().parent / "peers"
PYWORKER = PEERS_DIR / "pyworker.py"
PYCLIENT = PEERS_DIR / "pyclient.py"
PYBURST = PEERS_DIR / "pyburst.py"
PYJOBS = PEERS_DIR / "pyjobs.py"
PERLWORKER = PEERS_DIR / "worker.pl"
PERLCLIENT = PEERS_DIR / "client.pl"
PHPWORKER = PEERS_DIR / "worker.php"
PYTHON = sys.executable  # the venv that has pygearman
GEARMAN_CLI = "gearman"
PERL = "perl"

Address = Union[tuple[str, int], str]

READY_TIMEOUT_S = 10.0
_log_dir: Path | None = None


def hostport(address: Address) -> tuple[str, int]:
    """Normalise an address to (host, port)."""
    if isinstance(address, str):
        host, _, port = address.rpartition(":")
        return host, int(port)
    return address[0], int(address[1])


def address_str(address: Address) -> str:
    host, port = hostport(address)
    return f"{host}:{port}"


def _default_log_dir() -> Path:
    """Per-run directory for peer logs and payload files, removed at interpreter exit
    (pass log_dir=tmp_path to keep a test's logs)."""
    global _log_dir
    if _log_dir is None:
        _log_dir = Path(tempfile.mkdtemp(prefix="gproxy-peers-"))
        atexit.register(shutil.rmtree, _log_dir, True)
    return _log_dir


class PeerProcess(subprocess.Popen):  # type: ignore[type-arg]
    """A Popen in its own process group, with a log file and line reads under a deadline."""

    log_path: Path | None

    def __init__(self, argv: Sequence[str], *, log_path: Path | None, **kwargs: Any) -> None:
        self.log_path = log_path
        self._out_buf = b""
        self.stdout_lines: list[str] = []
        super().__init__(list(argv), start_new_session=True, **kwargs)

    def read_line(self, timeout: float) -> str | None:
        """Next stdout line (without newline), None at EOF; TimeoutError after `timeout`."""
        assert self.stdout is not None, "stdout is not a pipe"
        fd = self.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._out_buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no stdout line from {self.args!r} within {timeout}s")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    if self._out_buf:
                        line, self._out_buf = self._out_buf, b""
                        return self._record(line)
                    return None
                self._out_buf += chunk
        line, self._out_buf = self._out_buf.split(b"\n", 1)
        return self._record(line)

    def _record(self, raw: bytes) -> str:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.stdout_lines.append(line)
        return line

    def wait_for_line(self, expected: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Read stdout until a line equal to `expected`; raise with the log if it never comes."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                line = self.read_line(max(0.0, deadline - time.monotonic()))
                if line == expected:
                    return
                if line is None:
                    self.wait(5)
                    raise RuntimeError(
                        f"{self.args!r} exited (rc={self.returncode}) before printing "
                        f"{expected!r}; stdout {self.stdout_lines!r}\n{self.log_text()}"
                    )
        except TimeoutError:
            raise TimeoutError(
                f"{self.args!r} printed no {expected!r} line within {timeout}s; "
                f"stdout {self.stdout_lines!r}\n{self.log_text()}"
            ) from None

    def log_text(self) -> str:
        """The peer's stderr log so far (for assertion messages)."""
        if self.log_path is None:
            return ""
        try:
            return f"--- {self.log_path} ---\n" + self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the whole process group; see stop_peer()."""
        return stop_peer(self, timeout)


def stop_peer(proc: subprocess.Popen, timeout: float = 5.0) -> int | None:  # type: ignore[type-arg]
    """SIGTERM the process group of `proc`, wait up to `timeout`, then SIGKILL the group.

    Returns the leader's exit code. Group members a dead leader left behind (a job child
    of `gearman -w`) are killed too. The leader is reaped only after the SIGKILL: until
    then it holds its pid, so the group id cannot have been reused by another process.
    A leader reaped earlier (returncode already set) is left alone for the same reason.
    """
    if proc.returncode is None:
        pgid = proc.pid  # start_new_session=True: the leader's pid is the group id
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        _wait_exited_unreaped(proc.pid, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


def _wait_exited_unreaped(pid: int, timeout: float) -> bool:
    """Wait (10 ms polls) until child `pid` has exited, leaving it a zombie (WNOWAIT)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


@contextlib.contextmanager
def running(*procs: subprocess.Popen) -> Iterator[tuple[subprocess.Popen, ...]]:  # type: ignore[type-arg]
    """Context manager that always stops the given processes' groups at exit."""
    try:
        yield procs
    finally:
        for proc in procs:
            stop_peer(proc)


_P = TypeVar("_P", bound=subprocess.Popen)  # type: ignore[type-arg]


class PeerSet:
    """Tracks started peers and stops all their process groups on exit.

    with PeerSet() as peers:
        peers.add(start_pyworker(addr))
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []  # type: ignore[type-arg]

    def add(self, proc: _P) -> _P:
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        while self.procs:
            stop_peer(self.procs.pop())

    def __enter__(self) -> "PeerSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _log_file(name: str, log_dir: Path | None) -> Path:
    directory = log_dir if log_dir is not None else _default_log_dir()
    directory.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=directory)
    os.close(fd)
    return Path(path)


def _start_ready_worker(
    name: str, argv: list[str], timeout: float, log_dir: Path | None
) -> PeerProcess:
    log_path = _log_file(name, log_dir)
    with open(log_path, "ab") as err:
        proc = PeerProcess(
            argv, log_path=log_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
        )
    try:
        proc.wait_for_line("ready", timeout)
    except BaseException:
        stop_peer(proc)
        raise
    return proc


def start_pyworker(
    address: Address,
    *,
    client_id: str | None = None,
    echo: bool = True,
    state_dir: Path | None = None,
    timeout: float = READY_TIMEOUT_S,
    log_dir: Path | None = None,
    options: Sequence[str] = (),
    chaos: bool = False,
) -> PeerProcess:
    """Start tests/peers/pyworker.py (GRAB_JOB_UNIQ) and wait for its `ready` line.

    With echo=True (default) `ready` means gearmand processed its CAN_DOs (an ECHO round
    trip after them); echo=False keeps the library's exact packet sequence. `state_dir`
    receives the flaky functions' attempt counters and seen.log (see attempt_count(),
    seen_uniques()); without it the worker uses a private temp dir. chaos=True also
    registers the chaos functions (their records: chaos_log(state_dir)).
    """
    argv = _worker_argv([PYTHON, str(PYWORKER)], address, client_id, echo, state_dir)
    for option in options:  # OPTION_REQ after registering; each OPTION_RES is logged
        argv += ["--option", option]
    if chaos:
        argv.append("--chaos")
    return _start_ready_worker("pyworker", argv, timeout, log_dir)


def start_perlworker(
    address: Address,
    *,
    client_id: str | None = None,
    echo: bool = True,
    state_dir: Path | None = None,
    timeout: float = READY_TIMEOUT_S,
    log_dir: Path | None = None,
    timeouts: Mapping[str, str] | None = None,
    chaos: bool = False,
    tls: Mapping[str, Path] | None = None,
) -> PeerProcess:
    """Start tests/peers/worker.pl (Perl Gearman::Worker, plain GRAB_JOB); wait for `ready`.

    `state_dir` receives the `flaky` attempt counters, keyed by payload (attempt_count()).
    `timeouts` {function: value} registers those functions with CAN_DO_TIMEOUT `function\\0value`
    (the value is sent verbatim; gearmand 1.1.20 reads milliseconds, at least 1000).
    chaos=True also registers the chaos functions (chaos_log(state_dir)).
    `tls` {"ca": ..., "cert": ..., "key": ...} (any of them, or none: {}) connects over TLS.
    """
    argv = _worker_argv([PERL, str(PERLWORKER)], address, client_id, echo, state_dir)
    if tls is not None:
        argv += ["--tls", *(arg for key, path in tls.items() for arg in (f"--tls-{key}", str(path)))]
    for function, value in (timeouts or {}).items():
        argv += ["--timeout", f"{function}={value}"]
    if chaos:
        argv.append("--chaos")
    return _start_ready_worker("perlworker", argv, timeout, log_dir)


def start_phpworker(
    address: Address, state_dir: Path, *, timeout: float = READY_TIMEOUT_S, log_dir: Path | None = None
) -> PeerProcess:
    """Start tests/peers/worker.php (pecl gearman on libgearman, function php_db: real PDO
    and mysqli exceptions reported unmarked); wait for `ready`. Its attempts are logged in
    `state_dir`/php.log."""
    argv = ["php", str(PHPWORKER), address_str(address), str(state_dir)]
    return _start_ready_worker("phpworker", argv, timeout, log_dir)


def _worker_argv(
    program: list[str], address: Address, client_id: str | None, echo: bool, state_dir: Path | None
) -> list[str]:
    """The command line both worker scripts share."""
    argv = [*program, address_str(address)]
    if client_id is not None:
        argv += ["--client-id", client_id]
    if not echo:
        argv.append("--no-echo")
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    return argv


# `gearman -w -f F -- sh -c FLAKY_CLI_SCRIPT flaky_cli STATE_DIR`: payload `N:rest` on stdin;
# the first N attempts per payload exit 1 with nothing on stdout (libgearman then sends
# WORK_FAIL; any stdout of a failing command would go out first as WORK_DATA), later ones
# print `ok after <attempt>` (no newline), which libgearman sends as WORK_COMPLETE. The
# counter STATE_DIR/flaky-<sha1sum(payload)> grows by one byte per attempt under flock(1),
# so several CLI workers may share the dir. A payload that is not N:rest exits 2 (WORK_FAIL).
FLAKY_CLI_SCRIPT = r"""
dir=$1
tmp=$(mktemp "$dir/flaky_cli-payload.XXXXXX") || exit 2
cat >"$tmp"
key=$(sha1sum <"$tmp" | cut -d' ' -f1)
wanted=$(head -c 32 "$tmp" | sed -n '1s/^\([0-9][0-9]*\):.*/\1/p')
rm -f "$tmp"
case $wanted in
    '' | *[!0-9]*) echo "flaky_cli: payload is not N:rest" >&2; exit 2 ;;
esac
counter="$dir/flaky-$key"
exec 9>>"$counter"
flock 9
printf x >&9
attempt=$(wc -c <"$counter")
exec 9>&-
if [ "$attempt" -le "$wanted" ]; then
    echo "flaky_cli: transient failure $attempt" >&2
    exit 1
fi
printf 'ok after %s' "$attempt"
"""


def flaky_cli_command(state_dir: Path | str) -> list[str]:
    """Command argv for start_cli_worker() that fails the first N attempts per payload
    (see FLAKY_CLI_SCRIPT); its counters are readable with attempt_count(state_dir, payload)."""
    return ["sh", "-c", FLAKY_CLI_SCRIPT, "flaky_cli", str(state_dir)]


def attempt_count(state_dir: Path | str, key: bytes | str) -> int:
    """How many attempts a flaky function made for `key` (0 if none): the unique for the
    pyworker functions, the payload for Perl's `flaky` and for flaky_cli_command()."""
    raw = key.encode() if isinstance(key, str) else key
    path = Path(state_dir) / f"flaky-{hashlib.sha1(raw).hexdigest()}"
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class Attempt(NamedTuple):
    """One line of the pyworker's attempts.log (the `scripted` function)."""

    time: float  # the worker's time.monotonic() (CLOCK_MONOTONIC: comparable with ours)
    unique: str
    attempt: int
    action: str
    handle: str


def attempts_log(state_dir: Path | str) -> list[Attempt]:
    """Every `scripted` attempt logged in state_dir/attempts.log, in order ([] if none).

    The first field is split off the left and the last three off the right, so a unique
    with spaces survives (newlines in it are logged as a literal backslash-n).
    """
    try:
        text = (Path(state_dir) / "attempts.log").read_bytes().decode("utf-8", "backslashreplace")
    except FileNotFoundError:
        return []
    result = []
    for line in text.splitlines():
        when, _, rest = line.partition(" ")
        unique, attempt, action, handle = rest.rsplit(" ", 3)
        result.append(Attempt(float(when), unique, int(attempt), action, handle))
    return result


def chaos_log(state_dir: Path | str) -> list[dict[str, Any]]:
    """Every record of the workers' chaos functions in state_dir/chaos.log, in order ([] if
    none): {"e": "start", ...} when an attempt starts, {"e": "end", ...} before its final
    packet (see tests/peers/pyworker.py). A line cut short by a killed writer is skipped
    (each is one O_APPEND write, so this should not happen)."""
    try:
        text = (Path(state_dir) / "chaos.log").read_bytes().decode("utf-8", "backslashreplace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            records.append(dict(json.loads(line)))
    return records


def seen_uniques(state_dir: Path | str) -> list[str]:
    """The unique of every attempt of the pyworker's flaky-family functions, in order."""
    try:
        text = (Path(state_dir) / "seen.log").read_bytes().decode("utf-8", "backslashreplace")
    except FileNotFoundError:
        return []
    return text.splitlines()


def start_cli_worker(
    address: Address,
    function: str,
    command_argv: Sequence[str],
    *,
    admin_address: Address | None = None,
    timeout: float = READY_TIMEOUT_S,
    log_dir: Path | None = None,
) -> PeerProcess:
    """Start `gearman -w -h H -p P -f FUNCTION -- command...` (libgearman, GRAB_JOB_ALL).

    The CLI prints nothing when it is ready, so this reads the number of workers gearmand's
    admin `status` lists for `function` (at admin_address, default `address`; pass the real
    gearmand's address when `address` is a proxy) before starting, and polls until it grows.
    Another worker of the same function leaving meanwhile would hide the new one: use a
    function name no other live worker registers.
    """
    admin_at = hostport(admin_address if admin_address is not None else address)
    baseline = status(admin_at).get(function, (0, 0, 0))[2]
    host, port = hostport(address)
    argv = [GEARMAN_CLI, "-w", "-h", host, "-p", str(port), "-f", function, "--", *command_argv]
    log_path = _log_file(f"cli-worker-{function}", log_dir)
    with open(log_path, "ab") as out:
        proc = PeerProcess(
            argv, log_path=log_path, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )

    def registered() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv!r} exited (rc={proc.returncode})\n{proc.log_text()}")
        return status(admin_at).get(function, (0, 0, 0))[2] > baseline

    try:
        wait_for(registered, timeout, f"`gearman -w -f {function}` to register at {admin_at}")
    except BaseException:
        stop_peer(proc)
        raise
    return proc


class ClientRun(subprocess.CompletedProcess):  # type: ignore[type-arg]
    """CompletedProcess of pyclient.py, with its JSON report parsed."""

    @property
    def report(self) -> dict[str, Any]:
        """The last JSON line pyclient.py printed on stderr ({} if none)."""
        for line in reversed((self.stderr or b"").decode("utf-8", "replace").splitlines()):
            if line.startswith("{"):
                return dict(json.loads(line))
        return {}

    @property
    def state(self) -> str | None:
        return self.report.get("state")


class PyClientProcess(PeerProcess):
    """A running pyclient.py; result() waits for it (its payload temp file is removed)."""

    payload_path: Path | None = None
    client_timeout: float = 30.0

    def result(self, timeout: float | None = None) -> ClientRun:
        """Wait for the client (default: its own --timeout plus 10 s) and collect its output.

        Raises subprocess.TimeoutExpired after stopping it if it outlives the deadline.
        """
        try:
            out, err = _communicate(self, timeout if timeout is not None else self.client_timeout + 10.0)
        finally:
            if self.payload_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.payload_path.unlink()
        return ClientRun(self.args, self.returncode, out, err)


def _communicate(proc: PeerProcess, limit: float) -> tuple[bytes, bytes]:
    """Wait for `proc` and collect its output; past `limit` seconds, stop it and raise
    subprocess.TimeoutExpired."""
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        stop_peer(proc)
        raise
    return out, err


def start_pyclient(
    address: Address,
    function: str,
    payload: bytes | str | None = None,
    *,
    unique: str | None = None,
    background: bool = False,
    priority: str | None = None,
    out: Path | None = None,
    exceptions: bool = False,
    exception_final: bool = True,
    timeout: float = 30.0,
) -> PyClientProcess:
    """Start tests/peers/pyclient.py without waiting (e.g. to unblock a `block` job later).

    Bytes payloads go through a temp file (binary safe, any size); str via --payload.
    exceptions=True sends OPTION_REQ exceptions: a WORK_EXCEPTION then ends the job with
    its payload in report["exception"] (otherwise gearmand turns it into a WORK_FAIL).
    exception_final=False (with exceptions=True) keeps waiting after a WORK_EXCEPTION for the
    packet that ends the job: for the Perl Gearman::Server, where only WORK_FAIL does;
    report["ended_by"] names that packet.
    """
    argv = [PYTHON, str(PYCLIENT), address_str(address), function, "--timeout", str(timeout)]
    payload_path: Path | None = None
    if isinstance(payload, bytes):
        fd, name = tempfile.mkstemp(prefix="pyclient-payload-", dir=_default_log_dir())
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        payload_path = Path(name)
        argv += ["--payload-file", name]
    elif payload is not None:
        argv += ["--payload", payload]
    if unique is not None:
        argv += ["--unique", unique]
    if background:
        argv.append("--background")
    if priority is not None:
        argv += ["--priority", priority]
    if out is not None:
        argv += ["--out", str(out)]
    if exceptions:
        argv.append("--exceptions")
    if not exception_final:
        argv.append("--keep-after-exception")
    proc = PyClientProcess(
        argv,
        log_path=None,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.payload_path = payload_path
    proc.client_timeout = timeout
    return proc


def run_pyclient(*args: Any, **kwargs: Any) -> ClientRun:
    """start_pyclient() with the same arguments, run to completion. returncode: 0 COMPLETE
    (or background JOB_CREATED), 1 FAILED/error, 2 timeout; stdout is the raw result (or the
    background handle); `.report` is the parsed JSON line (state, data_updates,
    warning_updates, status, exception, exception_updates, stray_nul_fail, ended_by...)."""
    return start_pyclient(*args, **kwargs).result()


def run_perlclient(
    address: Address, function: str, payload: str, *, unique: str | None = None,
    tls: Mapping[str, Path] | None = None, timeout: float = 30.0,
) -> dict[str, Any]:
    """Run tests/peers/client.pl (Perl Gearman::Client) to the job's end: its JSON line
    ({"state": "complete"|"fail", "result": ...}), with "exit" its exit code. `tls` as for
    start_perlworker."""
    argv = [PERL, str(PERLCLIENT), address_str(address), function, payload, "--timeout", str(timeout)]
    if unique is not None:
        argv += ["--unique", unique]
    if tls is not None:
        argv += ["--tls", *(arg for key, path in tls.items() for arg in (f"--tls-{key}", str(path)))]
    done = subprocess.run(argv, capture_output=True, timeout=timeout + 10, check=False)
    lines = [line for line in done.stdout.decode("utf-8", "replace").splitlines() if line.startswith("{")]
    report: dict[str, Any] = json.loads(lines[-1]) if lines else {"stderr": done.stderr.decode("utf-8", "replace")}
    return {**report, "exit": done.returncode}


def run_cli_client(
    address: Address,
    function: str,
    payload: bytes | str | None = None,
    *,
    unique: str | None = None,
    background: bool = False,
    cli_timeout_ms: int | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """Run the libgearman client `gearman -h H -p P -f FUNCTION ...` and capture its output.

    A str payload is passed as the argument; bytes go through stdin (binary safe, NULs ok);
    None sends an empty job (-s). The 1.1.20 CLI hangs when a job ends in WORK_EXCEPTION
    (gearmand sends it WORK_FAIL with a stray NUL), so the run is bounded by `timeout`
    (subprocess.TimeoutExpired after the group is killed). `cli_timeout_ms` passes -t; note
    the CLI then exits 0 on its own timeout, printing "timeout reached" on stderr.
    """
    host, port = hostport(address)
    argv = [GEARMAN_CLI, "-h", host, "-p", str(port), "-f", function]
    if unique is not None:
        argv += ["-u", unique]
    if background:
        argv.append("-b")
    if cli_timeout_ms is not None:
        argv += ["-t", str(cli_timeout_ms)]
    stdin_data: bytes | None = None
    if isinstance(payload, bytes):
        stdin_data = payload
    elif payload is not None:
        argv += ["--", payload]  # "--": a payload starting with "-" is not an option
    else:
        argv.append("-s")
    proc = PeerProcess(
        argv,
        log_path=None,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(stdin_data if stdin_data is not None else b"", timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_peer(proc)
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


class BurstRun(subprocess.CompletedProcess):  # type: ignore[type-arg]
    """CompletedProcess of pyburst.py, with its JSON report parsed."""

    @property
    def report(self) -> dict[str, Any]:
        """The last JSON line pyburst.py printed on stdout ({} if none)."""
        for line in reversed((self.stdout or b"").decode("utf-8", "replace").splitlines()):
            if line.startswith("{"):
                return dict(json.loads(line))
        return {}

    @property
    def jobs(self) -> list[dict[str, Any]]:
        """Foreground: one dict per job (i, unique, handle, state, result, exception)."""
        return list(self.report.get("jobs", []))

    @property
    def states(self) -> list[str]:
        return [job["state"] for job in self.jobs]


class PyBurstProcess(PeerProcess):
    """A running pyburst.py; result() waits for it."""

    burst_timeout: float = 30.0

    def result(self, timeout: float | None = None) -> BurstRun:
        """Wait for the burst (default: its own --timeout plus 10 s) and collect its output.

        Raises subprocess.TimeoutExpired after stopping it if it outlives the deadline.
        """
        out, err = _communicate(self, timeout if timeout is not None else self.burst_timeout + 10.0)
        return BurstRun(self.args, self.returncode, out, err)


def start_pyburst(
    address: Address,
    function: str,
    count: int,
    payload: str,
    *,
    unique: str | None = None,
    exceptions: bool = False,
    background: bool = False,
    rate: float | None = None,
    timeout: float = 30.0,
) -> PyBurstProcess:
    """Start tests/peers/pyburst.py without waiting: `count` jobs on one client connection.

    `payload` and `unique` are templates in which `{i}` becomes the job index (0..count-1);
    keep `{i}` in `unique`, or gearmand coalesces the jobs. Foreground jobs are submitted all
    at once; background ones too, or paced at `rate` per second. exceptions=True: as for
    start_pyclient(). `timeout` bounds the whole burst.
    """
    argv = [
        PYTHON, str(PYBURST), address_str(address), function,
        "--count", str(count), "--payload", payload, "--timeout", str(timeout),
    ]  # fmt: skip
    if unique is not None:
        argv += ["--unique", unique]
    if exceptions:
        argv.append("--exceptions")
    if background:
        argv.append("--background")
    if rate is not None:
        argv += ["--rate", str(rate)]
    proc = PyBurstProcess(
        argv,
        log_path=None,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.burst_timeout = timeout
    return proc


def run_pyburst(address: Address, function: str, count: int, payload: str, **options: Any) -> BurstRun:
    """start_pyburst() with the same arguments, run to completion. returncode 0: every
    foreground job COMPLETE (or every background job accepted), 1 otherwise; `.report` is the
    parsed JSON line ({"jobs": [...], "elapsed"} or {"submitted", "handles", "elapsed"}),
    `.jobs` / `.states` the per-job entries of a foreground burst."""
    return start_pyburst(address, function, count, payload, **options).result()


def start_pyjobs(
    address: Address,
    jobs: Sequence[Mapping[str, Any]],
    out: Path,
    *,
    exceptions: bool = True,
    timeout: float = 60.0,
    linger: float = 0.3,
) -> PeerProcess:
    """Start tests/peers/pyjobs.py without waiting: `jobs` ({"id", "fn", "payload", "unique",
    "bg", "priority"}; unique None: the library's random one, "": none) on one client connection; its
    JSON report (every answer, update and their times, per job) goes to `out` when it ends.
    The job list is written next to `out`. `timeout` bounds the wait for the answers."""
    jobs_path = out.with_name(out.name + ".jobs.json")
    jobs_path.write_text(json.dumps(list(jobs)))
    argv = [
        PYTHON, str(PYJOBS), address_str(address), "--jobs", str(jobs_path), "--out", str(out),
        "--timeout", str(timeout), "--linger", str(linger),
    ]  # fmt: skip
    if exceptions:
        argv.append("--exceptions")
    log_path = out.with_name(out.name + ".stderr")
    with open(log_path, "ab") as err:
        return PeerProcess(argv, log_path=log_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
