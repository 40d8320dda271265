"""Sessions and the Retrier together under random interleavings (hypothesis' stateful testing).

A model world, every byte of it built and read with the real codec: one Retrier shared by one
or two Sessions (workers behind gproxy, each with its gearmand connections), a model gearmand,
gproxy's retry client (the real Submitter), an outside worker that is not behind gproxy, and a
clock. The Sessions' own lifecycle decides, as in gproxy: what the sockets do is told to the
Session (a worker leaves, a gearmand connection is lost or closes, a fresh one opens, a
timer fires), and every command the Sessions and the Retrier emit is carried out in the world
as gproxy.pair carries it out: SendUpstream reaches gearmand on that connection (another
pair's goes to that pair, as the control plane hands it over), NothingHeld goes to the pair
whose connection it names, OpenUpstream opens one, Shut makes gearmand close one (it does on
EOF), Close closes one (gearmand then requeues what it still owns), Finish closes the whole
pair, Wakeup, RecheckBudget and CallLater become timers, Submit goes to the retry client. Every
worker registers g with CAN_DO_TIMEOUT (so its attempts time out as the clock moves on) and
is ejected after failing two g jobs in a row; d retries a worker that vanishes mid-job.

The model gearmand assigns jobs (JOB_ASSIGN_UNIQ for GRAB_JOB_UNIQ, JOB_ASSIGN for GRAB_JOB,
NO_JOB), knows which connection owns each handle, ends a job on its first
WORK_COMPLETE/FAIL/EXCEPTION (that is the one outcome its client sees), requeues a connection's
jobs on CANT_DO, RESET_ABILITIES and close, answers the retry client (JOB_CREATED, or ERROR
when told to refuse) and abandons that client's jobs when its connection breaks. Like the real
one, it answers a work packet from a connection that does not own the handle with ERROR
JOB_NOT_FOUND: here that is a failure, as the model workers never send one of their own.

After every step: the Retrier's bookkeeping agrees with itself and holds no handle twice;
every connection's jobs in gearmand are exactly what gproxy tracks there, holds there, or is
still telling the worker about; no worker's CANT_DO or RESET_ABILITIES requeues a held job;
nothing stale (a worker's packets after its failure) reaches a client; every held job has a
timer, a submission or a retry job that will move it on; a departed worker's connections stay
open only while they hold retries; an ejected worker's grab never reaches gearmand. When
the world goes quiet (every timer fired, every reply delivered, every retry job run), no job
is held any more.
"""

from __future__ import annotations

import random
import sys
from collections import Counter, deque
from dataclasses import dataclass, field, replace

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gproxy.config import Address, Route
from gproxy.core.assignments import ServerTraits
from gproxy.core.commands import CallLater, Close, Finish, OpenUpstream, SendDownstream, Shut, Timer
from gproxy.core.connections import LinkState
from gproxy.core.metrics import Metrics
from gproxy.core.policy import DISCONNECTED, OnDisconnect, Policies, RetryPolicy
from gproxy.core.protocol import REQ, RES, Framer, Packet, PacketType, build_packet
from gproxy.core.retry import RecheckBudget, NothingHeld, Retrier, SendUpstream, State, Submit, Wakeup
from gproxy.core.session import Session, UpstreamLink
from gproxy.core.submitter import HELLO, Created, JobPacket, Refused, Submitter
from gproxy.core.uniques import parse_retry_unique

P = PacketType
ROUTE = Route(Address("127.0.0.1", 4730), Address("127.0.0.1", 4731))
F, G, D = b"f", b"g", b"d"
FUNCTIONS = (F, G, D)
POLICY = RetryPolicy(
    max_attempts=3, backoff_initial=1.0, backoff_max=8.0, budget_ratio=0.25,
    budget_min_per_second=0.4, budget_ttl=5.0, max_held=4, max_hold_time=20.0, dead_letter="dlq",
)
POLICIES = Policies(POLICY, {
    G: replace(POLICY, on_fail=True, eject_after=2, eject_for=4.0),  # g: a WORK_FAIL is retryable;
    # and a worker that fails two g jobs in a row is ejected for a while
    D: replace(POLICY, on_disconnect=OnDisconnect.RETRY),  # d: a worker that vanishes mid-job fails it
})
STALE = b"stale: the failed attempt's"
"""What a worker sends after its own failure (python-gearman's return value, late data)."""

FINALS = frozenset({P.WORK_COMPLETE, P.WORK_FAIL, P.WORK_EXCEPTION})
UPDATES = frozenset({P.WORK_DATA, P.WORK_WARNING, P.WORK_STATUS})
SUBMITS = frozenset({P.SUBMIT_JOB, P.SUBMIT_JOB_HIGH, P.SUBMIT_JOB_LOW, P.SUBMIT_JOB_BG})
FAILURES = {
    "retry": (P.WORK_EXCEPTION, b"RETRY: busy"),
    "retry_after": (P.WORK_EXCEPTION, b"RETRY after=3: rate limited"),
    "retry_perl": (P.WORK_EXCEPTION, b"\x05\x0b\x0a\x0cRETRY: oops\n"),  # Storable-frozen `die`
    "fatal": (P.WORK_EXCEPTION, b"FATAL: no"),
    "unmarked": (P.WORK_EXCEPTION, b"boom"),
    "fail": (P.WORK_FAIL, b""),
    "complete": (P.WORK_COMPLETE, b"done"),
}
TRAILING = ("none", "perl_fail", "python_complete", "python_data")
OUTSIDE_OUTCOMES = ("complete", "retry", "fatal", "fail", "unmarked", "disconnected")


def req(ptype: PacketType, **args: bytes) -> bytes:
    return build_packet(REQ, ptype, **args)


def res(ptype: PacketType, **args: bytes) -> bytes:
    return build_packet(RES, ptype, **args)


