"""The worker side of the fuzz: connections to gproxy's route A (the real gearmand) that
send what no Gearman library would, each written as a script (script.py) so that it can
be saved and replayed as it was.

`KINDS` lists every attack with its weight in a run; `attack_script(kind, rng, ...)` writes
one connection's script. A few kinds need a second actor: a client straight to gearmand
that submits the job the worker then grabs through gproxy (a job gproxy never saw
submitted), or a client that waits for the job's outcome.

`RetryHelper` is a healthy worker straight to gearmand for `fza_retry`: it completes the
retry jobs gproxy submits for the worker-side retry flows, so that every hold resolves.
"""

from __future__ import annotations

import random
import socket
from typing import Any

import trio

from tests.fuzz import corpus, wire
from tests.fuzz.script import Script, pieces_of, pkt

KINDS: dict[str, int] = {
    "valid": 6,
    "mutated": 14,
    "bitflip": 6,
    "size_off": 8,
    "truncate": 6,
    "random": 5,
    "admin": 8,
    "oversize": 6,
    "slow": 5,
    "half_close": 5,
    "reset": 3,
    "reset_at_once": 2,
    "no_read": 2,
    "work_unassigned": 5,
    "grab_flood": 3,
    "big_assign": 2,
    "retry_flow": 4,
    "long_function": 1,
    "after_close": 3,
    "slow_admin": 1,
}
"""Attack kinds and their weights."""
RETRY_FUNCTION = "fza_retry"


def _send(actor: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"op": "send", "actor": actor, "data": pieces_of(corpus.sanitize(data)), **extra}


def _ending(rng: random.Random, steps: list[dict[str, Any]], actor: str = "w") -> None:
    """Leave as most peers do: FIN and read what is left; now and then a reset instead."""
    roll = rng.random()
    if roll < 0.8:
        steps += [{"op": "half_close", "actor": actor}, {"op": "eof", "actor": actor, "timeout": 3}]
    elif roll < 0.9:
        steps += [{"op": "sleep", "seconds": rng.uniform(0, 0.2)}, {"op": "close", "actor": actor}]
    else:
        steps += [{"op": "sleep", "seconds": rng.uniform(0, 0.2)}, {"op": "reset", "actor": actor}]


