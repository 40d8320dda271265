"""The retry-client connection in-process: a fake gearmand of the test's own (the real codec
over real loopback sockets), trio's MockClock for the reconnect backoff, a real Retrier.
And the Submitter, pure: replies matched to submissions in order."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import struct
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing

from gproxy.connection import Connection
from gproxy.core.jobs import TrackedJob
from gproxy.core.metrics import Metrics
from gproxy.core.protocol import REQ, RES, Framer, Packet, PacketType, build_packet
from gproxy.core.policy import Policies, RetryPolicy
from gproxy.core.retry import Action, Retrier, SendUpstream, Submit
from gproxy.core.reconnect import MAXIMUM as RECONNECT_MAX
from gproxy.core.reconnect import PROVEN_AFTER
from gproxy.retry_client import ANSWER_WAIT, ECHO_WAIT, RetryClient
from gproxy.core.submitter import HELLO, Created, JobPacket, Refused, Submitter

P = PacketType
POLICY = RetryPolicy(jitter=False, dead_letter="dlq")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


class FakeGearmand:
    """Accepts gproxy's connections (or refuses the next `refuse`), reads what it submits."""

    def __init__(self) -> None:
        self.refuse = 0
        self.attempts = 0
        self.ends: list[trio.socket.SocketType] = []
        self.arrived = trio.Event()

    async def connect(self) -> Connection:
        self.attempts += 1
        if self.refuse:
            self.refuse -= 1
            raise ConnectionRefusedError("refused")
        client, server = tcp_pair()
        self.ends.append(trio.socket.from_stdlib_socket(server))
        self.arrived.set()
        return Connection(client)

    async def read(self, end: trio.socket.SocketType, count: int) -> list[Packet]:
        framer, packets = Framer(REQ), []
        while len(packets) < count:
            data = await end.recv(65536)
            assert data, "gproxy closed the connection"
            packets += [frame for frame in framer.receive(data) if type(frame) is Packet]
        return packets

    async def next_connection(self) -> trio.socket.SocketType:
        while True:
            if self.ends:
                return self.ends.pop(0)
            self.arrived = trio.Event()
            await self.arrived.wait()


class Harness:
    def __init__(self, policy: RetryPolicy = POLICY) -> None:
        self.retrier = Retrier(Policies(policy), random.Random(1), tag=b"")
        self.gearmand = FakeGearmand()
        self.executed: list[Action] = []
        self.acted = trio.Event()
        self.answered = trio.Event()
        """Set whenever the client has carried out what a reply of gearmand's meant."""
        self.metrics = Metrics()
        self.client = RetryClient(
            "route", self.retrier, self.gearmand.connect, self.execute, max_packet_size=4096, metrics=self.metrics
        )

    async def execute(self, actions: Sequence[Action]) -> None:
        self.answered.set()
        self.answered = trio.Event()
        for action in actions:
            if type(action) is Submit:
                self.client.submit(action)
            else:
                self.executed.append(action)
                self.acted.set()

    def hold(self, handle: bytes = b"H:1") -> int:
        job = TrackedJob(handle, b"f", b"u-" + handle, b"payload", "up-1", 0.0)
        decision = self.retrier.worker_failed(
            owner="up-1", route="route", job=job, ptype=P.WORK_EXCEPTION, failure=b"RETRY: x", now=0.0
        )
        assert decision.held
        return max(self.retrier.held)

    def due(self, key: int) -> None:
        wait = self.retrier.held[key].wait
        for action in self.retrier.timer_fired(key, wait, trio.current_time()):
            assert type(action) is Submit
            self.client.submit(action)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_gearmand_unreachable_delays_a_retry_and_never_fails_it(clock: trio.testing.MockClock) -> None:
    h = Harness()
    h.gearmand.refuse = 6
    key = h.hold()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.client.run)
        h.due(key)
        end = await h.gearmand.next_connection()
        hello, submit = await h.gearmand.read(end, 2)
        nursery.cancel_scope.cancel()
    assert h.gearmand.attempts == 7 and h.executed == []
    assert hello.raw == HELLO and submit.args()["unique"] == b"gpr:2:u-H:1"
    # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 3.2 seconds, doubling to at most RECONNECT_MAX.
    assert trio.current_time() == pytest.approx(6.3) and RECONNECT_MAX == 5.0


