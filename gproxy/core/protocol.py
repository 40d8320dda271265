"""Gearman binary protocol and admin text lines: packet layouts, framing, builders.

Pure code: bytes in, frames out. Nothing here touches a socket or a clock.

Rules of this module:
- A byte stream is framed strictly by the header's size field, never by searching for NULs
  (gearmand's own memchr can run past a packet; a proxy must not repeat that).
- The header (magic, type, size) is checked as soon as it is buffered, before waiting for a
  body, so a bad or oversized packet is refused without buffering it.
- Argument layouts are construct definitions, compiled. A compiled parser skips length checks,
  so it only ever sees a complete body that the framer has cut out by size.
- Unknown packet types and bad magic are errors, never guessed at.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

from construct import (
    Bytes,
    GreedyBytes,
    Int32ub,
    NullTerminated,
    OneOf,
    Struct,
    Terminated,
)

REQ: Final = b"\0REQ"
"""Magic of packets sent to the server (by workers and clients)."""
RES: Final = b"\0RES"
"""Magic of packets sent by the server."""

HEADER_SIZE: Final = 12
DEFAULT_MAX_PACKET_SIZE: Final = 64 * 1024 * 1024


class PacketType(enum.IntEnum):
    CAN_DO = 1
    CANT_DO = 2
    RESET_ABILITIES = 3
    PRE_SLEEP = 4
    NOOP = 6
    SUBMIT_JOB = 7
    JOB_CREATED = 8
    GRAB_JOB = 9
    NO_JOB = 10
    JOB_ASSIGN = 11
    WORK_STATUS = 12
    WORK_COMPLETE = 13
    WORK_FAIL = 14
    GET_STATUS = 15
    ECHO_REQ = 16
    ECHO_RES = 17
    SUBMIT_JOB_BG = 18
    ERROR = 19
    STATUS_RES = 20
    SUBMIT_JOB_HIGH = 21
    SET_CLIENT_ID = 22
    CAN_DO_TIMEOUT = 23
    ALL_YOURS = 24
    WORK_EXCEPTION = 25
    OPTION_REQ = 26
    OPTION_RES = 27
    WORK_DATA = 28
    WORK_WARNING = 29
    GRAB_JOB_UNIQ = 30
    JOB_ASSIGN_UNIQ = 31
    SUBMIT_JOB_HIGH_BG = 32
    SUBMIT_JOB_LOW = 33
    SUBMIT_JOB_LOW_BG = 34
    SUBMIT_JOB_SCHED = 35
    SUBMIT_JOB_EPOCH = 36
    SUBMIT_REDUCE_JOB = 37
    SUBMIT_REDUCE_JOB_BACKGROUND = 38
    GRAB_JOB_ALL = 39
    JOB_ASSIGN_ALL = 40
    GET_STATUS_UNIQUE = 41
    STATUS_RES_UNIQUE = 42


@dataclass(frozen=True, slots=True)
class Layout:
    """How a packet's payload splits: `fields` are NUL-terminated, `rest` takes what remains."""

    fields: tuple[str, ...] = ()
    rest: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return self.fields + ((self.rest,) if self.rest else ())


_SUBMIT = Layout(("function", "unique"), "data")
_REDUCE = Layout(("function", "unique", "reducer", "aggregator"), "data")

