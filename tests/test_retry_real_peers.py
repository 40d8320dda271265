"""Retries through gproxy, with real worker libraries and a real gearmand.

Without gproxy every one of these jobs fails on its first attempt (tests/test_flaky_peers_direct.py
shows the baseline); through gproxy the client sees only the outcome of the last attempt.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gproxy.core.policy import RetryPolicy
from gproxy.core.protocol import REQ, RES, Framer, PacketType, build_packet
from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import (
    PeerSet,
    attempt_count,
    attempts_log,
    flaky_cli_command,
    run_pyclient,
    seen_uniques,
    start_cli_worker,
    start_perlworker,
    start_pyclient,
    start_pyworker,
)
from tests.proxy_thread import ProxyThread

WAIT_S = 15.0
FAST = RetryPolicy(backoff_initial=0.02, jitter=False)


def proxy_to(gearmand: Gearmand, policy: RetryPolicy = FAST, frozen: bool = False, **functions: RetryPolicy) -> ProxyThread:
    return ProxyThread.to(gearmand.address, policy, functions, frozen=frozen)


@pytest.mark.parametrize("function", ["flaky", "flaky_hint", "stream_flaky"])
def test_retryable_exceptions_end_in_success_and_the_worker_sees_the_original_unique(
    gearmand: Gearmand, tmp_path: Path, function: str
) -> None:
    with proxy_to(gearmand) as proxy, PeerSet() as peers:
        worker = peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        run = run_pyclient(gearmand.address, function, "2:job", unique=f"{function}-u1", exceptions=True)
    assert (run.returncode, run.state, run.stdout) == (0, "COMPLETE", b"ok after 3"), run.stderr
    # python-gearman sent WORK_FAIL after each WORK_EXCEPTION: dropped, so no ERROR came back.
    assert "JOB_NOT_FOUND" not in worker.log_text()
    assert run.report["exception_updates"] == []  # the held failures never reached the client
    assert seen_uniques(tmp_path) == [f"{function}-u1"] * 3
    if function == "stream_flaky":  # every attempt's updates are relayed as the original's
        assert run.report["data_updates"] == ["data 1", "data 2", "data 3"]
        assert run.report["status_updates"] == [[1, 10], [2, 10], [3, 10]]


def test_work_fail_is_retried_only_where_on_fail_is_set(gearmand: Gearmand, tmp_path: Path) -> None:
    on_fail = replace(FAST, on_fail=True)
    with proxy_to(gearmand, flaky_cli=on_fail) as proxy, PeerSet() as peers:
        peers.add(start_cli_worker(proxy.address, "flaky_cli", flaky_cli_command(tmp_path), admin_address=gearmand.address))
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path / "py"))
        retried = run_pyclient(gearmand.address, "flaky_cli", "1:cli")
        not_retried = run_pyclient(gearmand.address, "flaky_fail", "1:py", unique="fail-u1")
    assert (retried.returncode, retried.stdout) == (0, b"ok after 2"), retried.stderr
    assert (not_retried.returncode, not_retried.state) == (1, "FAILED"), not_retried.stderr
    assert seen_uniques(tmp_path / "py") == ["fail-u1"]


@pytest.mark.parametrize("function, payload", [("fatal", "FATAL: broken input"), ("plain_exception", "boom")])
def test_fatal_and_unmarked_exceptions_pass_through_at_once(
    gearmand: Gearmand, tmp_path: Path, function: str, payload: str
) -> None:
    with proxy_to(gearmand) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        run = run_pyclient(gearmand.address, function, "x", unique=f"{function}-1", exceptions=True)
        assert proxy.call(lambda: dict(proxy.proxy.retrier.held)) == {}
    assert (run.state, run.report["exception"]) == ("FAILED", payload), run.stderr
    assert seen_uniques(tmp_path) == [f"{function}-1"]


def test_exhausted_jobs_fail_with_the_last_exception_and_go_to_the_dead_letter_queue(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    policy = replace(FAST, max_attempts=3, dead_letter="dead.{function}")
    with proxy_to(gearmand, policy) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        run = run_pyclient(gearmand.address, "flaky", "9:payload", unique="exhaust-1", exceptions=True)
        assert (run.state, run.report["exception"]) == ("FAILED", "RETRY: transient failure 3"), run.stderr
        assert seen_uniques(tmp_path) == ["exhaust-1"] * 3
        gearmand.wait_for_queue("dead.flaky", total=1, running=0)  # no worker: it stays queued


def test_perl_worker_survives_its_trailing_work_fail(gearmand: Gearmand, tmp_path: Path) -> None:
    # Perl's Gearman::Worker sends WORK_FAIL right after its WORK_EXCEPTION. Forwarded, it
    # would delete the held job; and the ERROR gearmand answers with kills the worker.
    with proxy_to(gearmand) as proxy, PeerSet() as peers:
        worker = peers.add(start_perlworker(proxy.address, state_dir=tmp_path))
        first = run_pyclient(gearmand.address, "flaky", "1:perl-a", exceptions=True)
        second = run_pyclient(gearmand.address, "flaky", "1:perl-b", exceptions=True)
        assert worker.poll() is None, worker.log_text()
    assert (first.stdout, second.stdout) == (b"ok after 2", b"ok after 2"), (first.stderr, second.stderr)


def test_background_jobs_are_retried(gearmand: Gearmand, tmp_path: Path) -> None:
    with proxy_to(gearmand) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        run = run_pyclient(gearmand.address, "flaky", "2:bg", unique="bg-retry-1", background=True)
        assert run.returncode == 0, run.stderr
        wait_for(lambda: len(seen_uniques(tmp_path)) == 3, WAIT_S, "three attempts")
        gearmand.wait_for_queue("flaky", total=0)
    assert seen_uniques(tmp_path) == ["bg-retry-1"] * 3


def test_a_second_client_of_the_same_unique_gets_the_retried_result(gearmand: Gearmand, tmp_path: Path) -> None:
    slow = replace(FAST, backoff_initial=1.0)
    with proxy_to(gearmand, slow, frozen=True) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        first = peers.add(start_pyclient(gearmand.address, "flaky", "1:shared", unique="shared-1"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        second = peers.add(start_pyclient(gearmand.address, "flaky", "other payload, discarded", unique="shared-1"))
        wait_for(lambda: gearmand.clients_of("shared-1") == 2, WAIT_S, "the second client to attach")
        proxy.advance(1.0)  # the retry, only now
        first_run, second = first.result(), second.result()
    assert (first_run.stdout, second.stdout) == (b"ok after 2", b"ok after 2"), (first_run.stderr, second.stderr)
    assert seen_uniques(tmp_path) == ["shared-1"] * 2


def test_behind_two_gproxies_the_one_holding_the_original_owns_the_loop(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    slow = replace(FAST, backoff_initial=0.5)
    with proxy_to(gearmand, slow, frozen=True) as owner, proxy_to(gearmand, FAST) as other, PeerSet() as peers:
        first = start_pyworker(owner.address, state_dir=tmp_path)
        client = peers.add(start_pyclient(gearmand.address, "flaky", "2:two", unique="two-proxies"))
        wait_for(lambda: len(owner.held()) == 1, WAIT_S, "the job to be held")
        # The first worker leaves; its gproxy keeps the held job's gearmand connection open.
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(WAIT_S)
        peers.add(start_pyworker(other.address, state_dir=tmp_path))
        owner.thaw()  # the retries may go now, to the worker behind the other gproxy
        run = client.result()
        assert other.call(lambda: dict(other.proxy.retrier.held)) == {}
    assert (run.returncode, run.stdout) == (0, b"ok after 3"), run.stderr
    assert seen_uniques(tmp_path) == ["two-proxies"] * 3


def test_gproxy_killed_while_holding_loses_no_job(gearmand: Gearmand, tmp_path: Path) -> None:
    config = tmp_path / "gproxy.toml"
    host, port = gearmand.address
    config.write_text(f'listen = "127.0.0.1:0"\nupstream = "{host}:{port}"\n[retry]\nbackoff_initial = 60\n')
    proc = subprocess.Popen([sys.executable, "-m", "gproxy", "--config", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        proxy_port = int(line.split("listening on 127.0.0.1:")[1].split(",")[0])
        with PeerSet() as peers:
            peers.add(start_pyworker(("127.0.0.1", proxy_port), state_dir=tmp_path))
            client = peers.add(start_pyclient(gearmand.address, "flaky", "1:crash", unique="crash-1"))
            wait_for(lambda: len(seen_uniques(tmp_path)) == 1, WAIT_S, "the first attempt")
            gearmand.wait_for_queue("flaky", total=1, running=1)  # held: still running in gearmand
            proc.kill()
            proc.wait(WAIT_S)
            # gearmand requeued the held job when gproxy's connection dropped; a direct worker runs it.
            peers.add(start_pyworker(gearmand.address, state_dir=tmp_path))
            run = client.result()
    finally:
        proc.kill()
        proc.wait(WAIT_S)
    assert (run.returncode, run.stdout) == (0, b"ok after 2"), run.stderr


def test_reset_abilities_while_holding_moves_the_worker_and_requeues_nothing(
    gearmand: Gearmand, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gproxy")
    slow = replace(FAST, backoff_initial=1.0)
    with proxy_to(gearmand, slow, frozen=True) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        client = peers.add(start_pyclient(gearmand.address, "flaky", "1:moved", unique="moved-1"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        # python-gearman sends RESET_ABILITIES + CAN_DOs on its connection; there, gearmand
        # would requeue the held job and it would run once more.
        assert run_pyclient(gearmand.address, "unregister", "echo").stdout == b"unregistered"
        assert gearmand.status()["flaky"][:2] == (1, 1)  # still assigned, not queued again
        proxy.advance(1.0)
        run = client.result()
        # The worker's abilities are what it asked for, on its new connection.
        wait_for(lambda: gearmand.status().get("echo", (0, 0, 0))[2] == 0, WAIT_S, "echo to be unregistered")
        assert gearmand.status()["reverse"][2] == 1
    assert (run.returncode, run.stdout) == (0, b"ok after 2"), run.stderr
    assert seen_uniques(tmp_path) == ["moved-1"] * 2  # the original and one retry, no requeue
    assert any("moved to a fresh gearmand connection" in r.getMessage() for r in caplog.records)


def test_cant_do_while_holding_moves_the_perl_worker_and_requeues_nothing(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    slow = replace(FAST, backoff_initial=1.0)
    with proxy_to(gearmand, slow, frozen=True) as proxy, PeerSet() as peers:
        worker = peers.add(start_perlworker(proxy.address, state_dir=tmp_path))
        client = peers.add(start_pyclient(gearmand.address, "flaky", "1:perl-moved"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        # Gearman::Worker sends CANT_DO flaky: on its connection, the held job would be requeued.
        assert run_pyclient(gearmand.address, "unregister", "flaky").stdout == b"unregistered"
        assert gearmand.status()["flaky"][:2] == (1, 1)  # the held original: still assigned, not requeued
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path / "py"))
        proxy.thaw()
        run = client.result()
        assert worker.poll() is None, worker.log_text()
    # The Perl worker ran the original once (no requeue); the pygearman worker, counting by
    # unique id on its own, failed the first retry and completed the second.
    assert attempt_count(tmp_path, "1:perl-moved") == 1
    assert (run.returncode, run.stdout) == (0, b"ok after 2"), run.stderr
    assert seen_uniques(tmp_path / "py") == [run.report["unique"]] * 2


def test_a_payload_of_several_mib_is_retried_intact(gearmand: Gearmand, tmp_path: Path) -> None:
    # Perl's flaky counts attempts by payload: "ok after 2" means the retry carried the very
    # same 3 MiB, NUL bytes and all.
    payload = b"1:" + bytes(range(256)) * (3 * 4096)
    with proxy_to(gearmand) as proxy, PeerSet() as peers:
        peers.add(start_perlworker(proxy.address, state_dir=tmp_path))
        run = run_pyclient(gearmand.address, "flaky", payload)
    assert (run.returncode, run.stdout) == (0, b"ok after 2"), run.stderr
    assert attempt_count(tmp_path, payload) == 2


def test_a_gearmand_restart_while_jobs_are_held_leaves_gproxy_serving(
    fresh_gearmand: Gearmand, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gearmand = fresh_gearmand
    caplog.set_level(logging.INFO, "gproxy")
    with proxy_to(gearmand, frozen=True) as proxy, PeerSet() as peers:
        worker = peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        client = peers.add(start_pyclient(gearmand.address, "flaky", "1:restart", unique="restart-held"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        gearmand.restart()  # the job, its client and every connection are gone
        assert client.result().returncode != 0
        wait_for(lambda: proxy.held() == [], WAIT_S, "the hold to be dropped")
        worker.wait_for_line("reconnected")
        proxy.thaw()
        run = run_pyclient(gearmand.address, "flaky", "1:after restart", unique="after-restart")
        assert proxy.sample("gproxy_jobs_held", function="flaky") == 0
    assert (run.returncode, run.stdout) == (0, b"ok after 2"), run.stderr
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_next_gproxy_to_hold_a_job_never_reuses_a_gone_ones_retry_unique(
    fresh_gearmand: Gearmand, tmp_path: Path
) -> None:
    """Found by the chaos tier. A gproxy that goes away with its retry of J queued leaves
    gearmand an abandoned job, which gearmand drops unrun when a worker would take it,
    together with any submission attached to it since. The next gproxy holding J must not
    submit the same retry unique, or J's client waits for ever."""
    gearmand = fresh_gearmand
    slow = replace(FAST, backoff_initial=1.0)
    with PeerSet() as peers, proxy_to(gearmand, slow, frozen=True) as second:
        with proxy_to(gearmand, slow, frozen=True) as first:
            peers.add(start_pyworker(first.address, state_dir=tmp_path))
            job = peers.add(start_pyclient(gearmand.address, "scripted", "retry,retry,ok|J", unique="U",
                                           priority="high", timeout=20))
            wait_for(lambda: len(first.held()) == 1, WAIT_S, "J to be held by the first gproxy")
            peers.add(start_pyclient(gearmand.address, "scripted", "hang,ok|K", unique="K", priority="high"))
            wait_for(lambda: [a.unique for a in attempts_log(tmp_path)] == ["U", "K"], WAIT_S, "its worker busy")
            first.advance(1.0)  # J's retry goes to gearmand, and waits there: the worker is busy
            gearmand.wait_for_queue("scripted", total=3, running=2)
        # The first gproxy is gone: gearmand requeues J and K, and abandons J's retry.
        gearmand.wait_for_queue("scripted", total=3, running=0)
        peers.add(start_pyclient(gearmand.address, "scripted", "sleep=2|K2", unique="K2", priority="high"))
        peers.add(start_pyworker(second.address, state_dir=tmp_path))
        wait_for(lambda: "K2" in [a.unique for a in attempts_log(tmp_path)] and len(second.held()) == 1,
                 WAIT_S, "J held by the second gproxy, its worker busy with K2")
        second.advance(1.0)  # J's retry, while the abandoned one still waits in the queue
        run = job.result()
    assert (run.returncode, run.stdout) == (0, b"ok after 3"), run.stderr