async def test_a_lost_connection_sends_unanswered_dead_letters_again_and_resubmits_retries(
    clock: trio.testing.MockClock,
) -> None:
    h = Harness()
    key = h.hold()
    dead = Submit("route", None, b"dlq", b"gpr:dl:1", b"payload", P.SUBMIT_JOB_BG)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.client.run)
        h.client.submit(dead)
        h.due(key)
        end = await h.gearmand.next_connection()
        await h.gearmand.read(end, 3)  # HELLO, the dead letter, the retry: none answered
        end.close()
        end = await h.gearmand.next_connection()
        _, again, resubmitted = await h.gearmand.read(end, 3)
        nursery.cancel_scope.cancel()
    assert again.raw == build_packet(REQ, P.SUBMIT_JOB_BG, function=b"dlq", unique=b"gpr:dl:1", data=b"payload")
    assert resubmitted.args()["unique"] == b"gpr:3:u-H:1"  # not the unique of the lost one
    assert h.retrier.held[key].attempt == 2  # it never arrived: not counted as an attempt


async def test_a_submission_for_a_job_that_ended_meanwhile_is_not_sent(clock: trio.testing.MockClock) -> None:
    h = Harness()
    first, second = h.hold(b"H:1"), h.hold(b"H:2")
    h.due(first)
    h.due(second)
    h.retrier.owner_lost("up-1")  # both jobs went back to gearmand before anything was sent
    key = h.hold(b"H:3")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.client.run)
        h.due(key)
        end = await h.gearmand.next_connection()
        _, submit = await h.gearmand.read(end, 2)
        nursery.cancel_scope.cancel()
    assert submit.args()["unique"] == b"gpr:2:u-H:3"


async def test_gearmands_error_answer_fails_the_job_with_its_last_failure(clock: trio.testing.MockClock) -> None:
    h = Harness()
    key = h.hold()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.client.run)
        end = await submitted(h, key)
        await end.send(build_packet(RES, P.ERROR, code=b"QUEUE_ERROR", text=b"Job queue is full"))
        with trio.fail_after(5):
            await h.acted.wait()
        nursery.cancel_scope.cancel()
    assert h.executed[0] == SendUpstream("up-1", build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"))
    assert h.retrier.held == {}


async def test_a_retry_result_over_max_packet_size_fails_the_job_and_keeps_the_connection(
    clock: trio.testing.MockClock,
) -> None:
    h = Harness()
    first, second = h.hold(b"H:1"), h.hold(b"H:2")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.client.run)
        h.due(first)
        end = await h.gearmand.next_connection()
        await h.gearmand.read(end, 2)
        await end.send(build_packet(RES, P.JOB_CREATED, handle=b"H:9"))
        huge = build_packet(RES, P.WORK_COMPLETE, handle=b"H:9", data=b"r" * 10_000)
        for i in range(0, len(huge), 3000):
            await end.send(huge[i : i + 3000])
        with trio.fail_after(5):
            await h.acted.wait()
        h.due(second)  # the same connection goes on serving
        (submit,) = await h.gearmand.read(end, 1)
        nursery.cancel_scope.cancel()
    assert h.executed[0] == SendUpstream("up-1", build_packet(
        REQ, P.WORK_EXCEPTION, handle=b"H:1",
        data=b"gproxy: the retry's WORK_COMPLETE of 10004 bytes exceeds max_packet_size 4096",
    ))
    assert submit.args()["unique"] == b"gpr:2:u-H:2" and h.gearmand.attempts == 1


