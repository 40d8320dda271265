"""The Gearman wire format as the fuzzer sees it: packet table, builders, a reference framer.

Written from the protocol notes (/work/shared/gearmand-protocol-notes.md) and the README,
not from gproxy/core/protocol.py: it is the oracle the fuzzer holds gproxy to, so it must not
share gproxy's code (or its bugs).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Final, NamedTuple

REQ: Final = b"\0REQ"
RES: Final = b"\0RES"
HEADER: Final = struct.Struct(">4sII")
HEADER_SIZE: Final = 12
OVERSIZED_HEAD: Final = 1024
"""gproxy reads this much of an oversized JOB_ASSIGN* (for its handle) before failing it."""

# number: (name, NUL-terminated fields before the rest, has a rest argument)
_TABLE: Final[dict[int, tuple[str, int, bool]]] = {
    1: ("CAN_DO", 0, True),
    2: ("CANT_DO", 0, True),
    3: ("RESET_ABILITIES", 0, False),
    4: ("PRE_SLEEP", 0, False),
    6: ("NOOP", 0, False),
    7: ("SUBMIT_JOB", 2, True),
    8: ("JOB_CREATED", 0, True),
    9: ("GRAB_JOB", 0, False),
    10: ("NO_JOB", 0, False),
    11: ("JOB_ASSIGN", 2, True),
    12: ("WORK_STATUS", 2, True),
    13: ("WORK_COMPLETE", 1, True),
    14: ("WORK_FAIL", 0, True),
    15: ("GET_STATUS", 0, True),
    16: ("ECHO_REQ", 0, True),
    17: ("ECHO_RES", 0, True),
    18: ("SUBMIT_JOB_BG", 2, True),
    19: ("ERROR", 1, True),
    20: ("STATUS_RES", 4, True),
    21: ("SUBMIT_JOB_HIGH", 2, True),
    22: ("SET_CLIENT_ID", 0, True),
    23: ("CAN_DO_TIMEOUT", 1, True),
    24: ("ALL_YOURS", 0, False),
    25: ("WORK_EXCEPTION", 1, True),
    26: ("OPTION_REQ", 0, True),
    27: ("OPTION_RES", 0, True),
    28: ("WORK_DATA", 1, True),
    29: ("WORK_WARNING", 1, True),
    30: ("GRAB_JOB_UNIQ", 0, False),
    31: ("JOB_ASSIGN_UNIQ", 3, True),
    32: ("SUBMIT_JOB_HIGH_BG", 2, True),
    33: ("SUBMIT_JOB_LOW", 2, True),
    34: ("SUBMIT_JOB_LOW_BG", 2, True),
    35: ("SUBMIT_JOB_SCHED", 7, True),
    36: ("SUBMIT_JOB_EPOCH", 3, True),
    37: ("SUBMIT_REDUCE_JOB", 4, True),
    38: ("SUBMIT_REDUCE_JOB_BACKGROUND", 4, True),
    39: ("GRAB_JOB_ALL", 0, False),
    40: ("JOB_ASSIGN_ALL", 4, True),
    41: ("GET_STATUS_UNIQUE", 0, True),
    42: ("STATUS_RES_UNIQUE", 5, True),
}
NAMES: Final[dict[int, str]] = {number: row[0] for number, row in _TABLE.items()}
T: Final[dict[str, int]] = {name: number for number, name in NAMES.items()}
"""Packet type numbers by name, e.g. T["GRAB_JOB_UNIQ"] == 30."""
FIELDS: Final[dict[int, int]] = {number: row[1] for number, row in _TABLE.items()}

REQUEST_TYPES: Final = tuple(
    T[n]
    for n in (
        "CAN_DO", "CANT_DO", "RESET_ABILITIES", "PRE_SLEEP", "SUBMIT_JOB", "GRAB_JOB",
        "WORK_STATUS", "WORK_COMPLETE", "WORK_FAIL", "GET_STATUS", "ECHO_REQ", "SUBMIT_JOB_BG",
        "SUBMIT_JOB_HIGH", "SET_CLIENT_ID", "CAN_DO_TIMEOUT", "ALL_YOURS", "WORK_EXCEPTION",
        "OPTION_REQ", "WORK_DATA", "WORK_WARNING", "GRAB_JOB_UNIQ", "SUBMIT_JOB_HIGH_BG",
        "SUBMIT_JOB_LOW", "SUBMIT_JOB_LOW_BG", "SUBMIT_JOB_SCHED", "SUBMIT_JOB_EPOCH",
        "SUBMIT_REDUCE_JOB", "SUBMIT_REDUCE_JOB_BACKGROUND", "GRAB_JOB_ALL", "GET_STATUS_UNIQUE",
    )
)  # fmt: skip
"""Every type a worker or client sends (the 'every request type' of the issue)."""
RESPONSE_TYPES: Final = tuple(
    T[n]
    for n in (
        "NOOP", "JOB_CREATED", "NO_JOB", "JOB_ASSIGN", "WORK_STATUS", "WORK_COMPLETE",
        "WORK_FAIL", "ECHO_RES", "ERROR", "STATUS_RES", "WORK_EXCEPTION", "OPTION_RES",
        "WORK_DATA", "WORK_WARNING", "JOB_ASSIGN_UNIQ", "JOB_ASSIGN_ALL", "STATUS_RES_UNIQUE",
    )
)  # fmt: skip
ASSIGNS: Final = frozenset({T["JOB_ASSIGN"], T["JOB_ASSIGN_UNIQ"], T["JOB_ASSIGN_ALL"]})
GRABS: Final = frozenset({T["GRAB_JOB"], T["GRAB_JOB_UNIQ"], T["GRAB_JOB_ALL"]})

# What gproxy parses and therefore refuses as `malformed` (README "What gproxy does to the
# traffic" and "Bad input"): the packets that carry a job's handle from the worker, the
# registration packet with a NUL-terminated field, and the assignments from gearmand.
# type -> NULs the payload needs at least.
MALFORMED_FROM_WORKER: Final[dict[int, int]] = {
    T["WORK_COMPLETE"]: 1, T["WORK_EXCEPTION"]: 1, T["WORK_DATA"]: 1, T["WORK_WARNING"]: 1,
    T["WORK_STATUS"]: 2, T["CAN_DO_TIMEOUT"]: 1,
}  # fmt: skip
"""(A WORK_STATUS is checked whole: README, "Bad input", since d84a2f5.)"""
MALFORMED_FROM_GEARMAND: Final[dict[int, int]] = {
    T["JOB_ASSIGN"]: 2, T["JOB_ASSIGN_UNIQ"]: 3, T["JOB_ASSIGN_ALL"]: 4,
}  # fmt: skip
_TIMEOUT: Final = re.compile(rb"\d{0,18}")
"""README "Bad input" (f4b7bdf): a CAN_DO_TIMEOUT's timeout is a decimal of at most 18 digits
(gearmand 1.1.20 dies of one that does not fit 64 bits)."""
EMPTY_TYPES: Final = frozenset(n for n, row in _TABLE.items() if not row[2])


def name(number: int) -> str:
    return NAMES.get(number, f"TYPE_{number}")


def packet(magic: bytes, ptype: int | str, *args: bytes) -> bytes:
    """A packet whose payload is `args` joined by NULs (the caller decides how many)."""
    number = T[ptype] if isinstance(ptype, str) else ptype
    body = b"\0".join(args)
    return HEADER.pack(magic, number, len(body)) + body


def req(ptype: int | str, *args: bytes) -> bytes:
    return packet(REQ, ptype, *args)


def res(ptype: int | str, *args: bytes) -> bytes:
    return packet(RES, ptype, *args)


def raw_packet(magic: bytes, number: int, size: int, body: bytes) -> bytes:
    """A header that may lie about its size, followed by `body`."""
    return HEADER.pack(magic, number & 0xFFFFFFFF, size & 0xFFFFFFFF) + body


def split_args(number: int, body: bytes) -> list[bytes] | None:
    """The arguments of a payload by the type's layout, None if it has too few NULs."""
    fields = FIELDS.get(number, 0)
    if number in EMPTY_TYPES:
        return []
    parts = body.split(b"\0", fields)
    return parts if len(parts) == fields + 1 else None


