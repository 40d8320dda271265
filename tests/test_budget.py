"""The retry budget, pure: the floor, the ratio, the window, and the bound it keeps; and the
budgets of every function with their lines of deferred retries."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gproxy.core.budget import BUDGETS_SWEPT_FROM, SLICES, Budgets, RetryBudget
from gproxy.core.policy import Policies, RetryPolicy


def test_the_floor_allows_min_per_second_times_ttl_in_every_window() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, ttl=10.0)
    assert [budget.try_withdraw(0.0) for _ in range(11)] == [True] * 10 + [False]
    assert budget.balance(5.0) == 0.0
    assert not budget.try_withdraw(9.9)  # still the same window
    assert budget.try_withdraw(11.0)  # the first withdrawals have expired


def test_each_first_attempt_earns_ratio_retries() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, ttl=10.0)
    assert not budget.try_withdraw(0.0)
    for _ in range(4):
        budget.deposit(1.0)
    assert budget.balance(1.0) == 2.0
    assert [budget.try_withdraw(2.0) for _ in range(3)] == [True, True, False]


def test_deposits_of_a_fifth_add_up_to_whole_retries() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, ttl=10.0)
    for _ in range(10):
        budget.deposit(0.0)
    assert budget.try_withdraw(0.0) and budget.try_withdraw(0.0)
    assert not budget.try_withdraw(0.0)


def test_deposits_expire_with_the_window() -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, ttl=1.0)
    budget.deposit(0.0)
    assert budget.balance(0.95) == 1.0
    assert budget.balance(1.2) == 0.0  # between ttl and ttl + one slice, it is gone
    budget.deposit(500.0)  # a long quiet spell clears everything at once
    assert budget.balance(500.0) == 1.0


def test_a_clock_that_steps_back_counts_in_the_newest_slice() -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, ttl=10.0)
    budget.deposit(5.0)
    budget.deposit(4.0)
    assert budget.balance(5.0) == 2.0


@pytest.mark.parametrize("args", [(-0.1, 1, 10), (0.2, -1, 10), (0.2, 1, 0)])
def test_nonsense_is_refused(args: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        RetryBudget(*args)


events = st.lists(
    st.tuples(st.sampled_from(["deposit", "withdraw"]), st.floats(min_value=0, max_value=3)),
    max_size=300,
)


@given(
    events,
    st.floats(min_value=0, max_value=1),
    st.floats(min_value=0, max_value=2),
    st.floats(min_value=0.5, max_value=10),
)
def test_retries_in_any_window_stay_within_the_ratio_and_the_floor(
    steps: list[tuple[str, float]], ratio: float, min_per_second: float, ttl: float
) -> None:
    """Over any span of 0.9 ttl (the part of a window no slice has left yet), successful
    withdrawals number at most the floor plus `ratio` per deposit made since a ttl before."""
    budget = RetryBudget(ratio, min_per_second, ttl)
    now, deposits, withdrawals = 0.0, [], []
    for kind, gap in steps:
        now += gap
        if kind == "deposit":
            budget.deposit(now)
            deposits.append(now)
        elif budget.try_withdraw(now):
            withdrawals.append(now)
    span = ttl * (SLICES - 1) / SLICES
    for start in withdrawals:
        inside = sum(1 for t in withdrawals if start <= t <= start + span)
        earned = sum(1 for t in deposits if start - ttl <= t <= start + span)
        assert inside <= min_per_second * ttl + ratio * earned + 1e-6
    assert budget.balance(now) >= 0


@given(st.floats(min_value=0.1, max_value=50), st.floats(min_value=1, max_value=30))
def test_with_no_traffic_the_floor_is_reached_exactly(min_per_second: float, ttl: float) -> None:
    budget = RetryBudget(0.2, min_per_second, ttl)
    allowed = 0
    while budget.try_withdraw(0.0):
        allowed += 1
    assert allowed == int(min_per_second * ttl + 1e-9)


# -- Budgets: every function's budget, and the line of retries waiting for it ----------------------

SPENT = Policies(RetryPolicy(budget_ratio=1.0, budget_min_per_second=0.0, budget_ttl=10.0))
"""No floor: a retry goes only on what first attempts earned."""


def test_idle_budgets_are_swept_when_their_number_doubles_and_a_line_keeps_its_own() -> None:
    budgets = Budgets(SPENT)
    budgets.budget(b"busy", 0.0).deposit(0.0)
    assert budgets.defer(b"waiting", 1, 0.0) == 1.0  # idle, but a retry waits for it
    for n in range(BUDGETS_SWEPT_FROM - 2):
        budgets.budget(b"f%d" % n, 0.0)
    assert len(budgets) == BUDGETS_SWEPT_FROM
    budgets.budget(b"new", 1.0)  # one more: the idle ones go
    assert len(budgets) == 3 and b"busy" in budgets and b"waiting" in budgets and b"f0" not in budgets
    for n in range(BUDGETS_SWEPT_FROM - 4):
        budgets.budget(b"g%d" % n, 1.0)
    assert len(budgets) == BUDGETS_SWEPT_FROM - 1  # no sweep below the floor of the threshold
    assert budgets.balances(1.0, [b"busy", b"f0"]) == {b"busy": 1.0, b"f0": 0.0}  # f0 came back as new


def test_a_retry_goes_only_if_no_older_one_is_in_line() -> None:
    budgets = Budgets(SPENT)
    assert not budgets.withdraw(b"f", 0.0)
    assert budgets.defer(b"f", 1, 0.0) == 1.0  # a new line: look again after a slice
    assert budgets.defer(b"f", 2, 0.5) is None  # a look is outstanding already
    budgets.budget(b"f", 0.5).deposit(0.5)
    assert not budgets.withdraw(b"f", 0.5)  # budget to spare, but two wait before it
    assert list(budgets.lines) == [b"f"] and list(budgets.deferred(b"f")) == [1, 2]
    assert budgets.withdraw(b"g", 0.5) is False and not budgets.deferred(b"g")


def test_a_look_lets_the_line_go_oldest_first_as_the_budget_allows() -> None:
    budgets = Budgets(SPENT)
    for key in (1, 2, 3, 4):
        budgets.defer(b"f", key, 0.0)
    for _ in range(2):
        budgets.budget(b"f", 0.0).deposit(0.0)
    asked, went = [], []

    def waits(key: int) -> bool:
        asked.append(key)
        return key != 2  # job 2 ended meanwhile

    assert budgets.recheck(b"f", 1.0, waits, went.append) == 1.0  # job 4 is left: look again
    assert (asked, went, list(budgets.deferred(b"f"))) == ([1, 2, 3, 4], [1, 3], [4])
    budgets.budget(b"f", 1.0).deposit(1.0)
    assert budgets.recheck(b"f", 2.0, waits, went.append) is None  # the line is empty, and gone
    assert went == [1, 3, 4] and not budgets.lines
    assert budgets.recheck(b"f", 3.0, waits, went.append) is None and went == [1, 3, 4]  # no line: nothing


def test_a_dropped_line_hands_back_its_keys_in_order() -> None:
    budgets = Budgets(SPENT)
    for key in (3, 1, 2):
        budgets.defer(b"f", key, 0.0)
    assert list(budgets.drop(b"f")) == [3, 1, 2]
    assert not budgets.lines and list(budgets.drop(b"f")) == []
    assert budgets.defer(b"f", 5, 1.0) == 1.0  # a new line asks for a look again