def test_the_submitter_matches_replies_to_submissions_in_order() -> None:
    submitter = Submitter()
    retry = Submit("route", 7, b"f", b"gpr:2:u", b"p")
    dead = Submit("route", None, b"dlq", b"gpr:dl:x", b"p", P.SUBMIT_JOB_BG)
    other = Submit("route", 8, b"f", b"gpr:2:v", b"p", P.SUBMIT_JOB_HIGH)
    sent = submitter.submit(retry, 0.0) + submitter.submit(dead, 0.0) + submitter.submit(other, 0.0)
    assert sent == (
        build_packet(REQ, P.SUBMIT_JOB, function=b"f", unique=b"gpr:2:u", data=b"p")
        + build_packet(REQ, P.SUBMIT_JOB_BG, function=b"dlq", unique=b"gpr:dl:x", data=b"p")
        + build_packet(REQ, P.SUBMIT_JOB_HIGH, function=b"f", unique=b"gpr:2:v", data=b"p")
    )
    replies = (
        build_packet(RES, P.JOB_CREATED, handle=b"H:1")
        + build_packet(RES, P.ERROR, code=b"QUEUE_ERROR", text=b"full")
        + build_packet(RES, P.JOB_CREATED, handle=b"H:3")
        + build_packet(RES, P.WORK_COMPLETE, handle=b"H:1", data=b"ok")
    )
    events = submitter.receive(replies[:20], 0.0) + submitter.receive(replies[20:], 0.0)
    assert events == [
        Created(7, b"H:1"),
        Refused(dead, b"QUEUE_ERROR: full"),
        Created(8, b"H:3"),
        JobPacket(P.WORK_COMPLETE, {"handle": b"H:1", "data": b"ok"}),
    ]
    assert submitter.unanswered() == []
    submitter.submit(retry, 0.0)
    assert submitter.unanswered() == [retry]
    # An ERROR that answers nothing gproxy asked is not matched with anything.
    assert Submitter().receive(build_packet(RES, P.ERROR, code=b"X", text=b"y"), 0.0) == []


def test_after_a_loss_a_new_submitter_matches_only_its_own_submissions() -> None:
    lost = Submitter()
    lost.submit(Submit("route", 1, b"f", b"gpr:2:a", b"p"), 0.0)
    lost.submit(Submit("route", None, b"dlq", b"gpr:dl:b", b"p", P.SUBMIT_JOB_BG), 0.0)
    assert [s.key for s in lost.unanswered()] == [1, None]  # what the loss leaves to redo
    fresh = Submitter()
    fresh.submit(Submit("route", 1, b"f", b"gpr:3:a", b"p"), 0.0)
    created = build_packet(RES, P.JOB_CREATED, handle=b"H:7")
    assert fresh.receive(created, 0.0) == [Created(1, b"H:7")]
    assert fresh.receive(created, 0.0) == []  # a second answer has nothing left to match


# -- every way the retry connection is lost, with jobs in both states

async def submitted(h: Harness, key: int) -> trio.socket.SocketType:
    """Held job `key`'s backoff over: its retry submitted on a new connection (HELLO and the
    SUBMIT_JOB read); gearmand's end of that connection."""
    h.due(key)
    end = await h.gearmand.next_connection()
    await h.gearmand.read(end, 2)
    return end


@contextlib.asynccontextmanager
async def serving(h: Harness) -> AsyncIterator[None]:
    """The client runs for the block; a stall fails within 600 s of the fake clock (at once)."""
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.client.run)
            yield
            nursery.cancel_scope.cancel()


NO_NUL_EXCEPTION = b"\0RES" + struct.pack(">II", P.WORK_EXCEPTION, 4) + b"H:9x"
NO_NUL_ERROR = b"\0RES" + struct.pack(">II", P.ERROR, 4) + b"oops"
LOSSES = {
    # kind: (what gearmand sends or does, the protocol error it counts)
    "reset": (None, None),
    "close": (None, None),
    "bad magic": (b"\0RXS" + bytes(8), "bad_magic"),
    "WORK_EXCEPTION without its NUL": (NO_NUL_EXCEPTION, "malformed"),
    "ERROR without its NUL": (NO_NUL_ERROR, "malformed"),
    "internal error": (None, None),
}


