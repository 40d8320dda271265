"""What the fake gearmand sees of gproxy's retry connections, and two invariants on it.

Every retry connection gproxy opens to the fake (served by the fake's model, dropped at once
in a storm, or claimed by a script) is a `RetryConnection`: when it was accepted, each
SUBMIT_JOB that arrived on it, and when it was lost. The checks:

- `retry_reconnects`: gproxy opens its retry connection again no faster than its documented
  backoff allows (README, "The retry connection lost": from 0.1 s doubling to 5 s, afresh
  only once a connection has proved itself, gearmand having answered on it and it having
  stayed up 5 s; a proven connection lost is tried again at once). `reconnect_bound(W)` is
  the most accepts that rule allows in any W seconds, whatever gearmand does: the worst is
  a gearmand that keeps each connection exactly 5 s now and then and drops the others at
  once: 50 in 60 s (cycles of a proven connection, then four dropped ones 0, 0.1, 0.3
  and 0.7 s after its end: five in 6.5 s), 11 in 10 s. The fake's own ends of retry
  connections (its model closes each after 2-8 s, proven or not) are such a gearmand.
  Counted by the fake at every accept, in sliding windows of 10 and 60 s, each held to the
  bound of a window 1 s longer (the fake's loop may be late to an accept): 12 and 52.
- `held_progress`: a held job whose retry was in flight on a retry connection that was lost
  (a SUBMIT_JOB for it had arrived on it) gets its next attempt (a new SUBMIT_JOB for it, on
  a later connection) or ends (gproxy's log says its hold ended: the retry succeeded, failed
  for good, ran out of attempts, was refused, or its original job's connection went, which
  abandons it) within HELD_BOUND seconds of the loss. The bound: the longest backoff (5 s),
  a storm of the fake's (at most STORM_MAX seconds, during which no submission can be seen),
  and slack. A job is known by what gproxy's retry unique id keeps of the original
  (`gpr:<n>[.<tag>]` then `:<unique>`, `@<hash of the handle>` or `#<hash of the unique>`):
  the fake notes every job it (or a script acting as it) assigns, to find its handle in
  gproxy's log.
"""

from __future__ import annotations

import hashlib
import re
import time
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field

from tests.fuzz import wire
from tests.fuzz.monitor import _wall

BACKOFF_INITIAL = 0.1
BACKOFF_MAXIMUM = 5.0
PROVEN_AFTER = 5.0
"""The README's figures for the retry connection's backoff (not read from gproxy: the fuzz
may run another version of it, see --src)."""
TIMING_SLACK = 0.05
"""Seconds each of gproxy's waits may look shorter than it is (clocks, timer wake-ups)."""
LOOP_LATENCY = 1.0
"""Seconds the fake's loop (shared with every actor of the run) may be late to an accept:
accepts stamped late bunch up, so a window of W seconds is held to the bound of W + this."""
WINDOWS = (10.0, 60.0)
"""Sliding windows (seconds) in which retry connections are counted."""
STORM_MIN, STORM_MAX = 2.0, 6.0
"""Seconds an accept_and_drop storm of the fake lasts (it resets every new retry connection)."""
HELD_BOUND = 15.0
"""Seconds after a retry connection's loss by which each job in flight on it must have had
its next submission or ended: the backoff's cap (5 s) after the longest storm (6 s), and 4 s
of slack for a busy 2-core machine."""
_RETRY_UNIQUE = re.compile(rb"gpr:\d{1,9}(?:\.[0-9a-z]{1,16})?([:@#])(.*)", re.DOTALL)
_HOLD_ENDS = re.compile(
    r"^(?P<time>\S+ \S+) [A-Z]+ gproxy\.retry: (?:retry succeeded: |retry failed for good: |retry exhausted: |"
    r"retry of |connection holding |operator: giving up |gearmand assigned held job )(?P<job>.+?) "
    r"(?:on attempt \d|failed \d+ attempts|after \d+ attempt|refused by gearmand|failed for good|waited max_hold_time"
    r"|lost: gearmand requeues|again \()"
)
"""gproxy's log lines that end a hold, and the job each names: `FUNCTION HANDLE` as gproxy
shows them (bytes decoded as UTF-8, what is not replaced by U+FFFD; either may hold a space)."""


