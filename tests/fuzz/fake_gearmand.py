"""The gearmand side of the fuzz: a fake job server of the test's own behind gproxy's route B.

gproxy opens one upstream connection per worker connection, and one retry connection per
route. The fake tells them apart by the first packet gproxy forwards on each:

- `SET_CLIENT_ID ep…`: a scripted episode (a worker actor of a script sent it); the
  script claims that connection and plays both sides (`episode()` writes such scripts);
- `OPTION_REQ exceptions`: gproxy's retry connection; answered by a small gearmand model
  (JOB_CREATED, then the retry's WORK_COMPLETE), now and then with an attack instead
  (`RETRY_ATTACKS`: bad input as above, results over the limit, and the connection lost
  around a submission: reset or closed before its JOB_CREATED, bad input in the same write
  as it, or a storm in which every new retry connection is reset at once for a few seconds);
- anything else (the real pygearman worker, client id `fzb-py`): answered by the same model,
  handing out jobs pyworker knows, with one attack at a random point of the connection.

Attacks (`attack()`): bad magic, unknown types, huge sizes, sizes at the limit, JOB_ASSIGN
over the limit, wrong argument counts, JOB_ASSIGN for handles no grab asked for, replies to
requests never made, `gpr:` uniques, long function names, bit flips, text, resets and
closes mid-packet. Every byte the fake sends and receives on a reactive connection is kept
(`Transcript`), so a connection that broke an invariant can be saved as a script. Every
retry connection, however it was served, is a `retries.RetryConnection` (when it came,
what was submitted on it, when it was lost), and every job the fake's side assigns is
noted (`jobs`), for the checks of retries.py.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import trio

from tests.fuzz import corpus, wire
from tests.fuzz.retries import STORM_MAX, STORM_MIN, Jobs, RetryConnection
from tests.fuzz.script import Script, linger_reset, pieces_of, pkt

EPISODE_PREFIX = "ep"
PYWORKER_ID = "fzb-py"
PYWORKER_JOBS = (b"reverse", b"echo", b"unique", b"stream", b"flaky")
"""Functions of tests/peers/pyworker.py the fake hands to the real worker (flaky: its first
attempt fails with a RETRY exception, so gproxy holds it and retries it through the fake)."""
RETRY_FUNCTIONS = ("flaky", "fzb_retry", "fzb_slow")
SLOW_RETRY = 1.0
"""Seconds the retry responder takes to complete a retry of fzb_slow (a hold that lasts)."""
CLAIM_TIMEOUT = 30.0
DROP_READ = 0.05
"""Seconds the fake reads a retry connection it drops in a storm (for a submission on it)."""
RETRY_ATTACK_RATE = 0.5
"""The share of gproxy's retry connections the fake attacks (one attack each)."""
RETRY_OUTCOME_WAIT = 30.0
"""Seconds an episode's worker connection waits for the outcome of a job gproxy holds: it
stays while the retry goes on (a job whose original connection goes is given up)."""
ATTACKS = (
    "bad_magic", "unknown_type", "huge_size", "at_max", "assign_over_max", "wrong_args",
    "assign_unasked", "unsolicited", "gpr_unique", "long_function", "bitflip", "size_off",
    "text", "close_mid_packet", "reset_mid_packet", "garbage",
)  # fmt: skip


@dataclass
class Attack:
    kind: str
    data: bytes
    then: str | None = None
    """None, "close" (FIN) or "reset" (RST) right after the data."""


