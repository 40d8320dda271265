"""Which modules one retryable failure passes through, from the worker's WORK_EXCEPTION to
the client's result: measured, not read (a profile hook on gproxy's thread records every
call into gproxy between the two).

    .venv/bin/python bench/failure_path.py [--hops]   # needs gearmand on PATH

A raw worker takes a client's job through gproxy (shipped defaults), fails it with
`RETRY: ...`, grabs the retry job and completes it; the client's WORK_COMPLETE ends the
recording. Prints the modules in the order they are first entered, which of them call on into
another gproxy module (and which), and with --hops every call from module to module in order.
"""

from __future__ import annotations

import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gproxy.core.protocol import REQ, RES, Framer, Packet, PacketType, build_packet  # noqa: E402
from tests.gearmand import Gearmand  # noqa: E402
from tests.proxy_thread import ProxyThread  # noqa: E402

P = PacketType
calls: list[str] = []
edges: dict[tuple[str, str], int] = {}
"""(caller's module, callee's module): calls from one gproxy module into another."""
recording = threading.Event()


def profile(frame: FrameType, event: str, arg: Any) -> None:
    if event == "call" and recording.is_set():
        module = frame.f_globals.get("__name__", "")
        if module.startswith("gproxy"):
            calls.append(module)
            caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back is not None else ""
            if caller.startswith("gproxy") and caller != module:
                edges[(caller, module)] = edges.get((caller, module), 0) + 1


class Peer:
    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address)
        self.framer = Framer(RES, 1 << 20)
        self.inbox: list[Packet] = []

    def send(self, ptype: P, **fields: bytes) -> None:
        self.sock.sendall(build_packet(REQ, ptype, **fields))

    def expect(self, *wanted: P) -> Packet:
        while True:
            for i, packet in enumerate(self.inbox):
                if packet.type in wanted:
                    return self.inbox.pop(i)
            self.inbox += [f for f in self.framer.receive(self.sock.recv(65536)) if isinstance(f, Packet)]


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch, Gearmand(Path(scratch)) as gearmand:
        threading.setprofile(profile)
        with ProxyThread.to(gearmand.address) as proxy:
            threading.setprofile(None)  # type: ignore[arg-type]
            worker, client = Peer(proxy.address), Peer(gearmand.address)
            worker.send(P.CAN_DO, function=b"path")
            client.send(P.SUBMIT_JOB, function=b"path", unique=b"one", data=b"x")
            client.expect(P.JOB_CREATED)
            worker.send(P.GRAB_JOB_UNIQ)
            first = worker.expect(P.JOB_ASSIGN_UNIQ)
            time.sleep(0.2)  # (the grab's own bookkeeping is not the failure's path)
            recording.set()
            worker.send(P.WORK_EXCEPTION, handle=first.args()["handle"], data=b"RETRY: transient")
            worker.send(P.WORK_FAIL, handle=first.args()["handle"])
            while True:  # the retry job, after its backoff
                worker.send(P.GRAB_JOB_UNIQ)
                answer = worker.expect(P.JOB_ASSIGN_UNIQ, P.NO_JOB)
                if answer.type is P.JOB_ASSIGN_UNIQ:
                    break
                time.sleep(0.05)
            worker.send(P.WORK_COMPLETE, handle=answer.args()["handle"], data=b"done")
            result = client.expect(P.WORK_COMPLETE, P.WORK_FAIL, P.WORK_EXCEPTION)
            recording.clear()
    print(f"client's result: {result.type.name} {result.args().get('data', b'')!r}")
    hops = [m for i, m in enumerate(calls) if i == 0 or calls[i - 1] != m]
    order = list(dict.fromkeys(calls))
    print(f"{len(order)} modules, in the order first entered:")
    for module in order:
        print(f"  {module}")
    onward = sorted({caller for caller, _ in edges})
    print(f"{len(onward)} of them call on into another gproxy module (the rest are only consulted):")
    for module in onward:
        callees = sorted(callee.removeprefix("gproxy.") for caller, callee in edges if caller == module)
        print(f"  {module.removeprefix('gproxy.')} -> {', '.join(callees)}")
    if "--hops" in sys.argv:
        print(f"{len(hops) - 1} hops between modules (calls only, in order):")
        print("  " + " -> ".join(m.removeprefix("gproxy.") for m in hops))


if __name__ == "__main__":
    main()