class Frame(NamedTuple):
    """A packet (`number` >= 0) or an admin text line (`number` == -1), as received."""

    number: int
    raw: bytes

    @property
    def body(self) -> bytes:
        return self.raw[HEADER_SIZE:] if self.number >= 0 else self.raw

    @property
    def name(self) -> str:
        return "TEXT" if self.number < 0 else name(self.number)

    def args(self) -> list[bytes] | None:
        return split_args(self.number, self.body) if self.number >= 0 else None


@dataclass
class Verdict:
    """What the reference framer made of a whole one-way stream."""

    frames: list[Frame]
    error: str | None = None
    """bad_magic, unknown_type, oversized, malformed, mid_packet; None if the stream is good."""
    detail: str = ""
    error_offset: int = -1
    oversized_assigns: int = 0
    """JOB_ASSIGN* over max_packet_size from gearmand: not an error, failed by gproxy."""
    maybe: list[tuple[int, str]] = field(default_factory=list)
    """(offset, reason) of frames gproxy may refuse or not, depending on its state: an
    ERROR without a NUL from gearmand is parsed (malformed) only while a grab is pending."""

    def allows(self, reason: str | None) -> bool:
        """Whether gproxy closing for `reason` (None: no protocol error) agrees with this."""
        if reason == self.error:
            return True
        limit = self.error_offset if self.error is not None else 1 << 62
        return any(r == reason and at < limit for at, r in self.maybe)


