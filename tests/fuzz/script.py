"""The replayable form of every fuzz input, and the executor that plays it.

A script is a list of steps for a few actors, played in order:

- a `worker` actor connects to gproxy's route A (to the real gearmand) or route B (to the
  fake gearmand), or straight to the real gearmand (`to: "gearmand"`, e.g. a client that
  submits a job gproxy never sees);
- a `gearmand` actor is one of gproxy's upstream connections to the fake gearmand, claimed
  by the SET_CLIENT_ID its worker sent first (`accept` with `client_id`), or gproxy's retry
  connection there (`accept` with `retry: true`).

Steps (each a JSON object with `op`; `actor` names the connection):

    connect  {actor, to: A|B|gearmand, read: true}   read: false = never read (backpressure)
    accept   {actor, client_id | retry: true, timeout}
    send     {actor, data: [piece...], chunk: N, delay: S}   chunk/delay: a slow sender
    expect   {actor, types: [NAME...], count: 1, timeout, require: "invariant"}
             wait for the next frame (or `count` frames) of these types (others are skipped);
             with `require`, not getting one within the timeout breaks that invariant
    eof      {actor, timeout, require}  wait until the other side closed (EOF or reset)
    open     {actor, require}           the connection must not have been closed
    half_close / close / reset {actor}  FIN only / FIN and stop reading / RST (SO_LINGER 0)
    sleep    {seconds}
    metrics  {max_bytes, max_seconds, require}   one scrape of gproxy's /metrics
    cpu_mark / cpu_check {max_seconds, require}  gproxy's CPU time between the two
    rss_mark / rss_check {max_growth, require}   gproxy's RSS growth between the two
    drop_retry {seconds}                the fake resets every new retry connection at once
                                        for that long (a storm; the step does not wait)
    retry_accepts {max, require}        how many retry connections gproxy opened to the
                                        fake since the last drop_retry: at most `max`

Data pieces: {"pkt": [MAGIC, TYPE, arg...]} (a packet with the args joined by NULs; MAGIC
"REQ"/"RES", TYPE a name or a number, args latin-1 text), {"hdr": [MAGIC, TYPE, SIZE]} (a
header alone, which may lie), {"bin": latin-1 text}, {"hex": ...}, {"fill": CHAR, "n": N},
{"repeat": [piece...], "n": N} (with "index": "04d", "{i}" in the pieces' text is the
repetition's number in that format). A packet argument "$handle" ("$created") is the handle
of the last JOB_ASSIGN* (JOB_CREATED) the sending actor received; a send that needs one
before any arrived is skipped.

Everything an actor sent and received is recorded, so the checks afterwards can hold it
against gproxy's log (see checks.py).
"""

from __future__ import annotations

import math
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from tests.fuzz import wire
from tests.fuzz.monitor import scrape

if TYPE_CHECKING:
    from tests.fuzz.fake_gearmand import FakeGearmand
    from tests.fuzz.procs import Gproxy
    from tests.fuzz.retries import RetryConnection

FORMAT = "gproxy-fuzz/1"
RECEIVE = 65536
TEARDOWN_EOF_TIMEOUT = 3.0


# -- data pieces


def _magic(text: str) -> bytes:
    return {"REQ": wire.REQ, "RES": wire.RES}.get(text, text.encode("latin-1"))


def _type(value: Any) -> int:
    return wire.T[value] if isinstance(value, str) else int(value)


class Unresolved(Exception):
    """A `$name` argument names nothing the actor has received yet."""


