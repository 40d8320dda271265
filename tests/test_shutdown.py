"""Graceful shutdown of the `gproxy` command, with real workers and a real gearmand.

SIGTERM: gproxy stops accepting and stops handing out jobs, lets running jobs and held
retries finish within the grace period, hands back the rest (gearmand requeues it) and
exits 0. Nothing is lost either way.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from gproxy.config import Address, Config, Route
from gproxy.control import Proxy
from gproxy.core.policy import RetryPolicy
from gproxy.core.protocol import REQ, RES, Framer, PacketType, build_packet
from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import PeerSet, seen_uniques, start_pyclient, start_pyworker
from tests.proxy_thread import ProxyThread
from tests.raw_worker import worker_with_jobs

WAIT_S = 15.0


@contextmanager
def gproxy(gearmand: Gearmand, tmp_path: Path, grace: float) -> Iterator[tuple[subprocess.Popen, tuple[str, int]]]:
    host, port = gearmand.address
    config = tmp_path / "gproxy.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\nupstream = "{host}:{port}"\nshutdown_grace_period = {grace}\n'
        "[retry]\nbackoff_initial = 0.5\njitter = false\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "gproxy", "--config", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        listening = re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.stderr.readline())
        assert listening
        yield proc, ("127.0.0.1", int(listening.group(1)))
    finally:
        proc.kill()
        proc.wait(WAIT_S)


def refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_running_jobs_and_held_retries_then_exits_0(gearmand: Gearmand, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with ExitStack() as stack, gproxy(gearmand, tmp_path, grace=30) as (proc, address), PeerSet() as peers:
        for _ in range(2):  # one will be busy with the blocking job
            peers.add(start_pyworker(address, state_dir=tmp_path))
        running = peers.add(start_pyclient(gearmand.address, "block", str(gate), unique="drain-block"))
        wait_for(Path(f"{gate}.started").exists, WAIT_S, "the running job")
        held = peers.add(start_pyclient(gearmand.address, "flaky", "1:drain", unique="drain-held"))
        wait_for(lambda: len(seen_uniques(tmp_path)) == 1, WAIT_S, "the failed first attempt")
        # The retry runs on another worker, behind a gproxy of its own (as in production:
        # that gproxy shows it the original unique id).
        other = stack.enter_context(ProxyThread.to(gearmand.address))
        peers.add(start_pyworker(other.address, state_dir=tmp_path))
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: refused(address), WAIT_S, "gproxy to stop accepting")
        assert held.result().stdout == b"ok after 2"  # the held retry finished during the drain
        assert proc.poll() is None  # still waiting for the running job
        gate.touch()
        assert running.result().stdout == b"unblocked"
        assert proc.wait(WAIT_S) == 0
    log = proc.stderr.read()
    assert "drained: every job finished" in log, log


def test_jobs_still_running_after_the_grace_period_are_handed_back(gearmand: Gearmand, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with gproxy(gearmand, tmp_path, grace=0.5) as (proc, address), PeerSet() as peers:
        peers.add(start_pyworker(address, state_dir=tmp_path))
        client = peers.add(start_pyclient(gearmand.address, "block", str(gate), unique="grace-over"))
        wait_for(Path(f"{gate}.started").exists, WAIT_S, "the running job")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
        # gearmand got the job back when gproxy's connection closed; another worker runs it.
        gearmand.wait_for_queue("block", total=1, running=0)
        Path(f"{gate}.started").unlink()
        peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
        wait_for(Path(f"{gate}.started").exists, WAIT_S, "the job to run again")
        gate.touch()
        assert client.result().stdout == b"unblocked"
    assert "handed back to gearmand" in proc.stderr.read()


async def test_a_worker_accepted_just_before_a_drain_is_drained_too() -> None:
    """In-process: its pair is created after the drain began (while gproxy still connects to
    gearmand); it must get NO_JOB for its grabs like every other worker, not new jobs."""
    # An upstream whose accept queue is full: gproxy's connect to it waits for a SYN retry.
    upstream = trio.socket.socket()
    await upstream.bind(("127.0.0.1", 0))
    upstream.listen(0)
    filler = [trio.socket.socket() for _ in range(2)]
    for sock in filler:
        with trio.move_on_after(0.2):
            await sock.connect(upstream.getsockname())
    config = Config(routes=(Route(Address("127.0.0.1", 0), Address(*upstream.getsockname()[:2])),))
    async with trio.open_nursery() as nursery:
        proxy = await nursery.start(Proxy(config).serve)
        worker = await trio.open_tcp_stream(*proxy.listen_addresses[0].host_port)
        await trio.testing.wait_all_tasks_blocked()  # accepted: its handler is connecting upstream
        nursery.start_soon(proxy.shutdown, 30.0)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):  # make room: gproxy's connect goes through on its next SYN
            with trio.move_on_after(0.01):
                (await upstream.accept())[0].close()
        await worker.send_all(build_packet(REQ, PacketType.GRAB_JOB))
        framer, frames = Framer(RES), []
        with trio.fail_after(10):
            while not frames:
                frames = framer.receive(await worker.receive_some())
        assert [frame.raw for frame in frames] == [build_packet(RES, PacketType.NO_JOB)]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("last", ["the running job", "the held retry"])
def test_the_drain_ends_when_the_last_job_ends_not_on_a_clock(
    gearmand: Gearmand, caplog: pytest.LogCaptureFixture, last: str
) -> None:
    """On a clock that stands still the drain still ends, the moment the last job it waits
    for ends, whichever that is; and not one moment before."""
    function = f"drain_{last.split()[-1]}".encode()
    policy = RetryPolicy(on_fail=True, backoff_initial=30.0, jitter=False)
    caplog.set_level(logging.INFO, logger="gproxy")
    with ProxyThread.to(gearmand.address, policy, frozen=True) as proxy:
        assert proxy.proxy is not None
        worker = worker_with_jobs(proxy.address, gearmand.address, function)
        handles = worker.handles
        worker.send(PacketType.WORK_FAIL, handle=handles[0])  # held for 30 s
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the failed job to be held")
        (key,) = [job.key for job in proxy.held()]

        def end_the_running_job() -> None:
            worker.send(PacketType.WORK_COMPLETE, handle=handles[1], data=b"done")
            wait_for(lambda: not proxy.tracked_jobs(), WAIT_S, "the job to end")

        def give_up_the_held_one() -> None:
            assert proxy.call(proxy.proxy.operator.give_up_now, key)  # type: ignore[union-attr]

        def settled() -> None:
            trio.from_thread.run(trio.testing.wait_all_tasks_blocked, trio_token=proxy._token)

        drained = threading.Event()
        stopping = threading.Thread(target=lambda: (
            trio.from_thread.run(proxy.proxy.shutdown, 3600.0, trio_token=proxy._token), drained.set()  # type: ignore[union-attr]
        ))
        stopping.start()
        wait_for(lambda: any(r.getMessage().startswith("draining:") for r in caplog.records), WAIT_S, "the drain")
        first, second = (give_up_the_held_one, end_the_running_job) if last == "the running job" else (
            end_the_running_job, give_up_the_held_one)
        settled()
        assert not drained.is_set()
        first()
        settled()
        assert not drained.is_set(), f"the drain ended before {last} did"
        second()
        stopping.join(WAIT_S)
        assert drained.is_set(), f"the drain went on after {last} ended"
        worker.sock.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "gproxy.control"]
    assert "draining: no new connections or jobs; waiting up to 3600s for 1 running and 1 held jobs" in messages
    assert "drained: every job finished" in messages
