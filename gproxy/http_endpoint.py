"""`/metrics`, `/healthz`, `/readyz` and `/held` over plain HTTP, served by the proxy's own
trio loop; with `admin = true`, the POSTs that steer held retries too.

A scrape or a probe is one short request: no keep-alive, no thread, a deadline per request,
so a stuck client cannot hold anything for long.
"""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from .config import Address
from .core.fields import about
from .core.metrics import Metrics

log = logging.getLogger("gproxy.http")
REQUEST_DEADLINE = 10.0
MAX_REQUEST = 8192

Readiness = Callable[[], Awaitable[tuple[bool, str]]]


class Operator(Protocol):
    """What `/held` shows and the admin POSTs do (steering.Steering)."""

    admin: bool
    """The POSTs are allowed (the listener is unauthenticated: off by default)."""

    def held(self, function: bytes | None) -> dict[str, Any]: ...

    def retry_now(self, key: int) -> bool: ...

    def give_up_now(self, key: int) -> bool: ...

    def pause(self, function: bytes) -> None: ...

    def resume(self, function: bytes) -> None: ...

    def reload(self) -> tuple[bool, str]: ...


async def bind_http(address: Address) -> tuple[list[trio.SocketListener], Address]:
    """Bind the listeners (an OSError here, the address in use, is plain: the command
    reports it in one line) and say where they are."""
    listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    host, port, *_ = listeners[0].socket.getsockname()
    bound = Address(host, port)
    log.info(
        "metrics on http://%s/metrics (health: /healthz, readiness: /readyz, held retries: /held)", bound,
        extra=about(address=str(bound)),
    )
    return listeners, bound


async def serve_http(
    listeners: list[trio.SocketListener],
    metrics: Metrics,
    ready: Readiness,
    operator: Operator,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await trio.serve_listeners(partial(_handle, metrics, ready, operator), listeners, task_status=task_status)


async def _handle(metrics: Metrics, ready: Readiness, operator: Operator, stream: trio.SocketStream) -> None:
    async with stream:
        with trio.move_on_after(REQUEST_DEADLINE):
            try:
                request = await _read_head(stream)
                if request is not None:
                    await stream.send_all(await _respond(request, metrics, ready, operator))
            except (trio.BrokenResourceError, OSError):
                pass
            except Exception:  # a failing collector costs one scrape, never the proxy
                log.exception("internal error answering an HTTP request", extra=about())
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    await stream.send_all(_response(500, b"internal error\n"))


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        data += chunk
    return data


async def _respond(request: bytes, metrics: Metrics, ready: Readiness, operator: Operator) -> bytes:
    parts = request.split(b"\n", 1)[0].split()
    if len(parts) >= 2 and parts[0] == b"POST":
        return _steer(operator, parts[1].split(b"?", 1)[0])
    if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
        return _response(405, b"method not allowed\n")
    path, _, query = parts[1].partition(b"?")
    head_only = parts[0] == b"HEAD"
    if path == b"/held":
        function = urllib.parse.parse_qs(query.decode("latin-1"), encoding="latin-1").get("function")
        view = operator.held(function[0].encode("latin-1") if function else None)
        return _json(200, view, head_only)
    if path == b"/metrics":
        # Copied on the loop, rendered in a thread: traffic never waits for a scrape.
        body = await trio.to_thread.run_sync(metrics.render, metrics.snapshot())
        return _response(200, body, CONTENT_TYPE_LATEST, head_only)
    if path == b"/healthz":
        return _response(200, b"ok\n", head_only=head_only)
    if path == b"/readyz":
        is_ready, detail = await ready()
        return _response(200 if is_ready else 503, detail.encode() + b"\n", head_only=head_only)
    return _response(404, b"not found\n", head_only=head_only)


def _steer(operator: Operator, path: bytes) -> bytes:
    """POST /held/KEY/retry, /held/KEY/give-up, /functions/NAME/pause, /functions/NAME/resume,
    /reload."""
    if not operator.admin:
        return _json(403, {"error": "admin is off: set admin = true in gproxy's config to steer held retries"})
    if path == b"/reload":
        done, message = operator.reload()
        return _json(200, {"ok": message}) if done else _json(409, {"error": message})
    segments = path.split(b"/")
    if len(segments) != 4 or segments[0] != b"":
        return _json(404, {"error": "not found"})
    _, what, name, action = segments
    if what == b"held" and action in (b"retry", b"give-up"):
        if not name.isdigit():
            return _json(404, {"error": f"no held job {name.decode('latin-1')!r}: keys are numbers (GET /held)"})
        done = operator.retry_now(int(name)) if action == b"retry" else operator.give_up_now(int(name))
        if not done:
            why = "not held, or its retry is under way already" if action == b"retry" else "not held"
            return _json(409 if action == b"retry" else 404, {"error": f"held job {int(name)}: not done: {why} (GET /held)"})
        return _json(200, {"ok": f"held job {int(name)}: {action.decode()} done"})
    if what == b"functions" and action in (b"pause", b"resume"):
        function = urllib.parse.unquote_to_bytes(name)
        (operator.pause if action == b"pause" else operator.resume)(function)
        return _json(200, {"ok": f"retries of {function.decode('utf-8', 'backslashreplace')}: {action.decode()}d"})
    return _json(404, {"error": "not found"})


def _json(status: int, value: Any, head_only: bool = False) -> bytes:
    return _response(status, json.dumps(value, indent=1).encode() + b"\n", "application/json", head_only)


_REASONS = {
    200: "OK", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
    500: "Internal Server Error", 503: "Service Unavailable",
}


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else body)