def build(pieces: list[dict[str, Any]], variables: dict[str, bytes] | None = None) -> bytes:
    """The bytes of `pieces`; a packet argument `$handle` (`$created`) stands for the handle
    of the last JOB_ASSIGN* (JOB_CREATED) the sending actor received."""
    out = bytearray()
    for piece in pieces:
        if "pkt" in piece:
            magic, ptype, *args = piece["pkt"]
            values = []
            for arg in args:
                if arg.startswith("$") and len(arg) > 1:
                    if variables is None or arg[1:] not in variables:
                        raise Unresolved(arg)
                    values.append(variables[arg[1:]])
                else:
                    values.append(arg.encode("latin-1"))
            out += wire.packet(_magic(magic), _type(ptype), *values)
        elif "hdr" in piece:
            magic, ptype, size = piece["hdr"]
            out += wire.HEADER.pack(_magic(magic), _type(ptype) & 0xFFFFFFFF, int(size) & 0xFFFFFFFF)
        elif "bin" in piece:
            out += piece["bin"].encode("latin-1")
        elif "hex" in piece:
            out += bytes.fromhex(piece["hex"])
        elif "fill" in piece:
            out += piece["fill"].encode("latin-1") * int(piece["n"])
        elif "repeat" in piece and "index" in piece:
            for i in range(int(piece["n"])):
                out += build(_indexed(piece["repeat"], format(i, piece["index"])), variables)
        elif "repeat" in piece:
            out += build(piece["repeat"], variables) * int(piece["n"])
        else:
            raise ValueError(f"unknown data piece {piece!r}")
    return bytes(out)


def _indexed(pieces: list[dict[str, Any]], index: str) -> list[dict[str, Any]]:
    """`pieces` with "{i}" in their text replaced by `index`."""
    out = []
    for piece in pieces:
        piece = dict(piece)
        if "bin" in piece:
            piece["bin"] = piece["bin"].replace("{i}", index)
        if "pkt" in piece:
            piece["pkt"] = [a.replace("{i}", index) if isinstance(a, str) else a for a in piece["pkt"]]
        out.append(piece)
    return out


def pieces_of(data: bytes) -> list[dict[str, Any]]:
    """Bytes as pieces a person can read: packets where they frame, runs as fills, the rest
    as latin-1 text (JSON escapes the control bytes)."""
    pieces: list[dict[str, Any]] = []
    pos = 0
    text = bytearray()

    def flush() -> None:
        if text:
            pieces.append({"bin": text.decode("latin-1")})
            text.clear()

    while pos < len(data):
        if data[pos] == 0 and len(data) - pos >= wire.HEADER_SIZE:
            magic, number, size = wire.HEADER.unpack_from(data, pos)
            end = pos + wire.HEADER_SIZE + size
            if magic in (wire.REQ, wire.RES) and number in wire.NAMES and end <= len(data) and size < 4096:
                body = data[pos + wire.HEADER_SIZE : end]
                args = body.split(b"\0")
                if all(len(a) < 200 for a in args) and (body or number in wire.EMPTY_TYPES):
                    flush()
                    pieces.append({"pkt": [magic[1:].decode(), wire.NAMES[number], *(a.decode("latin-1") for a in args)]})
                    pos = end
                    continue
        run = pos
        while run < len(data) and data[run] == data[pos]:
            run += 1
        if run - pos >= 32:
            flush()
            pieces.append({"fill": chr(data[pos]), "n": run - pos})
            pos = run
            continue
        text.append(data[pos])
        pos += 1
    flush()
    return pieces


def pkt(magic: str, ptype: str | int, *args: bytes | str) -> dict[str, Any]:
    """A packet piece (helper for generators and hand-written regression files)."""
    return {"pkt": [magic, ptype, *(a.decode("latin-1") if isinstance(a, bytes) else a for a in args)]}


# -- the script


@dataclass
class Script:
    steps: list[dict[str, Any]]
    name: str = ""
    side: str = "worker"
    kind: str = ""
    invariant: str = ""
    bug: str = ""
    found_by: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "side": self.side,
            "kind": self.kind,
            "bug": self.bug,
            "invariant": self.invariant,
            "found_by": self.found_by,
            "config": self.config,
            "notes": self.notes,
            "steps": self.steps,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Script:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file: format {data.get('format')!r}")
        return cls(
            steps=list(data["steps"]),
            name=data.get("name", ""),
            side=data.get("side", "worker"),
            kind=data.get("kind", ""),
            invariant=data.get("invariant", ""),
            bug=data.get("bug", ""),
            found_by=dict(data.get("found_by", {})),
            config=dict(data.get("config", {})),
            notes=data.get("notes", ""),
        )

    def actors(self) -> dict[str, dict[str, Any]]:
        """actor -> its connect/accept step."""
        return {s["actor"]: s for s in self.steps if s["op"] in ("connect", "accept")}


# -- playing it