def _failing_once(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real = getattr(Retrier, name)
    calls: list[int] = []

    def patched(self: Retrier, *args: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(f"injected failure in {name}")
        return real(self, *args)

    monkeypatch.setattr(Retrier, name, patched)


async def _lose(h: Harness, end: trio.socket.SocketType, kind: str, created: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """gearmand loses the connection `kind`'s way, after creating the retry job if `created`
    (in the same write as bad input: the hard case)."""
    bad, _ = LOSSES[kind]
    prefix = build_packet(RES, P.JOB_CREATED, handle=b"H:9") if created else b""
    if kind == "internal error":
        _failing_once(monkeypatch, "retry_packet" if created else "retry_created")
        status = build_packet(RES, P.WORK_STATUS, handle=b"H:9", numerator=b"1", denominator=b"2")
        await end.send(build_packet(RES, P.JOB_CREATED, handle=b"H:9") + (status if created else b""))
    elif bad is not None:
        await end.send(prefix + bad)
    else:
        if created:
            answered = h.answered
            await end.send(prefix)
            await answered.wait()
        if kind == "reset":
            end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        end.close()


@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("created", [False, True], ids=["unacknowledged", "created"])
async def test_however_the_retry_connection_is_lost_what_was_in_flight_goes_on_the_same_way(
    clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    kind: str, created: bool,
) -> None:
    """A submission gearmand never acknowledged is sent again, not counted as an attempt; a
    retry job it had created (it may have run) is submitted again as the next attempt."""
    caplog.set_level(logging.DEBUG, logger="gproxy")
    h = Harness()
    key = h.hold()
    async with serving(h):
        end = await submitted(h, key)  # HELLO, the retry as attempt 2
        await _lose(h, end, kind, created, monkeypatch)
        end = await h.gearmand.next_connection()
        _, resubmitted = await h.gearmand.read(end, 2)
    job = h.retrier.held[key]
    if created:
        assert (job.attempt, job.resubmitted) == (3, 0)  # the lost retry job counts as attempt 2
    else:
        assert (job.attempt, job.resubmitted) == (2, 1)
    assert resubmitted.args()["unique"] == b"gpr:3:u-H:1" and h.executed == []
    lost = [r for r in caplog.records if " lost (" in r.getMessage()]
    assert [r.levelno for r in lost] == [logging.WARNING]
    reason = LOSSES[kind][1]
    if reason is not None:
        assert "protocol error from gearmand" in lost[0].getMessage()
        assert h.metrics.registry.get_sample_value("gproxy_protocol_errors_total", {"reason": reason}) == 1


@pytest.mark.parametrize("kind", list(LOSSES))
async def test_a_created_retry_lost_with_no_attempt_left_forwards_the_last_failure(
    clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    h = Harness(RetryPolicy(jitter=False, max_attempts=2, dead_letter="dlq"))
    key = h.hold()
    async with serving(h):
        end = await submitted(h, key)
        await _lose(h, end, kind, True, monkeypatch)
        end = await h.gearmand.next_connection()
        _, dead_letter = await h.gearmand.read(end, 2)  # and no resubmission
    assert h.retrier.held == {} and dead_letter.type is P.SUBMIT_JOB_BG and dead_letter.args()["function"] == b"dlq"
    assert h.executed[0] == SendUpstream("up-1", build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x"))


async def test_a_gearmand_that_owes_an_answer_and_stays_silent_is_echoed_then_given_up(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Up but hung: the connection stays open, TCP acknowledges, nothing answers."""
    h = Harness()
    key = h.hold()
    async with serving(h):
        h.due(key)
        start = trio.current_time()
        end = await h.gearmand.next_connection()
        await h.gearmand.read(end, 2)
        (echo,) = await h.gearmand.read(end, 1)
        echoed = trio.current_time() - start
        assert await end.recv(100) == b""  # gproxy closed it
        given_up = trio.current_time() - start
        end = await h.gearmand.next_connection()
        _, resubmitted = await h.gearmand.read(end, 2)
    assert echo.type is P.ECHO_REQ and (echoed, given_up) == (pytest.approx(ANSWER_WAIT), pytest.approx(ANSWER_WAIT + ECHO_WAIT))
    assert resubmitted.args()["unique"] == b"gpr:3:u-H:1" and h.retrier.held[key].resubmitted == 1
    (lost,) = [r.getMessage() for r in caplog.records if " lost (" in r.getMessage()]
    assert f"answered nothing for {ANSWER_WAIT + ECHO_WAIT:g}s" in lost


async def test_gearmand_answering_then_dropping_every_connection_causes_no_storm(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """gearmand (or a load balancer in front of it) accepts, even answers, then drops each
    connection at once: tries back off to RECONNECT_MAX, one WARNING for the outage."""
    caplog.set_level(logging.DEBUG, logger="gproxy")
    h = Harness()
    key = h.hold()
    async with serving(h):
        h.due(key)
        while trio.current_time() < 60.0:
            end = await h.gearmand.next_connection()
            await h.gearmand.read(end, 1)
            await end.send(build_packet(RES, P.OPTION_RES, option=b"exceptions"))
            end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            end.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert h.gearmand.attempts <= 18 and len(warnings) == 1, (h.gearmand.attempts, len(warnings))
    assert h.metrics.registry.get_sample_value("gproxy_retry_connection_up", {"upstream": "route"}) == 0
    assert h.metrics.registry.get_sample_value("gproxy_retry_reconnects_total", {"upstream": "route"}) == h.gearmand.attempts - 1
    assert h.retrier.held[key].attempt == 2  # never acknowledged: no attempt spent on the storm


async def test_an_outage_ends_with_one_info_line_once_a_connection_proves_itself(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gproxy")
    h = Harness()
    h.gearmand.refuse = 3
    key = h.hold()
    async with serving(h):
        end = await submitted(h, key)
        await end.send(build_packet(RES, P.OPTION_RES, option=b"exceptions") + build_packet(RES, P.JOB_CREATED, handle=b"H:9"))
        connected = trio.current_time()
        await trio.sleep(PROVEN_AFTER + 0.5)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if "retry client" in r.getMessage()]
    assert [level for level, _ in messages] == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.INFO]
    assert messages[-1][1] == (
        f"retry client to gearmand route: connected again after an outage of {connected + PROVEN_AFTER:.1f}s (4 tries)"
    )
    assert h.metrics.registry.get_sample_value("gproxy_retry_connection_up", {"upstream": "route"}) == 1
    assert h.retrier.held[key].retry_handle == b"H:9"


@pytest.mark.parametrize("how", ["closes", "resets"])
async def test_once_needed_the_connection_is_kept_and_an_outage_ends_with_nothing_waiting(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """A proven connection ends while no retry is in flight: gproxy connects again at once,
    so an outage ends when gearmand is back, not at the next retry (an idle gproxy showed
    gproxy_retry_connection_up 0 until then). A clean close (a load balancer's idle timeout,
    a gearmand that stops) is no outage unless that try fails: no WARNING, the gauge stays 1."""
    caplog.set_level(logging.DEBUG, logger="gproxy")
    h = Harness()
    key = h.hold()
    up = {"upstream": "route"}
    async with serving(h):
        end = await submitted(h, key)
        answered = h.answered
        await end.send(build_packet(RES, P.OPTION_RES, option=b"exceptions") + build_packet(RES, P.JOB_CREATED, handle=b"H:9")
                       + build_packet(RES, P.WORK_COMPLETE, handle=b"H:9", data=b"done"))
        await answered.wait()
        await trio.sleep(PROVEN_AFTER)
        assert h.retrier.held == {}  # nothing in flight any more
        if how == "resets":
            end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        end.close()
        end = await h.gearmand.next_connection()  # with no retry waiting
        await h.gearmand.read(end, 1)  # HELLO
        assert h.metrics.registry.get_sample_value("gproxy_retry_connection_up", up) == (1 if how == "closes" else 0)
        await end.send(build_packet(RES, P.OPTION_RES, option=b"exceptions"))
        await trio.sleep(PROVEN_AFTER + 0.5)
        assert h.metrics.registry.get_sample_value("gproxy_retry_connection_up", up) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == (0 if how == "closes" else 1), warnings


async def test_a_clean_close_followed_by_a_failed_try_is_an_outage_from_the_close(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """gearmand stops: its kernel closes the connection cleanly, then refuses the next."""
    caplog.set_level(logging.DEBUG, logger="gproxy")
    h = Harness()
    key = h.hold()
    async with serving(h):
        end = await submitted(h, key)
        await end.send(build_packet(RES, P.OPTION_RES, option=b"exceptions") + build_packet(RES, P.JOB_CREATED, handle=b"H:9"))
        await trio.sleep(PROVEN_AFTER + 0.5)
        h.gearmand.refuse = 2
        closed = trio.current_time()
        end.close()  # (the retry job H:9 is lost with it: resubmitted as attempt 3)
        end = await h.gearmand.next_connection()
        _, resubmitted = await h.gearmand.read(end, 2)
        await end.send(build_packet(RES, P.OPTION_RES, option=b"exceptions"))
        back = trio.current_time()
        await trio.sleep(PROVEN_AFTER + 0.5)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if "retry client" in r.getMessage()]
    assert [level for level, _ in messages] == [logging.DEBUG, logging.WARNING, logging.DEBUG, logging.INFO]
    assert messages[1][1].endswith("cannot connect (refused); 1 submissions wait; trying again in 0.1s")
    assert messages[-1][1].endswith(f"after an outage of {back - closed + PROVEN_AFTER:.1f}s (3 tries)")
    assert resubmitted.args()["unique"] == b"gpr:3:u-H:1" and h.retrier.held[key].attempt == 3
