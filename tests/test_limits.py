"""Which failed connections are gproxy's own limits (gproxy/core/limits.py): by errno, found in
the error itself or inside what trio wraps it in."""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio

from gproxy.core.limits import RESOURCES, ResourceExhausted, cannot_connect, own_exhaustion


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def as_trio_raises(*errors: OSError) -> OSError:
    """What trio.open_tcp_stream raises when every address failed (trio 0.35)."""
    message = "all attempts to connect to 127.0.0.1:4730 failed"
    try:
        raise OSError(message) from ExceptionGroup(message, list(errors))
    except OSError as exc:
        return exc


@pytest.mark.parametrize(
    ("code", "resource", "remedy"),
    [
        (errno.EMFILE, "file_descriptors", "gproxy's own limit: raise its file limit, LimitNOFILE / ulimit -n"),
        (errno.ENFILE, "file_descriptors", "raise fs.file-max"),
        (errno.ENOMEM, "memory", "out of memory"),
        (errno.ENOBUFS, "buffers", "no kernel buffer space"),
        (errno.EADDRNOTAVAIL, "local_ports", "net.ipv4.ip_local_port_range"),
    ],
)
@pytest.mark.parametrize("wrapped", [False, True], ids=["direct", "wrapped"])
def test_each_local_errno_is_gproxys_own(code: int, resource: str, remedy: str, wrapped: bool) -> None:
    error = oserror(code)
    found = own_exhaustion(as_trio_raises(error) if wrapped else error)
    assert isinstance(found, ResourceExhausted) and isinstance(found, OSError)
    assert found.resource == resource and found.resource in RESOURCES
    assert found.errno == code
    assert str(found).startswith(f"[Errno {code}] {os.strerror(code)} (")
    assert remedy in str(found)


def test_the_message_an_operator_reads() -> None:
    found = own_exhaustion(as_trio_raises(oserror(errno.EMFILE)))
    assert found is not None
    assert cannot_connect(found) == (
        "gproxy cannot open a connection to gearmand: [Errno 24] Too many open files "
        "(gproxy's own limit: raise its file limit, LimitNOFILE / ulimit -n)"
    )
    assert cannot_connect(found, "gearmand 10.0.0.5:4730").startswith("gproxy cannot open a connection to gearmand 10.0.0.5:4730: ")
    assert cannot_connect(found, fresh=True).startswith("gproxy cannot open a fresh connection to gearmand: ")


def test_gearmands_failures_are_not_gproxys() -> None:
    for code in (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNRESET):
        assert own_exhaustion(oserror(code)) is None
        assert own_exhaustion(as_trio_raises(oserror(code))) is None
    assert own_exhaustion(trio.TooSlowError()) is None
    assert own_exhaustion(socket.gaierror(socket.EAI_NONAME, "Name or service not known")) is None
    assert own_exhaustion(OSError("no errno at all")) is None
    refused = as_trio_raises(oserror(errno.ECONNREFUSED))
    assert cannot_connect(refused) == "gearmand unreachable: all attempts to connect to 127.0.0.1:4730 failed"
    assert cannot_connect(trio.TooSlowError(), fresh=True) == "gearmand unreachable for a fresh connection: timed out"


def test_several_addresses() -> None:
    """Out of descriptors on one address is gproxy's own whatever the others answered; no
    local port only if no address got further (EADDRNOTAVAIL is also ::1 on a host without
    IPv6, next to gearmand's refusal on 127.0.0.1)."""
    refused, emfile, no_port = oserror(errno.ECONNREFUSED), oserror(errno.EMFILE), oserror(errno.EADDRNOTAVAIL)
    found = own_exhaustion(as_trio_raises(refused, emfile))
    assert found is not None and found.resource == "file_descriptors"
    found = own_exhaustion(as_trio_raises(no_port, emfile))
    assert found is not None and found.resource == "file_descriptors"
    assert own_exhaustion(as_trio_raises(no_port, refused)) is None
    found = own_exhaustion(as_trio_raises(no_port, no_port))
    assert found is not None and found.resource == "local_ports"


async def test_a_real_refusal_from_trio_is_gearmands() -> None:
    with trio.socket.socket() as unused:  # a port nothing listens on
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(OSError) as raised:
        await trio.open_tcp_stream("127.0.0.1", port)
    assert own_exhaustion(raised.value) is None
    assert [error.errno for error in _leaves(raised.value)] == [errno.ECONNREFUSED]


def _leaves(exc: BaseException) -> list[OSError]:
    """What trio wrapped: checks the shape own_exhaustion relies on."""
    cause = exc.__cause__
    assert isinstance(cause, ExceptionGroup)
    return [error for error in cause.exceptions if isinstance(error, OSError)]
