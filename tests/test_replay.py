"""`gproxy replay` against gearmand with its SQLite persistent queue: jobs exhausted into
the dead-letter queue by a real gproxy and a real pygearman worker survive a gearmand
restart; a replay killed half-way and run again resubmits every one, none twice but the one
in flight at the kill, at the rate asked for."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from gproxy.core.dead_letter import envelope
from gproxy.core.policy import RetryPolicy
from gproxy.core.protocol import REQ, RES, Framer, Packet, PacketType, build_packet
from tests.gearmand import Gearmand
from tests.peer_procs import PeerSet, start_pyworker
from tests.proxy_thread import ProxyThread

P = PacketType
JOBS = 24
RATE = 20.0


def submit_background(address: tuple[str, int], jobs: list[tuple[bytes, bytes]]) -> None:
    """A plain client: each (unique, payload) as a background job of `flaky`."""
    with socket.create_connection(address, timeout=10) as sock:
        framer = Framer(RES)
        for unique, payload in jobs:
            sock.sendall(build_packet(REQ, P.SUBMIT_JOB_BG, function=b"flaky", unique=unique, data=payload))
            frames: list[object] = []
            while not frames:
                frames = list(framer.receive(sock.recv(4096)))
            assert type(frames[0]) is Packet and frames[0].type is P.JOB_CREATED


def grab_all(address: tuple[str, int], function: bytes) -> list[tuple[bytes, bytes]]:
    """A plain worker: (unique, payload) of every queued job of `function` (left unfinished)."""
    jobs = []
    with socket.create_connection(address, timeout=10) as sock:
        framer = Framer(RES)
        sock.sendall(build_packet(REQ, P.CAN_DO, function=function))
        while True:
            sock.sendall(build_packet(REQ, P.GRAB_JOB_UNIQ))
            frames: list[object] = []
            while not frames:
                frames = [f for f in framer.receive(sock.recv(65536)) if type(f) is Packet and f.type is not P.NOOP]
            packet = frames[0]
            assert type(packet) is Packet
            if packet.type is P.NO_JOB:
                return jobs
            args = packet.args()
            jobs.append((args["unique"], args["data"]))


def replay_argv(gearmand: Gearmand) -> list[str]:
    host, port = gearmand.address
    return [sys.executable, "-m", "gproxy", "replay", "--server", f"{host}:{port}", "--from", "dead.flaky",
            "--to", "replayed", "--rate", str(RATE)]


def replayed(lines: list[str]) -> list[tuple[str, float]]:
    """(unique, seconds since the run began) of each `replayed ...` line."""
    found = [re.fullmatch(r"replayed \S+ \(unique '([^']*)', 1 attempts, last WORK_EXCEPTION\) to replayed as \S+ at (\S+)s", line)
             for line in lines if line.startswith("replayed H:")]
    assert all(found), lines
    return [(m.group(1), float(m.group(2))) for m in found if m]


def test_dead_letters_outlive_a_restart_and_a_killed_replay_and_are_replayed_once_at_a_rate(tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    gearmand = Gearmand(tmp_path / "gearmand", extra_args=["-q", "libsqlite3", f"--libsqlite3-db={queue}"]).start()
    try:
        exhausting = RetryPolicy(max_attempts=1, dead_letter="dead.{function}")
        jobs = [(b"dl-%d" % n, b"9:job %d" % n) for n in range(JOBS)]  # flaky fails them all: 9 attempts
        with ProxyThread.to(gearmand.address, exhausting) as proxy, PeerSet() as peers:
            peers.add(start_pyworker(proxy.address, state_dir=tmp_path / "worker"))
            submit_background(gearmand.address, jobs)
            gearmand.wait_for_queue("dead.flaky", total=JOBS, timeout=30)
            gearmand.wait_for_queue("flaky", total=0)
        gearmand.restart()  # the dead letters come back from SQLite
        gearmand.wait_for_queue("dead.flaky", total=JOBS)

        first = subprocess.Popen(replay_argv(gearmand), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert first.stdout is not None
        before_kill = []
        while len(before_kill) < JOBS // 2:
            line = first.stdout.readline()
            assert line, first.stderr.read() if first.stderr else ""
            before_kill.append(line.rstrip("\n"))
        first.send_signal(signal.SIGKILL)  # half-way, perhaps between a resubmission and its completion
        first.wait(10)
        first_lines = before_kill + first.stdout.read().splitlines()
        second = subprocess.run(replay_argv(gearmand), capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stdout + second.stderr
        gearmand.wait_for_queue("dead.flaky", total=0)
        gearmand.wait_for_queue("replayed", total=JOBS)  # (a dead letter replayed twice coalesces)
        resubmitted = grab_all(gearmand.address, b"replayed")
    finally:
        gearmand.stop()
    runs = [replayed(first_lines), replayed(second.stdout.splitlines())]
    uniques = [unique for run in runs for unique, _ in run]
    assert sorted(set(uniques)) == sorted(u.decode() for u, _ in jobs)  # every one
    assert len(uniques) - JOBS in (0, 1)  # none twice, but the one in flight at the kill
    for run in runs:  # the rate holds in each run
        times = [t for _, t in run]
        assert times[-1] - times[0] >= (len(times) - 1) / RATE * 0.95, times
    assert second.stdout.splitlines()[-1].startswith(f"replayed {len(runs[1])} dead letters from dead.flaky to replayed in ")
    assert second.stdout.splitlines()[-1].endswith("; 0 left in dead.flaky")
    assert sorted(resubmitted) == sorted(jobs)  # the original unique ids and payloads, byte for byte


def test_a_dry_run_shows_the_dead_letters_and_leaves_them_queued(gearmand: Gearmand) -> None:
    host, port = gearmand.address
    with socket.create_connection(gearmand.address, timeout=10) as sock:
        framer = Framer(RES)
        for n in range(3):
            letter = envelope(b"resize-dry", b"u-%d" % n, b"H:x:%d" % n, 5, "WORK_EXCEPTION", b"RETRY: busy", b"img %d" % n)
            sock.sendall(build_packet(REQ, P.SUBMIT_JOB_BG, function=b"dead.dry", unique=b"gpr:dl:%d" % n, data=letter))
            frames: list[object] = []
            while not frames:
                frames = list(framer.receive(sock.recv(4096)))
    gearmand.wait_for_queue("dead.dry", total=3)
    dry = subprocess.run([sys.executable, "-m", "gproxy", "replay", "--server", f"{host}:{port}", "--from", "dead.dry",
                          "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert [line.split(" (")[0].split()[0:2] for line in lines[:3]] == [["would", "replay"]] * 3
    assert all(line.endswith("5 attempts, last WORK_EXCEPTION) to resize-dry") for line in lines[:3])
    assert lines[-1] == "would replay 3 dead letters from dead.dry to their own functions"
    gearmand.wait_for_queue("dead.dry", total=3)  # all still there
    limited = subprocess.run([sys.executable, "-m", "gproxy", "replay", "--server", f"{host}:{port}", "--from", "dead.dry",
                              "--limit", "2"], capture_output=True, text=True, timeout=60)
    assert limited.returncode == 0 and limited.stdout.splitlines()[-1].endswith("; 1 left in dead.dry"), limited.stdout
    gearmand.wait_for_queue("resize-dry", total=2)  # each to its own function, from the envelope


def submit_letters(gearmand: Gearmand, function: bytes, letters: list[bytes]) -> None:
    with socket.create_connection(gearmand.address, timeout=10) as sock:
        framer = Framer(RES)
        for n, letter in enumerate(letters):
            sock.sendall(build_packet(REQ, P.SUBMIT_JOB_BG, function=function, unique=b"gpr:dl:%s:%d" % (function, n), data=letter))
            frames: list[object] = []
            while not frames:
                frames = list(framer.receive(sock.recv(4096)))


def test_a_dead_letter_stays_queued_until_its_resubmission_is_acknowledged(gearmand: Gearmand) -> None:
    """gearmand refuses the resubmission (the target's queue is full): the replay stops, and
    the dead letter is still there; nothing is lost."""
    host, port = gearmand.address
    submit_letters(gearmand, b"dead.full", [envelope(b"full", b"u-1", b"H:1", 2, "WORK_FAIL", b"", b"data")])
    submit_letters(gearmand, b"full", [b"already queued"])
    gearmand.wait_for_queue("dead.full", total=1)
    assert gearmand.admin("maxqueue full 1") == "OK"  # one job queued: the queue is full
    refused = subprocess.run([sys.executable, "-m", "gproxy", "replay", "--server", f"{host}:{port}", "--from", "dead.full"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "gearmand answered ERROR" in refused.stdout, refused.stdout + refused.stderr
    gearmand.wait_for_queue("dead.full", total=1)
    gearmand.wait_for_queue("full", total=1)


def test_a_dead_letter_without_the_envelope_needs_to_and_then_goes_as_it_is(gearmand: Gearmand) -> None:
    host, port = gearmand.address
    submit_letters(gearmand, b"dead.bare", [b"a bare payload, as gproxy 0.1 dead-lettered it"])
    gearmand.wait_for_queue("dead.bare", total=1)
    argv = [sys.executable, "-m", "gproxy", "replay", "--server", f"{host}:{port}", "--from", "dead.bare"]
    stopped = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 1 and "give --to" in stopped.stdout, stopped.stdout
    gearmand.wait_for_queue("dead.bare", total=1)  # left where it was
    done = subprocess.run([*argv, "--to", "bare"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    gearmand.wait_for_queue("dead.bare", total=0)
    assert grab_all(gearmand.address, b"bare") == [(b"", b"a bare payload, as gproxy 0.1 dead-lettered it")]


def test_a_rate_or_limit_out_of_range_is_a_usage_error() -> None:
    for bad in (["--rate", "0"], ["--limit", "0"]):
        run = subprocess.run([sys.executable, "-m", "gproxy", "replay", "--server", "127.0.0.1:1", "--from", "dead.x", *bad],
                             capture_output=True, text=True, timeout=30)
        assert run.returncode == 2 and "--rate must be > 0 and --limit >= 1" in run.stderr

