"""gproxy's own limits: a connection it cannot open or accept for want of something on its
own host (file descriptors, memory, socket buffers, local ports) is not gearmand's fault,
and must not be reported as such. Pure: an error in, a verdict out.

trio.open_tcp_stream raises an OSError without an errno ("all attempts to connect to … failed")
whose `__cause__` is an ExceptionGroup of one OSError per address it tried; the errno that
says why is in there.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Final

from .tls_refusals import TlsError

RESOURCES: Final = ("file_descriptors", "memory", "buffers", "local_ports")
"""The values of gproxy_resource_exhausted_total's `resource` label."""

_RESOURCE: Final = {
    errno.EMFILE: "file_descriptors",
    errno.ENFILE: "file_descriptors",
    errno.ENOMEM: "memory",
    errno.ENOBUFS: "buffers",
    errno.EADDRNOTAVAIL: "local_ports",
}
_REMEDY: Final = {
    errno.EMFILE: "gproxy's own limit: raise its file limit, LimitNOFILE / ulimit -n",
    errno.ENFILE: "the file table of gproxy's host is full: raise fs.file-max",
    errno.ENOMEM: "gproxy's host is out of memory",
    errno.ENOBUFS: "gproxy's host has no kernel buffer space left for a socket",
    errno.EADDRNOTAVAIL: "gproxy's host has no local port (or, for IPv6, address) left to reach it: "
    "widen net.ipv4.ip_local_port_range",
}


class ResourceExhausted(OSError):
    """A connection that failed for want of gproxy's own `resource`; its message names the
    remedy, e.g. `[Errno 24] Too many open files (gproxy's own limit: raise its file limit,
    LimitNOFILE / ulimit -n)`."""

    def __init__(self, cause: OSError) -> None:
        code = cause.errno
        assert code is not None
        super().__init__(code, f"{cause.strerror or errno.errorcode.get(code, code)} ({_REMEDY[code]})")
        self.resource: str = _RESOURCE[code]


def own_exhaustion(exc: BaseException) -> ResourceExhausted | None:
    """What of gproxy's own ran out, if that is why `exc` (from a connect or an accept) was
    raised; None if the other side, or the network, is to blame.

    Out of descriptors, memory or buffers for any address tried: gproxy's own, whatever the
    other addresses answered (they would have been tried in vain too). No local port: only
    if every address tried says so, since EADDRNOTAVAIL is also what connecting to an
    address family the host has turned off (::1 without IPv6) gives, next to gearmand's
    own refusal on the other family.
    """
    errors = list(_errors(exc))
    own = [error for error in errors if error.errno in _RESOURCE]
    for error in own:
        if error.errno != errno.EADDRNOTAVAIL:
            return ResourceExhausted(error)
    if own and len(own) == len(errors):
        return ResourceExhausted(own[0])
    return None


def _errors(exc: BaseException, depth: int = 0) -> Iterator[OSError]:
    """The OSErrors with an errno in `exc`: itself, or what it wraps (an exception group's
    members, its cause)."""
    if depth > 8:  # (a chain that long is not trio's)
        return
    if isinstance(exc, BaseExceptionGroup):
        for member in exc.exceptions:
            yield from _errors(member, depth + 1)
    elif isinstance(exc, OSError) and exc.errno is not None:
        yield exc
    elif exc.__cause__ is not None:
        yield from _errors(exc.__cause__, depth + 1)


def cannot_connect(exc: BaseException, gearmand: str = "gearmand", fresh: bool = False) -> str:
    """Why a connection to `gearmand` failed, as a log line or a probe says it: gproxy's own
    limit if it is one (a ResourceExhausted), else gearmand unreachable."""
    if isinstance(exc, ResourceExhausted):
        return f"gproxy cannot open {'a fresh' if fresh else 'a'} connection to {gearmand}: {exc}"
    if isinstance(exc, TlsError):
        return f"{gearmand}{' (a fresh connection)' if fresh else ''}: TLS handshake failed: {exc}"
    return f"{gearmand} unreachable{' for a fresh connection' if fresh else ''}: {str(exc) or 'timed out'}"
