"""final_exception: how a client hears of an exception that ends its job, with a real
gearmand, a real pygearman worker behind gproxy, and two real clients: the libgearman
`gearman` CLI, which never sets OPTION_REQ exceptions (gearmand 1.1.20 tells it nothing,
and it waits forever), and pygearman with the option."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gproxy.core.policy import FinalException, RetryPolicy
from tests.gearmand import Gearmand
from tests.peer_procs import PeerSet, run_cli_client, run_pyclient, start_pyworker
from tests.proxy_thread import ProxyThread

HANG_S = 2.0
"""How long the CLI client is given in the one case where it is expected to hang."""


@pytest.mark.parametrize("final", list(FinalException))
def test_an_exception_that_ends_a_job_reaches_every_client_as_final_exception_says(
    gearmand: Gearmand, tmp_path: Path, final: FinalException
) -> None:
    function = "plain_exception"  # WORK_EXCEPTION `boom`, then WORK_FAIL: not retryable
    policy = RetryPolicy(final_exception=final)
    with ProxyThread.to(gearmand.address, RetryPolicy(), {function: policy}) as proxy, PeerSet() as peers:
        worker = peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        opted = run_pyclient(gearmand.address, function, "x", unique=f"fe-{final.value}", exceptions=True)
        try:
            cli = run_cli_client(gearmand.address, function, "x", timeout=HANG_S if final is FinalException.EXCEPTION else 15)
        except subprocess.TimeoutExpired:
            cli = None
        completed = proxy.sample("gproxy_jobs_total", function=function, outcome="exception")
    assert opted.state == "FAILED", opted.stderr
    if final is FinalException.EXCEPTION:
        assert cli is None  # the CLI client still waits: gearmand sent it nothing it understands
        assert opted.report["exception"] == "boom"
    else:
        both = final is FinalException.BOTH  # the text comes first, as a warning: the CLI prints it
        assert cli is not None and (cli.returncode, cli.stderr) == (1, (b"boom" if both else b"") + b"Job failed\n")
        assert opted.report["exception_updates"] == [] and opted.report["ended_by"] == "WORK_FAIL"
        assert opted.report["warning_updates"] == (["boom"] if both else [])
    assert completed == 2  # counted as the worker ended them, whatever the clients heard
    assert "JOB_NOT_FOUND" not in worker.log_text()  # the worker's own WORK_FAIL was dropped
