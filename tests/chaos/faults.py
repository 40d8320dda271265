"""The seeded fault injector: one thread that breaks the world at random, and records it.

Kinds, dealt from a shuffled deck so that every kind comes up once per round of six:
- kill_worker: kill -9 a worker (its process group), then start another in its slot;
- term_gproxy: SIGTERM `g2`, which drains (running jobs and held retries may finish within
  its grace period) and exits; it must exit 0; then it is started again on the same ports;
- kill_gproxy: kill -9 `g2`, then start it again;
- reset_worker_link: reset (RST both ways) one worker's gearmand connection in the relay
  in front of `g1`;
- reset_retry_conn: reset `g1`'s retry connection(s) (the ones that open with OPTION_REQ
  exceptions);
- reset_burst: reset every connection in the relay, and refuse the next 0-3 new ones.

Each fault draws the same numbers from its own RNG whatever happens around it (the gap before
it, the kind, two uniform numbers for its target), so a seed makes the same decisions in the
same order; which process or connection a number lands on depends on what is alive then.
"""

from __future__ import annotations

import random
import struct
import threading
import time

from tests.chaos.history import Fault, Recorder
from tests.chaos.world import World

KINDS = ("kill_worker", "term_gproxy", "kill_gproxy", "reset_worker_link", "reset_retry_conn", "reset_burst")
_RETRY_HELLO = b"\0REQ" + struct.pack(">I", 26)  # OPTION_REQ: how gproxy's retry connection opens


def is_retry_connection(first_bytes: bytes) -> bool:
    return first_bytes.startswith(_RETRY_HELLO)


def is_worker_link(first_bytes: bytes) -> bool:
    """A worker's connection (readiness probes send nothing; retry connections open with OPTION_REQ)."""
    return bool(first_bytes) and not is_retry_connection(first_bytes)


class FaultInjector:
    def __init__(self, world: World, rng: random.Random, gap: tuple[float, float]) -> None:
        self.world = world
        self.rng = rng
        self.gap = gap
        self.recorder: Recorder = world.recorder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-faults", daemon=True)
        self._deck: list[str] = []
        self.errors: list[str] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the fault under way (a drain may take the grace period)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.world.settings.grace + 60)

    def _run(self) -> None:
        while True:
            gap = self.rng.uniform(*self.gap)
            if not self._deck:
                self._deck = list(KINDS)
                self.rng.shuffle(self._deck)
            kind = self._deck.pop()
            u, v = self.rng.random(), self.rng.random()
            if self._stop.wait(gap):
                return
            try:
                getattr(self, kind)(u, v)
            except Exception as exc:  # a harness problem: reported, and the run fails
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                self.recorder.event("injector_error", fault=kind, error=repr(exc))

    # -- the faults

    def kill_worker(self, u: float, v: float) -> None:
        slots = self.world.slots
        slot = slots[int(u * len(slots))]
        t = time.monotonic()
        pid = self.world.kill_worker(slot)
        self.recorder.fault(Fault("kill_worker", t, time.monotonic(), slot.gproxy.name, pid,
                                  f"slot {slot.index} ({slot.lib})" if pid else f"slot {slot.index}: no worker running"))
        self.world.start_worker(slot)  # if its gproxy is down, the supervisor does it later

    def term_gproxy(self, u: float, v: float) -> None:
        g2 = self.world.g2
        with self.world.lock:
            t = time.monotonic()
            rc = g2.terminate(self.world.settings.grace + 10)
            stopped = time.monotonic()
            g2.start()
        self.recorder.fault(Fault("term_gproxy", t, time.monotonic(), g2.name, None,
                                  f"exit {rc} after {stopped - t:.2f}s"))
        self.recorder.event("gproxy_exit", gproxy=g2.name, rc=rc, signal="TERM", seconds=stopped - t)

    def kill_gproxy(self, u: float, v: float) -> None:
        g2 = self.world.g2
        with self.world.lock:
            t = time.monotonic()
            g2.kill()
            g2.start()
        self.recorder.fault(Fault("kill_gproxy", t, time.monotonic(), g2.name))

    def reset_worker_link(self, u: float, v: float) -> None:
        relay = self.world.relay
        links = [c for c in relay.connections() if is_worker_link(c.first_bytes)]
        t = time.monotonic()
        detail = "no worker link"
        if links:
            chosen = links[int(u * len(links))]
            relay.reset(chosen.client_port)
            detail = f"link from gproxy port {chosen.client_port} ({len(links)} worker links)"
        self.recorder.fault(Fault("reset_worker_link", t, time.monotonic(), self.world.g1.name, None, detail))

    def reset_retry_conn(self, u: float, v: float) -> None:
        t = time.monotonic()
        n = self.world.relay.reset_where(lambda c: is_retry_connection(c.first_bytes))
        self.recorder.fault(Fault("reset_retry_conn", t, time.monotonic(), self.world.g1.name, None,
                                  f"{n} retry connection(s)"))

    def reset_burst(self, u: float, v: float) -> None:
        relay = self.world.relay
        refuse = int(u * 4)
        t = time.monotonic()
        relay.refuse_next(refuse)
        n = relay.reset_all()
        self.recorder.fault(Fault("reset_burst", t, time.monotonic(), self.world.g1.name, None,
                                  f"{n} connection(s) reset, next {refuse} refused"))
