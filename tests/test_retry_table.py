"""The retry state machine's table, TRANSITIONS: what it allows, that HeldJobs.move allows
nothing else, and that the module docstring shows the same table. (That the Retrier makes
only these moves, and makes every state change through move(), is checked under random
events in test_retry_stateful.py.)"""

from __future__ import annotations

import random
import re

import pytest

from gproxy.core import retry
from gproxy.core.jobs import TrackedJob
from gproxy.core.policy import Policies, RetryPolicy
from gproxy.core.protocol import PacketType
from gproxy.core.retry import TRANSITIONS, Event, HeldJob, Retrier, State, TransitionError

P = PacketType
ENDS_BY_ITSELF = set(Event) - {Event.OPERATOR_GIVE_UP, Event.OWNER_LOST, Event.REASSIGNED}
"""Events that are neither an operator's hand nor a lost connection."""


def _docstring_table() -> set[tuple[State | None, Event, State | None]]:
    """The table as the module docstring shows it: `SOURCE  events -> TARGET | ...`."""
    states = {"-": None, **{state.name: state for state in State}}
    events = {event.value: event for event in Event}
    doc = retry.__doc__ or ""
    rows = re.findall(r"^    (-|any|[A-Z]+) +(.+)$", doc, re.MULTILINE)
    assert rows, "the module docstring lost its table"
    shown = set()
    for source, moves in rows:
        sources = list(State) if source == "any" else [states[source]]
        for move in moves.split(" | "):
            names, target = move.split(" -> ")
            for name in names.split(", "):
                shown |= {(state, events[name], states[target]) for state in sources}
    return shown


def test_the_docstring_shows_the_table() -> None:
    assert _docstring_table() == {(source, event, target) for (source, event), target in TRANSITIONS.items()}


def test_every_event_moves_some_job_and_every_state_is_reached_from_the_hold() -> None:
    assert {event for _, event in TRANSITIONS} == set(Event)
    reached, frontier = set(), {None}
    while frontier:
        reached |= frontier
        frontier = {TRANSITIONS[move] for move in TRANSITIONS if move[0] in frontier} - reached
    assert reached == {None, *State}


def test_every_held_job_can_end_without_an_operator_or_a_lost_connection() -> None:
    """A result, a refusal, or max_hold_time ends every state: nothing is held for ever."""
    ends = {None}
    while True:
        more = {source for (source, event), target in TRANSITIONS.items() if event in ENDS_BY_ITSELF and target in ends}
        if more <= ends:
            break
        ends |= more
    assert ends == {None, *State}


def held(state: State) -> tuple[Retrier[str, str], HeldJob[str, str]]:
    """A Retrier holding one job, brought to `state` by its own moves."""
    retrier: Retrier[str, str] = Retrier(Policies(RetryPolicy(jitter=False)), random.Random(0), tag=b"")
    job = TrackedJob(b"H:1", b"f", b"u", b"payload", "up-1", 0.0)
    retrier.worker_failed(owner="up-1", route="route", job=job, ptype=P.WORK_EXCEPTION, failure=b"RETRY", now=0.0)
    (held_job,) = retrier.held.values()
    path = {
        State.WAITING: [], State.DEFERRED: [(Event.BUDGET_SPENT, None)], State.PAUSED: [(Event.PAUSED, None)],
        State.SUBMITTING: [(Event.BUDGET_GRANTED, None)],
        State.RUNNING: [(Event.BUDGET_GRANTED, None), (Event.CREATED, b"H:2")],
    }[state]
    for event, retry_handle in path:
        retrier.jobs.move(held_job, event, retry_handle)
    assert held_job.state is state
    return retrier, held_job


@pytest.mark.parametrize("state", list(State))
def test_a_move_not_in_the_table_raises_and_changes_nothing(state: State) -> None:
    for event in Event:
        if (state, event) in TRANSITIONS:
            continue
        retrier, job = held(state)
        before = (job.state, job.retry_handle, dict(retrier.jobs.by_retry_handle), dict(retrier.held_per_function))
        with pytest.raises(TransitionError, match=f"{state.name}, and {event.value}: no such move"):
            retrier.jobs.move(job, event, b"H:9" if event is Event.CREATED else None)
        assert (job.state, job.retry_handle, dict(retrier.jobs.by_retry_handle), dict(retrier.held_per_function)) == before
        assert retrier.held == {job.key: job}


def test_a_job_not_held_moves_only_into_its_hold() -> None:
    retrier, job = held(State.WAITING)
    retrier.owner_lost("up-1")  # forgotten
    for event in set(Event) - {Event.FAILED}:
        with pytest.raises(TransitionError, match="not held"):
            retrier.jobs.move(job, event)
    assert retrier.held == {} and retrier.held_per_function == {}


def test_a_retry_runs_only_with_its_handle_and_loses_it_when_it_stops() -> None:
    retrier, job = held(State.SUBMITTING)
    with pytest.raises(TransitionError):
        retrier.jobs.move(job, Event.CREATED)  # no handle: it could never be found again
    with pytest.raises(TransitionError):
        retrier.jobs.move(job, Event.REFUSED, b"H:2")  # a handle for a job that does not run
    assert job.state is State.SUBMITTING and retrier.jobs.by_retry_handle == {}
    retrier.jobs.move(job, Event.CREATED, b"H:2")
    assert retrier.jobs.by_retry_handle == {("route", b"H:2"): job.key} and retrier.is_retry_handle("route", b"H:2")
    retrier.jobs.move(job, Event.CONNECTION_LOST)
    assert job.state is State.SUBMITTING and job.retry_handle is None and retrier.jobs.by_retry_handle == {}
