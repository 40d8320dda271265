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