def attack(rng: random.Random, kind: str, normal: bytes, max_size: int) -> Attack:
    """Bytes a broken or hostile gearmand might send instead of (or around) `normal`."""
    if kind == "bad_magic":
        return Attack(kind, corpus.magic_field(rng, normal or wire.res("NOOP")))
    if kind == "unknown_type":
        return Attack(kind, corpus.type_field(random.Random(rng.random()), wire.res("NOOP")) if rng.random() < 0.3
                      else wire.HEADER.pack(wire.RES, rng.choice((0, 5, 43, 99, 0x80000000, 0xFFFFFFFF)), 0))
    if kind == "huge_size":
        return Attack(kind, corpus.lying_header(rng, wire.RES, max_size), rng.choice((None, "close", "reset")))
    if kind == "at_max":
        return Attack(kind, corpus.exact_size_packet(rng, wire.RES, max_size, rng.choice((0, -1, 1))))
    if kind == "assign_over_max":
        size = max_size + rng.choice((1, 7, 5000))
        head = b"H:fake:big%d\0fzb0\0u\0" % rng.randint(0, 999)
        number = rng.choice((wire.T["JOB_ASSIGN_UNIQ"], wire.T["JOB_ASSIGN_ALL"], wire.T["JOB_ASSIGN"]))
        if number == wire.T["JOB_ASSIGN"]:
            head = head.replace(b"\0u\0", b"\0")
        elif number == wire.T["JOB_ASSIGN_ALL"]:
            head += b"\0"
        body = head + b"b" * (size - len(head))
        if rng.random() < 0.2:
            body = body[: rng.randint(0, 2000)]  # the sender gives up in the middle
            return Attack(kind, wire.HEADER.pack(wire.RES, number, size) + body, rng.choice(("close", "reset")))
        return Attack(kind, wire.HEADER.pack(wire.RES, number, size) + body)
    if kind == "wrong_args":
        number = rng.choice((wire.T["JOB_ASSIGN"], wire.T["JOB_ASSIGN_UNIQ"], wire.T["JOB_ASSIGN_ALL"],
                             wire.T["ERROR"], wire.T["STATUS_RES"], wire.T["NOOP"], wire.T["JOB_CREATED"]))
        nuls = rng.randint(0, max(0, wire.FIELDS.get(number, 0) - 1))
        body = b"\0".join(b"a%d" % i for i in range(nuls + 1)) if number != wire.T["NOOP"] else b"junk"
        return Attack(kind, wire.packet(wire.RES, number, body))
    if kind == "assign_unasked":
        return Attack(kind, corpus.reply(rng, rng.choice(sorted(wire.ASSIGNS)), max_size) + normal)
    if kind == "unsolicited":
        extra = b"".join(corpus.reply(rng, rng.choice(wire.RESPONSE_TYPES), max_size) for _ in range(rng.randint(1, 4)))
        return Attack(kind, extra + normal if rng.random() < 0.5 else normal + extra)
    if kind == "gpr_unique":
        return Attack(kind, wire.res("JOB_ASSIGN_UNIQ", b"H:fake:g%d" % rng.randint(0, 999), b"fzb0",
                                     corpus.gpr_unique(rng), b"data"))
    if kind == "long_function":
        name = long_function_name(rng.randrange(4), max_size)
        return Attack(kind, wire.res("JOB_ASSIGN_UNIQ", b"H:fake:l%d" % rng.randint(0, 999), name, b"u", b"d"))
    if kind == "bitflip":
        return Attack(kind, corpus.flip_bits(rng, normal or wire.res("NOOP"), rng.randint(1, 4)))
    if kind == "size_off":
        return Attack(kind, corpus.size_field(rng, normal or wire.res("NO_JOB"), max_size))
    if kind == "text":
        line = rng.choice((b"OK\n", b"ERR bogus\r\n", b".\n", b"t" * rng.choice((10, max_size - 1, max_size, max_size + 1, 2 * max_size)) + b"\n",
                           b"unterminated"))
        return Attack(kind, line, "close" if not line.endswith(b"\n") and rng.random() < 0.5 else None)
    if kind == "close_mid_packet":
        data = normal or wire.res("JOB_ASSIGN_UNIQ", b"H:fake:c", b"fzb0", b"u", b"payload")
        return Attack(kind, data[: rng.randint(1, max(1, len(data) - 1))], "close")
    if kind == "reset_mid_packet":
        data = normal or wire.res("NO_JOB")
        return Attack(kind, data[: rng.randint(0, max(0, len(data) - 1))], "reset")
    if kind == "garbage":
        return Attack(kind, corpus.random_bytes(rng), rng.choice((None, "close")))
    raise ValueError(kind)


