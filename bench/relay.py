"""The floor under gproxy: its own I/O layer (trio + gproxy.connection) relaying bytes blindly.

No framing, no Session: what is left is the cost of Python and trio per forwarded chunk, so
`gproxy/trio-relay` is what gproxy's protocol work costs and `trio-relay/haproxy` is what the
language and event loop cost. Usage: relay.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import sys
from functools import partial

import trio

from gproxy.connection import Connection


async def pump(source: Connection, sink: Connection) -> None:
    while data := await source.receive(65536):
        await sink.send_all(data)
    sink.send_eof()


async def handle(upstream_port: int, stream: trio.SocketStream) -> None:
    downstream = Connection.from_stream(stream)
    upstream = Connection.from_stream(await trio.open_tcp_stream("127.0.0.1", upstream_port))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, downstream, upstream)
            nursery.start_soon(pump, upstream, downstream)
    except* OSError:
        pass
    finally:
        downstream.close()
        upstream.close()


if __name__ == "__main__":
    listen_port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    try:
        trio.run(partial(trio.serve_tcp, partial(handle, upstream_port), listen_port, host="127.0.0.1"))
    except KeyboardInterrupt:
        pass
