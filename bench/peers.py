"""Minimal blocking-socket Gearman worker and client, one process each (no shared GIL).

Tiny on purpose: the peers cost the same in every setup, so the difference is the hop.
"""

from __future__ import annotations

import collections
import socket
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event

from gproxy.core.protocol import REQ, RES, AdminLine, Framer, Packet, PacketType as P, build_packet

IO_TIMEOUT = 15.0
"""Seconds a client read may block: a lost job becomes an error, never a hang."""


class Peer:
    """One TCP connection (TCP_NODELAY), read packet by packet with gproxy's Framer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.framer = Framer(RES)
        self.frames: collections.deque[Packet | AdminLine] = collections.deque()
        self.send = self.sock.sendall

    def recv(self) -> Packet:
        while not self.frames:
            if not (data := self.sock.recv(65536)):
                raise ConnectionError("server closed the connection")
            self.frames.extend(self.framer.receive(data))
        frame = self.frames.popleft()
        if type(frame) is not Packet:
            raise RuntimeError(f"unexpected admin line {frame!r}")
        return frame

    def expect(self, ptype: P) -> Packet:
        if (packet := self.recv()).type is not ptype:
            raise RuntimeError(f"expected {ptype.name}, got {packet.type.name} {packet.body[:60]!r}")
        return packet


def worker(port: int, function: bytes, ready: Event) -> None:
    """libgearman's loop: GRAB_JOB_UNIQ; NO_JOB -> PRE_SLEEP, NOOP -> GRAB. Runs until killed."""
    peer = Peer(port)
    peer.sock.settimeout(None)  # may idle; the parent kills it
    # CAN_DO has no reply: an ECHO round trip proves gearmand registered it (and the hop works).
    peer.send(build_packet(REQ, P.CAN_DO, function=function) + build_packet(REQ, P.ECHO_REQ, data=b"hi"))
    peer.expect(P.ECHO_RES)
    ready.set()
    grab, pre_sleep = build_packet(REQ, P.GRAB_JOB_UNIQ), build_packet(REQ, P.PRE_SLEEP)
    peer.send(grab)
    while True:
        ptype = (packet := peer.recv()).type
        if ptype is P.JOB_ASSIGN_UNIQ:
            handle = packet.body.split(b"\0", 1)[0]
            peer.send(build_packet(REQ, P.WORK_COMPLETE, handle=handle, data=b"done"))
            peer.send(grab)  # a separate write, as libgearman does
        elif ptype is P.NO_JOB:
            peer.send(pre_sleep)
        elif ptype is P.NOOP:
            peer.send(grab)
        else:
            raise RuntimeError(f"worker got unexpected {ptype.name}")


def client(port: int, function: bytes, jobs: int, ready: Event, start: Event,
           out: Connection, tag: str) -> None:
    """Submit `jobs` jobs one at a time; send (done, t0, t1, latencies_ns | error text) to `out`.

    Connects first, then waits for `start` so that parallel clients begin together.
    """
    lat: list[int] = []
    try:
        peer = Peer(port)
        ready.set()
        if not start.wait(IO_TIMEOUT):
            raise TimeoutError("never told to start")
        clock, t0 = time.perf_counter_ns, time.perf_counter()
        for i in range(jobs):
            submit = build_packet(REQ, P.SUBMIT_JOB, function=function,
                                  unique=f"{tag}-{i}".encode(), data=b"0123456789abcdef")
            s = clock()
            peer.send(submit)
            peer.expect(P.JOB_CREATED)
            peer.expect(P.WORK_COMPLETE)
            lat.append(clock() - s)
        out.send((len(lat), t0, time.perf_counter(), lat))
    except Exception as exc:  # report it; never leave the parent waiting
        out.send((len(lat), 0.0, 0.0, f"{type(exc).__name__}: {exc}"))