T = PacketType
LAYOUTS: Final[dict[PacketType, Layout]] = {
    T.CAN_DO: Layout(rest="function"),
    T.CANT_DO: Layout(rest="function"),
    T.RESET_ABILITIES: Layout(),
    T.PRE_SLEEP: Layout(),
    T.NOOP: Layout(),
    T.SUBMIT_JOB: _SUBMIT,
    T.JOB_CREATED: Layout(rest="handle"),
    T.GRAB_JOB: Layout(),
    T.NO_JOB: Layout(),
    T.JOB_ASSIGN: Layout(("handle", "function"), "data"),
    T.WORK_STATUS: Layout(("handle", "numerator"), "denominator"),
    T.WORK_COMPLETE: Layout(("handle",), "data"),
    T.WORK_FAIL: Layout(rest="handle"),
    T.GET_STATUS: Layout(rest="handle"),
    T.ECHO_REQ: Layout(rest="data"),
    T.ECHO_RES: Layout(rest="data"),
    T.SUBMIT_JOB_BG: _SUBMIT,
    T.ERROR: Layout(("code",), "text"),
    T.STATUS_RES: Layout(("handle", "known", "running", "numerator"), "denominator"),
    T.SUBMIT_JOB_HIGH: _SUBMIT,
    T.SET_CLIENT_ID: Layout(rest="client_id"),
    T.CAN_DO_TIMEOUT: Layout(("function",), "timeout"),
    T.ALL_YOURS: Layout(),
    T.WORK_EXCEPTION: Layout(("handle",), "data"),
    T.OPTION_REQ: Layout(rest="option"),
    T.OPTION_RES: Layout(rest="option"),
    T.WORK_DATA: Layout(("handle",), "data"),
    T.WORK_WARNING: Layout(("handle",), "data"),
    T.GRAB_JOB_UNIQ: Layout(),
    T.JOB_ASSIGN_UNIQ: Layout(("handle", "function", "unique"), "data"),
    T.SUBMIT_JOB_HIGH_BG: _SUBMIT,
    T.SUBMIT_JOB_LOW: _SUBMIT,
    T.SUBMIT_JOB_LOW_BG: _SUBMIT,
    T.SUBMIT_JOB_SCHED: Layout(
        ("function", "unique", "minute", "hour", "mday", "month", "wday"), "data"
    ),
    T.SUBMIT_JOB_EPOCH: Layout(("function", "unique", "epoch"), "data"),
    T.SUBMIT_REDUCE_JOB: _REDUCE,
    T.SUBMIT_REDUCE_JOB_BACKGROUND: _REDUCE,
    T.GRAB_JOB_ALL: Layout(),
    T.JOB_ASSIGN_ALL: Layout(("handle", "function", "unique", "reducer"), "data"),
    T.GET_STATUS_UNIQUE: Layout(rest="unique"),
    T.STATUS_RES_UNIQUE: Layout(
        ("unique", "known", "running", "numerator", "denominator"), "client_count"
    ),
}
del T

HEADER = Struct(
    "magic" / OneOf(Bytes(4), [REQ, RES]),
    "type" / Int32ub,
    "size" / Int32ub,
)
"""The 12-byte header. The framer reads it with `struct` (10x cheaper); tests hold both equal."""

_HEADER_STRUCT: Final = struct.Struct(">4sII")


def _body_struct(layout: Layout) -> Struct:
    members = [name / NullTerminated(GreedyBytes) for name in layout.fields]
    members.append(layout.rest / GreedyBytes if layout.rest else Terminated)
    return Struct(*members)


BODIES: Final[dict[PacketType, Struct]] = {t: _body_struct(lay) for t, lay in LAYOUTS.items()}
"""Interpreted construct definition of each packet type's payload."""

_COMPILED: Final[dict[PacketType, Struct]] = {t: s.compile() for t, s in BODIES.items()}
_TYPE_BY_NUMBER: Final[dict[int, PacketType]] = {int(t): t for t in PacketType}


class ProtocolError(Exception):
    """The peer sent bytes that are not valid Gearman; the connection cannot continue.

    `reason` is a short stable word for metrics: bad_magic, unknown_type, oversized, malformed.
    `frames`: from a Framer, the frames its last chunk completed before the bad input (a
    client of gearmand must still act on a result that arrived just before garbage).
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason
        self.frames: list[Frame] = []


class Packet(NamedTuple):
    """One complete binary packet, kept as the exact bytes received so it can be forwarded.

    A NamedTuple, not a dataclass: one is made for every packet that crosses the proxy.
    """

    type: PacketType
    raw: bytes

    @property
    def magic(self) -> bytes:
        return self.raw[:4]

    @property
    def body(self) -> bytes:
        return self.raw[HEADER_SIZE:]

    def args(self) -> dict[str, bytes]:
        """Split the payload by the type's layout (only for packets the proxy acts on)."""
        return parse_body(self.type, self.raw[HEADER_SIZE:])


class AdminLine(NamedTuple):
    """One line of the text admin protocol, `\\n` included, exactly as received."""

    raw: bytes


class Oversized(NamedTuple):
    """A packet over max_packet_size of a type the framer was told to skip rather than
    refuse: its body is read and dropped, and only its start is kept, so the stream stays
    in step and the caller can still say which job it was about."""

    type: PacketType
    size: int
    head: bytes
    """The first OVERSIZED_HEAD bytes of the body (the handle comes first)."""

    @property
    def fields(self) -> list[bytes]:
        """The NUL-terminated fields that fit in `head` (the last one may be cut short)."""
        return self.head.split(b"\0")


Frame = Packet | AdminLine | Oversized
OVERSIZED_HEAD: Final = 1024


