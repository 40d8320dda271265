"""`gproxy replay`: dead letters back to their function, at a rate, at least once.

It takes the dead letters from gearmand as a worker of the dead-letter function, and submits
each again as a background job (its original function, unique id and payload, from the
envelope: see dead_letter.py), at most `rate` a second. A dead letter is completed only
once gearmand has acknowledged its resubmission (JOB_CREATED): a replay killed half-way
loses nothing; the one dead letter in flight at the kill goes back to the queue and is
replayed again (gearmand coalesces it with the first, if that one is still queued: the
unique id is the original's). Blocking sockets: a command, not a server.
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from .config import Address
from .core.dead_letter import parse
from .core.protocol import REQ, RES, AdminLine, Framer, Packet, PacketType, build_packet

P = PacketType
IO_TIMEOUT = 30.0


class ReplayError(Exception):
    """The replay stops: the reason, for one line."""


@dataclass(slots=True)
class Summary:
    replayed: int = 0
    seconds: float = 0.0
    left: int | None = None
    """Dead letters still queued at the end (None: not known)."""


class _Connection:
    """One blocking connection to gearmand, read packet by packet."""

    def __init__(self, server: Address) -> None:
        try:
            self.sock = socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT)
        except OSError as exc:
            raise ReplayError(f"cannot connect to gearmand at {server}: {exc}") from exc
        self.framer = Framer(RES)
        self.frames: collections.deque[Packet | AdminLine] = collections.deque()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _next(self) -> Packet | AdminLine:
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise ReplayError("gearmand closed the connection")
            self.frames.extend(f for f in self.framer.receive(data) if type(f) is Packet or type(f) is AdminLine)
        return self.frames.popleft()

    def receive(self, *wanted: PacketType) -> Packet:
        """The next packet of a `wanted` type (NOOPs skipped); an ERROR stops the replay."""
        while True:
            frame = self._next()
            if type(frame) is not Packet or frame.type is P.NOOP:
                continue
            if frame.type is P.ERROR:
                args = frame.args()
                raise ReplayError(f"gearmand answered ERROR {args['code'].decode(errors='replace')}: "
                                  f"{args['text'].decode(errors='replace')}")
            if frame.type in wanted:
                return frame
            raise ReplayError(f"unexpected {frame.type.name} from gearmand")

    def admin(self, command: bytes) -> list[bytes]:
        """A text admin command's reply lines, up to the closing `.`."""
        self.send(command + b"\n")
        lines: list[bytes] = []
        while True:
            frame = self._next()
            if type(frame) is AdminLine:
                line = frame.raw.rstrip(b"\r\n")
                if line == b".":
                    return lines
                lines.append(line)

    def close(self) -> None:
        self.sock.close()


def queued(server: Address, function: bytes) -> int:
    """Jobs of `function` in gearmand's queue now (admin `status`)."""
    connection = _Connection(server)
    try:
        for line in connection.admin(b"status"):
            fields = line.split(b"\t")
            if len(fields) >= 4 and fields[0] == function:
                return int(fields[1])
        return 0
    finally:
        connection.close()


