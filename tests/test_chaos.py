"""The chaos tier in `make test`: one short seeded run (tests/chaos), every invariant checked.

Real peers only: gearmand, two `gproxy` processes (one behind the test's fault-injecting
relay), pygearman and Perl Gearman::Worker workers, pygearman clients; a seeded injector
kills workers, drains and kills a gproxy, and resets connections; then a calm phase and a
gearmand restart. The run goes in a subprocess (`python -m tests.chaos`), so its threads,
signals and processes cannot leak into the test session; its report is printed on failure
(the seed, each check with its figure, and the timeline of every job that broke one).
A longer run: `make chaos SECONDS=600 SEED=1`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.peer_procs import stop_peer

REPO = Path(__file__).resolve().parents[1]
SECONDS = 55  # the chaos phase; with setup, warm-up, quiesce, calm and restart: 65-80 s
SEED = 1


@pytest.mark.timeout(300)
def test_short_seeded_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.chaos", "--seconds", str(SECONDS), "--seed", str(SEED),
         "--run-dir", str(tmp_path / "run")],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        stop_peer(proc)
        out, _ = proc.communicate()
        pytest.fail(f"the chaos run did not finish within 280 s:\n{out.decode(errors='replace')}")
    report = out.decode(errors="replace")
    print(report)
    assert proc.returncode == 0, report
    assert f"PASSED, seed {SEED}" in report, report
