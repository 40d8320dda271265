"""registration: what the worker tells gearmand about itself, what of it goes on, and when it
must go on a fresh connection instead (MOVE)."""

from __future__ import annotations

import pytest

from gproxy.config import Route
from gproxy.core.deadlines import Deadlines
from gproxy.core.policy import Mode, Policies, RetryPolicy
from gproxy.core.protocol import Packet, PacketType, ProtocolError
from gproxy.core.registration import MOVE, Registration
from gproxy.core.retry import Retrier
from tests.links import ROUTE, Link, req

P = PacketType
ENFORCED: Policies = Policies(RetryPolicy(), {b"g": RetryPolicy(mode=Mode.OBSERVE)})


def packet(ptype: PacketType, **args: bytes) -> Packet:
    return Packet(ptype, req(ptype, **args))


def held_on(link: Link, retrier: Retrier[Link, Route], handle: bytes, function: bytes) -> None:
    job = link.jobs.assigned(handle, function, b"u", b"d", 0.0)
    link.jobs.ended(handle)  # (its failure ended the attempt)
    decision = retrier.worker_failed(
        owner=link, route=ROUTE, job=job, ptype=P.WORK_EXCEPTION, failure=b"RETRY x", now=0.0, exception_ends_job=True
    )
    assert decision.held


def test_what_the_worker_said_is_replayed_once_each_in_order() -> None:
    registration, link, deadlines = Registration(), Link(), Deadlines[Link]()
    said = [
        packet(P.SET_CLIENT_ID, client_id=b"w1"),
        packet(P.CAN_DO, function=b"f"),
        packet(P.OPTION_REQ, option=b"exceptions"),
        packet(P.CAN_DO, function=b"g"),
        packet(P.CAN_DO, function=b"f"),
        packet(P.CANT_DO, function=b"g"),
    ]
    assert [registration.received(p, link, None, deadlines) for p in said] == [p.raw for p in said]
    assert registration.options == 1
    assert registration.replay() == said[0].raw + said[2].raw + said[1].raw
    registration.received(packet(P.RESET_ABILITIES), link, None, deadlines)
    assert registration.replay() == said[0].raw + said[2].raw


def test_can_do_timeout_goes_on_as_can_do_where_gproxy_times_attempts_out() -> None:
    registration, link, deadlines = Registration(), Link(), Deadlines[Link]()
    retrier: Retrier[Link, Route] = Retrier(ENFORCED)
    sent = registration.received(packet(P.CAN_DO_TIMEOUT, function=b"f", timeout=b"1500"), link, retrier, deadlines)
    assert sent == req(P.CAN_DO, function=b"f")
    assert registration.replay() == req(P.CAN_DO, function=b"f")
    assert deadlines.timeout_of(b"f", 0.0) == 1.5
    observed = packet(P.CAN_DO_TIMEOUT, function=b"g", timeout=b"1500")
    assert registration.received(observed, link, retrier, deadlines) == observed.raw  # gearmand's to time out
    assert deadlines.timeout_of(b"g", 0.0) is None
    registration.received(packet(P.CAN_DO, function=b"f"), link, retrier, deadlines)  # no timeout now
    assert deadlines.timeout_of(b"f", 0.0) is None


@pytest.mark.parametrize("timeout", [b"x", b"-1", b"1" * 19, b"1.5"])
def test_a_timeout_gearmand_could_not_read_is_refused(timeout: bytes) -> None:
    with pytest.raises(ProtocolError):
        Registration().received(packet(P.CAN_DO_TIMEOUT, function=b"f", timeout=timeout), Link(), None, Deadlines())


def test_cant_do_releases_that_functions_jobs_unless_one_is_held_then_the_worker_moves() -> None:
    registration, link, deadlines = Registration(), Link(), Deadlines[Link]()
    retrier: Retrier[Link, Route] = Retrier(ENFORCED)
    link.jobs.assigned(b"H:1", b"f", b"u", b"d", 0.0)
    link.jobs.assigned(b"H:2", b"g", b"u", b"d", 0.0)
    cant_do = packet(P.CANT_DO, function=b"g")
    assert registration.received(cant_do, link, retrier, deadlines) == cant_do.raw
    assert [job.handle for job in link.jobs] == [b"H:1"]  # gearmand requeues H:2
    held_on(link, retrier, b"H:3", b"f")
    assert registration.received(packet(P.CANT_DO, function=b"f"), link, retrier, deadlines) is MOVE
    assert [job.handle for job in link.jobs] == [b"H:1"]  # still owned here
    assert registration.received(packet(P.RESET_ABILITIES), link, retrier, deadlines) is MOVE
    assert registration.replay() == b""  # what the fresh connection is told


def test_reset_abilities_releases_every_job_where_none_is_held() -> None:
    registration, link = Registration(), Link()
    link.jobs.assigned(b"H:1", b"f", b"u", b"d", 0.0)
    reset = packet(P.RESET_ABILITIES)
    assert registration.received(reset, link, Retrier(ENFORCED), Deadlines()) == reset.raw
    assert len(link.jobs) == 0
