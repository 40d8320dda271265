"""Codec and framer, pure: every packet type, arbitrary splits, and every kind of bad input."""

from __future__ import annotations

import struct

import pytest
from construct import ConstructError
from hypothesis import given
from hypothesis import strategies as st

from gproxy.core.protocol import (
    BODIES,
    HEADER,
    LAYOUTS,
    REQ,
    RES,
    OVERSIZED_HEAD,
    AdminLine,
    Framer,
    Oversized,
    Packet,
    PacketType,
    ProtocolError,
    build_packet,
    build_submission,
    parse_body,
    splice,
    split_head,
)

COMPILED = {ptype: body.compile() for ptype, body in BODIES.items()}
field_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b""))
rest_bytes = st.binary(max_size=200)


@st.composite
def packets(draw, magic: bytes = REQ, types=tuple(PacketType)) -> bytes:
    ptype = draw(st.sampled_from(types))
    layout = LAYOUTS[ptype]
    args = {name: draw(field_bytes) for name in layout.fields}
    if layout.rest:
        args[layout.rest] = draw(rest_bytes)
    return build_packet(magic, ptype, **args)


admin_lines = st.binary(min_size=1, max_size=60).map(
    lambda b: b"s" + b.replace(b"\n", b"").replace(b"\0", b"") + b"\r\n"
)


def test_the_table_has_every_type_of_the_notes() -> None:
    assert len(LAYOUTS) == len(PacketType) == 41
    assert 5 not in set(PacketType)  # unused: gearmand answers INVALID_COMMAND


@pytest.mark.parametrize("ptype", list(PacketType), ids=lambda t: t.name)
def test_every_type_round_trips_and_compiled_agrees_with_interpreted(ptype: PacketType) -> None:
    layout = LAYOUTS[ptype]
    args = {name: f"{name}-1".encode() for name in layout.fields}
    if layout.rest:
        args[layout.rest] = b"rest\0with\0nuls"
    raw = build_packet(RES, ptype, **args)
    assert raw[:12] == struct.pack(">4sII", RES, ptype, len(raw) - 12)
    assert parse_body(ptype, raw[12:]) == args
    interpreted = BODIES[ptype].parse(raw[12:])
    assert {name: interpreted[name] for name in layout.names} == args


@given(packets(magic=RES))
def test_build_then_parse_is_identity(raw: bytes) -> None:
    header = HEADER.parse(raw[:12])
    ptype = PacketType(header.type)
    assert header.size == len(raw) - 12
    assert build_packet(RES, ptype, **parse_body(ptype, raw[12:])) == raw


@given(st.sampled_from(list(PacketType)), st.binary(max_size=60).map(lambda b: b.replace(b"\1", b"\0")))
def test_the_fast_parse_is_the_construct_definition(ptype: PacketType, body: bytes) -> None:
    """parse_body splits with bytes.split on the hot path; it must mean what BODIES says."""
    layout = LAYOUTS[ptype]
    try:
        parsed = COMPILED[ptype].parse(body)
        expected = {name: parsed[name] for name in layout.names}
    except ConstructError:
        with pytest.raises(ProtocolError):
            parse_body(ptype, body)
    else:
        assert parse_body(ptype, body) == expected


def test_header_struct_and_construct_agree() -> None:
    raw = build_packet(REQ, PacketType.SUBMIT_JOB, function=b"f", unique=b"u", data=b"xyz")
    assert HEADER.build({"magic": REQ, "type": 7, "size": 7}) == raw[:12]


def test_missing_nul_is_a_protocol_error_not_a_short_field() -> None:
    # The compiled parser does no length checks of its own; a body without its NULs must
    # still be refused rather than split wrongly.
    with pytest.raises(ProtocolError, match="malformed JOB_ASSIGN"):
        parse_body(PacketType.JOB_ASSIGN, b"H:x:1")
    with pytest.raises(ProtocolError, match="malformed NOOP"):
        parse_body(PacketType.NOOP, b"unexpected")


def test_build_refuses_nul_inside_a_field_and_wrong_arguments() -> None:
    with pytest.raises(ValueError, match="may not contain NUL"):
        build_packet(REQ, PacketType.SUBMIT_JOB, function=b"f\0g", unique=b"", data=b"")
    with pytest.raises(ValueError, match="takes"):
        build_packet(REQ, PacketType.CAN_DO, name=b"f")


@given(
    st.lists(st.one_of(packets(magic=REQ), admin_lines), min_size=1, max_size=12),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
)
def test_any_split_of_the_stream_gives_the_same_frames(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frames)
    framer = Framer(REQ)
    got: list[Packet | AdminLine] = []
    start = 0
    for cut in sorted({c % (len(stream) + 1) for c in cuts}) + [len(stream)]:
        got.extend(framer.receive(stream[start:cut]))
        start = cut
    assert [frame.raw for frame in got] == frames
    assert [isinstance(frame, AdminLine) for frame in got] == [raw[0] != 0 for raw in frames]
    assert framer.buffered == 0


