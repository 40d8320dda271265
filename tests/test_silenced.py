"""silenced: the handles whose packets from the worker are dropped."""

from __future__ import annotations

from gproxy.config import Route
from gproxy.core.policy import Policies, RetryPolicy
from gproxy.core.protocol import PacketType
from gproxy.core.retry import Retrier
from gproxy.core.silenced import MAX_SILENCED, Silenced
from tests.links import ROUTE, Link


def test_the_oldest_handle_leaves_first_and_a_new_assignment_clears_one() -> None:
    silenced: Silenced[Link] = Silenced(None, ROUTE)
    current = Link()
    for n in range(MAX_SILENCED + 1):
        silenced.add(b"H:%d" % n)
    assert len(silenced) == MAX_SILENCED
    assert not silenced.drops(b"H:0", current, [])
    assert silenced.drops(b"H:1", current, []) and silenced.drops(b"H:%d" % MAX_SILENCED, current, [])
    silenced.pop(b"H:1", None)
    assert not silenced.drops(b"H:1", current, [])


def test_a_job_held_on_one_of_the_workers_links_is_dropped_beyond_the_memory() -> None:
    retrier: Retrier[Link, Route] = Retrier(Policies(RetryPolicy()))
    silenced: Silenced[Link] = Silenced(retrier, ROUTE)
    old, current, elsewhere = Link("old"), Link("new"), Link("other")
    job = old.jobs.assigned(b"H:1", b"f", b"u", b"d", 0.0)
    old.jobs.ended(b"H:1")
    retrier.worker_failed(
        owner=old, route=ROUTE, job=job, ptype=PacketType.WORK_EXCEPTION, failure=b"RETRY x", now=0.0,
        exception_ends_job=True,
    )
    assert silenced.drops(b"H:1", current, [old])
    assert silenced.drops(b"H:1", old, [])
    assert not silenced.drops(b"H:1", elsewhere, [])  # another worker's: not this one's to drop
    assert not silenced.drops(b"H:2", current, [old])
