"""Whether gproxy is shutting down: one fact for the whole process, with one owner.

The control plane starts the drain (Proxy.shutdown); every Session reads it, so a pair
accepted a moment before the drain began serves as draining without being told.
"""

from __future__ import annotations


class Drain:
    """Started once, never stopped: while draining, a worker's grabs get NO_JOB from gproxy,
    and the jobs it is running finish."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = False

    def start(self) -> None:
        self.started = True