@dataclass(eq=False)
class RetryConnection:
    """One of gproxy's retry connections to the fake (wall-clock times, as gproxy's log)."""

    opened: float
    how: str = "model"
    """model (the fake's gearmand model answered it), dropped (reset at once in a storm) or
    scripted (a script's actor played the fake)."""
    submissions: list[tuple[float, bytes, bytes]] = field(default_factory=list)
    """(when it arrived, function, unique) of each SUBMIT_JOB*."""
    lost: float | None = None
    """When it ended: the fake reset or closed it, or gproxy closed it."""
    attack: str | None = None

    def saw(self, frames: list[wire.Frame]) -> None:
        now = time.time()
        for frame in frames:
            if frame.name.startswith("SUBMIT_JOB"):
                args = frame.args()
                if args:
                    self.submissions.append((now, args[0], args[1]))

    def end(self) -> None:
        if self.lost is None:
            self.lost = time.time()


def retry_identity(unique: bytes) -> bytes | None:
    """What a retry's unique id keeps of the original job (None: not a retry's)."""
    match = _RETRY_UNIQUE.fullmatch(unique)
    return match[1] + match[2] if match else None


def job_identities(handle: bytes, unique: bytes) -> list[bytes]:
    """Every form `retry_identity` may find for a job assigned with `handle` and `unique`."""
    forms = [b"@" + hashlib.sha1(handle).hexdigest()[:32].encode(), b"#" + hashlib.sha1(unique).hexdigest().encode()]
    return [b":" + unique, *forms] if unique else forms


class Jobs:
    """Every job the fake's side assigned, by identity: each as gproxy's log names it,
    `FUNCTION HANDLE` (a unique id may be used by several jobs)."""

    def __init__(self) -> None:
        self.handles: dict[bytes, set[str]] = defaultdict(set)

    def note_sent(self, data: bytes) -> None:
        """Bytes the fake's side sent a gproxy connection: each assignment in them is noted."""
        if len(data) > 1 << 20:
            return  # oversized assignments are no job gproxy holds
        for frame in wire.RefFramer(wire.RES).feed(data):
            if frame.number in wire.ASSIGNS:
                args = frame.args()
                if args:
                    unique = args[2] if frame.name != "JOB_ASSIGN" else b""
                    for form in job_identities(args[0], unique):
                        self.handles[form].add(f"{_text(args[1])} {_text(args[0])}")


def _text(value: bytes) -> str:
    """Bytes as gproxy's log shows them."""
    return value.decode("utf-8", "replace")


def hold_ends(log_text: str) -> dict[str, list[float]]:
    """`FUNCTION HANDLE` -> when gproxy's log says a hold of that job ended (wall clock)."""
    ends: dict[str, list[float]] = defaultdict(list)
    for line in log_text.splitlines():
        if "gproxy.retry: " in line and (match := _HOLD_ENDS.match(line)) is not None:
            ends[match["job"]].append(_wall(match["time"]))
    return ends


# -- retry_reconnects


def reconnect_bound(window: float, slack: float = TIMING_SLACK) -> int:
    """The most retry connections gproxy's backoff allows it to open in `window` seconds
    (each wait and a proven connection's 5 s taken `slack` shorter)."""
    unit = 0.01
    waits, delay = [], BACKOFF_INITIAL
    while True:
        waits.append(max(1, round((delay - slack) / unit)))
        if delay >= BACKOFF_MAXIMUM:
            break
        delay = min(delay * 2, BACKOFF_MAXIMUM)
    proven = round((PROVEN_AFTER - slack) / unit)
    span = round(window / unit)
    # most[t][i]: accepts in t units from one accept at 0, the next unproven loss waiting waits[i].
    most = [[1] * len(waits) for _ in range(span + 1)]
    for t in range(span + 1):
        for i, wait in enumerate(waits):
            best = 1
            if wait <= t:
                best = max(best, 1 + most[t - wait][min(i + 1, len(waits) - 1)])
            if proven <= t:
                best = max(best, 1 + most[t - proven][0])
            most[t][i] = best
    return max(most[span])


def busiest(times: list[float], window: float) -> tuple[int, float]:
    """The most of `times` within any `window` seconds, and when that window starts."""
    times = sorted(times)
    best, at = 0, times[0] if times else 0.0
    for i, start in enumerate(times):
        count = bisect_right(times, start + window) - i
        if count > best:
            best, at = count, start
    return best, at