def test_a_partial_frame_waits_and_reports_what_is_buffered() -> None:
    raw = build_packet(REQ, PacketType.ECHO_REQ, data=b"hello")
    framer = Framer(REQ)
    assert framer.receive(raw[:-1]) == []
    assert framer.buffered == len(raw) - 1
    assert framer.receive(raw[-1:] + raw[:3]) == [Packet(PacketType.ECHO_REQ, raw)]
    assert framer.buffered == 3


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\0RES" + struct.pack(">II", 1, 0), "bad magic"),
        (b"\0RX", "bad magic"),  # refused before the header is even complete
        (b"\0REQ" + struct.pack(">II", 0, 0), "unknown packet type 0"),
        (b"\0REQ" + struct.pack(">II", 5, 0), "unknown packet type 5"),
        (b"\0REQ" + struct.pack(">II", 43, 0), "unknown packet type 43"),
        (b"\0REQ" + struct.pack(">II", 16, 2048), "exceeds max_packet_size 1024"),
        (b"x" * 1025, "admin text line longer"),
    ],
)
def test_bad_input_is_refused_as_soon_as_it_is_seen(data: bytes, message: str) -> None:
    framer = Framer(REQ, max_packet_size=1024)
    ok = build_packet(REQ, PacketType.NOOP)
    # No body follows: an oversized packet is refused from its header alone.
    with pytest.raises(ProtocolError, match=message):
        framer.receive(ok + data)
    with pytest.raises(ProtocolError, match=message):  # out of sync for good
        framer.receive(ok)


def test_a_large_body_is_framed_whole_and_framing_goes_on_after_it() -> None:
    payload = bytes(range(256)) * 20000  # 5 MB with NUL bytes
    raw = build_packet(RES, PacketType.WORK_COMPLETE, handle=b"H:x:1", data=payload)
    small = build_packet(RES, PacketType.NOOP)
    framer = Framer(RES)
    frames = []
    for i in range(0, len(raw), 65536):
        frames += framer.receive(raw[i : i + 65536])
        assert framer.buffered == min(i + 65536, len(raw)) % len(raw)
    (frame,) = frames
    assert frame.args() == {"handle": b"H:x:1", "data": payload}
    assert framer.receive(small) == [Packet(PacketType.NOOP, small)]
    assert framer.buffered == 0


def test_a_type_of_two_to_the_31_is_refused_from_the_header() -> None:
    # gearmand 1.1.20 segfaults on this header; behind gproxy it never sees it.
    with pytest.raises(ProtocolError, match="unknown packet type 4294967295"):
        Framer(REQ).receive(bytes.fromhex("00524551ffffffff00000000"))
    with pytest.raises(ProtocolError, match="unknown packet type 2147483648"):
        Framer(REQ).receive(b"\0REQ" + struct.pack(">II", 2**31, 0))


def test_a_long_admin_line_in_small_reads_is_searched_once() -> None:
    framer = Framer(REQ, max_packet_size=1 << 20)
    chunk = b"x" * 4096
    searched = []

    class Counting(bytearray):
        def find(self, sub: bytes, start: int = 0, *args: int) -> int:  # type: ignore[override]
            searched.append(len(self) - start)
            return super().find(sub, start, *args)

    framer._pending = Counting()  # every read after the first one lands in _pending
    framer._pending += chunk
    for _ in range(63):
        assert framer.receive(chunk) == []
    assert framer.receive(b"\n") == [AdminLine(chunk * 64 + b"\n")]
    # Each byte looked at about once: 65 chunks' worth, not the 2,080 a rescan would cost.
    assert sum(searched) <= 65 * len(chunk) + 1


@pytest.mark.parametrize("split", [1, 700, 1100, 5000, 100_000])
def test_an_oversized_packet_of_a_type_to_skip_is_dropped_and_framing_goes_on(split: int) -> None:
    body_data = b"\0" * 10_000
    big = build_packet(RES, PacketType.JOB_ASSIGN_UNIQ, handle=b"H:x:1", function=b"resize", unique=b"u", data=body_data)
    small = build_packet(RES, PacketType.NOOP)
    stream = small + big + small
    framer = Framer(RES, max_packet_size=2048, skip_oversized=frozenset({PacketType.JOB_ASSIGN_UNIQ}))
    frames = framer.receive(stream[:split]) + framer.receive(stream[split:])
    assert [type(f) for f in frames] == [Packet, Oversized, Packet]
    oversized = frames[1]
    assert (oversized.type, oversized.size) == (PacketType.JOB_ASSIGN_UNIQ, len(big) - 12)
    assert oversized.fields[:2] == [b"H:x:1", b"resize"] and len(oversized.head) == OVERSIZED_HEAD
    assert framer.buffered == 0
    # Mid-skip, what is still to come counts as buffered (a peer leaving then left mid-packet).
    assert [type(f) for f in framer.receive(big[:3000])] == [Oversized]
    assert framer.buffered == len(big) - 3000


def test_oversized_packets_of_other_types_are_still_refused() -> None:
    framer = Framer(RES, max_packet_size=1024, skip_oversized=frozenset({PacketType.JOB_ASSIGN}))
    with pytest.raises(ProtocolError, match="WORK_DATA of 2048 bytes exceeds"):
        framer.receive(b"\0RES" + struct.pack(">II", PacketType.WORK_DATA, 2048))


