"""The invariants each played script is held to, against gproxy's log.

Per connection of a worker actor (to route A or B), gproxy's log (at DEBUG) has exactly one
`peer HOST:PORT (via …): closed: …` line, found by the actor's own port. What it says must
agree with what the reference framer (wire.judge) makes of the bytes each side sent:

- a protocol error is logged at WARNING, names the side that sent it, and its reason is the
  one the reference sees first (bad_magic, unknown_type, oversized, malformed, mid_packet);
- input the reference finds valid is never refused; gproxy never refuses what the real
  gearmand sent;
- input the reference finds bad is never taken for a normal close, except an unfinished
  frame from a side that closed after the other one (gproxy had half-closed its way to it,
  and its close answers that one: it may cut short what it was sending);
- what the fake gearmand sent reaches the worker unchanged, in order, and whole when the
  pair ended normally (the README's changes excepted: JOB_ASSIGN_UNIQ answering a GRAB_JOB
  becomes JOB_ASSIGN, a `gpr:` unique is shown as the original, a JOB_ASSIGN over
  max_packet_size becomes NO_JOB);
- nothing gproxy sends is larger than max_packet_size.

Each broken invariant is one line: `check: detail`.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

from tests.fuzz import wire
from tests.fuzz.monitor import CloseLine
from tests.fuzz.script import Actor, Run, Script

CLOSE_LINE_LATENESS = 30.0
"""Seconds after a run ended within which gproxy has logged the close of its connections
(a pair lingers at most 10 s after one side closed)."""
NORMAL_CLOSES = ("peer closed the connection", "both sides finished")
GEARMAND_WENT = ("gearmand closed the connection", "gearmand connection lost")


@dataclass
class CloseIndex:
    """gproxy's close lines by (upstream address, peer port), oldest first (the lines name
    a route by the listen address as configured, which may be port 0, and its upstream)."""

    lines: dict[tuple[str, int], list[CloseLine]]
    unnamed: list[CloseLine]

    @classmethod
    def of(cls, closes: list[CloseLine]) -> CloseIndex:
        lines: dict[tuple[str, int], list[CloseLine]] = defaultdict(list)
        unnamed = []
        for close in closes:
            if close.port is None:
                unnamed.append(close)
            else:
                lines[(close.upstream, close.port)].append(close)
        return cls(lines, unnamed)

    def take(self, upstream: str, port: int) -> list[CloseLine]:
        """Every line for connections from `port` on that route, oldest first."""
        return self.lines.get((upstream, port), [])


def assign_lines(
    runs: list[RunDigest],
    index: CloseIndex,
    upstreams: dict[str, str],
    others: dict[tuple[str, int], list[float]] | None = None,
) -> dict[tuple[int, str], list[CloseLine]]:
    """(run number, actor) -> its close lines. A port is used again and again in a long run:
    each line goes to the last connection from that port that had connected before it was
    written (log times have milliseconds; connect times are taken after connect()), unless
    that connection's run had ended more than CLOSE_LINE_LATENESS before: then the line is
    some other connection's whose port is not known (the real worker's, when the fake could
    not tell which of several it was). `others`: where other connections (the real
    worker's) used a port, by (upstream, port), and when."""
    by_key: dict[tuple[str, int], list[tuple[float, float, int, str]]] = defaultdict(list)
    for number, run in enumerate(runs):
        for actor in run.actors.values():
            if actor.role == "worker" and actor.route in upstreams:
                by_key[(upstreams[actor.route], actor.local_port)].append(
                    (actor.connected_wall, actor.ended_wall, number, actor.name)
                )
    for key, times in (others or {}).items():
        if key in by_key:
            by_key[key] += [(t, math.inf, -1, "") for t in times]
    result: dict[tuple[int, str], list[CloseLine]] = {}
    for key, users in by_key.items():
        users.sort()
        for _, _, number, name in users:
            result[(number, name)] = []
        for line in index.take(*key):
            owner = None
            for connected, ended, number, name in users:
                if connected - 0.005 <= line.time:  # the log's times are cut to milliseconds
                    owner = (number, name) if line.time <= ended + CLOSE_LINE_LATENESS else None
            if owner is not None:
                result[owner].append(line)
    return result


def _from_side(reason: str) -> str | None:
    if "protocol error from peer" in reason or reason.startswith("peer closed mid-packet"):
        return "peer"
    if "protocol error from gearmand" in reason or reason.startswith("gearmand closed mid-packet"):
        return "gearmand"
    return None


# -- what is kept of a played script (its bytes are judged at once and let go)


@dataclass
class ActorDigest:
    name: str
    role: str
    route: str
    local_port: int
    connected_wall: float
    ended_wall: float
    """When its run ended, on the clock of connected_wall (and of the log's lines)."""
    fin_sent: bool
    reset_sent: bool
    sent_any: bool
    sent_bytes: int
    client_id: str
    verdict: wire.Verdict
    """What the reference makes of everything it sent (frames dropped)."""
    oversized: list[str]


@dataclass
class RunDigest:
    script: Script
    violations: list[str]
    connect_failures: list[str]
    ended: float
    actors: dict[str, ActorDigest]
    transparency: list[str] = field(default_factory=list)
    """Problems of what reached route B's worker, whatever the close lines say."""
    incomplete: list[str] = field(default_factory=list)
    """What the fake sent that never reached the worker: a problem if the pair ended normally."""
    worker_complete: bool = False


def digest(run: Run, max_size: int) -> RunDigest:
    actors = {}
    for actor in run.actors.values():
        if actor.role == "gearmand":
            verdict = wire.judge(bytes(actor.sent), wire.RES, max_size, from_gearmand=True, eof=actor.fin_sent,
                                 reset=actor.reset_sent)
        else:
            verdict = wire.judge(bytes(actor.sent), wire.REQ, max_size, from_gearmand=False,
                                 eof=actor.fin_sent and not actor.send_failed, reset=actor.reset_sent)
        oversized = _oversized_frames(actor, max_size) if actor.role != "direct" else []
        actors[actor.name] = ActorDigest(
            actor.name, actor.role, actor.route, actor.local_port, actor.connected_wall,
            actor.connected_wall + (run.ended or time.monotonic()) - actor.connected_at, actor.fin_sent,
            actor.reset_sent, bool(actor.sent), len(actor.sent), actor.client_id, verdict, oversized,
        )  # fmt: skip
    result = RunDigest(run.script, list(run.violations), list(run.connect_failures), run.ended, actors)
    links = _links(run)
    for actor in run.actors.values():
        if actor.role == "worker" and actor.route == "B" and links:
            result.transparency, result.incomplete = _transparency(actor, links, actors, max_size)
            result.worker_complete = actor.eof and not actor.reset
    for entry in actors.values():
        entry.verdict.frames = []  # only the transparency check needed them
    return result


def _links(run: Run) -> list[Actor]:
    """The fake's side of the worker's pair (its retry connection is gproxy's own, no pair's)."""
    return [a for a in run.actors.values() if a.role == "gearmand" and a.client_id != "retry"]


def check_run(run: RunDigest, lines: dict[tuple[int, str], list[CloseLine]], number: int) -> list[str]:
    problems = [f"required: {v}" for v in run.violations]
    problems += [f"gproxy and gearmand accept connections: {f}" for f in run.connect_failures]
    gearmand = [a for a in run.actors.values() if a.role == "gearmand" and a.client_id != "retry"]
    for actor in run.actors.values():
        problems += actor.oversized
        if actor.role != "worker":
            continue
        closes = lines.get((number, actor.name), [])
        problems += _check_close(run, actor, closes, gearmand if actor.route == "B" else [])
        if actor.route == "B" and gearmand:
            problems += run.transparency
            broken = any(c.protocol_reason or c.reason.startswith("gearmand connection lost") for c in closes)
            if run.worker_complete and not broken:
                problems += run.incomplete
    return problems


def _oversized_frames(actor: Actor, max_size: int) -> list[str]:
    for frame in actor.frames:
        size = len(frame.body) - (1 if frame.number < 0 else 0)
        if frame.number < 0 and frame.raw.endswith(b"\r\n"):
            size -= 1
        if size > max_size:
            what = "gearmand" if actor.role == "gearmand" else "its peer"
            return [f"gproxy sends no packet over max_packet_size: it sent {what} a {frame.name} of {size} bytes"]
    return []


def _check_close(run: RunDigest, actor: ActorDigest, closes: list[CloseLine], gearmand: list[ActorDigest]) -> list[str]:
    kind = run.script.kind
    if not closes:
        if actor.reset_sent and not actor.sent_any:
            return []  # reset before gproxy accepted it: nothing to log
        return [f"one close line per connection: none names {actor.name}'s port {actor.local_port}"]
    problems = []
    if len(closes) > 1:
        problems.append(f"one close line per connection: {len(closes)} for port {actor.local_port}")
    close = closes[0]
    reason = close.protocol_reason
    side = _from_side(close.reason)
    mine = actor.verdict
    theirs = [g.verdict for g in gearmand]
    if close.reason.startswith("internal error"):
        problems.append(f"no internal error: {close.reason}")
    if close.level == "WARNING" and reason is None and not close.reason.startswith(("gearmand unreachable", "gproxy cannot open")):
        problems.append(f"a WARNING close line says what was bad: it says '{close.reason}'")
    if reason is not None:
        if close.level != "WARNING":
            problems.append(f"bad input is logged at WARNING: {close.level} {close.reason}")
        if side == "peer" and not mine.allows(reason):
            problems.append(
                f"refusals match the input: gproxy refused the worker's bytes ({close.reason}); the reference says "
                f"{mine.error or 'valid'} {mine.detail}".rstrip()
            )
        if side == "gearmand":
            if actor.route == "A":
                problems.append(f"gproxy never refuses what the real gearmand sent: {close.reason}")
            elif not any(t.allows(reason) for t in theirs):
                said = "; ".join(f"{t.error or 'valid'} {t.detail}".strip() for t in theirs) or "nothing sent"
                problems.append(f"refusals match the input: gproxy refused the fake's bytes ({close.reason}); the reference says {said}")
    elif close.level != "WARNING" and (close.reason in NORMAL_CLOSES or close.reason.startswith(GEARMAND_WENT[0])):
        answered = mine.error == "mid_packet" and close.reason.startswith(GEARMAND_WENT[0])  # (gearmand left first)
        if mine.error and not actor.reset_sent and not answered and not (
            close.reason.startswith(GEARMAND_WENT) and kind != "after_close"
        ):
            problems.append(
                f"bad input is refused: the worker's {mine.error} ({mine.detail}) ended in '{close.reason}' ({close.level})"
            )
        current = gearmand[-1] if gearmand else None
        for g in gearmand:
            answered = g.verdict.error == "mid_packet" and close.reason == NORMAL_CLOSES[0]  # (the worker left first)
            if g.verdict.error and g is current and not g.reset_sent and not answered and close.reason in NORMAL_CLOSES:
                problems.append(
                    f"bad input is refused: the fake's {g.verdict.error} ({g.verdict.detail}) ended in '{close.reason}'"
                )
    return problems


def _equivalent(sent: wire.Frame, got: wire.Frame) -> bool:
    if sent.raw == got.raw:
        return True
    a, b = sent.args(), got.args()
    if a is None or b is None:
        return False
    if sent.name == "JOB_ASSIGN_UNIQ" and got.name == "JOB_ASSIGN":
        return [a[0], a[1], a[3]] == b
    if sent.number == got.number and sent.number in wire.ASSIGNS and sent.name != "JOB_ASSIGN":
        unique = a[2]
        return unique.startswith(b"gpr:") and a[:2] == b[:2] and a[3:] == b[3:]
    return False


def _transparency(
    worker: Actor, links: list[Actor], digests: dict[str, ActorDigest], max_size: int
) -> tuple[list[str], list[str]]:
    """What each of the fake's connections sent reaches the worker in order (as documented):
    (problems, what never arrived)."""
    expected = []
    whole = True
    for g in links:
        verdict = digests[g.name].verdict
        expected.append(verdict.frames)
        if verdict.error or g.reset_sent or verdict.maybe:
            whole = False
    matched = [0] * len(links)
    for got in worker.frames:
        for i, frames in enumerate(expected):
            j = matched[i]
            while j < len(frames) and not _equivalent(frames[j], got) and frames[j].name in ("ERROR", "OPTION_RES"):
                j += 1  # a reply gproxy may keep to itself (see the module doc)
            if j < len(frames) and _equivalent(frames[j], got):
                matched[i] = j + 1
                break
        else:
            if got.name == "NO_JOB" and len(links) > 1:
                continue  # gproxy's own answer to a grab left open on a moved-off connection
            return [(f"gproxy passes gearmand's packets on unchanged: the worker got a {got.name} "
                     f"({got.raw[:60]!r}) the fake never sent in that order")], []
    if whole and worker.framer is not None and not worker.framer.broken:
        for g, frames, count in zip(links, expected, matched, strict=True):
            missing = [f.name for f in frames[count:] if f.name not in ("ERROR", "OPTION_RES")]
            if missing:
                return [], [(f"gproxy passes gearmand's packets on whole: {len(missing)} of what {g.name} sent never "
                             f"reached the worker ({', '.join(missing[:5])})")]
    return [], []