def result(ptype: PacketType, handle: bytes, data: bytes = b"") -> bytes:
    if ptype is P.WORK_FAIL:
        return req(P.WORK_FAIL, handle=handle)
    if ptype is P.WORK_STATUS:
        return req(P.WORK_STATUS, handle=handle, numerator=b"1", denominator=b"2")
    return req(ptype, handle=handle, data=data)


def trailing(kind: str, handle: bytes) -> bytes:
    """What a worker library sends after its WORK_EXCEPTION for the same handle: Perl's
    Gearman::Worker a WORK_FAIL, python-gearman (send_job_exception, then return) a
    WORK_COMPLETE with the handler's return value, or late WORK_DATA."""
    return {
        "none": b"",
        "perl_fail": req(P.WORK_FAIL, handle=handle),
        "python_complete": req(P.WORK_COMPLETE, handle=handle, data=STALE),
        "python_data": req(P.WORK_DATA, handle=handle, data=STALE),
    }[kind]


# -- the model gearmand -----------------------------------------------------------------------

CLIENT = "client"
"""The client of an original job, waiting for its one outcome."""
OUTSIDE = "outside"
"""A worker connected to gearmand directly, not behind gproxy."""
RETRY = "retry"
"""gproxy's retry-client connection."""


@dataclass(eq=False)
class GJob:
    handle: bytes
    function: bytes
    unique: bytes
    payload: bytes
    client: object
    """CLIENT, (RETRY, generation of the retry connection), or None (a background job)."""
    shown: bytes | None = None
    """For a retry job: the unique id a worker behind gproxy must be shown (the original's)."""
    owner: object = None
    """The connection the job is assigned to; None while it is queued."""
    abandoned: bool = False
    """Its retry connection broke: gearmand drops it rather than run it (again), and nobody
    hears how a run of it that was under way ends."""


@dataclass(eq=False)
class Conn:
    framer: Framer = field(default_factory=lambda: Framer(REQ))
    abilities: set[bytes] = field(default_factory=set)
    outbox: deque[tuple[bytes, bytes | None]] = field(default_factory=deque)
    """Replies not yet delivered, each with the handle it assigns (if it is a JOB_ASSIGN*)."""
    open: bool = True


class Gearmand:
    def __init__(self, world: SessionWorld) -> None:
        self.world = world
        self.jobs: dict[bytes, GJob] = {}
        """Every job that has not ended."""
        self.queue: list[bytes] = []
        self.conns: dict[object, Conn] = {RETRY: Conn(), OUTSIDE: Conn()}
        self.outcomes: dict[bytes, tuple[PacketType, bytes]] = {}
        """The outcome each original job's client got."""
        self.dead_letters: list[bytes] = []
        self.next_handle = 0
        self.pick = 0
        """Which of the jobs a grab could take it gets (modulo their number)."""
        self.refuse = False
        """Answer the next submission with ERROR."""

    def new_handle(self) -> bytes:
        self.next_handle += 1
        return b"H:gm:%d" % self.next_handle

    def owned_by(self, key: object) -> list[GJob]:
        return [job for job in self.jobs.values() if job.owner is key]

    def receive(self, key: object, data: bytes) -> None:
        conn = self.conns[key]
        assert conn.open, f"bytes sent on {key!r}, a connection that is closed"
        for frame in conn.framer.receive(data):
            assert type(frame) is Packet
            ptype, args = frame.type, frame.args()
            if ptype is P.CAN_DO or ptype is P.CAN_DO_TIMEOUT:
                conn.abilities.add(args["function"])
            elif ptype is P.CANT_DO:
                conn.abilities.discard(args["function"])
                self.requeue(key, [j for j in self.owned_by(key) if j.function == args["function"]], "CANT_DO")
            elif ptype is P.RESET_ABILITIES:
                conn.abilities.clear()
                self.requeue(key, self.owned_by(key), "RESET_ABILITIES")
            elif ptype is P.SET_CLIENT_ID:
                pass
            elif ptype is P.OPTION_REQ:
                self.reply(key, res(P.OPTION_RES, option=args["option"]))
            elif ptype in (P.GRAB_JOB, P.GRAB_JOB_UNIQ):
                self.grab(key, ptype)
            elif ptype in FINALS or ptype in UPDATES:
                self.work(key, ptype, args)
            elif ptype in SUBMITS:
                assert key is RETRY
                self.submitted(ptype, args)
            else:
                raise AssertionError(f"gearmand got an unexpected {ptype.name} on {key!r}")

    def reply(self, key: object, data: bytes, handle: bytes | None = None) -> None:
        if key is RETRY:
            self.world.rc_out.append((data, None))
        else:
            self.conns[key].outbox.append((data, handle))

    def grab(self, key: object, ptype: PacketType) -> None:
        abilities = self.conns[key].abilities
        takes = [h for h in self.queue if self.jobs[h].function in abilities]
        if not takes:
            return self.reply(key, res(P.NO_JOB))
        job = self.jobs[takes[self.pick % len(takes)]]
        self.queue.remove(job.handle)
        job.owner = key
        if ptype is P.GRAB_JOB_UNIQ:
            data = res(P.JOB_ASSIGN_UNIQ, handle=job.handle, function=job.function, unique=job.unique, data=job.payload)
        else:
            data = res(P.JOB_ASSIGN, handle=job.handle, function=job.function, data=job.payload)
        self.reply(key, data, job.handle)

    def requeue(self, key: object, jobs: list[GJob], why: str) -> None:
        """gearmand takes jobs back from `key` (its CANT_DO, RESET_ABILITIES, or close)."""
        for job in jobs:
            if why != "close":
                holder = self.world.retrier.holder(ROUTE, job.handle)
                assert holder is not key, f"the worker's {why} made gearmand requeue held job {job.handle!r}"
            job.owner = None
            if job.abandoned:
                del self.jobs[job.handle]
            else:
                self.queue.insert(0, job.handle)

    def close(self, key: object) -> list[GJob]:
        conn = self.conns[key]
        conn.open = False
        conn.outbox.clear()
        owned = self.owned_by(key)
        self.requeue(key, owned, "close")
        return owned

    def work(self, key: object, ptype: PacketType, args: dict[str, bytes]) -> None:
        handle = args["handle"]
        job = self.jobs.get(handle)
        if job is None or job.owner is not key:
            raise AssertionError(
                f"{ptype.name} for {handle!r} reached gearmand on {key!r}, which does not own that "
                f"handle ({'it has ended' if job is None else f'owner {job.owner!r}'}): ERROR JOB_NOT_FOUND"
            )
        data = args.get("data", b"")
        if job.client is CLIENT:
            assert STALE not in data, f"{ptype.name} {data!r} of a failed attempt reached {handle!r}'s client"
        if ptype in FINALS:
            del self.jobs[handle]
            if job.client is CLIENT:
                assert handle not in self.outcomes, f"{handle!r} ended twice"
                self.outcomes[handle] = (ptype, data)
        if type(job.client) is tuple and not job.abandoned:
            self.world.rc_out.append((build_packet(RES, ptype, **args), handle if ptype in FINALS else None))

    def submitted(self, ptype: PacketType, args: dict[str, bytes]) -> None:
        if self.refuse:
            return self.reply(RETRY, res(P.ERROR, code=b"QUEUE_ERROR", text=b"queue full"))
        handle = self.new_handle()
        if ptype is P.SUBMIT_JOB_BG:
            self.dead_letters.append(handle)
            client, shown = None, None
        else:
            client = (RETRY, self.world.rc_generation)
            parsed = parse_retry_unique(args["unique"])
            assert parsed is not None, f"a retry submitted with unique {args['unique']!r}"
            shown = parsed[1]  # what a worker behind gproxy must see
        self.jobs[handle] = GJob(handle, args["function"], args["unique"], args["data"], client, shown)
        self.queue.append(handle)
        self.reply(RETRY, res(P.JOB_CREATED, handle=handle))


