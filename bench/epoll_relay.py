"""The floor for any Python proxy: a plain epoll loop relaying bytes blindly.

Every socket is registered once; a ready socket gets one recv, and what it read is sent to
its partner at once (kept, with reading paused, only while the partner's kernel buffer is
full). No framing, no trio, no gproxy code: `gproxy/epoll-relay` is what gproxy costs over
the least a Python process can do per forwarded chunk. Usage: epoll_relay.py LISTEN_PORT
UPSTREAM_PORT
"""

from __future__ import annotations

import select
import signal
import socket
import sys

IN, OUT = select.EPOLLIN, select.EPOLLOUT


def main(listen_port: int, upstream_port: int) -> None:
    listener = socket.create_server(("127.0.0.1", listen_port), backlog=128)
    listener.setblocking(False)
    epoll = select.epoll()
    epoll.register(listener.fileno(), IN)
    socks: dict[int, socket.socket] = {}
    partner: dict[int, int] = {}
    pending: dict[int, bytes] = {}  # fd -> bytes waiting to be written to it

    def close(fd: int) -> None:
        for end in (fd, partner.pop(fd, None)):
            if end is not None and end in socks:
                epoll.unregister(end)
                socks.pop(end).close()
                partner.pop(end, None)
                pending.pop(end, None)

    while True:
        for fd, mask in epoll.poll():
            if fd == listener.fileno():
                try:
                    down, _ = listener.accept()
                except BlockingIOError:
                    continue
                up = socket.create_connection(("127.0.0.1", upstream_port))
                for s in (down, up):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    s.setblocking(False)
                    socks[s.fileno()] = s
                    epoll.register(s.fileno(), IN)
                partner[down.fileno()], partner[up.fileno()] = up.fileno(), down.fileno()
                continue
            if fd not in socks:
                continue
            other = partner[fd]
            if mask & OUT:  # `fd` can take what waited for it: read its partner again
                data = pending.pop(fd)
                sent = _send(socks[fd], data)
                if sent < len(data):
                    pending[fd] = data[sent:]
                    continue
                epoll.modify(fd, IN)
                epoll.modify(other, IN)
                continue
            try:
                data = socks[fd].recv(65536)
            except OSError:
                data = b""
            if not data:
                close(fd)
                continue
            sent = _send(socks[other], data)
            if sent < len(data):
                pending[other] = data[sent:]
                epoll.modify(other, IN | OUT)
                epoll.modify(fd, 0)


def _send(sock: socket.socket, data: bytes) -> int:
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0
    except OSError:
        return len(data)  # the peer is gone: its own read reports it


if __name__ == "__main__":
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    main(int(sys.argv[1]), int(sys.argv[2]))
