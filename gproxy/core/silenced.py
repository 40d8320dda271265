"""The handles whose packets from the worker are dropped: their job is held, or it has ended.

Once a job is held, or its WORK_EXCEPTION has ended it, or a retry job has failed, or its
attempt ran past its timeout, nothing more the worker sends for that handle is forwarded:
libraries send a WORK_FAIL, and some a WORK_COMPLETE or WORK_DATA, after an exception;
forwarded, they would finish the held job, or earn the worker an ERROR JOB_NOT_FOUND (which
kills a Perl worker).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Final, Generic, TypeVar

from ..config import Route
from .retry import Retrier

LinkT = TypeVar("LinkT", bound=Hashable)
MAX_SILENCED: Final = 4096
"""Ended handles remembered per connection; a held one is recognised beyond that too."""


class Silenced(dict[bytes, None], Generic[LinkT]):
    """One worker's silenced handles, oldest first, at most MAX_SILENCED; and every job the
    Retrier holds on one of its links. A new assignment of a handle clears it (`pop`).

    (A dict, so that the check and the clearing on every packet are the dict's own.)"""

    def __init__(self, retrier: Retrier[LinkT, Route] | None, route: Route) -> None:
        super().__init__()
        self._retrier = retrier
        self._route = route

    def add(self, handle: bytes) -> None:
        """The job of `handle` is held, or it has ended by a failure or a timeout."""
        self[handle] = None
        if len(self) > MAX_SILENCED:
            del self[next(iter(self))]

    def drops(self, handle: bytes, current: LinkT, retired: Sequence[LinkT]) -> bool:
        """Is what the worker sends for `handle` dropped? (`current`, `retired`: its links.)"""
        if handle in self:
            return True
        if self._retrier is None:
            return False
        holder = self._retrier.holder(self._route, handle)
        return holder is not None and (holder is current or holder in retired)