def test_an_admin_line_over_max_packet_size_is_refused_even_when_it_arrives_whole() -> None:
    framer = Framer(REQ, max_packet_size=1024)
    with pytest.raises(ProtocolError, match="admin text line longer"):
        framer.receive(b"x" * 3072 + b"\n" + build_packet(REQ, PacketType.NOOP))
    assert Framer(REQ, max_packet_size=1024).receive(b"x" * 1023 + b"\n") == [AdminLine(b"x" * 1023 + b"\n")]


@pytest.mark.parametrize("length, accepted", [(1024, True), (1025, False)])
def test_an_admin_line_is_judged_by_one_rule_whether_it_arrives_whole_or_in_pieces(length: int, accepted: bool) -> None:
    """The text before the newline may be max_packet_size bytes long, as a packet's body
    may: the newline no more counts than a packet's header. Every split of the line, the
    line whole, and the line behind a packet in the same read are judged alike."""
    line = b"x" * length + b"\n"
    chunkings = [[line], [build_packet(REQ, PacketType.NOOP) + line]]
    chunkings += [[line[:cut], line[cut:]] for cut in (1, 512, length - 1, length, length + 1)]
    for chunks in chunkings:
        framer = Framer(REQ, max_packet_size=1024)
        if accepted:
            frames = [frame for chunk in chunks for frame in framer.receive(chunk)]
            assert frames[-1] == AdminLine(line), [len(chunk) for chunk in chunks]
        else:
            with pytest.raises(ProtocolError, match="admin text line longer"):
                for chunk in chunks:
                    framer.receive(chunk)


@given(packets(magic=RES, types=(PacketType.JOB_ASSIGN, PacketType.JOB_ASSIGN_UNIQ, PacketType.JOB_ASSIGN_ALL)))
def test_the_head_split_and_the_splices_agree_with_a_full_parse_and_rebuild(raw: bytes) -> None:
    """The hot path reads an assignment's head and rewrites its unique id by offsets; the
    construct definitions, parsing and building the whole packet, say what that must give."""
    ptype = Packet(PacketType(struct.unpack(">I", raw[4:8])[0]), raw).type
    args = parse_body(ptype, raw[12:])
    names = LAYOUTS[ptype].fields
    fields, rest = split_head(raw, len(names))
    assert dict(zip(names, fields, strict=True)) == {name: args[name] for name in names}
    assert raw[rest:] == args["data"]
    if ptype is PacketType.JOB_ASSIGN:
        return
    unique_at = 12 + len(args["handle"]) + len(args["function"]) + 2
    if ptype is PacketType.JOB_ASSIGN_UNIQ:
        plain = {name: value for name, value in args.items() if name != "unique"}
        assert splice(raw, PacketType.JOB_ASSIGN, unique_at, unique_at + len(args["unique"]) + 1) == build_packet(
            RES, PacketType.JOB_ASSIGN, **plain
        )
    shown = b"shown-" + args["unique"][:5]
    assert splice(raw, ptype, unique_at, unique_at + len(args["unique"]), shown) == build_packet(
        RES, ptype, **{**args, "unique": shown}
    )


def test_a_head_short_of_a_nul_is_malformed() -> None:
    raw = build_packet(RES, PacketType.JOB_ASSIGN_UNIQ, handle=b"H:1", function=b"f", unique=b"u", data=b"")
    with pytest.raises(ProtocolError, match="malformed JOB_ASSIGN_UNIQ"):
        split_head(raw[:-3], 3)


@given(field_bytes, field_bytes, rest_bytes)
def test_a_submission_with_a_viewed_payload_is_the_packet_construct_builds(
    function: bytes, unique: bytes, payload: bytes
) -> None:
    for ptype in (PacketType.SUBMIT_JOB, PacketType.SUBMIT_JOB_BG, PacketType.SUBMIT_JOB_HIGH):
        built = build_packet(REQ, ptype, function=function, unique=unique, data=payload)
        assert build_submission(ptype, function, unique, memoryview(b"xx" + payload)[2:]) == built
    with pytest.raises(ValueError):
        build_submission(PacketType.SUBMIT_JOB, b"f\0", unique, payload)


def test_a_whole_packet_over_the_cap_in_one_read_is_refused_as_in_pieces() -> None:
    """The one-packet fast path checks the cap as the general framer does."""
    big = build_packet(REQ, PacketType.WORK_DATA, handle=b"H:1", data=b"x" * 200)
    with pytest.raises(ProtocolError, match="exceeds max_packet_size 100") as refused:
        Framer(REQ, 100).receive(big)
    assert refused.value.reason == "oversized"
    assign = build_packet(RES, PacketType.JOB_ASSIGN, handle=b"H:1", function=b"f", data=b"x" * 2000)
    (frame,) = Framer(RES, 1500, skip_oversized=frozenset({PacketType.JOB_ASSIGN})).receive(assign)
    assert type(frame) is Oversized and frame.size == len(assign) - 12