@dataclass
class Reconnects:
    ok: bool
    figure: str
    details: list[str]
    worst: dict[float, int]


def check_reconnects(connections: list[RetryConnection]) -> Reconnects:
    times = [c.opened for c in connections]
    worst, details = {}, []
    for window in WINDOWS:
        bound = reconnect_bound(window + LOOP_LATENCY)
        count, at = busiest(times, window)
        worst[window] = count
        if count > bound:
            dropped = sum(1 for c in connections if at <= c.opened <= at + window and c.how == "dropped")
            details.append(f"gproxy opened {count} retry connections in {window:g}s (bound {bound}), "
                           f"from {time.strftime('%H:%M:%S', time.localtime(at))}; {dropped} of them dropped at once")
    figure = ", ".join(f"{worst[w]} in {w:g}s (bound {reconnect_bound(w + LOOP_LATENCY)})" for w in WINDOWS)
    return Reconnects(not details, f"at most {figure}; {len(times)} retry connections in all", details, worst)


# -- held_progress


@dataclass
class Progress:
    ok: bool
    figure: str
    details: list[str]
    in_flight: int = 0
    resubmitted: int = 0
    ended: int = 0
    undecided: int = 0
    unknown: int = 0
    worst: float = 0.0
    by_function: dict[str, int] = field(default_factory=dict)


def check_held_progress(
    connections: list[RetryConnection], jobs: Jobs, ends: dict[str, list[float]], observed_until: float,
    bound: float = HELD_BOUND,
) -> Progress:
    arrivals: dict[bytes, list[float]] = defaultdict(list)
    for c in connections:
        for at, _, unique in c.submissions:
            if (identity := retry_identity(unique)) is not None:
                arrivals[identity].append(at)
    for times in arrivals.values():
        times.sort()
    result = Progress(True, "", [])
    by_function: dict[str, int] = defaultdict(int)
    for c in connections:
        if c.lost is None:
            continue
        for at, function, unique in c.submissions:
            identity = retry_identity(unique)
            if identity is None:
                continue
            later = arrivals[identity]
            following = later[bisect_right(later, at)] if bisect_right(later, at) < len(later) else None
            handles = jobs.handles.get(identity, set())
            # (the fake may read a submission late: it reads nothing while it delays a reply)
            ended = min((e for h in handles for e in ends.get(h, ()) if e >= c.opened - 0.5), default=None)
            if ended is not None and ended < c.lost - 0.5:
                continue  # its hold had ended (the retry's outcome came): nothing was in flight
            result.in_flight += 1
            by_function[function.decode("latin-1")[:40]] += 1
            if following is not None and following <= c.lost + bound and (ended is None or following <= ended):
                result.resubmitted += 1
                result.worst = max(result.worst, following - c.lost)
            elif ended is not None and ended <= c.lost + bound:
                result.ended += 1
            elif c.lost + bound > observed_until and following is None and ended is None:
                result.undecided += 1
            elif not handles and following is None:
                result.unknown += 1  # a job the fake did not assign (its end cannot be looked up)
            else:
                what = "never" if following is None and ended is None else \
                    f"only {min(x for x in (following, ended) if x is not None) - c.lost:.1f}s after it"
                result.details.append(
                    f"held job {' or '.join(sorted(handles)) or function.decode('latin-1')[:40] + ' ?'} (retry unique "
                    f"{unique.decode('latin-1')[:60]}): its retry connection ({c.how}"
                    f"{', ' + c.attack if c.attack else ''}) was lost at {_clock(c.lost)} and the job had no next "
                    f"attempt and no end within {bound:g}s ({what})"
                )
    result.by_function = dict(sorted(by_function.items()))
    result.ok = not result.details
    result.figure = (
        f"{result.in_flight} retries in flight on lost retry connections: {result.resubmitted} submitted again "
        f"(worst {result.worst:.1f}s after the loss), {result.ended} ended, {result.undecided} still open at the end"
        + (f", {result.unknown} of jobs the fake never assigned" if result.unknown else "")
        + (f"; {len(result.details)} stalled" if result.details else "") + f" (bound {bound:g}s)"
    )
    return result


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"