class RefFramer:
    """Incremental framing by the documented rules, for what an actor receives (no
    verdict: it just stops at the first thing it cannot frame)."""

    def __init__(self, magic: bytes, max_size: int = 0xFFFFFFFF) -> None:
        self.magic = magic
        self.max_size = max_size
        self.buf = bytearray()
        self.broken: str | None = None

    def feed(self, data: bytes) -> list[Frame]:
        if self.broken:
            return []
        self.buf += data
        frames: list[Frame] = []
        pos = 0
        buf = self.buf
        while pos < len(buf):
            if buf[pos] != 0:
                newline = buf.find(b"\n", pos)
                if newline < 0:
                    break
                frames.append(Frame(-1, bytes(buf[pos : newline + 1])))
                pos = newline + 1
                continue
            if len(buf) - pos < HEADER_SIZE:
                break
            magic, number, size = HEADER.unpack_from(buf, pos)
            if magic != self.magic or number not in NAMES or size > self.max_size:
                self.broken = f"unframeable {bytes(buf[pos:pos + 12]).hex()}"
                break
            if len(buf) - pos - HEADER_SIZE < size:
                break
            frames.append(Frame(number, bytes(buf[pos : pos + HEADER_SIZE + size])))
            pos += HEADER_SIZE + size
        del self.buf[:pos]
        return frames


