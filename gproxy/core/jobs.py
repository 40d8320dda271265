"""What gproxy knows about the jobs assigned through one upstream connection.

Ownership of a Gearman job is per gearmand TCP connection: only the connection that was
assigned a job can finish it. So jobs are tracked per connection, by handle, and a retry
(which must reuse the owning connection) can always find which connection holds a job.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Iterator
from typing import NamedTuple, Protocol

Payload = bytes | memoryview
"""A job's payload: a view into the packet that brought it, so a large job is not copied."""


class TrackedJob(NamedTuple):
    handle: bytes
    function: bytes
    unique: bytes
    payload: Payload
    upstream: str
    """Name of the upstream connection that owns the job (only it can finish the job)."""
    started_at: float
    """Time of assignment, on the clock the caller injected."""
    is_retry: bool = False
    """A retry job of some gproxy: the gproxy holding the original owns its retry loop."""


class JobTable:
    """Jobs assigned through one upstream connection and not yet ended or handed back."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._jobs: dict[bytes, TrackedJob] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[TrackedJob]:
        return iter(list(self._jobs.values()))

    def get(self, handle: bytes) -> TrackedJob | None:
        return self._jobs.get(handle)

    def assigned(
        self, handle: bytes, function: bytes, unique: bytes, payload: Payload, now: float,
        is_retry: bool = False,
    ) -> TrackedJob:
        job = self._jobs[handle] = TrackedJob(handle, function, unique, payload, self.upstream, now, is_retry)
        return job

    def ended(self, handle: bytes) -> TrackedJob | None:
        """The worker sent the job's final result (or gearmand took it back)."""
        return self._jobs.pop(handle, None)

    def take_function(self, function: bytes) -> list[TrackedJob]:
        """CANT_DO: gearmand silently requeues the connection's jobs of that function."""
        taken = [job for job in self._jobs.values() if job.function == function]
        for job in taken:
            del self._jobs[job.handle]
        return taken

    def take_all(self) -> list[TrackedJob]:
        """RESET_ABILITIES or a closed connection: gearmand requeues every job it holds."""
        taken = list(self._jobs.values())
        self._jobs.clear()
        return taken



class Owner(Hashable, Protocol):
    """A gearmand connection as the pure rules see it (session.UpstreamLink): the jobs
    assigned through it, which only it can finish."""

    jobs: JobTable


def running_per_function(tables: Iterable[JobTable]) -> Counter[bytes]:
    """The jobs of `tables` per function: counted from the tables that own them, when asked
    (a scrape), so no counter kept beside them can drift from what they hold."""
    return Counter(job.function for table in tables for job in table)