def test_a_worker_whose_connection_is_reset_leaves_its_held_jobs_held(
    fresh_gearmand: Gearmand, tmp_path: Path
) -> None:
    """Found by the chaos tier: a worker killed with unread data in its socket resets the
    connection instead of closing it. That closed every gearmand connection of its pair at
    once, and gearmand requeued the held job while its retry ran: it ran twice. A reset is
    now a departure like a close. (The failing worker is a raw socket here: no library
    resets on cue.)"""
    gearmand = fresh_gearmand
    with proxy_to(gearmand, frozen=True) as proxy, PeerSet() as peers:
        worker = socket.create_connection(proxy.address)
        worker.sendall(build_packet(REQ, PacketType.CAN_DO, function=b"scripted"))
        client = peers.add(start_pyclient(gearmand.address, "scripted", "ok|reset", unique="reset-held"))
        gearmand.wait_for_queue("scripted", total=1)
        worker.sendall(build_packet(REQ, PacketType.GRAB_JOB_UNIQ))
        framer, frames = Framer(RES), []
        while not frames:
            frames = framer.receive(worker.recv(65536))
        (assign,) = frames
        handle = assign.args()["handle"]
        worker.sendall(build_packet(REQ, PacketType.WORK_EXCEPTION, handle=handle, data=b"RETRY: raw"))
        wait_for(lambda: len(proxy.held()) == 1, WAIT_S, "the job to be held")
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        worker.close()  # a reset, not a FIN

        def departure() -> str | None:
            pairs = proxy.call(lambda: [pair.session.worker_gone for pair in proxy.proxy.pairs])
            return "closed" if not pairs else "kept for the held job" if pairs == [True] else None

        wait_for(lambda: departure() is not None, WAIT_S, "gproxy to see the worker go")
        assert departure() == "kept for the held job"
        assert gearmand.status()["scripted"][:2] == (1, 1)  # still assigned, not requeued
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        proxy.thaw()
        run = client.result()
    assert (run.returncode, run.stdout) == (0, b"ok after 1"), run.stderr
    assert seen_uniques(tmp_path) == ["reset-held"]  # the retry alone: no requeued second run
