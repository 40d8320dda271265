"""Outlier ejection: the pure bookkeeping, and a sick worker beside a healthy one, each
behind its own gproxy, with a real gearmand, real libgearman CLI workers and clients."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from gproxy.core.ejection import Ejection
from gproxy.core.policy import RetryPolicy
from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import PeerSet, run_cli_client, start_cli_worker
from tests.proxy_thread import ProxyThread

EJECTS = RetryPolicy(eject_after=3, eject_for=10.0, eject_for_max=15.0)


def test_a_worker_is_ejected_after_eject_after_failures_in_a_row() -> None:
    ejection = Ejection()
    assert [ejection.failed(EJECTS, b"f", now=1.0) for _ in range(2)] == [None, None]
    ejection.completed()  # a completion starts the count again
    assert [ejection.failed(EJECTS, b"f", now=2.0) for _ in range(3)] == [None, None, 10.0]
    assert ejection.active and ejection.until == 12.0 and ejection.function == b"f"
    # Jobs it was still running when ejected may fail too: no second ejection on top.
    assert [ejection.failed(EJECTS, b"f", now=3.0) for _ in range(3)] == [None, None, None]
    assert ejection.over() is False and not ejection.active  # it was not asleep: nothing to wake


def test_each_ejection_without_a_completion_between_lasts_twice_as_long_up_to_the_cap() -> None:
    ejection = Ejection()
    durations = []
    for _ in range(3):
        durations += [d for _ in range(3) if (d := ejection.failed(EJECTS, b"f", now=0.0)) is not None]
        ejection.over()
    assert durations == [10.0, 15.0, 15.0]  # 20 and 40 capped by eject_for_max
    ejection.completed()
    assert [ejection.failed(EJECTS, b"f", now=0.0) for _ in range(3)][-1] == 10.0


def test_a_worker_that_slept_while_ejected_is_woken_and_ejection_is_off_by_default() -> None:
    ejection = Ejection()
    assert [ejection.failed(RetryPolicy(), b"f", now=0.0) for _ in range(100)] == [None] * 100
    ejection.failed(replace(EJECTS, eject_after=1), b"f", now=0.0)
    ejection.sleeping = True
    assert ejection.over() is True and ejection.sleeping is False
    assert ejection.over() is False  # over once


async def test_an_ejection_is_counted_and_shown_in_the_same_step() -> None:
    """The ejections counter and the ejected gauge have one owner, the Session's Ejection:
    a scrape right after the step that ejects a worker sees both, before the control plane
    has even set the timer that ends the ejection (a scrape used to see the count and
    nobody ejected)."""
    from gproxy.config import Address, Config, Route
    from gproxy.control import Proxy
    from gproxy.core.commands import CallLater, Timer
    from gproxy.core.policy import Policies
    from gproxy.core.protocol import REQ, RES, PacketType, build_packet
    from gproxy.core.session import Session
    from gproxy.dataplane import DataPlane
    from gproxy.pair import Pair

    route = Route(Address("127.0.0.1", 0), Address("127.0.0.1", 4730))
    proxy = Proxy(Config(routes=(route,), policies=Policies(EJECTS)))
    posted: list[object] = []
    session = Session("up", route=route, retrier=proxy.retrier, metrics=proxy.metrics)
    pair = Pair("p", session, DataPlane(), SimpleNamespace(post=posted.append), proxy.pairs)  # type: ignore[arg-type]
    proxy.pairs.add(pair)
    for n in range(3):
        handle = b"H:%d" % n
        session.from_downstream(build_packet(REQ, PacketType.GRAB_JOB_UNIQ), 0.0)
        session.from_upstream(session.current, build_packet(
            RES, PacketType.JOB_ASSIGN_UNIQ, handle=handle, function=b"f", unique=b"u%d" % n, data=b""), 0.0)
        commands = session.from_downstream(build_packet(REQ, PacketType.WORK_FAIL, handle=handle), 0.0)
    assert CallLater(Timer.EJECTION, EJECTS.eject_for) in commands  # (its timer: not set yet)
    snapshot = proxy.metrics.snapshot()
    assert proxy.metrics.registry.get_sample_value("gproxy_worker_ejections_total", {"function": "f"}) == 1
    assert snapshot.ejected == {b"f": 1} and posted == []
    session.ejection_over()
    assert proxy.metrics.snapshot().ejected == {}


def test_a_sick_worker_is_ejected_the_healthy_one_takes_the_jobs_and_the_sick_one_comes_back(
    gearmand: Gearmand, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    function = "eject-me"
    runs = tmp_path / "sick.log"
    policy = RetryPolicy(eject_after=3, eject_for=30.0, eject_for_max=45.0)

    def sick_runs() -> int:
        return len(runs.read_text().splitlines()) if runs.exists() else 0

    caplog.set_level(logging.WARNING, logger="gproxy.pair")
    with ProxyThread.to(gearmand.address, policy, frozen=True) as sick_side, ProxyThread.to(
        gearmand.address, policy
    ) as healthy_side, PeerSet() as peers:
        peers.add(start_cli_worker(sick_side.address, function, ["sh", "-c", f"echo run >> {runs}; exit 1"],
                                   admin_address=gearmand.address))
        peers.add(start_cli_worker(healthy_side.address, function, ["cat"], admin_address=gearmand.address))

        def ejected() -> float | None:
            return sick_side.sample("gproxy_worker_ejected", function=function)

        def until_ejected(ejections: float) -> list[bytes]:
            outputs = []
            while sick_side.sample("gproxy_worker_ejections_total", function=function) != ejections:
                assert len(outputs) < 60, "the sick worker was never ejected"
                outputs.append(run_cli_client(gearmand.address, function, f"job {len(outputs)}").stdout)
            return outputs

        first = until_ejected(1)
        assert sick_runs() == 3 and ejected() == 1  # three failures in a row, and out
        while_out = [run_cli_client(gearmand.address, function, f"meanwhile {n}").stdout for n in range(10)]
        assert while_out == [b"meanwhile %d" % n for n in range(10)] and sick_runs() == 3  # all to the healthy one
        sick_side.advance(30.0)  # the ejection is over: the sleeping sick worker is woken
        wait_for(lambda: ejected() == 0, 10, "the ejection to end")
        second = until_ejected(2)
        assert sick_runs() == 6  # it took jobs again, and failed three more
        healthy = sum(1 for out in first + second if out.startswith(b"job "))
    assert healthy == len(first) + len(second) - 6  # every job the sick one did not fail completed
    lines = [r.getMessage() for r in caplog.records if "eject" in r.getMessage()]
    assert [line.split(": worker ", 1)[1].split(":")[0] for line in lines] == [
        "ejected for 30s", "back from its ejection; it is given jobs again", "ejected for 45s",  # doubled, capped
    ]
