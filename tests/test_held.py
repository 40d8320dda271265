"""Held retries, visible and steerable: the Retrier's operator actions, the view, and
`/held` with its POSTs and `gproxy held` against a real gproxy holding real jobs."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gproxy.config import Address
from gproxy.core.held import held_view, table
from gproxy.core.jobs import TrackedJob
from gproxy.core.policy import Policies, RetryPolicy
from gproxy.core.protocol import REQ, PacketType, build_packet
from gproxy.core.retry import NothingHeld, Retrier, SendUpstream, State, Submit, Wakeup
from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import PeerSet, run_pyclient, start_pyclient, start_pyworker
from tests.proxy_thread import ProxyThread

P = PacketType
POLICY = RetryPolicy(jitter=False, dead_letter="dlq", max_hold_time=100.0)


def held_one(policy: RetryPolicy = POLICY, function: bytes = b"f") -> Retrier[str, str]:
    retrier: Retrier[str, str] = Retrier(Policies(policy), random.Random(1), tag=b"")
    decision = retrier.worker_failed(
        owner="up-1", route="route", job=TrackedJob(b"H:1", function, b"u-1", b"payload", "up-1", 0.0),
        ptype=P.WORK_EXCEPTION, failure=b"RETRY: busy", now=0.0,
    )
    assert decision.actions == [Wakeup(1, 1.0, 1)]
    return retrier


def test_retry_now_submits_at_once_and_voids_the_backoff_timer() -> None:
    retrier = held_one()
    (submit,) = retrier.retry_now(1, now=0.2) or []
    assert type(submit) is Submit and submit.unique == b"gpr:2:u-1"
    assert retrier.timer_fired(1, 1, now=1.0) == []  # the backoff's timer: void
    assert retrier.retry_now(1, now=0.3) is None and retrier.retry_now(7, now=0.3) is None  # under way; unknown


def test_give_up_now_forwards_the_last_failure_and_dead_letters_the_job() -> None:
    retrier = held_one()
    actions = retrier.give_up_now(1, now=0.5) or []
    assert [type(a) for a in actions] == [Submit, SendUpstream, NothingHeld]
    assert actions[1] == SendUpstream("up-1", build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: busy"))
    assert retrier.held == {} and retrier.give_up_now(1, now=0.6) is None


def test_a_paused_function_waits_for_resume_and_still_gives_up_at_max_hold_time() -> None:
    retrier = held_one()
    retrier.pause(b"f")
    assert retrier.timer_fired(1, 1, now=1.0) == [Wakeup(1, 99.0, 1)]  # only its deadline stands
    assert retrier.held[1].state is State.PAUSED
    (submit,) = retrier.resume(b"f", now=2.0)
    assert type(submit) is Submit and retrier.resume(b"f", now=2.0) == []
    again = held_one()
    again.pause(b"f")
    again.timer_fired(1, 1, now=1.0)
    actions = again.timer_fired(1, 1, now=100.0)  # max_hold_time, paused or not
    assert SendUpstream("up-1", build_packet(REQ, P.WORK_EXCEPTION, handle=b"H:1", data=b"RETRY: busy")) in actions


def test_jobs_deferred_by_the_budget_wait_for_resume_too_when_their_function_is_paused() -> None:
    retrier = held_one(replace(POLICY, budget_ratio=0.0, budget_min_per_second=0.001, budget_ttl=1.0))
    retrier.budgets.budget(b"f", 0.0).try_withdraw(0.0)  # (the one retry the floor allows: spent)
    actions = retrier.timer_fired(1, 1, now=1.0)
    assert retrier.held[1].state is State.DEFERRED and any(type(a).__name__ == "RecheckBudget" for a in actions)
    retrier.pause(b"f")
    assert retrier.budget_recheck(b"f", now=2.0) == [] and retrier.held[1].state is State.PAUSED
    retrier.resume(b"f", now=3.0)
    assert retrier.held[1].state in (State.SUBMITTING, State.DEFERRED)  # back with the budget


def test_the_view_shows_each_held_job_and_the_table_reads_it() -> None:
    retrier = held_one()
    retrier.pause(b"g")
    view = held_view(retrier, now=0.25)
    assert view == {"held": [{
        "key": 1, "function": "f", "handle": "H:1", "unique": "u-1", "upstream": "route", "attempt": 1,
        "max_attempts": 5, "state": "waiting", "next_attempt_in": 0.75, "gives_up_in": 99.75,
        "last_failure": {"type": "WORK_EXCEPTION", "data": "RETRY: busy"},
    }], "paused": ["g"]}
    assert held_view(retrier, now=0.25, function=b"other")["held"] == []
    lines = table(view).splitlines()
    assert lines[0].split() == ["KEY", "FUNCTION", "HANDLE", "ATTEMPT", "STATE", "NEXT", "IN", "LAST", "FAILURE"]
    assert lines[1].split() == ["1", "f", "H:1", "1/5", "waiting", "0.8s", "WORK_EXCEPTION", "RETRY:", "busy"]
    assert lines[2] == "1 held; retries paused: g"
    retrier.pause(b"f")  # a job waiting for its backoff, of a paused function: it will wait longer
    assert table(held_view(retrier, now=0.25)).splitlines()[1].split()[4:6] == ["waiting", "(paused)"]


# -- against a real gproxy holding real jobs ------------------------------------------------------


def http(method: str, url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def admin_proxy(gearmand: Gearmand, admin: bool = True) -> ProxyThread:
    slow = RetryPolicy(backoff_initial=60.0, jitter=False)  # held until the operator acts
    return ProxyThread.to(gearmand.address, slow, frozen=True, metrics_listen=Address("127.0.0.1", 0), admin=admin)


def base(proxy: ProxyThread) -> str:
    assert proxy.proxy is not None and proxy.proxy.metrics_address is not None
    return f"http://{proxy.proxy.metrics_address}"


def test_held_jobs_are_listed_retried_and_given_up_through_the_endpoint(gearmand: Gearmand, tmp_path: Path) -> None:
    with admin_proxy(gearmand) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        first = peers.add(start_pyclient(gearmand.address, "flaky", "1:first", unique="held-1", exceptions=True))
        second = peers.add(start_pyclient(gearmand.address, "flaky", "1:second", unique="held-2", exceptions=True))
        wait_for(lambda: len(proxy.held()) == 2, 15, "both jobs to be held")
        status, view = http("GET", f"{base(proxy)}/held?function=flaky")
        jobs = sorted(view["held"], key=lambda job: job["unique"])  # (held in the order they failed)
        assert status == 200 and [job["unique"] for job in jobs] == ["held-1", "held-2"]
        job = jobs[0]
        assert (job["attempt"], job["max_attempts"], job["state"], job["next_attempt_in"]) == (1, 5, "waiting", 60.0)
        assert job["last_failure"] == {"type": "WORK_EXCEPTION", "data": "RETRY: transient failure 1"}
        shown = subprocess.run([sys.executable, "-m", "gproxy", "held", "--url", base(proxy), "--function", "flaky"],
                               capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0 and shown.stdout.splitlines()[-1] == "2 held", shown.stderr
        keys = [j["key"] for j in jobs]
        assert http("POST", f"{base(proxy)}/held/{keys[0]}/retry")[0] == 200
        assert http("POST", f"{base(proxy)}/held/{keys[0]}/retry")[0] == 409  # under way already (or done)
        assert http("POST", f"{base(proxy)}/held/abc/retry")[0] == 404
        assert http("POST", f"{base(proxy)}/held/{keys[1]}/forget")[0] == 404  # no such action
        assert http("POST", f"{base(proxy)}/held/{keys[1]}/give-up")[0] == 200
        assert http("POST", f"{base(proxy)}/held/{keys[1]}/give-up")[0] == 404  # not held any more
        retried, given_up = first.result(), second.result()
        assert http("GET", f"{base(proxy)}/held")[1]["held"] == []
    assert (retried.returncode, retried.stdout) == (0, b"ok after 2"), retried.stderr
    assert (given_up.state, given_up.report["exception"]) == ("FAILED", "RETRY: transient failure 1")


def test_a_paused_function_retries_nothing_until_resumed(gearmand: Gearmand, tmp_path: Path) -> None:
    with admin_proxy(gearmand) as proxy, PeerSet() as peers:
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        assert http("POST", f"{base(proxy)}/functions/flaky/pause")[0] == 200
        client = peers.add(start_pyclient(gearmand.address, "flaky", "1:paused", unique="paused-1", exceptions=True))
        wait_for(lambda: len(proxy.held()) == 1, 15, "the job to be held")
        proxy.advance(60.0)  # its backoff is over: it would go now, but its function is paused
        wait_for(lambda: proxy.held()[0].state is State.PAUSED, 15, "the job to be paused")
        assert http("GET", f"{base(proxy)}/held")[1]["paused"] == ["flaky"]
        assert http("POST", f"{base(proxy)}/functions/flaky/resume")[0] == 200
        run = client.result()
    assert (run.returncode, run.stdout) == (0, b"ok after 2"), run.stderr


def test_without_admin_the_endpoint_shows_but_does_not_steer(gearmand: Gearmand) -> None:
    with admin_proxy(gearmand, admin=False) as proxy:
        assert http("GET", f"{base(proxy)}/held") == (200, {"held": [], "paused": []})
        status, answer = http("POST", f"{base(proxy)}/functions/flaky/pause")
        assert status == 403 and "admin = true" in answer["error"]
        assert proxy.call(lambda: set(proxy.proxy.retrier.paused)) == set()  # type: ignore[union-attr]


def test_check_config_prints_the_resolved_policies_and_fails_as_a_start_does(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('upstream = "127.0.0.1:4730"\n[retry]\nmax_attempts = 3\n[functions."resize"]\non_fail = true\n'
                    'budget_min_per_second = inf\n')
    ok = subprocess.run([sys.executable, "-m", "gproxy", "check-config", str(good)], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "  max_attempts = 3" in ok.stdout and '[functions."resize"]:' in ok.stdout and "  on_fail = true" in ok.stdout
    assert '  exception_marker = "RETRY"' in ok.stdout and "  budget_min_per_second = inf" in ok.stdout  # as TOML
    bad = tmp_path / "bad.toml"
    bad.write_text('upstream = "127.0.0.1:4730"\n[retry]\nmax_attempts = 0\n')
    checked = subprocess.run([sys.executable, "-m", "gproxy", "check-config", str(bad)], capture_output=True, text=True, timeout=30)
    started = subprocess.run([sys.executable, "-m", "gproxy", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == started.returncode == 2
    assert checked.stderr == started.stderr == "gproxy: configuration error: retry.max_attempts: expected a whole number >= 1, got 0\n"


@pytest.mark.parametrize("flag", ["--version"])
def test_version(flag: str) -> None:
    out = subprocess.run([sys.executable, "-m", "gproxy", flag], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("gproxy ")


def test_gproxy_held_says_in_one_line_when_the_url_is_not_gproxys() -> None:
    wrong = subprocess.run([sys.executable, "-m", "gproxy", "held", "--url", "http://127.0.0.1:1"],
                           capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 1 and wrong.stderr.startswith("gproxy held: cannot read http://127.0.0.1:1/held: ")
    assert len(wrong.stderr.splitlines()) == 1

