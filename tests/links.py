"""What the tests of the Session's collaborators share: a gearmand connection as their rules
see it (what they read of session.UpstreamLink), a route, and the real codec."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gproxy.config import Address, Route
from gproxy.core.jobs import JobTable
from gproxy.core.protocol import REQ, RES, Framer, PacketType, build_packet

ROUTE = Route(Address("127.0.0.1", 4730), Address("127.0.0.1", 4731))


@dataclass(eq=False)
class Link:
    """One gearmand connection: its jobs, its framer, the grabs it has yet to answer."""

    name: str = "up"
    jobs: JobTable = field(default_factory=lambda: JobTable("up"))
    framer: Framer = field(default_factory=lambda: Framer(RES))
    grabs_pending: deque[bool] = field(default_factory=deque)
    replies_to_swallow: int = 0


def req(ptype: PacketType, **args: bytes) -> bytes:
    return build_packet(REQ, ptype, **args)


def res(ptype: PacketType, **args: bytes) -> bytes:
    return build_packet(RES, ptype, **args)