@dataclass
class Env:
    """What scripts play against."""

    route_a: tuple[str, int]
    route_b: tuple[str, int] | None
    gearmand: tuple[str, int]
    gproxy: Gproxy
    fake: FakeGearmand | None
    max_packet_size: int


@dataclass(eq=False)
class Actor:
    name: str
    role: str
    """worker (to gproxy), direct (to the real gearmand), gearmand (the fake's side)."""
    route: str
    sock: trio.socket.SocketType
    magic_in: bytes
    local_port: int = 0
    peer_port: int = 0
    sent: bytearray = field(default_factory=bytearray)
    received_total: int = 0
    frames: list[wire.Frame] = field(default_factory=list)
    cursor: int = 0
    fin_sent: bool = False
    reset_sent: bool = False
    send_failed: str | None = None
    eof: bool = False
    reset: bool = False
    closed: bool = False
    connected_at: float = 0.0
    ended_at: float | None = None
    connected_wall: float = 0.0
    """time.time() when it connected, to match gproxy's log lines (a port is used again)."""
    client_id: str = ""
    variables: dict[str, bytes] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)
    reading: bool = False
    framer: wire.RefFramer | None = None
    retry: RetryConnection | None = None
    """The fake's record of it, when this actor plays the fake on gproxy's retry connection."""

    @property
    def gone(self) -> bool:
        return self.eof or self.reset

    def note(self, data: bytes) -> None:
        self.received_total += len(data)
        assert self.framer is not None
        frames = self.framer.feed(data)
        if self.retry is not None:
            self.retry.saw(frames)
        for frame in frames:
            self.frames.append(frame)
            if frame.number in wire.ASSIGNS or frame.name == "JOB_CREATED":
                args = frame.args()
                if args:
                    self.variables["handle" if frame.number in wire.ASSIGNS else "created"] = args[0]

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def summary(self) -> dict[str, Any]:
        return {
            "role": self.role, "route": self.route, "port": self.local_port, "sent": len(self.sent),
            "received": self.received_total, "frames": len(self.frames), "fin_sent": self.fin_sent,
            "reset_sent": self.reset_sent, "eof": self.eof, "reset": self.reset,
        }  # fmt: skip


@dataclass
class Run:
    script: Script
    actors: dict[str, Actor] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    aborted: str | None = None
    connect_failures: list[str] = field(default_factory=list)