def judge(
    stream: bytes,
    magic: bytes,
    max_size: int,
    *,
    from_gearmand: bool,
    eof: bool,
    reset: bool = False,
    framing_only: bool = False,
) -> Verdict:
    """What gproxy must make of `stream` (everything one side sent on a connection) by the
    README's rules: the frames it forwards, and the first reason to close the pair, if any.

    A `malformed` packet is refused by gproxy's session, after its framer has cut the whole
    read it came in; a framing error (bad magic, unknown type, oversized) later in the same
    read is then the one reported: such a later error is allowed too (`framing_only` finds
    it).

    `eof`: the sender then closed cleanly (FIN), so bytes of an unfinished frame are a
    `mid_packet`. `reset`: it reset the connection instead; the kernel reports a reset to the
    first read or write after it and an end of file to the reads after that, so gproxy may
    see a reset mid-frame as a close mid-frame: `mid_packet` is allowed, not required. Admin lines: a line whose text before the newline is longer than
    max_packet_size is refused as `oversized` (README: `max_packet_size` is the largest
    packet or admin line accepted). JOB_ASSIGN* over max_packet_size from gearmand is no
    error: gproxy fails that job and answers the grab NO_JOB.
    """
    verdict = Verdict([])
    malformed = MALFORMED_FROM_GEARMAND if from_gearmand else MALFORMED_FROM_WORKER
    pos, total = 0, len(stream)

    def fail(reason: str, detail: str, at: int) -> Verdict:
        verdict.error, verdict.detail, verdict.error_offset = reason, detail, at
        return verdict

    while pos < total:
        if stream[pos] != 0:
            newline = stream.find(b"\n", pos)
            length = (newline if newline >= 0 else total) - pos
            # The text before the newline may have max_packet_size bytes (as a packet's
            # body may: neither its header nor a line's newline counts); an unterminated
            # line is refused once more than that has come.
            if length > max_size:
                return fail("oversized", f"admin line of {length}+ bytes", pos)
            if newline < 0:
                break
            verdict.frames.append(Frame(-1, stream[pos : newline + 1]))
            pos = newline + 1
            continue
        head = stream[pos : pos + HEADER_SIZE]
        seen = min(len(head), 4)
        if head[:seen] != magic[:seen]:
            return fail("bad_magic", f"magic {head[:4]!r}", pos)
        if len(head) < HEADER_SIZE:
            break
        _, number, size = HEADER.unpack(head)
        if number not in NAMES:
            return fail("unknown_type", f"type {number}", pos)
        if size > max_size:
            if from_gearmand and number in ASSIGNS:
                end = pos + HEADER_SIZE + size
                if total - pos - HEADER_SIZE >= min(size, OVERSIZED_HEAD):
                    verdict.oversized_assigns += 1
                    verdict.frames.append(Frame(T["NO_JOB"], res("NO_JOB")))
                if end > total:
                    if eof:
                        return fail("mid_packet", f"{end - total} bytes of an oversized job missing", pos)
                    if reset:
                        verdict.maybe.append((pos, "mid_packet"))
                    break
                pos = end
                continue
            return fail("oversized", f"{name(number)} of {size} bytes", pos)
        end = pos + HEADER_SIZE + size
        if end > total:
            break
        body = stream[pos + HEADER_SIZE : end]
        needed = malformed.get(number)
        nuls = body.count(b"\0")
        bad = None
        if framing_only:
            pass
        elif needed is not None and nuls < needed:
            bad = f"{name(number)} with {nuls} NULs"
        elif not from_gearmand and number == T["CAN_DO_TIMEOUT"] and not _TIMEOUT.fullmatch(body.split(b"\0", 1)[1]):
            bad = "CAN_DO_TIMEOUT whose timeout is not a decimal of at most 18 digits"
        if bad is not None:
            later = judge(stream[end:], magic, max_size, from_gearmand=from_gearmand, eof=False, framing_only=True)
            if later.error is not None:
                verdict.maybe.append((-1, later.error))
            return fail("malformed", bad, pos)
        if from_gearmand and number == T["ERROR"] and b"\0" not in body:
            verdict.maybe.append((pos, "malformed"))
        verdict.frames.append(Frame(number, stream[pos:end]))
        pos = end
    if pos < total and eof:
        return fail("mid_packet", f"{total - pos} bytes of an unfinished frame", pos)
    if pos < total and reset:
        verdict.maybe.append((pos, "mid_packet"))
    return verdict


REASON_WORDS: Final = (
    ("bad magic", "bad_magic"),
    ("unknown packet type", "unknown_type"),
    ("exceeds max_packet_size", "oversized"),
    ("longer than max_packet_size", "oversized"),
    ("malformed", "malformed"),
    ("mid-packet", "mid_packet"),
)


def reason_of(message: str) -> str | None:
    """The metric reason a gproxy close message stands for (None: not a protocol error)."""
    if "protocol error" not in message and "mid-packet" not in message:
        return None
    for words, reason in REASON_WORDS:
        if words in message:
            return reason
    return "unclassified"
