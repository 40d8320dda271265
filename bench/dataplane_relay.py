"""gproxy's data plane relaying bytes blindly, with trio as its guest (idle), as in production.

No framing, no Session, no Pair: `dataplane-relay/epoll-relay` is what the data plane and
the guest run cost over a plain epoll loop, `gproxy/dataplane-relay` what gproxy's work on
each packet costs. Usage: dataplane_relay.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import contextlib
import socket
import sys

import trio

from gproxy.dataplane import DataPlane, Endpoint


class Forward:
    """Both endpoints of one relayed connection: what one reads, the other writes."""

    def __init__(self) -> None:
        self.other: dict[Endpoint, Endpoint] = {}

    def received(self, endpoint: Endpoint, data: bytes) -> None:
        self.other[endpoint].write(data)

    def ended(self, endpoint: Endpoint, error: OSError | None) -> None:
        endpoint.close()
        self.other[endpoint].close()

    def drained(self, endpoint: Endpoint) -> None:
        pass

    def failed(self, endpoint: Endpoint, exc: Exception) -> None:
        endpoint.close()


async def serve(plane: DataPlane, listen_port: int, upstream_port: int) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", listen_port))
    listener.listen()
    while True:
        accepted, _ = await listener.accept()
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        worker = socket.socket(fileno=accepted.detach())
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        relay = Forward()
        a, b = plane.add(worker, relay, "worker"), plane.add(upstream, relay, "gearmand")
        relay.other[a], relay.other[b] = b, a


if __name__ == "__main__":
    plane = DataPlane()
    with contextlib.suppress(KeyboardInterrupt):
        plane.run_host(serve, plane, int(sys.argv[1]), int(sys.argv[2]))
