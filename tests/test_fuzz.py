"""The fuzz tier (tests/fuzz) in `make test`: a short seeded run, and every saved input
replayed (tests/fuzz/regressions/*.json).

The long run is `make fuzz SECONDS=600 SEED=1` (or `python -m tests.fuzz --seconds N --seed S`);
`python -m tests.fuzz --replay FILE...` replays inputs one by one, and `--src DIR` runs either
against another gproxy (e.g. an export of an older commit).

OPEN lists the bugs the fuzz found that are not fixed yet, with the regression file that
shows each: that file's replay is an expected failure (strict: once the bug is fixed it
passes, and the test says so, so that the entry is removed), and the short run tolerates
failures that bug explains, and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.replay import replay
from tests.fuzz.runner import BUGS, Options, run_campaign

REGRESSIONS = sorted((Path(__file__).resolve().parent / "fuzz" / "regressions").glob("*.json"))
OPEN: dict[str, str] = {}
"""Bug (runner.BUGS) -> the regression file that fails until it is fixed."""
SHORT_SECONDS = 12.0
SHORT_SEED = 1


@pytest.mark.timeout(150)
def test_short_fuzz_run(tmp_path: Path) -> None:
    report = run_campaign(Options(seconds=SHORT_SECONDS, seed=SHORT_SEED, workdir=tmp_path / "run", quiet=True))
    problems = report.unexplained(set(OPEN))
    assert not problems, "\n".join(problems) + "\n\n" + report.text()


def _marks(path: Path) -> list[pytest.MarkDecorator]:
    bugs = [bug for bug, name in OPEN.items() if name == path.name]
    return [pytest.mark.xfail(strict=True, reason=f"open bug {b}: {BUGS[b][0]}") for b in bugs]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=_marks(p)) for p in REGRESSIONS])
def test_saved_input_replays_clean(path: Path, tmp_path: Path) -> None:
    result = replay(path, workdir=tmp_path)
    assert result.ok, result.describe()


def test_open_bugs_have_their_regression_file() -> None:
    names = {path.name for path in REGRESSIONS}
    assert set(OPEN.values()) <= names
    assert set(OPEN) <= set(BUGS)


def test_a_close_line_long_after_a_run_ended_is_not_that_runs() -> None:
    """Found by a 600 s run: a port comes back many times; a close line written minutes
    after the script that last used it had ended belonged to a connection of the real
    worker whose port the fake could not pin down, and was counted as the script's second."""
    from tests.fuzz.checks import CLOSE_LINE_LATENESS, ActorDigest, CloseIndex, RunDigest, assign_lines
    from tests.fuzz.monitor import CloseLine
    from tests.fuzz.script import Script

    actor = ActorDigest("w", "worker", "B", 38608, 100.0, 101.0, True, False, True, 10, "", None, [])  # type: ignore[arg-type]
    run = RunDigest(Script([]), [], [], 0.0, {"w": actor})

    def line(at: float) -> CloseLine:
        return CloseLine("WARNING", "127.0.0.1:38608", "127.0.0.1:0", "127.0.0.1:4730", "bad magic", 1, at)

    index = CloseIndex.of([line(100.5), line(101.0 + CLOSE_LINE_LATENESS - 1), line(400.0)])
    lines = assign_lines([run], index, {"B": "127.0.0.1:4730"})
    assert [close.time for close in lines[(0, "w")]] == [100.5, 101.0 + CLOSE_LINE_LATENESS - 1]


def test_reconnect_bound_follows_the_backoff() -> None:
    """The most retry connections the README's backoff allows: a proven connection (5 s) and
    four dropped at once after it, 0, 0.1, 0.3 and 0.7 s after its end, again and again."""
    from tests.fuzz.retries import busiest, reconnect_bound

    assert [reconnect_bound(w, slack=0.0) for w in (1.0, 10.0, 60.0)] == [4, 11, 50]
    dropped = [0.0, 0.1, 0.3, 0.7, 1.5, 3.1, 6.3, 11.3, 16.3]  # a gearmand that drops every connection
    assert busiest(dropped, 10.0) == (7, 0.0)
    assert busiest(dropped, 10.0)[0] <= reconnect_bound(10.0)


def test_held_progress_tells_a_stalled_retry_from_one_that_went_on() -> None:
    from tests.fuzz.retries import Jobs, RetryConnection, check_held_progress
    from tests.fuzz.wire import res

    jobs = Jobs()
    jobs.note_sent(res("JOB_ASSIGN_UNIQ", b"H:1", b"f", b"u1", b"") + res("JOB_ASSIGN_UNIQ", b"H:2", b"f", b"u2", b""))
    lost = RetryConnection(100.0, submissions=[(100.1, b"f", b"gpr:2.ab:u1"), (100.1, b"f", b"gpr:2.ab:u2")], lost=101.0)
    again = RetryConnection(103.0, submissions=[(103.1, b"f", b"gpr:3.ab:u1")], lost=104.0)
    done = {"f H:1": [103.2]}  # the second attempt succeeded before its connection went
    stalled = check_held_progress([lost, again], jobs, done, observed_until=200.0)
    assert (stalled.in_flight, stalled.resubmitted, len(stalled.details)) == (2, 1, 1) and "H:2" in stalled.details[0]
    abandoned = check_held_progress([lost, again], jobs, {**done, "f H:2": [110.0]}, observed_until=200.0)
    assert abandoned.ok and (abandoned.resubmitted, abandoned.ended) == (1, 1)
    late = check_held_progress([lost, again], jobs, {**done, "f H:2": [117.0]}, observed_until=200.0)
    assert not late.ok and "16.0s after" in late.details[0]
    open_at_end = check_held_progress([lost, again], jobs, done, observed_until=110.0)
    assert open_at_end.ok and open_at_end.undecided == 1


def test_hold_ends_are_read_from_gproxys_log() -> None:
    from tests.fuzz.retries import Jobs, hold_ends
    from tests.fuzz.wire import res

    log = "\n".join(f"2026-01-02 03:04:05,{ms:03d} {line}" for ms, line in enumerate([
        "WARNING gproxy.retry: connection holding flaky H:a lost: gearmand requeues it, retry abandoned",
        "INFO gproxy.retry: retry succeeded: fzb_retry H:b on attempt 3",
        "INFO gproxy.retry: retry of fzb_retry H:c deferred: the retry budget of fzb_retry is spent",
        "WARNING gproxy.retry: retry exhausted: f H:d failed 3 attempts, last failure forwarded",
        "WARNING gproxy.retry: retry of f H:e waited max_hold_time (5s): last failure forwarded",
        "INFO gproxy.retry: retry connection lost: resubmitting f H:f as attempt 3 of 3",
        "INFO gproxy.retry: retry succeeded: flaky H:fak\ufffd 7 on attempt 2",  # (a handle no longer UTF-8)
    ]))  # fmt: skip
    assert sorted(hold_ends(log)) == ["f H:d", "f H:e", "flaky H:a", "flaky H:fak\ufffd 7", "fzb_retry H:b"]
    jobs = Jobs()
    jobs.note_sent(res("JOB_ASSIGN_UNIQ", b"H:fak\xe5 7", b"flaky", b"u", b""))
    assert jobs.handles[b":u"] == {"flaky H:fak\ufffd 7"}