SUBMISSION_ATTACKS = ("reset_before_created", "close_before_created", "malformed_after_created", "accept_and_drop")
"""Retry attacks played at a submission (the others at the 2nd or 3rd answer): the
connection lost with a retry in flight, before gearmand acknowledged it or just after."""
RETRY_ATTACKS: dict[str, int] = {
    "result_over_max": 1, "update_over_max": 1, "bad_magic": 1, "unknown_type": 1, "huge_size": 1, "wrong_args": 1,
    "close_mid_packet": 1, "reset_mid_packet": 1, "garbage": 1, "text": 1, "bitflip": 1,
    "reset_before_created": 4, "close_before_created": 4, "malformed_after_created": 4, "accept_and_drop": 2,
}  # fmt: skip
"""What the fake may do on gproxy's retry connection instead of running the retry, and how
often (weights). reset_before_created / close_before_created: the SUBMIT_JOB read, then
RST / FIN without an answer. malformed_after_created: JOB_CREATED and, in the same write, a
WORK_EXCEPTION for it without its NUL separator, or an ERROR without its NUL.
accept_and_drop: RST, and every new retry connection reset as soon as it is classified for
STORM_MIN-STORM_MAX seconds (a gearmand, or a load balancer, that accepts and drops)."""


def retry_attack(rng: random.Random, kind: str, normal: bytes, max_size: int) -> Attack:
    """An attack on the retry connection; `normal` is JOB_CREATED (+ WORK_COMPLETE)."""
    created = wire.RefFramer(wire.RES).feed(normal)
    handle = (created[0].args() or [b"H:fake:x"])[0] if created else b"H:fake:x"
    if kind in ("reset_before_created", "accept_and_drop"):
        return Attack(kind, b"", "reset")
    if kind == "close_before_created":
        return Attack(kind, b"", "close")
    if kind == "malformed_after_created":
        bad = wire.res("WORK_EXCEPTION", handle) if rng.random() < 0.5 else wire.res("ERROR", b"ERR_NO_NUL")
        return Attack(kind, wire.res("JOB_CREATED", handle) + bad)
    if kind in ("result_over_max", "update_over_max"):
        size = max_size + rng.choice((1, 100, 5000))
        ptype = "WORK_COMPLETE" if kind == "result_over_max" else rng.choice(("WORK_DATA", "WORK_WARNING"))
        big = wire.res(ptype, handle, b"r" * (size - len(handle) - 1))
        tail = b"" if kind == "result_over_max" else wire.res("WORK_COMPLETE", handle, b"after the big update")
        return Attack(kind, wire.res("JOB_CREATED", handle) + big + tail)
    return attack(rng, kind, normal, max_size)


def long_function_name(k: int, max_size: int) -> bytes:
    """One of the four long function names the fake assigns jobs under (a few names only:
    gproxy keeps some state per function, and a run measures its memory)."""
    return b"fzb_long_%d_" % k + b"F" * (100, 1000, 20000, max_size - 200)[k]


def names_episode(k: int, max_size: int) -> Script:
    """A job under the k-th long function name, run through route B: the warm-up makes every
    name the run will use, so that gproxy's baseline has what it keeps per function."""
    cid = f"{EPISODE_PREFIX}-names-{k}"
    name = long_function_name(k, max_size).decode("latin-1")
    return Script([
        {"op": "connect", "actor": "w", "to": "B"},
        {"op": "send", "actor": "w", "data": [pkt("REQ", "SET_CLIENT_ID", cid), pkt("REQ", "GRAB_JOB_UNIQ")]},
        {"op": "accept", "actor": "g", "client_id": cid, "timeout": 5},
        {"op": "expect", "actor": "g", "types": ["GRAB_JOB_UNIQ"], "timeout": 5},
        {"op": "send", "actor": "g", "data": [pkt("RES", "JOB_ASSIGN_UNIQ", f"H:fake:n{k}", name, "u", "d")]},
        {"op": "expect", "actor": "w", "types": ["JOB_ASSIGN_UNIQ"], "timeout": 5},
        {"op": "send", "actor": "w", "data": [pkt("REQ", "WORK_COMPLETE", f"H:fake:n{k}", "done")]},
        {"op": "expect", "actor": "g", "types": ["WORK_COMPLETE"], "timeout": 5},
    ], side="gearmand", kind="names")  # fmt: skip


# -- the server