def attack_script(kind: str, rng: random.Random, ident: str, max_size: int, variant: int | None = None) -> Script:
    """One connection's script (`variant` picks the function name of big_assign and
    long_function, which otherwise the rng does)."""
    steps: list[dict[str, Any]] = [{"op": "connect", "actor": "w", "to": "A"}]
    notes = ""
    if kind == "valid":
        steps.append(_send("w", b"".join(corpus.sequence(rng, max_size))))
        _ending(rng, steps)
    elif kind == "mutated":
        data, applied = corpus.mutate_frames(rng, corpus.sequence(rng, max_size), max_size, rng.randint(1, 3))
        notes = " ".join(applied)
        steps.append(_send("w", data))
        _ending(rng, steps)
    elif kind == "bitflip":
        data = b"".join(corpus.sequence(rng, max_size))
        steps.append(_send("w", corpus.flip_bits(rng, data, rng.randint(1, 8))))
        _ending(rng, steps)
    elif kind == "size_off":
        frames = corpus.sequence(rng, max_size)
        binary = [i for i, f in enumerate(frames) if f[:1] == b"\0"] or [0]
        i = rng.choice(binary)
        frames[i] = corpus.size_field(rng, frames[i], max_size)
        steps.append(_send("w", b"".join(frames)))
        _ending(rng, steps)
    elif kind == "truncate":
        steps.append(_send("w", corpus.truncate(rng, b"".join(corpus.sequence(rng, max_size)))))
        _ending(rng, steps)
    elif kind == "random":
        steps.append(_send("w", corpus.random_bytes(rng)))
        _ending(rng, steps)
    elif kind == "admin":
        lines = [corpus.admin_line(rng, max_size) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.3:
            lines[-1] = lines[-1].rstrip(b"\r\n")  # unterminated
        if rng.random() < 0.3:
            lines.insert(rng.randint(0, len(lines)), corpus.request(rng, wire.T["ECHO_REQ"], max_size))
        steps.append(_send("w", b"".join(lines)))
        _ending(rng, steps)
    elif kind == "oversize":
        pieces = [corpus.exact_size_packet(rng, wire.REQ, max_size, rng.choice((-1, 0, 0, 1)))]
        if rng.random() < 0.4:
            pieces.append(corpus.lying_header(rng, wire.REQ, max_size))
        steps.append(_send("w", b"".join(pieces)))
        _ending(rng, steps)
    elif kind == "slow":
        if rng.random() < 0.5:
            data = b"".join(corpus.sequence(rng, 1024, rng.randint(1, 4)))
        else:
            data, _ = corpus.mutate_frames(rng, corpus.sequence(rng, 1024, 3), max_size, 1)
        data = data[:3000]
        chunk = rng.choice((1, 2, 5, 13))
        steps.append(_send("w", data, chunk=chunk, delay=min(0.01, 1.5 * chunk / max(1, len(data)))))
        _ending(rng, steps)
    elif kind == "half_close":
        data = b"".join(corpus.sequence(rng, max_size))
        steps.append(_send("w", data[: rng.randint(0, len(data))]))
        steps += [{"op": "half_close", "actor": "w"}, {"op": "eof", "actor": "w", "timeout": 3}]
    elif kind == "reset":
        steps.append(_send("w", b"".join(corpus.sequence(rng, max_size, rng.randint(1, 3)))))
        steps += [{"op": "sleep", "seconds": rng.choice((0, 0.001, 0.05))}, {"op": "reset", "actor": "w"}]
    elif kind == "reset_at_once":
        steps.append({"op": "reset", "actor": "w"})
    elif kind == "no_read":
        steps[0]["read"] = False
        grabs = wire.req("GRAB_JOB_UNIQ") * rng.randint(5000, 40000)
        steps.append(_send("w", wire.req("CAN_DO", rng.choice(corpus.FUNCTIONS)) + grabs))
        steps += [{"op": "sleep", "seconds": rng.uniform(0.1, 0.5)}, {"op": "close", "actor": "w"}]
    elif kind == "work_unassigned":
        frames = []
        for _ in range(rng.randint(1, 20)):
            ptype = rng.choice(("WORK_COMPLETE", "WORK_FAIL", "WORK_EXCEPTION", "WORK_DATA", "WORK_WARNING", "WORK_STATUS"))
            frames.append(corpus.request(rng, wire.T[ptype], max_size))
        steps.append(_send("w", b"".join(frames)))
        steps.append({"op": "expect", "actor": "w", "types": ["ERROR"], "timeout": 2})
        _ending(rng, steps)
    elif kind == "grab_flood":
        count = rng.randint(500, 5000)
        grab = rng.choice(("GRAB_JOB", "GRAB_JOB_UNIQ", "GRAB_JOB_ALL"))
        steps.append(_send("w", wire.req("CAN_DO", rng.choice(corpus.FUNCTIONS)) + wire.req(grab) * count))
        steps.append({"op": "send", "actor": "w", "data": [pkt("REQ", "ECHO_REQ", "flood-done")]})
        steps.append({"op": "expect", "actor": "w", "types": ["ECHO_RES"], "timeout": 10,
                      "require": "a worker that floods gearmand with grabs gets every answer"})
        _ending(rng, steps)
    elif kind == "big_assign":
        steps, notes = _big_assign(rng, max_size, variant)
    elif kind == "retry_flow":
        steps, notes = _retry_flow(rng, ident, max_size)
    elif kind == "long_function":
        steps, notes = _long_function(rng, variant)
    elif kind == "after_close":
        six = b"a b c d e f\n"  # gearmand closes a connection on a sixth token
        steps += [_send("w", six), {"op": "eof", "actor": "w", "timeout": 3}]
        steps.append(_send("w", rng.choice((corpus.random_bytes(rng), b"\0REX" + bytes(8), corpus.lying_header(rng, wire.REQ, max_size)))))
        _ending(rng, steps)
    elif kind == "slow_admin":
        size = rng.randint(max_size // 4, max_size)
        chunk = rng.choice((512, 1024, 4096))
        steps.append({"op": "send", "actor": "w", "data": [{"fill": "a", "n": size}], "chunk": chunk, "delay": 0.001})
        if rng.random() < 0.5:
            steps.append({"op": "send", "actor": "w", "data": [{"bin": "\n"}]})
        _ending(rng, steps)
    else:
        raise ValueError(kind)
    return Script(steps, side="worker", kind=kind, notes=notes, config={"max_packet_size": max_size})


def _big_assign(rng: random.Random, max_size: int, variant: int | None) -> tuple[list[dict[str, Any]], str]:
    """A job whose JOB_ASSIGN is at or just over max_packet_size, submitted straight to
    gearmand (or through gproxy, which accepts a SUBMIT_JOB up to the limit), then grabbed
    through gproxy. The worker must get an answer to its grab and keep its connection.
    Scripts of this kind share four function names, so one may grab another's job: the
    invariant holds for any job."""
    k = rng.randrange(4)
    function = f"fzbig{k if variant is None else variant}"  # a few names: gproxy keeps state per function
    via = rng.choice(("gearmand", "A"))
    grab = rng.choice(("GRAB_JOB_UNIQ", "GRAB_JOB", "GRAB_JOB_ALL"))
    size = max_size - len(function) - 2 + rng.choice((-20, 0, 0, 5))  # the SUBMIT_JOB's own payload
    data = [{"hdr": ["REQ", "SUBMIT_JOB_BG", size]}, {"bin": function + "\0\0"}, {"fill": "j", "n": size - len(function) - 2}]
    steps: list[dict[str, Any]] = [
        {"op": "connect", "actor": "c", "to": via},
        {"op": "send", "actor": "c", "data": data},
        {"op": "expect", "actor": "c", "types": ["JOB_CREATED"], "timeout": 5},
        {"op": "connect", "actor": "w", "to": "A"},
        {"op": "send", "actor": "w", "data": [pkt("REQ", "CAN_DO", function), pkt("REQ", grab)]},
        {"op": "expect", "actor": "w", "types": ["JOB_ASSIGN", "JOB_ASSIGN_UNIQ", "JOB_ASSIGN_ALL", "NO_JOB"], "timeout": 5,
         "require": "a worker that grabs a job gearmand holds gets an answer (JOB_ASSIGN* or NO_JOB)"},
        {"op": "send", "actor": "w", "data": [pkt("REQ", "WORK_COMPLETE", "$handle", "done")]},
        {"op": "send", "actor": "w", "data": [pkt("REQ", "ECHO_REQ", "still there?")]},
        {"op": "expect", "actor": "w", "types": ["ECHO_RES"], "timeout": 5,
         "require": "a worker keeps its connection after grabbing a job gearmand holds"},
        # Clean up: whatever is left of the job is taken straight from gearmand and failed.
        {"op": "half_close", "actor": "w"},
        {"op": "eof", "actor": "w", "timeout": 3},
        {"op": "connect", "actor": "d", "to": "gearmand"},
        {"op": "send", "actor": "d", "data": [pkt("REQ", "CAN_DO", function), pkt("REQ", "GRAB_JOB_UNIQ")]},
        {"op": "expect", "actor": "d", "types": ["JOB_ASSIGN_UNIQ", "NO_JOB"], "timeout": 5},
        {"op": "send", "actor": "d", "data": [pkt("REQ", "WORK_FAIL", "$handle")]},
        {"op": "send", "actor": "d", "data": [pkt("REQ", "ECHO_REQ", "sync")]},
        {"op": "expect", "actor": "d", "types": ["ECHO_RES"], "timeout": 5},
    ]
    return steps, f"{function}: SUBMIT_JOB_BG of {size} bytes via {via}, {grab}"


def _retry_flow(rng: random.Random, ident: str, max_size: int) -> tuple[list[dict[str, Any]], str]:
    """A real job of fza_retry grabbed through gproxy and failed with a RETRY exception, then
    whatever a worker might do next. gproxy holds it and retries it (RetryHelper completes
    the retry); the client must get the job's outcome whatever the worker did."""
    unique = f"fzr{ident}"
    steps: list[dict[str, Any]] = [
        {"op": "connect", "actor": "c", "to": rng.choice(("gearmand", "A"))},
        {"op": "send", "actor": "c", "data": [pkt("REQ", "OPTION_REQ", "exceptions"),
                                              pkt("REQ", "SUBMIT_JOB", RETRY_FUNCTION, unique, f"payload {ident}")]},
        {"op": "expect", "actor": "c", "types": ["JOB_CREATED"], "timeout": 5},
        {"op": "connect", "actor": "w", "to": "A"},
        {"op": "send", "actor": "w", "data": [pkt("REQ", "CAN_DO", RETRY_FUNCTION),
                                              pkt("REQ", rng.choice(("GRAB_JOB_UNIQ", "GRAB_JOB", "GRAB_JOB_ALL")))]},
        {"op": "expect", "actor": "w", "types": ["JOB_ASSIGN", "JOB_ASSIGN_UNIQ", "JOB_ASSIGN_ALL", "NO_JOB"], "timeout": 5},
        {"op": "send", "actor": "w", "data": [pkt("REQ", "WORK_EXCEPTION", "$handle", "RETRY: fuzz")]},
    ]
    follow = rng.choice(("fail", "fail+complete", "fail+data", "cant_do", "reset_abilities", "leave", "garbage",
                         "status", "nothing"))
    data = {
        "fail": [pkt("REQ", "WORK_FAIL", "$handle")],
        "fail+complete": [pkt("REQ", "WORK_FAIL", "$handle"), pkt("REQ", "WORK_COMPLETE", "$handle", "late")],
        "fail+data": [pkt("REQ", "WORK_FAIL", "$handle"), pkt("REQ", "WORK_DATA", "$handle", "late data")],
        "cant_do": [pkt("REQ", "WORK_FAIL", "$handle"), pkt("REQ", "CANT_DO", RETRY_FUNCTION)],
        "reset_abilities": [pkt("REQ", "RESET_ABILITIES"), pkt("REQ", "GRAB_JOB_UNIQ")],
        "status": [pkt("REQ", "WORK_STATUS", "$handle", "1", "2"), pkt("REQ", "GET_STATUS", "$handle")],
        "garbage": [{"hex": "0052455800000000"}],
    }.get(follow)
    if data:
        steps.append({"op": "send", "actor": "w", "data": data})
    if follow == "leave":
        steps.append({"op": rng.choice(("close", "reset")), "actor": "w"})
    steps.append({"op": "expect", "actor": "c", "types": ["WORK_COMPLETE", "WORK_FAIL", "WORK_EXCEPTION"], "timeout": 15,
                  "require": "a job whose worker asked for a retry gets an outcome"})
    return steps, f"then {follow}"


def _long_function(rng: random.Random, variant: int | None) -> tuple[list[dict[str, Any]], str]:
    """A job with a long function name (gearmand takes up to about 8 KiB) run through gproxy:
    the name becomes a metric label."""
    k = rng.randrange(4)
    k = k if variant is None else variant
    function = f"fzlong{k}_" + "L" * (200, 1000, 4000, 8000)[k]
    steps: list[dict[str, Any]] = [
        {"op": "connect", "actor": "c", "to": rng.choice(("gearmand", "A"))},
        {"op": "send", "actor": "c", "data": [pkt("REQ", "SUBMIT_JOB_BG", function, "", "x")]},
        {"op": "expect", "actor": "c", "types": ["JOB_CREATED", "ERROR"], "timeout": 5},
        {"op": "connect", "actor": "w", "to": "A"},
        {"op": "send", "actor": "w", "data": [pkt("REQ", "CAN_DO", function), pkt("REQ", "GRAB_JOB_UNIQ")]},
        {"op": "expect", "actor": "w", "types": ["JOB_ASSIGN_UNIQ", "NO_JOB"], "timeout": 5},
        {"op": "send", "actor": "w", "data": [pkt("REQ", "WORK_COMPLETE", "$handle", "done")]},
        {"op": "send", "actor": "w", "data": [pkt("REQ", "ECHO_REQ", "sync")]},
        {"op": "expect", "actor": "w", "types": ["ECHO_RES"], "timeout": 5},
    ]
    return steps, f"function name of {len(function)} bytes"


class RetryHelper:
    """A worker straight to gearmand that completes every fza_retry job it is given."""

    def __init__(self, gearmand: tuple[str, int]) -> None:
        self.gearmand = gearmand
        self.completed = 0

    async def run(self) -> None:
        while True:
            try:
                await self._serve()
            except OSError:
                pass
            await trio.sleep(0.1)

    async def _serve(self) -> None:
        sock = trio.socket.socket()
        with sock:
            await sock.connect(self.gearmand)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            framer = wire.RefFramer(wire.RES)
            await sock.send(wire.req("CAN_DO", RETRY_FUNCTION.encode()) + wire.req("GRAB_JOB_UNIQ"))
            while True:
                data = await sock.recv(65536)
                if not data:
                    return
                for frame in framer.feed(data):
                    if frame.name == "JOB_ASSIGN_UNIQ":
                        handle = (frame.args() or [b""])[0]
                        self.completed += 1
                        await sock.send(wire.req("WORK_COMPLETE", handle, b"helped") + wire.req("GRAB_JOB_UNIQ"))
                    elif frame.name == "NO_JOB":
                        await sock.send(wire.req("PRE_SLEEP"))
                    elif frame.name == "NOOP":
                        await sock.send(wire.req("GRAB_JOB_UNIQ"))
