"""The retry-client connection in-process: a fake gearmand of the test's own (the real codec
over real loopback sockets), trio's MockClock for the reconnect backoff, a real Retrier.
And the Submitter, pure: replies matched to submissions in order."""

from __future__ import annotations

import random
import socket
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from gproxy.connection import Connection
from gproxy.jobs import TrackedJob
from gproxy.protocol import REQ, RES, Framer, Packet, PacketType, build_packet
from gproxy.retry import Action, Policies, Retrier, RetryPolicy, SendUpstream, Submit
from gproxy.retry_client import RECONNECT_MAX, RetryClient
from gproxy.submitter import HELLO, Created, JobPacket, Refused, Submitter

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
    def __init__(self) -> None:
        self.retrier = Retrier(Policies(POLICY), random.Random(1), tag=b"")
        self.gearmand = FakeGearmand()
        self.executed: list[Action] = []
        self.acted = trio.Event()
        self.client = RetryClient("route", self.retrier, self.gearmand.connect, self.execute, max_packet_size=4096)

    async def execute(self, actions: Sequence[Action]) -> None:
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
        h.due(key)
        end = await h.gearmand.next_connection()
        await h.gearmand.read(end, 2)
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
    sent = submitter.submit(retry) + submitter.submit(dead) + submitter.submit(other)
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
    events = submitter.receive(replies[:20]) + submitter.receive(replies[20:])
    assert events == [
        Created(7, b"H:1"),
        Refused(dead, b"QUEUE_ERROR: full"),
        Created(8, b"H:3"),
        JobPacket(P.WORK_COMPLETE, {"handle": b"H:1", "data": b"ok"}),
    ]
    assert submitter.unanswered() == []
    submitter.submit(retry)
    assert submitter.unanswered() == [retry]
    # An ERROR that answers nothing gproxy asked is not matched with anything.
    assert Submitter().receive(build_packet(RES, P.ERROR, code=b"X", text=b"y")) == []


def test_after_a_loss_a_new_submitter_matches_only_its_own_submissions() -> None:
    lost = Submitter()
    lost.submit(Submit("route", 1, b"f", b"gpr:2:a", b"p"))
    lost.submit(Submit("route", None, b"dlq", b"gpr:dl:b", b"p", P.SUBMIT_JOB_BG))
    assert [s.key for s in lost.unanswered()] == [1, None]  # what the loss leaves to redo
    fresh = Submitter()
    fresh.submit(Submit("route", 1, b"f", b"gpr:3:a", b"p"))
    created = build_packet(RES, P.JOB_CREATED, handle=b"H:7")
    assert fresh.receive(created) == [Created(1, b"H:7")]
    assert fresh.receive(created) == []  # a second answer has nothing left to match
