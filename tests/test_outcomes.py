"""The endings of jobs gproxy stops retrying, pure: what the client hears, the dead letter,
and what is counted. (The Retrier's transcripts in test_retry.py reach them through its
events; here each ending is checked on its own, from one table.)"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gproxy.core.dead_letter import parse
from gproxy.core.jobs import TrackedJob
from gproxy.core.metrics import Metrics
from gproxy.core.outcomes import Outcomes, final_exception, instead
from gproxy.core.policy import FinalException, GiveUp, RetryPolicy
from gproxy.core.protocol import REQ, PacketType, build_packet
from gproxy.core.uniques import dead_letter_unique

P = PacketType
FAIL = build_packet(REQ, P.WORK_FAIL, handle=b"H:1")
EXCEPTION = build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: x")
WARNING = build_packet(REQ, P.WORK_WARNING, handle=b"H:1", data=b"RETRY: x")


@dataclass
class Held:
    """A held job as giving up sees it (retry.HeldJob has these and more)."""

    policy: RetryPolicy
    last_failure: tuple[PacketType, bytes] = (P.WORK_EXCEPTION, b"RETRY: x")
    exception_ends_job: bool = True
    function: bytes = b"f"
    unique: bytes = b"u"
    handle: bytes = b"H:1"
    payload: bytes = b"payload"
    attempt: int = 3
    started_at: float = 0.0


@pytest.mark.parametrize(
    "final, last_failure, ends_job, packet",
    [
        (FinalException.EXCEPTION, (P.WORK_EXCEPTION, b"RETRY: x"), True, EXCEPTION),
        (FinalException.EXCEPTION, (P.WORK_EXCEPTION, b"RETRY: x"), False, EXCEPTION + FAIL),
        (FinalException.FAIL, (P.WORK_EXCEPTION, b"RETRY: x"), True, FAIL),
        (FinalException.FAIL, (P.WORK_EXCEPTION, b"RETRY: x"), False, FAIL),
        (FinalException.BOTH, (P.WORK_EXCEPTION, b"RETRY: x"), True, WARNING + FAIL),
        (FinalException.EXCEPTION, (P.WORK_FAIL, b""), True, FAIL),
        (FinalException.BOTH, (P.WORK_FAIL, b""), False, FAIL),
    ],
)
def test_a_job_given_up_ends_with_its_last_failure_as_final_exception_says(
    final: FinalException, last_failure: tuple[PacketType, bytes], ends_job: bool, packet: bytes
) -> None:
    job = Held(RetryPolicy(final_exception=final), last_failure, ends_job)
    assert Outcomes(Metrics()).given_up(job, 5.0, GiveUp.OPERATOR) == packet
    if last_failure[0] is P.WORK_EXCEPTION:  # gproxy's own exceptions end a job the same way
        assert final_exception(job.policy, b"f", b"H:1", b"RETRY: x", ends_job) == packet


def test_instead_of_an_exception_a_client_hears_a_fail() -> None:
    assert instead(RetryPolicy(final_exception=FinalException.FAIL), b"f", b"H:1", b"RETRY: x") == FAIL
    assert instead(RetryPolicy(final_exception=FinalException.BOTH), b"f", b"H:1", b"RETRY: x") == WARNING + FAIL


@pytest.mark.parametrize("why", [GiveUp.EXHAUSTED, GiveUp.MAX_HOLD_TIME, GiveUp.OPERATOR, GiveUp.FINAL, GiveUp.REFUSED])
def test_giving_up_ends_the_job_and_counts_what_ran_out(why: GiveUp) -> None:
    metrics = Metrics()
    Outcomes(metrics).given_up(Held(RetryPolicy()), 5.0, why)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"function": "f", **labels})

    assert sample("gproxy_jobs_total", outcome="exception") == 1  # as the last failure ended it
    assert sample("gproxy_retries_exhausted_total") == (why is GiveUp.EXHAUSTED)
    assert sample("gproxy_retry_cap_rejections_total", cap="max_hold_time") == (why is GiveUp.MAX_HOLD_TIME)


def test_a_dead_letter_carries_the_job_and_is_counted_only_where_one_is_configured() -> None:
    metrics = Metrics()
    outcomes = Outcomes(metrics)
    job = TrackedJob(b"H:7", b"resize", b"img-1", b"\x00payload", "up-1", 0.0)
    assert outcomes.dead_letter(RetryPolicy(), job, 1, (P.WORK_FAIL, b"")) is None
    assert not metrics.registry.get_sample_value("gproxy_jobs_total", {"function": "resize", "outcome": "dead_lettered"})
    frozen = b"\x05\x0b\x0a\x0cRETRY: oops\n"  # Perl's Storable-frozen `die`: the text is kept
    letter = outcomes.dead_letter(RetryPolicy(dead_letter="dlq.{function}"), job, 4, (P.WORK_EXCEPTION, frozen))
    assert letter is not None and letter.function == b"dlq.resize"
    assert letter.unique == dead_letter_unique(b"resize", b"img-1", b"H:7", b"\x00payload")
    parsed = parse(letter.payload)
    assert parsed is not None
    assert (parsed.function, parsed.unique, parsed.handle, parsed.attempts) == (b"resize", b"img-1", b"H:7", 4)
    assert (parsed.failure_type, parsed.failure, parsed.payload) == ("WORK_EXCEPTION", b"RETRY: oops\n", b"\x00payload")
    assert metrics.registry.get_sample_value("gproxy_jobs_total", {"function": "resize", "outcome": "dead_lettered"}) == 1
