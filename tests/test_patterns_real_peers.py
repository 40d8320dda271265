"""retry_on / fatal_on end to end: workers that cannot be changed, with the exceptions their
database drivers really throw (PHP's PDO and mysqli on pecl gearman, Perl's DBI-style die on
Gearman::Worker), behind gproxy with the shipped defaults and only the patterns added."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from gproxy.core.policy import RetryPolicy
from tests.gearmand import Gearmand
from tests.peer_procs import PeerSet, start_perlworker, start_phpworker, start_pyclient
from tests.proxy_thread import ProxyThread

TRANSIENT = ("SQLSTATE\\[40001\\]", "database is locked", "Connection refused")
PATTERNS = RetryPolicy(
    retry_on=tuple(re.compile(p.encode()) for p in TRANSIENT),
    fatal_on=(re.compile(rb"SQLSTATE\[23000\]"),),
)


def attempts(state: Path) -> list[str]:
    return (state / "php.log").read_text().splitlines()


def test_a_php_worker_s_real_driver_exceptions_are_retried_by_pattern(
    gearmand: Gearmand, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gproxy")
    with ProxyThread.to(gearmand.address, PATTERNS) as proxy, PeerSet() as peers:
        for _ in range(2):
            peers.add(start_phpworker(proxy.address, tmp_path))
        scripts = ["deadlock,ok", "locked,ok", "refused,ok", "mysqli,ok"]
        clients = [start_pyclient(gearmand.address, "php_db", f"{script}|{n}", exceptions=True)
                   for n, script in enumerate(scripts)]
        for script, client in zip(scripts, clients, strict=True):
            run = client.result()
            assert (run.returncode, run.stdout) == (0, b"ok after 2"), (script, run.report)
        assert proxy.sample("gproxy_retries_total", function="php_db", reason="pattern") == 4
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrying php_db")]
    assert sorted(line.rsplit("(", 1)[1] for line in logged) == sorted([
        'pattern "SQLSTATE\\[40001\\]")', 'pattern "database is locked")',
        'pattern "Connection refused")', 'pattern "Connection refused")',
    ]), logged
    failures = sorted(line for line in attempts(tmp_path) if not line.endswith(" ok"))
    assert failures == ["1 deadlock", "1 locked", "1 mysqli", "1 refused"]


def test_a_php_worker_s_duplicate_key_is_fatal_and_reaches_the_client_at_once(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    with ProxyThread.to(gearmand.address, PATTERNS) as proxy, PeerSet() as peers:
        peers.add(start_phpworker(proxy.address, tmp_path))
        run = start_pyclient(gearmand.address, "php_db", "duplicate,ok|dup", exceptions=True).result()
        assert run.report.get("exception") == (
            "PDOException: SQLSTATE[23000]: Integrity constraint violation: 1062 Duplicate entry '7' for key 'PRIMARY'"
        ), run.report
        assert proxy.sample("gproxy_retries_total", function="php_db", reason="pattern") == 0
    assert attempts(tmp_path) == ["1 duplicate"]


def test_a_perl_worker_s_die_is_retried_by_pattern(gearmand: Gearmand, tmp_path: Path) -> None:
    deadlock = RetryPolicy(retry_on=(re.compile(rb"Deadlock found when trying to get lock"),))
    with ProxyThread.to(gearmand.address, deadlock) as proxy, PeerSet() as peers:
        peers.add(start_perlworker(proxy.address, state_dir=tmp_path))
        run = start_pyclient(gearmand.address, "flaky_db", "2:perl").result()
        assert (run.returncode, run.stdout) == (0, b"ok after 3"), run.report
        assert proxy.sample("gproxy_retries_total", function="flaky_db", reason="pattern") == 2