def replay(
    server: Address, source: bytes, target: bytes | None, rate: float, limit: int | None, dry_run: bool,
    report: Callable[[str], None], clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> Summary:
    """Replay the dead letters of `source` (to `target`, else each to its own function);
    `report` hears one line per dead letter."""
    summary, started = Summary(), clock()
    worker = _Connection(server)
    client = None if dry_run else _Connection(server)
    interval, next_at = 1.0 / rate, started
    try:
        worker.send(build_packet(REQ, P.CAN_DO, function=source))
        while limit is None or summary.replayed < limit:
            worker.send(build_packet(REQ, P.GRAB_JOB))
            assigned = worker.receive(P.JOB_ASSIGN, P.NO_JOB)
            if assigned.type is P.NO_JOB:
                break  # the queue is empty
            args = assigned.args()
            handle, data = args["handle"], args["data"]
            letter = parse(data)
            if letter is None and target is None:
                raise ReplayError(
                    f"dead letter {handle.decode(errors='replace')} is not in gproxy's envelope (a dead letter "
                    "of gproxy 0.1?): give --to to submit its payload as it is (it stays queued)"
                )
            function = target if target is not None else letter.function  # type: ignore[union-attr]
            unique = letter.unique if letter is not None else b""
            payload = letter.payload if letter is not None else data
            attempts = f", {letter.attempts} attempts, last {letter.failure_type}" if letter is not None else ""
            what = f"{handle.decode(errors='replace')} (unique {unique.decode(errors='replace')!r}{attempts})"
            if dry_run:
                report(f"would replay {what} to {function.decode(errors='replace')}")
                summary.replayed += 1
                continue  # it stays assigned here, and goes back to the queue when we close
            assert client is not None
            if (wait := next_at - clock()) > 0:
                sleep(wait)
            next_at = max(next_at, clock() - interval) + interval  # no burst after a pause
            client.send(build_packet(REQ, P.SUBMIT_JOB_BG, function=function, unique=unique, data=payload))
            created = client.receive(P.JOB_CREATED).args()["handle"]
            worker.send(build_packet(REQ, P.WORK_COMPLETE, handle=handle, data=b""))  # only now: at least once
            summary.replayed += 1
            report(f"replayed {what} to {function.decode(errors='replace')} as {created.decode(errors='replace')}"
                   f" at {clock() - started:.3f}s")
        if summary.replayed and not dry_run:
            # gearmand has taken every WORK_COMPLETE once it answers this (it reads a
            # connection in order): only then does its count of what is left hold.
            worker.send(build_packet(REQ, P.ECHO_REQ, data=b"replayed"))
            worker.receive(P.ECHO_RES)
    except OSError as exc:
        raise ReplayError(f"connection to gearmand at {server} lost: {exc}") from exc
    finally:
        worker.close()
        if client is not None:
            client.close()
    summary.seconds = clock() - started
    return summary


def run(server: Address, source: bytes, target: bytes | None, rate: float, limit: int | None, dry_run: bool,
        out: TextIO) -> int:
    """The command: progress on a terminal (one line per dead letter otherwise), a summary."""
    interactive = out.isatty()
    try:
        total = queued(server, source)
    except (ReplayError, OSError, ValueError):
        total = None
    goal = min(total, limit) if total is not None and limit is not None else total if total is not None else limit

    done = 0

    def report(line: str) -> None:
        nonlocal done
        done += 1
        if interactive:
            out.write(f"\r{_bar(done, goal)} {done}/{goal if goal is not None else '?'}")
        else:
            out.write(line + "\n")
        out.flush()

    name = source.decode(errors="replace")
    try:
        summary = replay(server, source, target, rate, limit, dry_run, report)
    except ReplayError as exc:
        if interactive:
            out.write("\n")
        out.write(f"gproxy replay: stopped after {done} dead letters: {exc}\n")
        return 1
    if interactive:
        out.write("\n")
    left = None if dry_run else _left(server, source)
    to = target.decode(errors="replace") if target is not None else "their own functions"
    verb = "would replay" if dry_run else "replayed"
    pace = ""
    if not dry_run and summary.replayed > 1 and summary.seconds > 0:  # (the first goes at once)
        pace = f" in {summary.seconds:.1f}s ({(summary.replayed - 1) / summary.seconds:.1f}/s)"
    out.write(f"{verb} {summary.replayed} dead letters from {name} to {to}{pace}"
              + (f"; {left} left in {name}" if left is not None else "") + "\n")
    return 0


def _left(server: Address, source: bytes) -> int | None:
    try:
        return queued(server, source)
    except (ReplayError, OSError, ValueError):
        return None


def _bar(done: int, goal: int | None, width: int = 30) -> str:
    if not goal:
        return "[" + "#" * min(done, width) + "]"
    filled = min(width, done * width // goal)
    return "[" + "#" * filled + "." * (width - filled) + "]"