def linger_reset(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Player:
    """Plays one script against `env` (any number of players at once, e.g. in a fuzz run)."""

    def __init__(self, env: Env, script: Script, *, time_limit: float = 60.0) -> None:
        self.env = env
        self.script = script
        self.run = Run(script)
        self.time_limit = time_limit
        self._marks: dict[str, float] = {}

    async def play(self) -> Run:
        run = self.run
        run.started = time.monotonic()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with trio.move_on_after(self.time_limit) as scope:
                    for step in self.script.steps:
                        await self._step(step)
                if scope.cancelled_caught:
                    run.aborted = f"time limit {self.time_limit}s"
                await self._teardown()
                nursery.cancel_scope.cancel()
        finally:
            for actor in run.actors.values():
                if not actor.closed:
                    actor.sock.close()
                    actor.closed = True
            if self.env.fake is not None:
                self.env.fake.release(self._client_ids())
            run.ended = time.monotonic()
        return run

    def _client_ids(self) -> list[str]:
        return [s["client_id"] for s in self.script.steps if s["op"] == "accept" and "client_id" in s]

    async def _step(self, step: dict[str, Any]) -> None:
        op = step["op"]
        actor = self.run.actors.get(step.get("actor", ""))
        if op == "connect":
            await self._connect(step)
        elif op == "accept":
            await self._accept(step)
        elif op == "sleep":
            await trio.sleep(float(step["seconds"]))
        elif op in ("metrics", "cpu_mark", "cpu_check", "rss_mark", "rss_check"):
            await self._measure(step)
        elif op in ("drop_retry", "retry_accepts"):
            self._retry_storm(step)
        elif actor is None:
            if op in ("expect", "eof", "open") and step.get("require"):
                self.run.violations.append(f"{step['require']} (actor {step.get('actor')} never connected)")
        elif op == "send":
            try:
                data = build(step["data"], actor.variables)
            except Unresolved:
                return  # e.g. WORK_COMPLETE $handle when no job was assigned
            await self._send(actor, data, int(step.get("chunk", 0)), float(step.get("delay", 0)))
        elif op == "expect":
            await self._expect(actor, step)
        elif op == "eof":
            with trio.move_on_after(float(step.get("timeout", 5))):
                while not actor.gone:
                    await actor.changed.wait()
            if not actor.gone and step.get("require"):
                self.run.violations.append(f"{step['require']} ({actor.name} still open)")
        elif op == "open":
            await trio.lowlevel.checkpoint()
            if actor.gone and step.get("require"):
                self.run.violations.append(f"{step['require']} ({actor.name} was closed by the other side)")
        elif op == "half_close":
            self._half_close(actor)
        elif op == "close":
            self._half_close(actor)
            actor.sock.close()
            actor.closed = True
        elif op == "reset":
            self._reset(actor)
        else:
            raise ValueError(f"unknown op {op!r}")

    async def _connect(self, step: dict[str, Any]) -> None:
        env = self.env
        to = step.get("to", "A")
        address = {"A": env.route_a, "B": env.route_b, "gearmand": env.gearmand}[to]
        assert address is not None, f"no route {to}"
        sock = trio.socket.socket()
        try:
            await sock.connect(address)
        except OSError as exc:
            sock.close()
            self.run.connect_failures.append(f"{step['actor']} to {to} {address}: {exc.strerror or exc}")
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        role = "direct" if to == "gearmand" else "worker"
        actor = Actor(step["actor"], role, to, sock, wire.RES, connected_at=time.monotonic())
        actor.local_port = sock.getsockname()[1]
        actor.connected_wall = time.time()
        actor.framer = wire.RefFramer(wire.RES)
        self.run.actors[actor.name] = actor
        if step.get("read", True):
            actor.reading = True
            self._nursery.start_soon(self._reader, actor)

    async def _accept(self, step: dict[str, Any]) -> None:
        fake = self.env.fake
        if fake is None:
            self.run.violations.append("script needs the fake gearmand")
            return
        timeout = float(step.get("timeout", 5))
        with trio.move_on_after(timeout):
            record = None
            if step.get("retry"):
                sock, first, record = await fake.claim_retry()
            else:
                sock, first = await fake.claim(step["client_id"])
            actor = Actor(step["actor"], "gearmand", "B", sock, wire.REQ, connected_at=time.monotonic(), retry=record)
            actor.local_port = sock.getsockname()[1]
            actor.peer_port = sock.getpeername()[1]
            actor.client_id = step.get("client_id", "retry")
            actor.framer = wire.RefFramer(wire.REQ)
            actor.note(first)
            self.run.actors[actor.name] = actor
            actor.reading = True
            self._nursery.start_soon(self._reader, actor)
            return
        if step.get("require"):
            self.run.violations.append(f"{step['require']} (no connection for {step['actor']} within {timeout}s)")

    async def _reader(self, actor: Actor) -> None:
        try:
            while True:
                try:
                    data = await actor.sock.recv(RECEIVE)
                except trio.ClosedResourceError:
                    break  # we closed it ourselves
                except OSError:
                    actor.reset = True
                    break
                if not data:
                    actor.eof = True
                    break
                actor.note(data)
                actor.wake()
        finally:
            actor.ended_at = time.monotonic()
            if actor.retry is not None:
                actor.retry.end()
            actor.wake()

    async def _send(self, actor: Actor, data: bytes, chunk: int, delay: float) -> None:
        if actor.send_failed or actor.fin_sent or actor.reset_sent:
            return
        if actor.role == "gearmand" and self.env.fake is not None:
            self.env.fake.jobs.note_sent(data)
        chunk = chunk if chunk > 0 else len(data) or 1
        for start in range(0, len(data), chunk):
            view = memoryview(data[start : start + chunk])
            try:
                while view:
                    sent = await actor.sock.send(view)
                    actor.sent += view[:sent]  # what the kernel took, even if the rest fails
                    view = view[sent:]
            except (OSError, trio.ClosedResourceError) as exc:
                actor.send_failed = f"{type(exc).__name__}: {exc}"
                return
            if delay and start + chunk < len(data):
                await trio.sleep(delay)

    async def _expect(self, actor: Actor, step: dict[str, Any]) -> None:
        wanted = {wire.T.get(t, -1) for t in step["types"]}
        deadline = trio.current_time() + float(step.get("timeout", 5))
        left = int(step.get("count", 1))
        while True:
            while actor.cursor < len(actor.frames):
                frame = actor.frames[actor.cursor]
                actor.cursor += 1
                if frame.number in wanted:
                    left -= 1
                    if not left:
                        return
            if actor.gone or trio.current_time() >= deadline:
                break
            with trio.move_on_at(deadline):
                await actor.changed.wait()
        if step.get("require"):
            why = "it was closed" if actor.gone else f"none within {step.get('timeout', 5)}s"
            self.run.violations.append(f"{step['require']} ({actor.name} got no {'/'.join(step['types'])}: {why})")

    def _half_close(self, actor: Actor) -> None:
        if actor.fin_sent or actor.reset_sent or actor.closed:
            return
        try:
            actor.sock.shutdown(socket.SHUT_WR)
            actor.fin_sent = True
        except OSError:
            pass

    def _reset(self, actor: Actor) -> None:
        if actor.closed:
            return
        try:
            linger_reset(actor.sock)
        except OSError:
            pass
        actor.sock.close()
        actor.closed = actor.reset_sent = True

    def _retry_storm(self, step: dict[str, Any]) -> None:
        fake = self.env.fake
        if fake is None:
            self.run.violations.append("script needs the fake gearmand")
            return
        if step["op"] == "drop_retry":
            fake.drop_retry(float(step["seconds"]))
            self._marks["retry_accepts"] = len(fake.retry_connections)
            self._marks["retry_accepts_at"] = time.monotonic()
            return
        opened = len(fake.retry_connections) - int(self._marks.get("retry_accepts", 0))
        if opened > int(step["max"]):
            seconds = time.monotonic() - self._marks.get("retry_accepts_at", self.run.started)
            self.run.violations.append(
                f"{step.get('require', 'few retry connections')} (gproxy opened {opened} retry connections in "
                f"{seconds:.1f}s, bound {step['max']})"
            )

    async def _measure(self, step: dict[str, Any]) -> None:
        op, gproxy, violations = step["op"], self.env.gproxy, self.run.violations
        if op == "metrics":
            assert gproxy.metrics is not None
            try:
                result = await trio.to_thread.run_sync(scrape, gproxy.metrics, float(step.get("max_seconds", 10)) + 5)
            except (OSError, RuntimeError) as exc:
                violations.append(f"{step.get('require', 'a /metrics scrape works')} ({exc})")
                return
            too_big = result.size > int(step.get("max_bytes", 1 << 62))
            too_slow = result.seconds > float(step.get("max_seconds", math.inf))
            if too_big or too_slow:
                violations.append(
                    f"{step.get('require', '/metrics stays small')} ({result.size} bytes in {result.seconds:.2f}s)"
                )
        elif op == "cpu_mark":
            self._marks["cpu"] = gproxy.cpu_seconds()
        elif op == "cpu_check":
            used = gproxy.cpu_seconds() - self._marks.get("cpu", 0.0)
            if used > float(step["max_seconds"]):
                violations.append(f"{step.get('require', 'CPU bounded')} (gproxy used {used:.2f}s of CPU)")
        elif op == "rss_mark":
            self._marks["rss"] = gproxy.rss()
        elif op == "rss_check":
            growth = gproxy.rss() - self._marks.get("rss", 0.0)
            if growth > float(step["max_growth"]):
                violations.append(f"{step.get('require', 'RSS bounded')} (gproxy's RSS grew {growth / 2**20:.1f} MiB)")

    async def _teardown(self) -> None:
        """Every connection still open sends FIN, then waits (a while) for the other side to
        close it: gproxy closes a pair once both of its sides have finished."""
        actors = list(self.run.actors.values())
        for actor in actors:
            self._half_close(actor)
        with trio.move_on_after(TEARDOWN_EOF_TIMEOUT):
            for actor in actors:
                while actor.reading and not actor.gone and not actor.closed:
                    await actor.changed.wait()
