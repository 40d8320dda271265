"""What an operator sees of the jobs held for a retry: `GET /held` and `gproxy held`.

The view is plain data (JSON), made on the proxy's loop from the Retrier's state; the table
is made from that JSON, so the command needs nothing but the endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .policy import exception_text
from .protocol import PacketType
from .retry import Retrier, State

FAILURE_SHOWN = 200
"""Bytes of a job's last failure shown (the rest may be megabytes of a worker's dump)."""


def held_view(retrier: Retrier[Any, Any], now: float, function: bytes | None = None) -> dict[str, Any]:
    """Every held job (of `function`, if given), oldest first, and the paused functions."""
    jobs = []
    for key in sorted(retrier.held):
        job = retrier.held[key]
        if function is not None and job.function != function:
            continue
        ptype, failure = job.last_failure
        text = exception_text(failure) if ptype is PacketType.WORK_EXCEPTION else failure
        waiting = job.state in (State.WAITING, State.DEFERRED, State.PAUSED)
        jobs.append({
            "key": key,
            "function": _shown(job.function),
            "handle": _shown(job.handle),
            "unique": _shown(job.unique),
            "upstream": str(getattr(job.route, "upstream", job.route)),
            "attempt": job.attempt,
            "max_attempts": job.policy.max_attempts,
            "state": job.state.value,
            "next_attempt_in": _seconds(job.next_attempt_at, now) if job.state is State.WAITING else None,
            "gives_up_in": _seconds(job.deadline, now) if waiting else None,
            "last_failure": {"type": ptype.name, "data": _shown(text[:FAILURE_SHOWN])},
        })
    return {"held": jobs, "paused": sorted(_shown(name) for name in retrier.paused)}


def table(view: Mapping[str, Any]) -> str:
    """The view as a terminal table, one held job a line."""
    rows: list[Sequence[str]] = [("KEY", "FUNCTION", "HANDLE", "ATTEMPT", "STATE", "NEXT IN", "LAST FAILURE")]
    for job in view["held"]:
        state = job["state"] + (" (paused)" if job["function"] in view["paused"] and job["state"] != "paused" else "")
        rows.append((
            str(job["key"]), job["function"], job["handle"], f"{job['attempt']}/{job['max_attempts']}", state,
            "-" if job["next_attempt_in"] is None else f"{job['next_attempt_in']:.1f}s",
            f"{job['last_failure']['type']} {job['last_failure']['data']}".replace("\n", " ")[:60].rstrip(),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    summary = f"{len(view['held'])} held"
    if view["paused"]:
        summary += f"; retries paused: {', '.join(view['paused'])}"
    return "\n".join([*lines, summary]) + "\n"


def _seconds(at: float | None, now: float) -> float | None:
    return None if at is None else round(max(at - now, 0.0), 3)


def _shown(value: bytes) -> str:
    """Bytes as text an operator can read and copy, every byte visible (backslashreplace)."""
    return value.decode("utf-8", "backslashreplace")