def parse_body(ptype: PacketType, body: bytes) -> dict[str, bytes]:
    """Arguments of a complete payload; a missing NUL or stray bytes is a ProtocolError.

    This is the parse that BODIES defines, done with one `bytes.split` (~0.5 us) instead of
    the compiled construct parser (~9 us) because it runs for every job on the hot path;
    a property test holds the two equal on arbitrary input, malformed input included.
    """
    layout = LAYOUTS[ptype]
    if layout.rest is None:
        if body:
            raise ProtocolError(f"malformed {ptype.name} payload ({len(body)} bytes, expected none)")
        return {}
    if not layout.fields:
        return {layout.rest: body}
    parts = body.split(b"\0", len(layout.fields))
    if len(parts) <= len(layout.fields):
        raise ProtocolError(f"malformed {ptype.name} payload ({len(body)} bytes, too few NULs)")
    return dict(zip(layout.names, parts, strict=True))


def split_head(raw: bytes, count: int) -> tuple[list[bytes], int]:
    """The first `count` NUL-terminated fields of a packet, and where the rest of its body
    starts: the rest (a job's payload, perhaps megabytes) is neither split nor copied."""
    fields = []
    pos = HEADER_SIZE
    for _ in range(count):
        end = raw.find(b"\0", pos)
        if end < 0:
            ptype = _TYPE_BY_NUMBER.get(_HEADER_STRUCT.unpack_from(raw)[1])
            raise ProtocolError(f"malformed {ptype.name if ptype else 'packet'} payload ({len(raw) - HEADER_SIZE} bytes, too few NULs)")
        fields.append(raw[pos:end])
        pos = end + 1
    return fields, pos


def splice(raw: bytes, ptype: PacketType, start: int, end: int, insert: bytes = b"") -> bytes:
    """`raw` as a packet of type `ptype`, with its bytes from `start` to `end` replaced by
    `insert`: a field rewritten by offsets, the payload copied once, never parsed."""
    view = memoryview(raw)
    size = len(raw) - HEADER_SIZE - (end - start) + len(insert)
    return b"".join((_HEADER_STRUCT.pack(raw[:4], ptype, size), view[HEADER_SIZE:start], insert, view[end:]))


def build_submission(ptype: PacketType, function: bytes, unique: bytes, payload: bytes | memoryview) -> bytes:
    """A SUBMIT_JOB* packet; the payload may be a view (of the packet that brought the job)."""
    if b"\0" in function or b"\0" in unique:
        raise ValueError(f"{ptype.name}: function and unique id may not contain NUL")
    size = len(function) + len(unique) + 2 + len(payload)
    return b"".join((_HEADER_STRUCT.pack(REQ, ptype, size), function, b"\0", unique, b"\0", payload))


def build_packet(magic: bytes, ptype: PacketType, **args: bytes) -> bytes:
    """Encode a packet; refuses a NUL inside a NUL-terminated field (it would shift the rest)."""
    layout = LAYOUTS[ptype]
    if set(args) != set(layout.names):
        raise ValueError(f"{ptype.name} takes {layout.names}, got {tuple(args)}")
    for name in layout.fields:
        if b"\0" in args[name]:
            raise ValueError(f"{ptype.name} field {name!r} may not contain NUL")
    body: bytes = _COMPILED[ptype].build(args)
    return _HEADER_STRUCT.pack(magic, ptype, len(body)) + body