@dataclass
class Transcript:
    """One reactive connection, as the fake saw it."""

    kind: str
    """pyworker, retry or other."""
    gproxy_port: int
    events: list[tuple[str, bytes]] = field(default_factory=list)
    """("recv", frame) / ("send", bytes) / ("close", b"") / ("reset", b"") in order."""
    attack: str | None = None
    downstream_port: int | None = None
    downstream_ports: list[int] = field(default_factory=list)
    """Every port the real worker had to route B then: its connection is one of them."""
    opened: float = field(default_factory=time.monotonic)
    opened_wall: float = field(default_factory=time.time)
    closed: float | None = None
    eof: bool = False

    def sent(self) -> bytes:
        return b"".join(data for what, data in self.events if what == "send")

    def received(self) -> list[bytes]:
        return [data for what, data in self.events if what == "recv"]

    def to_script(self, max_size: int) -> Script:
        """Both sides of this connection as a script: a worker actor sends what gproxy
        forwarded from the real worker, the fake's actor sends what the fake sent."""
        cid = f"{EPISODE_PREFIX}-replay"
        steps: list[dict[str, Any]] = [
            {"op": "connect", "actor": "w", "to": "B"},
            {"op": "send", "actor": "w", "data": [pkt("REQ", "SET_CLIENT_ID", cid)]},
            {"op": "accept", "actor": "g", "client_id": cid, "timeout": 5},
        ]
        for what, data in self.events:
            if what == "recv":
                number = int.from_bytes(data[4:8], "big") if data[:1] == b"\0" and len(data) >= 8 else -1
                frame = wire.Frame(number, data)
                if frame.name == "SET_CLIENT_ID":
                    continue
                steps.append({"op": "send", "actor": "w", "data": pieces_of(data)})
                steps.append({"op": "expect", "actor": "g", "types": [frame.name], "timeout": 2})
            elif what == "send":
                steps.append({"op": "send", "actor": "g", "data": pieces_of(data)})
                steps.append({"op": "sleep", "seconds": 0.05})
            elif what in ("close", "reset"):
                steps.append({"op": "close" if what == "close" else "reset", "actor": "g"})
        steps.append({"op": "eof", "actor": "w", "timeout": 3})
        return Script(steps, side="gearmand", kind=self.attack or "clean", config={"max_packet_size": max_size})


