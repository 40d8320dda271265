"""gproxy's retry-client connection under faults: resets and refusals from a fault-injecting
relay between gproxy and a real gearmand, and gearmand's own refusal of a retry.

Only gearmand's ERROR answer to a submission fails a job early; connection trouble is
retried for as long as it lasts.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from gproxy.config import Keepalive
from gproxy.core.policy import RetryPolicy
from gproxy.core.protocol import REQ, PacketType
from gproxy.core.reconnect import INITIAL
from tests.fault_relay import FaultRelay, RelayedConnection
from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import PeerSet, run_pyclient, seen_uniques, start_pyclient, start_pyworker
from tests.proxy_thread import ProxyThread

WAIT_S = 15.0
FAST = RetryPolicy(backoff_initial=0.05, jitter=False)


def is_retry_client(connection: RelayedConnection) -> bool:
    """gproxy's retry client opens with OPTION_REQ `exceptions`; workers register first."""
    return connection.first_bytes[:8] == REQ + int(PacketType.OPTION_REQ).to_bytes(4, "big")


def test_a_broken_retry_connection_whose_replacement_fails_at_once_fails_no_job(
    fresh_gearmand: Gearmand, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gproxy")
    caplog.set_level(logging.DEBUG, "gproxy.retry")  # (a failure during an outage is DEBUG)
    slow = replace(FAST, backoff_initial=1.0)
    with FaultRelay(fresh_gearmand.address) as relay, ProxyThread.to(relay.address, slow, frozen=True) as proxy, \
            PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        warm = peers.add(start_pyclient(fresh_gearmand.address, "scripted", "retry,ok|warm", unique="warm"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the warm-up job to be held")
        proxy.advance(1.0)  # its retry opens the retry connection
        warm = warm.result()
        assert warm.stdout == b"ok after 2", warm.stderr
        client = peers.add(start_pyclient(fresh_gearmand.address, "scripted", "retry,ok|x", unique="cut-retry"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        # The retry connection is reset, and while its backoff runs gearmand cannot be
        # reached at all (connect refused), then only with connections reset at once.
        relay.down()
        assert relay.reset_where(is_retry_client) == 1
        proxy.advance(1.0)  # the retry is due
        wait_for(lambda: any("cannot connect" in r.getMessage() for r in caplog.records) or not proxy.held(),
                 WAIT_S, "gproxy to fail to reconnect")
        relay.refuse_next(5)  # more than max_attempts
        relay.up()
        proxy.thaw()  # reconnecting takes a backoff: let it run
        run = client.result()
    assert (run.returncode, run.stdout) == (0, b"ok after 2"), run.stderr
    assert [u for u in seen_uniques(tmp_path) if u == "cut-retry"] == ["cut-retry"] * 2
    messages = [r.getMessage() for r in caplog.records]
    assert not any("refused by gearmand" in m or "exhausted" in m for m in messages)
    # The submissions lost with the refused connections were sent again, not counted as attempts.
    assert any(m.startswith("retry succeeded: scripted") and m.endswith("on attempt 2") for m in messages)


def test_a_retry_job_lost_with_the_connection_runs_again_as_the_next_attempt(
    fresh_gearmand: Gearmand, tmp_path: Path
) -> None:
    slow = replace(FAST, backoff_initial=0.5)
    with FaultRelay(fresh_gearmand.address) as relay, ProxyThread.to(relay.address, slow, frozen=True) as proxy, \
            PeerSet() as peers:
        first = start_pyworker(proxy.address, state_dir=tmp_path)
        client = peers.add(start_pyclient(fresh_gearmand.address, "scripted", "retry,ok|y", unique="lost-retry"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        first.stop()  # no worker: the retry job will wait in gearmand's queue
        proxy.advance(0.5)
        def retry_handles() -> list[bytes | None]:
            return proxy.call(lambda: [job.retry_handle for job in proxy.proxy.retrier.held.values()])

        wait_for(lambda: retry_handles() != [None], WAIT_S, "the retry job to be created")
        (lost,) = retry_handles()
        assert relay.reset_where(is_retry_client) == 1
        upstream = str(proxy.config.routes[0].upstream)
        wait_for(lambda: proxy.sample("gproxy_retry_connection_up", upstream=upstream) == 0, WAIT_S, "the loss")
        proxy.advance(INITIAL)  # a connection that had not proved itself yet: reconnected after a backoff
        wait_for(lambda: retry_handles() not in ([None], [lost]), WAIT_S, "a new retry job to be created")
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        run = client.result()
    # gearmand dropped the abandoned retry job unrun; the one submitted in its place ran.
    assert (run.returncode, run.stdout) == (0, b"ok after 2"), run.stderr
    assert seen_uniques(tmp_path) == ["lost-retry"] * 2


def test_gearmand_refusing_a_retry_gives_the_client_the_last_failure_at_once(
    fresh_gearmand: Gearmand, tmp_path: Path
) -> None:
    gearmand = fresh_gearmand
    slow = replace(FAST, backoff_initial=1.0)
    with ProxyThread.to(gearmand.address, slow, frozen=True) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        client = peers.add(start_pyclient(gearmand.address, "scripted", "retry,ok|z", unique="refused", exceptions=True))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        # The held job counts in the queue: a queue of one is full, the retry is refused.
        assert gearmand.admin("maxqueue scripted 1") == "OK"
        proxy.advance(1.0)
        run = client.result(timeout=WAIT_S)
        assert len(proxy.held()) == 0
    assert (run.state, run.report["exception"]) == ("FAILED", "RETRY: scripted 1"), run.stderr
    assert seen_uniques(tmp_path) == ["refused"]


def test_a_hung_gearmand_is_noticed_and_the_retry_goes_on_once_it_answers_again(
    fresh_gearmand: Gearmand, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """gearmand stopped (SIGSTOP): up, its kernel still accepting and acknowledging, nothing
    answered. The retry connection owes an answer, echoes after `idle`, gives up after
    `interval * count` more; once gearmand goes on, the retry runs and the client gets it."""
    caplog.set_level(logging.DEBUG, "gproxy.retry")
    quick = Keepalive(idle=1, interval=1, count=1)
    with ProxyThread.to(fresh_gearmand.address, FAST, upstream_keepalive=quick) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        assert fresh_gearmand.proc is not None
        client = peers.add(start_pyclient(fresh_gearmand.address, "scripted", "retry,ok|hung", unique="hung"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        os.kill(fresh_gearmand.proc.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: any("answered nothing for 2s" in r.getMessage() for r in caplog.records),
                     WAIT_S, "the hung gearmand to be noticed")
        finally:
            os.kill(fresh_gearmand.proc.pid, signal.SIGCONT)
        run = client.result()
    # A submission gproxy gave up on may still run: gearmand, going on, reads it before it
    # reads that its connection closed (at least once, as the README says).
    assert run.returncode == 0 and re.fullmatch(rb"ok after [234]", run.stdout), run.stderr
    (lost, *_) = [r for r in caplog.records if "answered nothing" in r.getMessage()]
    assert lost.levelno == logging.WARNING and "not even an ECHO_REQ: it is hung or gone" in lost.getMessage()