class Framer:
    """Cuts one direction of a connection into packets and admin lines.

    `receive(bytes)` returns every frame completed by those bytes and keeps the rest for
    the next call (one call per chunk read, not one per frame: this runs for every chunk
    that crosses the proxy). After a ProtocolError the stream is out of sync for good and
    the framer refuses to go on.
    """

    def __init__(
        self,
        magic: bytes,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        counts: list[int] | None = None,
        skip_oversized: frozenset[PacketType] = frozenset(),
    ) -> None:
        if magic not in (REQ, RES):
            raise ValueError(f"magic must be REQ or RES, not {magic!r}")
        self.magic = magic
        self.max_packet_size = max_packet_size
        self.counts = counts if counts is not None else [0] * (max(PacketType) + 1)
        """Packets framed, by type number (shared across framers, read by the metrics)."""
        self.skip_oversized = skip_oversized
        """Types whose oversized packets are skipped (an Oversized frame) instead of refused."""
        self._pending = bytearray()
        self._scanned = 0
        """How much of an unfinished admin line at the start of `_pending` has been searched
        for its newline already: a long line arriving in small reads is searched once."""
        self._skipping = 0
        """Body bytes of an Oversized packet still to be read and dropped."""
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet framed: non-zero at EOF means the peer left mid-frame."""
        return len(self._pending) + self._skipping

    def whole(self, data: bytes) -> PacketType | None:
        """The type of `data` if it is exactly one whole packet that `receive(data)` would
        frame as it is (nothing buffered before it, within the cap); else None."""
        if self._pending or self._skipping or self._error is not None or len(data) < HEADER_SIZE:
            return None
        magic, number, size = _HEADER_STRUCT.unpack_from(data)
        if size + HEADER_SIZE != len(data) or magic != self.magic or size > self.max_packet_size:
            return None
        return _TYPE_BY_NUMBER.get(number)

    def receive(self, data: bytes) -> list[Frame]:
        if not self._pending and not self._skipping and self._error is None and len(data) >= HEADER_SIZE:
            # The usual read: exactly one whole packet, checked as _cut checks it.
            magic, number, size = _HEADER_STRUCT.unpack_from(data)
            if size + HEADER_SIZE == len(data) and magic == self.magic and size <= self.max_packet_size:
                ptype = _TYPE_BY_NUMBER.get(number)
                if ptype is not None:
                    self.counts[number] += 1
                    return [Packet(ptype, data)]
        if self._error is not None:
            self._error.frames = []  # (handed over with the first raise)
            raise self._error
        if self._skipping:
            dropped = min(self._skipping, len(data))
            self._skipping -= dropped
            data = data[dropped:]
        if self._pending:
            self._pending += data
            buf: bytes | bytearray = self._pending
        else:
            buf = data  # the usual case: no copy until a frame is cut out
        frames: list[Frame] = []
        try:
            consumed = self._cut(buf, frames)
        except ProtocolError as exc:
            exc.frames = frames
            self._error = exc
            raise
        if buf is self._pending:
            del self._pending[:consumed]
        elif consumed < len(buf):
            self._pending = bytearray(buf[consumed:])
        return frames

    def _cut(self, buf: bytes | bytearray, frames: list[Frame]) -> int:
        """Append the frames `buf` completes to `frames`; returns how much of it they took."""
        counts = self.counts
        pos, total = 0, len(buf)
        scanned, self._scanned = self._scanned, 0
        while pos < total:
            if buf[pos] != 0:  # a text admin line, up to its newline
                newline = buf.find(b"\n", pos + scanned)
                if newline < 0:
                    if total - pos > self.max_packet_size:
                        raise ProtocolError(
                            f"admin text line longer than max_packet_size {self.max_packet_size}",
                            "oversized",
                        )
                    self._scanned = total - pos
                    break
                if newline - pos > self.max_packet_size:
                    raise ProtocolError(
                        f"admin text line longer than max_packet_size {self.max_packet_size}",
                        "oversized",
                    )
                frames.append(AdminLine(bytes(buf[pos : newline + 1])))
                pos, scanned = newline + 1, 0
                continue
            if total - pos < HEADER_SIZE:
                seen = min(total - pos, 4)
                if buf[pos : pos + seen] != self.magic[:seen]:
                    raise ProtocolError(f"bad magic {bytes(buf[pos:pos + 4])!r}", "bad_magic")
                break
            magic, number, size = _HEADER_STRUCT.unpack_from(buf, pos)
            if magic != self.magic:
                raise ProtocolError(f"bad magic {magic!r} (expected {self.magic!r})", "bad_magic")
            ptype = _TYPE_BY_NUMBER.get(number)
            if ptype is None:
                raise ProtocolError(f"unknown packet type {number}", "unknown_type")
            if size > self.max_packet_size:
                if ptype not in self.skip_oversized:
                    raise ProtocolError(
                        f"{ptype.name} of {size} bytes exceeds max_packet_size {self.max_packet_size}",
                        "oversized",
                    )
                head_end = pos + HEADER_SIZE + OVERSIZED_HEAD
                if head_end > total:  # wait for the head, then drop the rest as it comes
                    break
                frames.append(Oversized(ptype, size, bytes(buf[pos + HEADER_SIZE : head_end])))
                counts[number] += 1
                in_buffer = min(total, pos + HEADER_SIZE + size)
                self._skipping = pos + HEADER_SIZE + size - in_buffer
                pos = in_buffer
                continue
            end = pos + HEADER_SIZE + size
            if end > total:
                break
            frames.append(Packet(ptype, bytes(buf[pos:end])))
            counts[number] += 1
            pos = end
        return pos


def text(value: bytes) -> str:
    """Bytes from the network (a function name, a handle, an error), for a log line."""
    return value.decode("utf-8", "replace")