class FakeGearmand:
    def __init__(
        self, seed: int, max_size: int, *, attack_rate: float = 0.8, retry_attack_rate: float = RETRY_ATTACK_RATE,
        retry_attacks: tuple[str, ...] = (),
    ) -> None:
        self.seed = seed
        self.max_size = max_size
        self.attack_rate = attack_rate
        self.retry_attack_rate = retry_attack_rate
        self.retry_attacks = {k: RETRY_ATTACKS[k] for k in retry_attacks} or RETRY_ATTACKS
        """The retry attacks to choose from, with their weights (default: all)."""
        self.retry_connections: list[RetryConnection] = []
        """Every retry connection gproxy opened to the fake, in order."""
        self.jobs = Jobs()
        self.storms = 0
        self._drop_retry_until = -math.inf
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.retry_scripted = False
        """True while a replay script claims the retry connection itself."""
        self.transcripts: list[Transcript] = []
        self.stats: Counter[str] = Counter()
        self.attacks: Counter[str] = Counter()
        self.bytes_sent = 0
        self.locate_downstream: Any = None
        """Callable returning the real worker's local ports to route B now (set by the runner)."""
        self._pending: dict[str, list[tuple[trio.socket.SocketType, bytes]]] = defaultdict(list)
        self._retry_pending: list[tuple[trio.socket.SocketType, bytes, RetryConnection]] = []
        self._arrived = trio.Event()
        self._counter = 0
        self._socks: set[trio.socket.SocketType] = set()
        self._retry_serial = 0

    @property
    def open_retry_connections(self) -> int:
        """gproxy's retry connections to the fake that are open now."""
        return sum(1 for t in self.transcripts if t.kind == "retry" and t.closed is None)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self.address = listener.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            with listener:
                while True:
                    sock, _ = await listener.accept()
                    accepted = time.time()
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._socks.add(sock)
                    nursery.start_soon(self._classify, sock, accepted)

    async def _classify(self, sock: trio.socket.SocketType, accepted: float) -> None:
        framer = wire.RefFramer(wire.REQ)
        first = b""
        frames: list[wire.Frame] = []
        with trio.move_on_after(CLAIM_TIMEOUT):
            while not frames and not framer.broken:
                try:
                    data = await sock.recv(65536)
                except (OSError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    break
                first += data
                frames = framer.feed(data)
        if not frames:
            self.stats["silent"] += 1
            self._drop(sock)
            return
        head = frames[0]
        if head.name == "SET_CLIENT_ID" and head.body.startswith(EPISODE_PREFIX.encode()):
            self.stats["episode"] += 1
            self._pending[head.body.decode("latin-1")].append((sock, first))
            self._wake()
            return
        if head.name == "OPTION_REQ" and head.body == b"exceptions":
            self.stats["retry"] += 1
            record = RetryConnection(accepted)
            self.retry_connections.append(record)
            if not self.retry_scripted or trio.current_time() < self._drop_retry_until:
                record.saw(frames)  # (a script's actor notes what it claims itself)
            if trio.current_time() < self._drop_retry_until:
                self.stats["retry_dropped"] += 1
                record.how = "dropped"
                with trio.move_on_after(DROP_READ):  # what gproxy wrote at once (a submission, seen)
                    while not framer.broken and not any(f.name.startswith("SUBMIT_JOB") for f in frames):
                        try:
                            data = await sock.recv(65536)
                        except OSError:
                            break
                        if not data:
                            break
                        frames = framer.feed(data)
                        record.saw(frames)
                record.end()
                linger_reset(sock)
                self._drop(sock)
                return
            if self.retry_scripted:
                record.how = "scripted"
                self._retry_pending.append((sock, first, record))
                self._wake()
                return
            await self._reactive(sock, framer, frames, "retry", self.retry_attack_rate, record)
            return
        kind = "pyworker" if head.name == "SET_CLIENT_ID" and head.body.startswith(PYWORKER_ID.encode()) else "other"
        self.stats[kind] += 1
        await self._reactive(sock, framer, frames, kind, self.attack_rate)

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = trio.Event()

    def _drop(self, sock: trio.socket.SocketType) -> None:
        self._socks.discard(sock)
        sock.close()

    async def claim(self, client_id: str) -> tuple[trio.socket.SocketType, bytes]:
        """The next upstream connection gproxy opened for the worker that sent `client_id`."""
        while not self._pending.get(client_id):
            await self._arrived.wait()
        sock, first = self._pending[client_id].pop(0)
        self._socks.discard(sock)
        return sock, first

    async def claim_retry(self) -> tuple[trio.socket.SocketType, bytes, RetryConnection]:
        while not self._retry_pending:
            await self._arrived.wait()
        sock, first, record = self._retry_pending.pop(0)
        self._socks.discard(sock)
        return sock, first, record

    def drop_retry(self, seconds: float) -> None:
        """Every new retry connection is reset as soon as it is classified, for `seconds`."""
        self._drop_retry_until = trio.current_time() + seconds

    def release(self, client_ids: list[str]) -> None:
        """A script is over: connections for it that it never claimed are closed."""
        for client_id in client_ids:
            for sock, _ in self._pending.pop(client_id, []):
                self._drop(sock)

    def close_all(self) -> None:
        """Every connection the fake still serves is closed (the end of a fuzz run)."""
        for sock in list(self._socks):
            self._drop(sock)
        for entries in self._pending.values():
            for sock, _ in entries:
                sock.close()
        self._pending.clear()
        for sock, _, record in self._retry_pending:
            record.end()
            sock.close()
        self._retry_pending.clear()

    # -- the small gearmand model, with one attack

    async def _reactive(
        self, sock: trio.socket.SocketType, framer: wire.RefFramer, frames: list[wire.Frame], kind: str, rate: float,
        record: RetryConnection | None = None,
    ) -> None:
        self._counter += 1
        rng = random.Random(f"{self.seed}:{kind}:{self._counter}")
        transcript = Transcript(kind, sock.getpeername()[1])
        if kind == "pyworker" and self.locate_downstream is not None:
            # The real worker's connections to route B now; one an earlier transcript still
            # open has is that one's (the worker may not have closed it yet).
            taken = {t.downstream_port for t in self.transcripts if t.kind == "pyworker" and t.closed is None}
            ports = self.locate_downstream()
            fresh = [port for port in ports if port not in taken]
            transcript.downstream_port = fresh[0] if len(fresh) == 1 else None
            transcript.downstream_ports = ports
        self.transcripts.append(transcript)
        planned = None
        if rng.random() < rate:
            if kind == "retry":
                planned = rng.choices(list(self.retry_attacks), list(self.retry_attacks.values()))[0]
            else:
                planned = rng.choice(ATTACKS)
        # The fake ends each connection after a while (gproxy and the real worker connect
        # again), so that a long run keeps making new connections, each with its attack.
        lifetime = rng.uniform(2.0, 8.0) if kind == "retry" else rng.uniform(0.5, 3.0)
        attack_at = rng.randint(2, 3) if kind == "retry" else rng.randint(1, 10)
        replies = 0
        done = fin = False
        ends = trio.current_time() + lifetime
        try:
            while not done:
                if not fin and trio.current_time() >= ends:
                    transcript.events.append(("close", b""))
                    if record is not None:
                        record.end()
                    sock.shutdown(socket.SHUT_WR)
                    fin = True
                for frame in frames:
                    if fin:
                        transcript.events.append(("recv", frame.raw))
                        continue
                    transcript.events.append(("recv", frame.raw))
                    reply, delay = self._answer(rng, frame, kind)
                    if reply is None:
                        continue
                    replies += 1
                    then = None
                    at_submission = planned in SUBMISSION_ATTACKS
                    if planned and not transcript.attack and (
                        frame.name.startswith("SUBMIT_JOB") if at_submission else replies == attack_at
                    ):
                        chosen = (retry_attack if kind == "retry" else attack)(rng, planned, reply, self.max_size)
                        transcript.attack = planned
                        self.attacks[f"{kind}:{planned}"] += 1
                        reply, then = chosen.data, chosen.then
                        if record is not None:
                            record.attack = planned
                        if planned == "accept_and_drop":
                            self.storms += 1
                            self._drop_retry_until = trio.current_time() + rng.uniform(STORM_MIN, STORM_MAX)
                    if delay:
                        await trio.sleep(delay)
                    if reply:
                        await self._send(sock, reply, transcript)
                    if then is not None:
                        if then == "reset":  # what arrived meanwhile, which the RST would discard unread
                            for late in self._unread(sock, framer):
                                transcript.events.append(("recv", late.raw))
                                if record is not None:
                                    record.saw([late])
                        transcript.events.append((then, b""))
                        if record is not None:
                            record.end()
                        if then == "reset":
                            linger_reset(sock)
                            self._drop(sock)
                            done = True
                            break
                        sock.shutdown(socket.SHUT_WR)
                        fin = True
                if done:
                    break
                with trio.move_on_at(ends if not fin else ends + 10) as waited:
                    data = await sock.recv(65536)
                if waited.cancelled_caught:
                    if fin:
                        break  # gproxy did not close its side within 10 s of ours
                    frames = []
                    continue
                if not data:
                    transcript.eof = True
                    break
                frames = framer.feed(data)
                if record is not None:
                    record.saw(frames)
                if framer.broken:
                    self.stats["unframeable_from_gproxy"] += 1
                    transcript.events.append(("recv", bytes(framer.buf[:64])))
                    break
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            transcript.closed = time.monotonic()
            if record is not None:
                record.end()
            self._drop(sock)

    @staticmethod
    def _unread(sock: trio.socket.SocketType, framer: wire.RefFramer) -> list[wire.Frame]:
        """The frames waiting in the socket's receive buffer now (without waiting for more)."""
        frames: list[wire.Frame] = []
        while not framer.broken:
            try:
                data = os.read(sock.fileno(), 65536)  # (the socket is non-blocking; trio's recv would wait)
            except OSError:
                break
            if not data:
                break
            frames += framer.feed(data)
        return frames

    async def _send(self, sock: trio.socket.SocketType, data: bytes, transcript: Transcript) -> None:
        view = memoryview(data)
        while view:
            view = view[await sock.send(view) :]
        transcript.events.append(("send", data))
        self.bytes_sent += len(data)
        self.jobs.note_sent(data)

    def _answer(self, rng: random.Random, frame: wire.Frame, kind: str) -> tuple[bytes | None, float]:
        """gearmand's answer to `frame` (None: it answers nothing) and a delay before it."""
        n = frame.name
        args = frame.args() or []
        if n == "ECHO_REQ":
            return wire.res("ECHO_RES", frame.body), 0
        if n == "OPTION_REQ":
            if frame.body.lower() == b"exceptions":
                return wire.res("OPTION_RES", frame.body), 0
            return wire.res("ERROR", b"UNKNOWN_OPTION", b"Server does not recognize given option"), 0
        if n == "PRE_SLEEP":
            return wire.res("NOOP"), rng.uniform(0.01, 0.05)
        if n in ("GRAB_JOB", "GRAB_JOB_UNIQ", "GRAB_JOB_ALL"):
            if rng.random() < 0.3:
                return wire.res("NO_JOB"), 0
            function = rng.choice(PYWORKER_JOBS) if kind == "pyworker" else b"fzb0"
            self._retry_serial += 1
            handle = b"H:fake:%d" % self._retry_serial
            unique = b"fz-%d-%d" % (self.seed, self._retry_serial)
            data = b"1:%d" % self._retry_serial if function == b"flaky" else rng.randbytes(rng.randint(0, 40))
            if n == "GRAB_JOB":
                return wire.res("JOB_ASSIGN", handle, function, data), 0
            return wire.res("JOB_ASSIGN_UNIQ", handle, function, unique, data), 0
        if n.startswith("SUBMIT_JOB") and args:
            self._retry_serial += 1
            handle = b"H:fake:r%d" % self._retry_serial
            created = wire.res("JOB_CREATED", handle)
            if kind != "retry":
                return created, 0
            slow = args[0] == b"fzb_slow"
            return created + wire.res("WORK_COMPLETE", handle, b"retried by the fake"), SLOW_RETRY if slow else 0
        if n == "GET_STATUS":
            return wire.res("STATUS_RES", frame.body, b"0", b"0", b"0", b"0"), 0
        if n == "GET_STATUS_UNIQUE":
            return wire.res("STATUS_RES_UNIQUE", frame.body, b"0", b"0", b"0", b"0", b"0"), 0
        if n == "TEXT":
            return b".\n" if frame.raw.strip() in (b"status", b"workers") else b"OK\n", 0
        return None, 0


# -- scripted episodes: both sides of one route-B conversation


def episode(rng: random.Random, ident: str, max_size: int, *, attacks: int | None = None) -> Script:
    """One worker connection through route B and gproxy's upstream connection for it, as a
    script: a healthy worker (actor w) and the fake (actor g), with 0-2 of the fake's
    answers replaced by an attack."""
    cid = f"{EPISODE_PREFIX}{ident}"
    steps: list[dict[str, Any]] = [
        {"op": "connect", "actor": "w", "to": "B"},
        {"op": "send", "actor": "w", "data": [pkt("REQ", "SET_CLIENT_ID", cid), pkt("REQ", "CAN_DO", "fzb0"),
                                               pkt("REQ", "CAN_DO", "fzb_retry"), pkt("REQ", "CAN_DO", "fzb_slow")]},
        {"op": "accept", "actor": "g", "client_id": cid, "timeout": 5},
        {"op": "expect", "actor": "g", "types": ["CAN_DO"], "timeout": 2},
    ]
    rounds = rng.randint(1, 6)
    hits = attacks if attacks is not None else rng.choice((0, 1, 1, 1, 2))
    attacked_rounds = set(rng.sample(range(rounds), min(hits, rounds)))
    kinds: list[str] = []
    g = "g"
    for r in range(rounds):
        serial = r + 1
        exchange = rng.choice(("grab", "grab", "grab", "echo", "sleep", "option", "retry", "retry_move", "status"))
        w_send: list[bytes] = []
        g_reply: bytes = b""
        expect_w: list[str] = []
        expect_g = ""
        handle = f"H:fake:{cid}:{serial}".encode()
        after: list[dict[str, Any]] = []
        if exchange in ("grab", "retry", "retry_move"):
            grab = rng.choice(("GRAB_JOB_UNIQ", "GRAB_JOB", "GRAB_JOB_ALL"))
            function = {"grab": b"fzb0", "retry": b"fzb_retry", "retry_move": b"fzb_slow"}[exchange]
            w_send = [wire.req(grab)]
            expect_g = "GRAB_JOB_UNIQ" if grab == "GRAB_JOB" else grab
            unique = b"u-%s-%d" % (cid.encode(), serial)
            data = rng.randbytes(rng.randint(0, 64))
            if rng.random() < 0.1:
                data = b"d" * (max_size - 100 - len(handle) - len(unique))
            g_reply = wire.res("JOB_ASSIGN_UNIQ", handle, function, unique, data)
            if grab == "GRAB_JOB_ALL" and rng.random() < 0.3:
                g_reply = wire.res("JOB_ASSIGN_ALL", handle, function, unique, b"", data)
            expect_w = ["JOB_ASSIGN", "JOB_ASSIGN_UNIQ", "JOB_ASSIGN_ALL", "NO_JOB"]
            if exchange == "grab":
                work = [wire.req("WORK_DATA", handle, b"part"), wire.req("WORK_STATUS", handle, b"1", b"2"),
                        wire.req("WORK_COMPLETE", handle, b"done")]
                after = [{"op": "send", "actor": "w", "data": pieces_of(b"".join(work[rng.randint(0, 2):]))},
                         {"op": "expect", "actor": g, "types": ["WORK_COMPLETE"], "timeout": 2}]
            else:
                fail = wire.req("WORK_EXCEPTION", handle, b"RETRY: fuzz") + wire.req("WORK_FAIL", handle)
                if exchange == "retry_move":
                    fail += wire.req("CANT_DO", b"fzb_slow")
                after = [{"op": "send", "actor": "w", "data": pieces_of(fail)}]
                if exchange == "retry_move":
                    after += [{"op": "accept", "actor": f"g{serial}", "client_id": cid, "timeout": 2},
                              {"op": "expect", "actor": f"g{serial}", "types": ["CAN_DO"], "timeout": 2}]
                after += [{"op": "expect", "actor": g, "types": ["WORK_COMPLETE", "WORK_EXCEPTION", "WORK_FAIL"],
                           "timeout": RETRY_OUTCOME_WAIT}]
        elif exchange == "echo":
            payload = rng.randbytes(rng.randint(0, 100))
            w_send, expect_g = [wire.req("ECHO_REQ", payload)], "ECHO_REQ"
            g_reply, expect_w = wire.res("ECHO_RES", payload), ["ECHO_RES"]
        elif exchange == "sleep":
            w_send, expect_g = [wire.req("PRE_SLEEP")], "PRE_SLEEP"
            g_reply, expect_w = wire.res("NOOP"), ["NOOP"]
        elif exchange == "option":
            w_send, expect_g = [wire.req("OPTION_REQ", b"exceptions")], "OPTION_REQ"
            g_reply, expect_w = wire.res("OPTION_RES", b"exceptions"), ["OPTION_RES"]
        else:
            w_send, expect_g = [wire.req("GET_STATUS", handle)], "GET_STATUS"
            g_reply, expect_w = wire.res("STATUS_RES", handle, b"0", b"0", b"0", b"0"), ["STATUS_RES"]
        steps.append({"op": "send", "actor": "w", "data": pieces_of(b"".join(w_send))})
        steps.append({"op": "expect", "actor": g, "types": [expect_g], "timeout": 2})
        then = None
        if r in attacked_rounds:
            kind = rng.choice(ATTACKS)
            chosen = attack(rng, kind, g_reply, max_size)
            kinds.append(kind)
            g_reply, then = chosen.data, chosen.then
        if g_reply:
            chunk = rng.choice((0, 0, 0, 1, 7)) if len(g_reply) < 4096 else 0
            send: dict[str, Any] = {"op": "send", "actor": g, "data": pieces_of(g_reply)}
            if chunk:
                send.update(chunk=chunk, delay=0.002)
            steps.append(send)
        if then is not None:
            steps.append({"op": "close" if then == "close" else "reset", "actor": g})
            break
        steps.append({"op": "expect", "actor": "w", "types": expect_w, "timeout": 2})
        steps += after
        if exchange == "retry_move":
            g = f"g{serial}"
    ending = rng.choice(("fake_closes", "worker_closes", "worker_closes"))
    if ending == "fake_closes":
        steps += [{"op": "half_close", "actor": g}, {"op": "eof", "actor": "w", "timeout": 3}]
    else:
        steps += [{"op": "half_close", "actor": "w"}, {"op": "eof", "actor": g, "timeout": 3}]
    return Script(steps, side="gearmand", kind="+".join(kinds) or "clean", config={"max_packet_size": max_size})
