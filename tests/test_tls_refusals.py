"""The hold-off after a lasting TLS refusal, pure: from INITIAL, doubling, capped; it holds
exactly until its time is up."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gproxy.core.tls_refusals import INITIAL, MAXIMUM, HeldOff, HoldOff


def test_nothing_is_held_off_before_a_refusal() -> None:
    assert HoldOff().check(0.0) is None


def test_a_refusal_holds_off_until_its_time_and_says_why_and_for_how_long() -> None:
    hold_off = HoldOff()
    assert hold_off.refused("certificate verify failed: unable to get local issuer certificate", 100.0) == INITIAL
    held = hold_off.check(100.25)
    assert isinstance(held, HeldOff) and held.lasting
    assert str(held) == "certificate verify failed: unable to get local issuer certificate (0.2s ago; tried again in 0.8s)"
    assert hold_off.check(100.0 + INITIAL) is None


@given(st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=12))
def test_each_refusal_in_a_row_waits_twice_as_long_up_to_the_cap(gaps: list[float]) -> None:
    hold_off, now, waits = HoldOff(), 0.0, []
    for gap in gaps:
        waits.append(hold_off.refused("refused", now))
        assert hold_off.check(now) is not None and hold_off.check(now + waits[-1]) is None
        now += waits[-1] + gap
    assert waits == [min(MAXIMUM, INITIAL * 2**n) for n in range(len(gaps))]
