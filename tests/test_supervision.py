"""No background task can take the process down: a send racing a close, an unexpected error
in a timer, in the retry client or in a scrape costs at most the connections it concerns."""

from __future__ import annotations

import logging
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

from gproxy.config import Address, Route
from gproxy.connection import Connection
from gproxy.core.jobs import TrackedJob
from gproxy.core.metrics import Metrics
from gproxy.core.policy import Policies, RetryPolicy
from gproxy.core.protocol import REQ, RES, Framer, PacketType, build_packet
from gproxy.core.retry import Retrier, Submit
from gproxy.retry_client import RetryClient
from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import PeerSet, attempt_count, run_pyclient, start_perlworker, start_pyclient, start_pyworker
from tests.proxy_thread import ProxyThread

FAST = RetryPolicy(backoff_initial=0.02, jitter=False)


def _failing_once(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[int]:
    """Make `cls.name` raise RuntimeError on its first call; returns the list of calls."""
    calls: list[int] = []
    real = getattr(cls, name)

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(f"injected failure in {name}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, patched)
    return calls


@pytest.mark.parametrize("waiting_in", ["send_all", "receive"])
async def test_a_close_racing_a_send_or_a_receive_is_an_oserror_not_a_crash(waiting_in: str) -> None:
    """trio reports a socket closed while a task waits on it as ClosedResourceError, which
    escaped every `except OSError` of the proxy's background tasks."""
    ours, theirs = socket.socketpair()
    connection = Connection(ours)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    outcome: list[BaseException] = []

    async def wait_on_it() -> None:
        try:
            if waiting_in == "send_all":
                await connection.send_all(b"x" * (16 << 20))  # far more than the buffers hold
            else:
                await connection.receive(100)
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_on_it)
        await trio.testing.wait_all_tasks_blocked()
        connection.close()
    theirs.close()
    (error,) = outcome
    assert isinstance(error, OSError), repr(error)


def test_an_error_in_a_retry_timer_closes_only_its_pair_and_the_job_is_requeued(
    gearmand: Gearmand, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _failing_once(monkeypatch, Retrier, "timer_fired")
    caplog.set_level(logging.INFO, logger="gproxy")
    with ProxyThread.to(gearmand.address, FAST) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        # Attempt 1 fails and is held; its timer fails: the pair closes, gearmand requeues
        # the job, the worker reconnects; attempt 2 fails and is retried; attempt 3 succeeds.
        run = run_pyclient(gearmand.address, "flaky", "2:job", unique="supervised-timer")
        second = run_pyclient(gearmand.address, "reverse", "abc")  # and the proxy serves on
        assert proxy.proxy is not None and proxy.call(lambda: len(proxy.proxy.pairs)) == 1  # type: ignore[union-attr]
    assert (run.returncode, run.stdout) == (0, b"ok after 3"), run.stderr
    assert (second.returncode, second.stdout) == (0, b"cba"), second.stderr
    assert len(calls) >= 2 and attempt_count(tmp_path, "supervised-timer") == 3
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    (traceback,) = [r.getMessage() for r in errors if r.exc_info]
    assert re.fullmatch(r"retry timer of flaky H:\S+: internal error; closing peer 127\.0\.0\.1:\d+ \(via .*\)", traceback)
    (closing,) = [r.getMessage() for r in errors if not r.exc_info]
    assert re.fullmatch(r"peer 127\.0\.0\.1:\d+ .*: closed: internal error in the retry timer of flaky H:\S+", closing)


async def test_an_error_in_the_retry_client_costs_its_connection_not_the_retry(
    gearmand: Gearmand, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry client's reply handling fails once: the connection is treated as lost, the
    submission in flight is made again, and the client task serves on."""
    calls = _failing_once(monkeypatch, Retrier, "retry_created")
    route = Route(Address("127.0.0.1", 0), Address(*gearmand.address))
    retrier: Retrier[str, Route] = Retrier(Policies(FAST), metrics=Metrics())
    executed: list[Any] = []

    async def connect() -> Connection:
        return Connection.from_stream(await trio.open_tcp_stream(*gearmand.address))

    created = trio.Event()

    async def execute(actions: Any) -> None:  # as the proxy does: submissions go back to the client
        executed.extend(actions)
        for action in actions:
            if type(action) is Submit:
                client.submit(action)
        if any(job.retry_handle is not None for job in retrier.held.values()):
            created.set()  # (the second JOB_CREATED, taken in this time)

    job = TrackedJob(b"H:orig:1", b"supervised_rc", b"u-rc", b"payload", "up", 0.0)
    start = trio.current_time()
    decision = retrier.worker_failed(
        owner="up", route=route, job=job, ptype=PacketType.WORK_EXCEPTION, failure=b"RETRY: x", now=start
    )
    assert decision.held
    client = RetryClient(route, retrier, connect, execute)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="gproxy")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        (key,) = retrier.held
        with trio.fail_after(10):
            actions = retrier.timer_fired(key, retrier.held[key].wait, start + 1.0)
            for action in actions:
                if type(action) is Submit:
                    client.submit(action)
            await created.wait()
        nursery.cancel_scope.cancel()
    assert len(calls) == 2 and [r.getMessage() for r in caplog.records if r.exc_info] == [
        f"retry client to gearmand {route.upstream}: internal error"
    ]
    # Its JOB_CREATED was never taken in: submitted again, under a new unique id.
    assert retrier.held[key].resubmitted == 1


def test_a_failing_scrape_answers_500_and_the_proxy_serves_on(
    gearmand: Gearmand, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("injected failure in a collector")

    with ProxyThread.to(gearmand.address, FAST, metrics_listen=Address("127.0.0.1", 0)) as proxy:
        assert proxy.proxy is not None and proxy.proxy.metrics_address is not None
        url = f"http://{proxy.proxy.metrics_address}/metrics"
        monkeypatch.setattr(proxy.proxy.scraped, "connections", broken)
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(url, timeout=10)
        assert failed.value.code == 500
        monkeypatch.undo()
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b"gproxy_connections" in response.read()
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["internal error answering an HTTP request"]


async def test_a_process_wide_task_that_fails_is_started_again(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry client's own loop is the last line: should it fail past its own handling
    (a bug in handing back what was in flight), it is started again, not lost."""
    from gproxy.supervision import RESTART_PAUSE, keep_running

    runs: list[float] = []

    async def task() -> None:
        runs.append(trio.current_time())
        if len(runs) == 1:
            raise RuntimeError("injected failure in the task")

    await keep_running("the task", task)
    assert len(runs) == 2 and runs[1] - runs[0] >= RESTART_PAUSE
    assert [r.getMessage() for r in caplog.records if r.exc_info] == [
        f"the task: internal error; starting it again in {RESTART_PAUSE:g}s"
    ]


def _serves_on(proxy: ProxyThread) -> None:
    """A new worker connection is served: the process is still up."""
    worker = socket.create_connection(proxy.address)
    worker.sendall(build_packet(REQ, PacketType.ECHO_REQ, data=b"still here"))
    worker.settimeout(10)
    assert worker.recv(100) == build_packet(RES, PacketType.ECHO_RES, data=b"still here")
    worker.close()


@pytest.mark.parametrize("failing", ["the pair's start", "reaching gearmand"])
def test_an_error_while_a_worker_connects_closes_that_worker_and_the_proxy_serves_on(
    gearmand: Gearmand, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failing: str
) -> None:
    """A bug in starting the pair, or in connecting for it (the dial, a TLS handshake), costs
    the worker it was for."""
    from gproxy.dialer import Dialer
    from gproxy.pair import Pair

    cls, method = (Pair, "start") if failing == "the pair's start" else (Dialer, "transport")
    calls = _failing_once(monkeypatch, cls, method)
    with ProxyThread.to(gearmand.address, FAST) as proxy:
        first = socket.create_connection(proxy.address)
        first.settimeout(10)
        assert first.recv(10) == b""  # closed by gproxy, not left hanging
        first.close()
        _serves_on(proxy)
    assert len(calls) == 2
    assert [r.getMessage().split(": closed: ")[1] for r in caplog.records if r.exc_info] == ["internal error"]


def test_an_error_while_moving_a_worker_to_a_fresh_connection_closes_that_worker_and_the_proxy_serves_on(
    gearmand: Gearmand, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The move's dial (a CANT_DO while gproxy holds a job of the worker's) fails with a bug:
    that worker's pair closes with the reason, and the process serves on."""
    from gproxy.dialer import Dialer

    with ProxyThread.to(gearmand.address, FAST, frozen=True) as proxy, PeerSet() as peers:
        peers.add(start_perlworker(proxy.address, state_dir=tmp_path))
        peers.add(start_pyclient(gearmand.address, "flaky", "1:moved"))
        wait_for(lambda: len(proxy.held()) == 1, 15, "the job to be held")
        # (The next dial is the move's: the retry client dials at the first retry, and the
        # frozen clock holds that back.)
        calls = _failing_once(monkeypatch, Dialer, "transport")
        assert run_pyclient(gearmand.address, "unregister", "flaky").stdout == b"unregistered"
        closed = "closed: internal error"
        wait_for(lambda: any(closed in r.getMessage() for r in caplog.records), 15, "the move's failure")
        _serves_on(proxy)
    assert len(calls) >= 1
    move = "move to a fresh gearmand connection"
    (traceback,) = [r.getMessage() for r in caplog.records if r.exc_info]
    assert re.fullmatch(rf"{move}: internal error; closing peer 127\.0\.0\.1:\d+ .*", traceback)
    closing = [r.getMessage() for r in caplog.records if not r.exc_info and closed in r.getMessage()]
    (line,) = closing
    assert re.fullmatch(rf"peer 127\.0\.0\.1:\d+ .*: {closed} in the {move}", line)


def test_an_error_in_a_pairs_timer_closes_that_pair_and_the_proxy_serves_on(
    gearmand: Gearmand, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A pair's own timer (here its timeouts') fails: the pair closes, gearmand requeues its
    job, the worker reconnects and runs it again, and the proxy serves on."""
    from gproxy.core.session import Session

    calls = _failing_once(monkeypatch, Session, "timeouts_due")
    timed = RetryPolicy(backoff_initial=0.02, jitter=False, timeout=0.3)
    with ProxyThread.to(gearmand.address, FAST, {"scripted": timed}) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        run = run_pyclient(gearmand.address, "scripted", "sleep=1,ok|timer", unique="supervised-pair-timer")
        second = run_pyclient(gearmand.address, "reverse", "abc")
    assert len(calls) >= 1 and (second.returncode, second.stdout) == (0, b"cba"), second.stderr
    assert run.returncode == 0, run.stderr  # requeued by gearmand when the pair closed; run again
    (closing,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and not r.exc_info]
    assert re.fullmatch(r"peer 127\.0\.0\.1:\d+ .*: closed: internal error in its timeouts timer", closing)


def _receive_packet(sock: socket.socket) -> bytes:
    framer, frames = Framer(RES), []
    while not frames:
        data = sock.recv(65536)
        assert data, "closed before a whole packet came"
        frames = framer.receive(data)
    (frame,) = frames
    return frame.raw


def test_an_error_in_the_pair_an_action_is_delivered_to_closes_that_pair_not_the_sender(
    gearmand: Gearmand, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Pair A's event carries a command for a connection of pair B (as a retry's outcome or a
    release is); B fails to carry it out. B closes, its job goes back to gearmand, and A's
    event goes on: its next command is carried out, and A serves on."""
    from gproxy.core.retry import SendUpstream
    from gproxy.core.session import SendDownstream, Session

    function = b"supervised_delivery"
    calls = _failing_once(monkeypatch, Session, "deliver")
    caplog.set_level(logging.INFO, logger="gproxy")
    with ProxyThread.to(gearmand.address, FAST) as proxy:
        assert proxy.proxy is not None
        receiver = socket.create_connection(proxy.address, timeout=10)  # B: it will run a job
        receiver.sendall(build_packet(REQ, PacketType.CAN_DO, function=function)
                         + build_packet(REQ, PacketType.GRAB_JOB_UNIQ))
        assert _receive_packet(receiver) == build_packet(RES, PacketType.NO_JOB)
        with socket.create_connection(gearmand.address, timeout=10) as client:
            client.sendall(build_packet(REQ, PacketType.SUBMIT_JOB_BG, function=function, unique=b"sd-1", data=b"x"))
            assert _receive_packet(client)[:8] == build_packet(RES, PacketType.JOB_CREATED, handle=b"")[:8]
        receiver.sendall(build_packet(REQ, PacketType.GRAB_JOB_UNIQ))
        while _receive_packet(receiver)[4:8] != PacketType.JOB_ASSIGN_UNIQ.to_bytes(4, "big"):
            receiver.sendall(build_packet(REQ, PacketType.GRAB_JOB_UNIQ))
        gearmand.wait_for_queue(function.decode(), total=1, running=1)
        sender = socket.create_connection(proxy.address, timeout=10)  # A
        wait_for(lambda: proxy.call(lambda: len(proxy.proxy.pairs)) == 2, 10, "both pairs")  # type: ignore[union-attr]

        def a_command_for_another_pair() -> None:
            port = receiver.getsockname()[1]
            (b,) = [pair for pair in proxy.proxy.pairs if f":{port} " in pair.name]  # type: ignore[union-attr]
            (a,) = [pair for pair in proxy.proxy.pairs if pair is not b]  # type: ignore[union-attr]
            echo = build_packet(REQ, PacketType.ECHO_REQ, data=b"for B")
            a.execute([SendUpstream(b.session.current, echo), SendDownstream(b"after")])

        proxy.call(a_command_for_another_pair)
        assert sender.recv(100) == b"after"  # A's event went on past the failure
        assert receiver.recv(100) == b""  # B closed
        gearmand.wait_for_queue(function.decode(), total=1, running=0)  # and gearmand took its job back
        sender.sendall(build_packet(REQ, PacketType.ECHO_REQ, data=b"still here"))  # A serves on
        assert _receive_packet(sender) == build_packet(RES, PacketType.ECHO_RES, data=b"still here")
        assert proxy.call(lambda: len(proxy.proxy.pairs)) == 1  # type: ignore[union-attr]
        sender.close()
        receiver.close()
    assert len(calls) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, errors
    assert re.fullmatch(r"peer 127\.0\.0\.1:\d+ .*: internal error carrying out a retry's outcome; closing it", errors[0])
    assert re.fullmatch(r"peer 127\.0\.0\.1:\d+ .*: closed: internal error carrying out a retry's outcome", errors[1])