# -- the workers behind gproxy ----------------------------------------------------------------


@dataclass(eq=False)
class Worker:
    name: str
    session: Session
    framer: Framer = field(default_factory=lambda: Framer(RES))
    grabs: deque[PacketType] = field(default_factory=deque)
    """Its grabs not yet answered (a worker waits for the answer before it grabs again)."""
    running: dict[bytes, bytes] = field(default_factory=dict)
    """The jobs it runs: handle -> function."""
    options_owed: int = 0
    gone: bool = False
    shut: bool = False
    """gproxy half-closed its connection (gearmand closed its current one): it leaves."""
    timed_out: set[bytes] = field(default_factory=set)
    """Jobs it still runs that gproxy timed out (retried): what it sends for them is dropped."""

    def __repr__(self) -> str:
        return f"Worker({self.name})"


class StillHeld(AssertionError):
    """A job is still held when nothing is left to happen in the world."""


@dataclass
class Due:
    due: float
    action: Wakeup | RecheckBudget | Timer
    """A Retrier timer, or one a Session asked for (CallLater), with its worker in `worker`."""
    worker: Worker | None = None


class SessionWorld(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.metrics = Metrics()
        self.retrier = Retrier(POLICIES, random.Random(0), metrics=self.metrics)
        self.traits = ServerTraits()
        self.gearmand = Gearmand(self)
        self.workers: list[Worker] = []
        self.worker_of: dict[UpstreamLink, Worker] = {}
        self.links: list[UpstreamLink] = []
        """Every session connection ever opened, oldest first."""
        self.timers: list[Due] = []
        self.next_job = 0
        # The retry client (gproxy.retry_client.RetryClient, without its trio task).
        self.rc_generation = 0
        self.rc_pending: deque[Submit] = deque()
        """Submissions not yet written; they wait through any outage."""
        self.rc_submitter = Submitter()
        self.rc_out: deque[tuple[bytes, bytes | None]] = deque()
        """gearmand's replies on the retry connection not yet read, each with the retry job's
        handle if it is that job's outcome."""
        self.rc_hello = False
        self.passed = 0
        """Packets sent on before their Session saw them (passes_downstream/_upstream)."""

    # -- carrying out what gproxy asks for, as gproxy.pair and the control plane do

    def run(self, commands: list, worker: Worker | None = None) -> None:
        """In order; `worker`: the one whose Session gave them, if any."""
        for command in commands:
            kind = type(command)
            if kind is SendDownstream:
                assert worker is not None, f"{command!r} with no worker to send it to"
                assert not worker.gone, f"{command!r} for {worker!r}, which has left"
                self.to_worker(worker, command.data)
            elif kind is Wakeup or kind is RecheckBudget:
                self.timers.append(Due(self.now + command.delay, command))
            elif kind is Submit:
                self.rc_pending.append(command)
            elif kind is SendUpstream or kind is NothingHeld:
                owner = self.worker_of[command.owner]
                if owner is not worker:  # another pair's connection: handed to that pair
                    self.run(owner.session.deliver(command), owner)
                else:
                    assert kind is SendUpstream, f"{command!r}: a Session settles its own connections"
                    self.gearmand.receive(command.owner, command.data)
            elif kind is OpenUpstream:
                assert worker is not None
                self.open(worker, command.link)
                self.run(worker.session.link_opened(command.link), worker)  # (connected at once)
            elif kind is Shut:
                assert worker is not None
                if command.link is None:
                    worker.shut = True  # its library closes the connection (the rule makes it leave)
                else:
                    self.close(command.link, closed_by_gearmand=True)  # gearmand closes on EOF
            elif kind is Close:
                self.close(command.link, by_gproxy=True)
            elif kind is Finish:
                assert worker is not None
                self.finished(worker)
            elif kind is CallLater:
                assert worker is not None
                # (it replaces any earlier one)
                self.timers = [t for t in self.timers if (t.action, t.worker) != (command.timer, worker)]
                self.timers.append(Due(self.now + command.delay, command.timer, worker))
            else:
                raise AssertionError(f"unknown command {command!r}")

    def open(self, worker: Worker, link: UpstreamLink) -> None:
        self.gearmand.conns[link] = Conn()
        self.worker_of[link] = worker
        self.links.append(link)

    def close(
        self, link: UpstreamLink, by_gproxy: bool = False, lost: bool = False, closed_by_gearmand: bool = False,
    ) -> None:
        """`link`'s connection closes: gearmand requeues what it owns; unless gproxy closed it,
        the Session is told (the connection was `lost`, or gearmand closed it)."""
        if not self.gearmand.conns[link].open:
            return
        worker = self.worker_of[link]
        if by_gproxy:
            owned = [job.handle for job in self.gearmand.owned_by(link)]
            assert not owned, f"gproxy closed {link!r}, which still owns {owned}: gearmand requeues them"
        for job in self.gearmand.close(link):
            worker.running.pop(job.handle, None)  # a worker's result there would only earn an ERROR
        if lost or closed_by_gearmand:
            error = ConnectionResetError(104, "Connection reset by peer") if lost else None
            self.run(worker.session.link_ended(link, error), worker)

    def finished(self, worker: Worker) -> None:
        """gproxy ended the pair: every connection of it closes, the worker's too."""
        for link in self.links:
            if self.worker_of[link] is worker:
                self.close(link)
        if not worker.gone:
            worker.gone = True
            worker.running.clear()
            worker.grabs.clear()

    def send(self, worker: Worker, data: bytes) -> None:
        """The worker's bytes through its Session, and its commands carried out in order
        (a packet that passes goes first, and the Session sees it after, as in a Pair)."""
        session = worker.session
        assert not worker.gone
        sent = session.current.state is LinkState.OPEN and session.passes_downstream(data)
        if sent:
            self.passed += 1
            self.gearmand.receive(session.current, data)
        self.run(session.from_downstream(data, self.now, sent), worker)

    def deliver(self, link: UpstreamLink) -> None:
        """gearmand's next reply on `link` reaches the Session, and the worker if it is there."""
        data, _ = self.gearmand.conns[link].outbox.popleft()
        worker = self.worker_of[link]
        session = worker.session
        sent = session.passes_upstream(link, data)
        if sent:
            self.passed += 1
            if not worker.gone:
                self.to_worker(worker, data)
        self.run(session.from_upstream(link, data, self.now, sent), worker)

    def to_worker(self, worker: Worker, data: bytes) -> None:
        for frame in worker.framer.receive(data):
            assert type(frame) is Packet
            ptype, args = frame.type, frame.args()
            if ptype is P.NO_JOB:
                assert worker.grabs, "NO_JOB for a grab the worker never sent"
                worker.grabs.popleft()
            elif ptype is P.JOB_ASSIGN or ptype is P.JOB_ASSIGN_UNIQ:
                assert worker.grabs, "a job for a grab the worker never sent"
                grab = worker.grabs.popleft()
                assert (ptype is P.JOB_ASSIGN) == (grab is P.GRAB_JOB), f"{grab.name} answered with {ptype.name}"
                handle = args["handle"]
                job = self.gearmand.jobs[handle]
                assert job.owner in worker.session.links and handle not in worker.running
                assert (args["function"], args["data"]) == (job.function, job.payload)
                if ptype is P.JOB_ASSIGN_UNIQ:
                    shown = job.unique if job.shown is None else job.shown
                    assert args["unique"] == shown, f"the worker was shown {args['unique']!r}, not {shown!r}"
                worker.running[handle] = job.function
                worker.timed_out.discard(handle)
            elif ptype is P.NOOP:
                pass  # (woken after an ejection: it grabs when the rules say so)
            elif ptype is P.OPTION_RES:
                assert worker.options_owed, "an OPTION_RES the worker never asked for"
                worker.options_owed -= 1
            else:
                raise AssertionError(f"the worker got {ptype.name} {args}")

    def leave(self, worker: Worker, answered_first: bool = True) -> None:
        """The worker disconnects (gproxy.pair.Pair._worker_ended).

        `answered_first`: gearmand's answer to a grab the worker sent reaches gproxy before
        the worker's EOF does, or (False) after it: then the job that answer assigns on a
        connection kept open for held retries has no worker, and gproxy must hand it back
        (test_a_retry_job_assigned_after_its_worker_left_ends_its_hold)."""
        session = worker.session
        if answered_first:
            for link in session.links:
                if link.grabs_pending and self.gearmand.conns[link].open:
                    self.answer_all(link)
        worker.gone = True
        worker.running.clear()
        worker.grabs.clear()
        # The Session keeps what must stay (held retries, jobs of functions that retry
        # disconnects), fails retry jobs back, and half-closes the rest.
        self.run(session.worker_ended(None, self.now), worker)
        kept = [link for link in session.links if self.gearmand.conns[link].open]
        assert all(self.retrier.holds(link) for link in kept), (
            f"{worker!r} left: {kept} stay open, but only those that hold retries may"
        )

    def connect(self) -> None:
        name = b"w%d" % (len(self.workers) + 1)
        session = Session(
            name.decode(), retrier=self.retrier, route=ROUTE, metrics=self.metrics, traits=self.traits
        )
        worker = Worker(name.decode(), session)
        self.workers.append(worker)
        self.open(worker, session.current)
        worker.options_owed += 1
        self.send(worker, req(P.SET_CLIENT_ID, client_id=name) + req(P.OPTION_REQ, option=b"exceptions")
                  + req(P.CAN_DO, function=F) + req(P.CAN_DO_TIMEOUT, function=G, timeout=b"300"))

    def retry_client_writes(self, refuse: bool) -> bool:
        """Writes the next submission still wanted (RetryClient._write); False if none is."""
        while self.rc_pending:
            submit = self.rc_pending.popleft()
            if submit.key is not None and not self.retrier.submitting(submit.key):
                continue
            if not self.rc_hello:
                self.rc_hello = True
                self.gearmand.receive(RETRY, HELLO)
            self.gearmand.refuse = refuse
            self.gearmand.receive(RETRY, self.rc_submitter.submit(submit, self.now))
            return True
        return False

    def retry_client_reads(self) -> None:
        data, _ = self.rc_out.popleft()
        for event in self.rc_submitter.receive(data, self.now):
            if type(event) is JobPacket:
                self.run(self.retrier.retry_packet(ROUTE, event.type, event.args, self.now))
            elif type(event) is Created:
                self.run(self.retrier.retry_created(event.key, event.handle))
            else:
                assert type(event) is Refused
                if event.submit.key is not None:
                    self.run(self.retrier.retry_rejected(event.submit.key, event.error, self.now))

    def fire(self, timer: Due) -> None:
        self.timers.remove(timer)
        self.now = max(self.now, timer.due)
        action, worker = timer.action, timer.worker
        if type(action) is Wakeup:
            self.run(self.retrier.timer_fired(action.key, action.wait, self.now))
        elif type(action) is Timer:
            assert worker is not None
            tracked = {job.handle for link in worker.session.links for job in link.jobs}
            self.run(worker.session.timer_fired(action, self.now), worker)
            still = {job.handle for link in worker.session.links for job in link.jobs}
            if action is Timer.TIMEOUTS:
                worker.timed_out |= (tracked - still) & set(worker.running)
        else:
            self.run(self.retrier.budget_recheck(action.function, self.now))

    def outside_runs(self, job: GJob, ptype: PacketType, data: bytes, updates: bool) -> None:
        self.gearmand.queue.remove(job.handle)
        job.owner = OUTSIDE
        if updates:
            self.gearmand.work(OUTSIDE, P.WORK_DATA, {"handle": job.handle, "data": b"part"})
        args = {"handle": job.handle} if ptype is P.WORK_FAIL else {"handle": job.handle, "data": data}
        self.gearmand.work(OUTSIDE, ptype, args)

    # -- what may happen next

    def live(self) -> list[Worker]:
        return [worker for worker in self.workers if not worker.gone and not worker.shut]

    def cut_off(self) -> list[Worker]:
        return [worker for worker in self.workers if worker.shut and not worker.gone]

    def open_links(self) -> list[UpstreamLink]:
        return [link for link in self.links if self.gearmand.conns[link].open]

    def queued_retries(self) -> list[GJob]:
        return [self.gearmand.jobs[h] for h in self.gearmand.queue if self.gearmand.jobs[h].shown is not None]

    def jobs_to_finish(self) -> list[tuple[Worker, bytes]]:
        return [(worker, handle) for worker in self.live() for handle in sorted(worker.running)]

    def idle_workers(self) -> list[Worker]:
        return [worker for worker in self.live() if not worker.grabs]

    def busy_workers(self) -> list[Worker]:
        """Live workers that a departure would affect: running, grabbing or holding."""
        return [w for w in self.live() if w.running or w.grabs or self.holds_on(w)]

    def busy_links(self) -> list[UpstreamLink]:
        """Open connections that own something in gearmand, or are owed an answer."""
        return [link for link in self.open_links() if self.gearmand.owned_by(link) or link.grabs_pending]

    def holds_on(self, worker: Worker) -> bool:
        return any(self.retrier.holds(link) for link in worker.session.links)

    def may_change_abilities(self, worker: Worker, function: bytes | None) -> bool:
        """A worker changes its abilities between jobs: none of that function is running, and
        no grab is unanswered unless gproxy will move it (else gearmand would requeue the job
        it is about to get, and the worker's own result for it would earn an ERROR)."""
        if any(function is None or f == function for f in worker.running.values()):
            return False
        return not worker.grabs or self.retrier.holds(worker.session.current, function)

    def ability_changes(self) -> list[tuple[Worker, bytes | None]]:
        """Where a change matters: the worker's connections hold retries (it may be moved)."""
        return [
            (w, f) for w in self.live() if self.holds_on(w) for f in (F, G, None) if self.may_change_abilities(w, f)
        ]

    def submit_job(self, function: bytes) -> None:
        self.next_job += 1
        handle = self.gearmand.new_handle()
        job = GJob(handle, function, b"u-%d" % self.next_job, b"payload %d" % self.next_job, CLIENT)
        self.gearmand.jobs[handle] = job
        self.gearmand.queue.append(handle)

    def grab(self, worker: Worker, plain: bool, pick: int = 0) -> None:
        grab = P.GRAB_JOB if plain else P.GRAB_JOB_UNIQ
        worker.grabs.append(grab)
        self.gearmand.pick = pick
        ejected = worker.session.ejection.active
        self.send(worker, req(grab))
        if ejected:  # gproxy answered NO_JOB itself; gearmand never saw the grab
            assert not worker.grabs, f"{worker!r} is ejected, and its grab went on"

    def answer_all(self, link: UpstreamLink) -> None:
        while self.gearmand.conns[link].open and self.gearmand.conns[link].outbox:
            self.deliver(link)

    def run_outside(self, job: GJob, how: str, updates: bool) -> None:
        ptype, payload = (P.WORK_EXCEPTION, DISCONNECTED) if how == "disconnected" else FAILURES[how]
        self.outside_runs(job, ptype, payload, updates)

    @initialize(workers=st.integers(1, 2))
    def workers_connect(self, workers: int) -> None:
        for _ in range(workers):
            self.connect()

    @precondition(lambda self: len(self.live()) < 2)
    @rule()
    def a_worker_connects(self) -> None:
        self.connect()

    @precondition(lambda self: self.idle_workers())
    @rule(
        data=st.data(), submit=st.sampled_from((None, F, G, D)), plain=st.booleans(), pick=st.integers(-2, 2),
        answered=st.booleans(),
    )
    def a_worker_grabs(
        self, data: st.DataObject, submit: bytes | None, plain: bool, pick: int, answered: bool
    ) -> None:
        """A client submits a job (or not), a worker grabs (GRAB_JOB or GRAB_JOB_UNIQ), and
        gearmand's answers arrive at once (or later)."""
        worker = data.draw(st.sampled_from(self.idle_workers()))
        if submit is not None:
            self.submit_job(submit)
        self.grab(worker, plain, pick)
        if answered:
            self.answer_all(worker.session.current)

    @precondition(lambda self: any(self.gearmand.conns[link].outbox for link in self.links))
    @rule(data=st.data())
    def gearmand_answers(self, data: st.DataObject) -> None:
        link = data.draw(st.sampled_from([link for link in self.links if self.gearmand.conns[link].outbox]))
        self.deliver(link)

    @precondition(lambda self: self.jobs_to_finish())
    @rule(
        data=st.data(), updates=st.sampled_from([(), (P.WORK_DATA,), (P.WORK_STATUS, P.WORK_WARNING)]),
        how=st.sampled_from(sorted(FAILURES)), after=st.sampled_from(TRAILING), apart=st.booleans(),
    )
    def a_worker_finishes_a_job(
        self, data: st.DataObject, updates: tuple[PacketType, ...], how: str, after: str, apart: bool
    ) -> None:
        """After some updates, completes it or fails it, in every way a worker library can,
        and (after an exception) sends what the library sends next for the same handle, in
        the same read or not."""
        worker, handle = data.draw(st.sampled_from(self.jobs_to_finish()))
        for ptype in updates:
            self.send(worker, result(ptype, handle, b"part"))
        del worker.running[handle]
        ptype, payload = FAILURES[how]
        first = result(ptype, handle, payload)
        then = trailing(after, handle) if ptype is P.WORK_EXCEPTION else b""
        if apart and then:
            self.send(worker, first)
            self.send(worker, then)
        else:
            self.send(worker, first + then)

    @precondition(lambda self: self.ability_changes())
    @rule(data=st.data(), together=st.booleans())
    def a_worker_changes_its_abilities(self, data: st.DataObject, together: bool) -> None:
        """CANT_DO one function, or RESET_ABILITIES, then CAN_DO again: in the same read,
        or in the next."""
        worker, function = data.draw(st.sampled_from(self.ability_changes()))
        functions = FUNCTIONS if function is None else (function,)
        again = b"".join(req(P.CAN_DO, function=f) for f in functions)
        packet = req(P.RESET_ABILITIES) if function is None else req(P.CANT_DO, function=function)
        if together:
            self.send(worker, packet + again)
        else:
            self.send(worker, packet)
            self.send(worker, again)

    @precondition(lambda self: self.retrier.held)
    @rule(data=st.data(), what=st.sampled_from(["a_worker_leaves", "a_connection_is_lost"]), holding=st.booleans())
    def a_worker_or_connection_goes(self, data: st.DataObject, what: str, holding: bool) -> None:
        """While retries are held, a worker that runs, grabs or holds something disconnects,
        or one of the gearmand connections that own something is lost (if `holding`, where
        retries are held)."""
        workers, links = self.busy_workers(), self.busy_links()
        if (what == "a_worker_leaves" and workers) or not links:
            if holding and any(self.holds_on(w) for w in workers):
                workers = [w for w in workers if self.holds_on(w)]
            return self.leave(data.draw(st.sampled_from(workers)), answered_first=data.draw(st.booleans()))
        if holding and any(self.retrier.holds(link) for link in links):
            links = [link for link in links if self.retrier.holds(link)]
        link = data.draw(st.sampled_from(links))
        self.close(link, lost=True)  # (the current one's loss ends the pair)

    @precondition(lambda self: self.cut_off())
    @rule(data=st.data())
    def a_cut_off_worker_leaves(self, data: st.DataObject) -> None:
        self.leave(data.draw(st.sampled_from(self.cut_off())))

    @precondition(lambda self: self.crash_candidates())
    @rule(data=st.data(), answered_first=st.booleans())
    def a_worker_crashes_mid_job(self, data: st.DataObject, answered_first: bool) -> None:
        """A worker running a job of a function that retries disconnects vanishes (held
        retries or not): its connection stays open for that job, which is retried."""
        self.leave(data.draw(st.sampled_from(self.crash_candidates())), answered_first)

    def crash_candidates(self) -> list[Worker]:
        return [w for w in self.live() if D in w.running.values()]

    @precondition(lambda self: self.timers)
    @rule(data=st.data(), late=st.sampled_from([0.0, 0.0, 3.0, 30.0]))
    def time_passes(self, data: st.DataObject, late: float) -> None:
        """One of the next timers fires, perhaps late (the clock moved on, as on a busy loop)."""
        timer = data.draw(st.sampled_from(sorted(self.timers, key=lambda t: t.due)[:3]))
        self.now = max(self.now, timer.due) + late
        self.fire(timer)

    @precondition(lambda self: self.rc_pending or self.rc_out)
    @rule(read=st.booleans(), refuse=st.sampled_from([False, False, False, True]))
    def the_retry_client_works(self, read: bool, refuse: bool) -> None:
        """It writes its next submission (which gearmand accepts or refuses), or reads a reply."""
        if (read and self.rc_out) or not self.rc_pending:
            self.retry_client_reads()
        else:
            self.retry_client_writes(refuse)

    @precondition(lambda self: self.rc_submitter.unanswered() or self.rc_out or any(
        job.state is State.RUNNING for job in self.retrier.held.values()))
    @rule(replies_read=st.booleans())
    def the_retry_connection_breaks(self, replies_read: bool) -> None:
        """gearmand abandons that connection's retry jobs; gproxy reconnects and resubmits;
        gearmand's last replies were read by gproxy first, or lost with the connection."""
        while replies_read and self.rc_out:
            self.retry_client_reads()
        for job in list(self.gearmand.jobs.values()):
            if job.client == (RETRY, self.rc_generation):
                job.abandoned = True
                if job.owner is None:  # dropped when a worker would take it
                    self.gearmand.queue.remove(job.handle)
                    del self.gearmand.jobs[job.handle]
        self.rc_generation += 1
        self.rc_out.clear()
        self.gearmand.conns[RETRY] = Conn()
        unanswered = self.rc_submitter.unanswered()
        self.rc_submitter, self.rc_hello = Submitter(), False
        self.rc_pending.extendleft(reversed([s for s in unanswered if s.key is None]))
        in_flight = {s.key for s in unanswered if s.key is not None}
        self.run(self.retrier.retry_connection_lost(ROUTE, in_flight, self.now))

    @precondition(lambda self: self.queued_retries())
    @rule(data=st.data(), how=st.sampled_from(OUTSIDE_OUTCOMES), updates=st.booleans())
    def an_outside_worker_runs_a_retry_job(self, data: st.DataObject, how: str, updates: bool) -> None:
        """A worker not behind gproxy (or behind another one, whose departed worker's retry
        job it fails back with DISCONNECTED) runs a retry job."""
        self.run_outside(data.draw(st.sampled_from(self.queued_retries())), how, updates)

    @precondition(lambda self: self.retrier.held)
    @rule(
        data=st.data(), how=st.sampled_from(OUTSIDE_OUTCOMES), behind_gproxy=st.booleans(),
        steps=st.sampled_from([1, 10]),
    )
    def a_held_job_moves_on(self, data: st.DataObject, how: str, behind_gproxy: bool, steps: int) -> None:
        """What would happen next to a held job, once or until its retry job runs, so that runs
        go deep: its timer fires, its submission is sent and answered, its retry job runs (on
        a worker behind gproxy, which finishes it by another rule, or on the outside worker)."""
        job = data.draw(st.sampled_from(sorted(self.retrier.held.values(), key=lambda job: job.key)))
        for _ in range(steps):
            if self.retrier.held.get(job.key) is not job or not self.next_step_of(data, job, how, behind_gproxy):
                return

    def next_step_of(self, data: st.DataObject, job, how: str, behind_gproxy: bool) -> bool:
        """One step of `job`'s retry; False when it has no step to take, or its retry runs."""
        if job.state is State.WAITING or job.state is State.DEFERRED:
            due = [t for t in self.timers if type(t.action) is Wakeup and (t.action.key, t.action.wait) == (job.key, job.wait)]
            due += [t for t in self.timers if type(t.action) is RecheckBudget and t.action.function == job.function]
            self.fire(min(due, key=lambda t: t.due))
            return True
        if job.state is State.SUBMITTING:
            if self.rc_pending:
                return self.retry_client_writes(refuse=False)
            if self.rc_out:
                self.retry_client_reads()
                return True
            return False
        retry = self.gearmand.jobs.get(job.retry_handle)
        if retry is None or retry.owner is not None:
            return False
        takers = [w for w in self.idle_workers() if retry.function in self.gearmand.conns[w.session.current].abilities]
        takers.sort(key=lambda w: not self.holds_on(w))  # those that hold first: a departure matters there
        if behind_gproxy and takers:
            worker = data.draw(st.sampled_from(takers))
            abilities = self.gearmand.conns[worker.session.current].abilities
            eligible = [h for h in self.gearmand.queue if self.gearmand.jobs[h].function in abilities]
            self.grab(worker, data.draw(st.booleans()), pick=eligible.index(retry.handle))
            if data.draw(st.booleans()):  # else the assignment is still on its way
                self.answer_all(worker.session.current)
        else:
            self.run_outside(retry, how, updates=False)
        return False

    @precondition(lambda self: self.retrier.held)
    @rule()
    def the_world_goes_quiet(self) -> None:
        self.quiet()

    def teardown(self) -> None:
        if sys.exc_info()[0] is None:  # not while a failure is on its way out
            self.quiet()

    def quiet(self) -> None:
        """Every reply delivered, every running job completed, every retry job run, every
        timer fired: then nothing may be held any more."""
        for _ in range(10_000):
            if not self.one_step_towards_quiet():
                break
        else:
            raise AssertionError("the world never went quiet")
        if self.retrier.held:
            raise StillHeld(f"held after the world went quiet: {list(self.retrier.held.values())}")
        for worker in self.workers:
            if worker.gone:
                assert not [link for link in worker.session.links if self.gearmand.conns[link].open]

    def one_step_towards_quiet(self) -> bool:
        for worker in self.cut_off():
            self.leave(worker)
            return True
        for link in self.links:
            if self.gearmand.conns[link].outbox:
                self.deliver(link)
                return True
        for worker, handle in self.jobs_to_finish():
            del worker.running[handle]
            self.send(worker, req(P.WORK_COMPLETE, handle=handle, data=b"done"))
            return True
        if self.retry_client_writes(refuse=False):
            return True
        if self.rc_out:
            self.retry_client_reads()
            return True
        for job in self.queued_retries():
            self.outside_runs(job, P.WORK_COMPLETE, b"done", updates=False)
            return True
        if self.timers:
            self.fire(min(self.timers, key=lambda t: t.due))
            return True
        return False

    # -- invariants

    @invariant()
    def the_retrier_agrees_with_itself_and_holds_no_handle_twice(self) -> None:
        r = self.retrier
        held = list(r.held.values())
        handles = [(job.route, job.handle) for job in held]
        assert len(set(handles)) == len(handles), f"a handle held twice: {Counter(handles)}"
        assert r.held_per_function == Counter(job.function for job in held)
        assert r.jobs.by_handle == {(job.route, job.handle): job.key for job in held}
        assert r.jobs.by_retry_handle == {
            (job.route, job.retry_handle): job.key for job in held if job.retry_handle is not None
        }
        assert {owner: keys for owner, keys in r.jobs.by_owner.items()} == {
            owner: {job.key for job in held if job.owner is owner} for owner in {job.owner for job in held}
        }
        for job in held:
            assert 1 <= job.attempt <= POLICY.max_attempts
            assert (job.retry_handle is not None) == (job.state is State.RUNNING)

    @invariant()
    def gproxy_agrees_with_gearmand(self) -> None:
        """On every connection gearmand's jobs are exactly those gproxy tracks (the worker
        runs them), holds, or is about to hand the worker; a closed one has none."""
        gearmand = self.gearmand
        for link in self.links:
            conn = gearmand.conns[link]
            tracked = {job.handle for job in link.jobs}
            held = {job.handle for job in self.retrier.held.values() if job.owner is link}
            if not conn.open:
                assert not tracked and not held, f"{link!r} is closed but gproxy has {tracked or held} there"
                continue
            assigned = {job.handle for job in gearmand.owned_by(link)}
            coming = {handle for _, handle in conn.outbox if handle is not None}
            assert not tracked & held, f"{tracked & held} both running and held on {link!r}"
            assert assigned == tracked | held | coming, (
                f"{link!r}: gearmand has {sorted(assigned)}, gproxy tracks {sorted(tracked)}, "
                f"holds {sorted(held)}, is handing over {sorted(coming)}"
            )
        # The metrics count running jobs from the live pairs' JobTables: an ended one holds none.
        assert not [job for w in self.workers if w.session.done for link in w.session.links for job in link.jobs]
        for worker in self.live():
            tracked = {job.handle for link in worker.session.links for job in link.jobs}
            runs = set(worker.running) - worker.timed_out
            assert runs == tracked, f"{worker!r} runs {runs} (and timed out {worker.timed_out}), gproxy tracks {tracked}"

    @invariant()
    def connections_close_when_they_should(self) -> None:
        for worker in self.workers:
            session = worker.session
            opened = {link for link in self.links if self.worker_of[link] is worker and self.gearmand.conns[link].open}
            assert opened <= set(session.links), f"{worker!r}: gproxy forgot open connections {opened - set(session.links)}"
            if worker.gone:
                assert not opened or any(self.retrier.holds(link) for link in session.links), (
                    f"{worker!r} left and nothing is held, but {opened} stay open"
                )
            else:
                idle = [link for link in session.retired if session.idle(link)]
                assert not idle, f"{worker!r}: retired connections {idle} own nothing but stay open"
                owed = sum(len(link.grabs_pending) for link in opened)
                assert len(worker.grabs) == owed, f"{worker!r} waits for {len(worker.grabs)} grabs, {owed} are owed"

    @invariant()
    def no_held_job_is_stuck(self) -> None:
        r = self.retrier
        wakeups = {(t.action.key, t.action.wait) for t in self.timers if type(t.action) is Wakeup}
        rechecks = {t.action.function for t in self.timers if type(t.action) is RecheckBudget}
        submissions = {s.key for s in self.rc_pending} | {s.key for s in self.rc_submitter.unanswered()}
        outcomes_due = {handle for _, handle in self.rc_out if handle is not None}
        for job in r.held.values():
            if job.state in (State.WAITING, State.DEFERRED):
                assert (job.key, job.wait) in wakeups, f"job {job.key} waits with no timer"
            if job.state is State.DEFERRED:
                assert job.function in rechecks and job.key in r.budgets.deferred(job.function)
            if job.state is State.SUBMITTING:
                assert job.key in submissions, f"job {job.key} is being submitted, but nothing is sent"
            if job.state is State.RUNNING:
                retry = self.gearmand.jobs.get(job.retry_handle)
                assert (retry is not None and retry.client == (RETRY, self.rc_generation)) or (
                    job.retry_handle in outcomes_due
                ), f"job {job.key}'s retry {job.retry_handle!r} is neither running nor reporting"


TestSessionWorld = SessionWorld.TestCase
TestSessionWorld.settings = settings(max_examples=200, stateful_step_count=80, deadline=None)


def test_a_retry_job_assigned_after_its_worker_left_ends_its_hold() -> None:
    """The worker grabs, and leaves before gearmand's answer reaches gproxy; the answer
    assigns the retry of a job held on the same connection. The connection stays open for
    that held job, which waits for its retry, which waited on that connection for a worker
    that is gone: neither ever ended (found by hypothesis). Now the retry job is failed
    back to its loop, which runs it again elsewhere."""
    world = SessionWorld()
    world.connect()
    worker = world.workers[0]
    link = worker.session.current
    world.answer_all(link)
    world.submit_job(G)
    world.grab(worker, plain=False)
    world.answer_all(link)
    (handle,) = worker.running
    del worker.running[handle]
    world.send(worker, result(P.WORK_FAIL, handle))  # g: on_fail, so the job is held
    (timer,) = [t for t in world.timers if type(t.action) is Wakeup]  # (not G's timeout)
    world.fire(timer)
    assert world.retry_client_writes(refuse=False)
    while world.rc_out:  # OPTION_RES, JOB_CREATED
        world.retry_client_reads()
    (held,) = world.retrier.held.values()
    assert held.state is State.RUNNING
    world.grab(worker, plain=False)  # gearmand assigns the retry job, on the held job's connection
    world.leave(worker, answered_first=False)  # the worker's EOF arrives before that answer
    world.quiet()
