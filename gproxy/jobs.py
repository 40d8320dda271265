"""What gproxy knows about the jobs assigned through one upstream connection.

Ownership of a Gearman job is per gearmand TCP connection: only the connection that was
assigned a job can finish it. So jobs are tracked per connection, by handle, and a retry
(which must reuse the owning connection) can always find which connection holds a job.
"""

from __future__ import annotations

from typing import NamedTuple


class TrackedJob(NamedTuple):
    handle: bytes
    function: bytes
    unique: bytes
    payload: bytes
    upstream: str
    """Name of the upstream connection that owns the job (only it can finish the job)."""
    started_at: float
    """Time of assignment, on the clock the caller injected."""


class JobTable:
    """Jobs assigned through one upstream connection and not yet ended or handed back."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._jobs: dict[bytes, TrackedJob] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self):
        return iter(list(self._jobs.values()))

    def get(self, handle: bytes) -> TrackedJob | None:
        return self._jobs.get(handle)

    def assigned(
        self, handle: bytes, function: bytes, unique: bytes, payload: bytes, now: float
    ) -> TrackedJob:
        job = TrackedJob(handle, function, unique, payload, self.upstream, now)
        self._jobs[handle] = job
        return job

    def ended(self, handle: bytes) -> TrackedJob | None:
        """The worker sent the job's final result (or gearmand took it back)."""
        return self._jobs.pop(handle, None)

    def released_function(self, function: bytes) -> list[TrackedJob]:
        """CANT_DO: gearmand silently requeues the connection's jobs of that function."""
        released = [job for job in self._jobs.values() if job.function == function]
        for job in released:
            del self._jobs[job.handle]
        return released

    def released_all(self) -> list[TrackedJob]:
        """RESET_ABILITIES or a closed connection: gearmand requeues every job it holds."""
        released = list(self._jobs.values())
        self._jobs.clear()
        return released
