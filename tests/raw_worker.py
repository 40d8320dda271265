"""A worker of raw packets through gproxy, for tests that must know exactly which job is
where: one running, one held."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from gproxy.core.protocol import REQ, RES, Framer, Packet, PacketType, build_packet

P = PacketType


def next_packet(sock: socket.socket, framer: Framer) -> Packet:
    """The next packet on `sock` (the tests that call this expect one at a time)."""
    frames: list[object] = []
    while not frames:
        data = sock.recv(65536)
        assert data, "closed before a whole packet came"
        frames = framer.receive(data)
    (frame,) = frames
    assert isinstance(frame, Packet)
    return frame


@dataclass
class RawWorker:
    sock: socket.socket
    framer: Framer
    handles: list[bytes]

    def send(self, ptype: PacketType, **fields: bytes) -> None:
        self.sock.sendall(build_packet(REQ, ptype, **fields))


def worker_with_jobs(proxy: tuple[str, int], gearmand: tuple[str, int], function: bytes, jobs: int = 2) -> RawWorker:
    """A worker connected through gproxy at `proxy`, running `jobs` background jobs of
    `function` submitted straight to gearmand (their handles in the order assigned)."""
    worker = RawWorker(socket.create_connection(proxy, timeout=10), Framer(RES), [])
    worker.send(P.CAN_DO, function=function)
    with socket.create_connection(gearmand, timeout=10) as client:
        for n in range(jobs):
            client.sendall(build_packet(REQ, P.SUBMIT_JOB_BG, function=function, unique=b"%d" % n, data=b""))
            assert next_packet(client, Framer(RES)).type is P.JOB_CREATED
    while len(worker.handles) < jobs:
        worker.send(P.GRAB_JOB_UNIQ)
        if (packet := next_packet(worker.sock, worker.framer)).type is P.JOB_ASSIGN_UNIQ:
            worker.handles.append(packet.args()["handle"])
    return worker
