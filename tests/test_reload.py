"""Reloading the config without a restart: SIGHUP and POST /reload, under load, and what is
refused (a bad file, a change that needs a restart)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gproxy.config import load_config, unreloadable
from gproxy.core.metrics import Metrics
from gproxy.reload import ConfigSource, Reloader
from tests.gearmand import Gearmand, wait_for
from tests.peer_procs import PeerSet, start_pyclient, start_pyworker
from tests.proxy_thread import ProxyThread

WAIT_S = 30


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ('[retry]\nmax_attempts = 2\n[functions."x"]\nretry_on = ["Deadlock"]\n', None),
        ('log_level = "DEBUG"\nlog_format = "json"\nshutdown_grace_period = 3\n', None),
        ('listen = "127.0.0.1:4731"\nupstream = "g:1"\n', "listen, upstream or routes"),
        ('metrics_listen = "127.0.0.1:9999"\n', "metrics_listen"),
        ("max_packet_size = 2048\n", "max_packet_size"),
        ("admin = true\n", "admin"),
        ("[upstream_keepalive]\nidle = 5\n", "upstream_keepalive"),
        ("metrics_max_functions = 7\n", "metrics_max_functions"),
    ],
)
def test_what_a_reload_may_change(tmp_path: Path, change: str, refused: str | None) -> None:
    base = 'listen = "127.0.0.1:4730"\nupstream = "g:1"\n'
    running = load_config(str(write(tmp_path / "a.toml", base)))
    new = load_config(str(write(tmp_path / "b.toml", change if change.startswith("listen") else base + change)))
    assert unreloadable(running, new) == refused


def reloader(tmp_path: Path, text: str) -> tuple[Reloader, Path, list[object], Metrics]:
    path = write(tmp_path / "gproxy.toml", text)
    running = load_config(str(path))
    applied: list[object] = []
    metrics = Metrics()
    return Reloader(ConfigSource(str(path)), lambda: running, applied.append, metrics), path, applied, metrics


def test_a_bad_file_changes_nothing_and_says_what_check_config_says(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reload, path, applied, metrics = reloader(tmp_path, 'upstream = "g:1"\n')
    write(path, 'upstream = "g:1"\n[retry]\nmax_attempts = 0\n')
    checked = subprocess.run([sys.executable, "-m", "gproxy", "check-config", str(path)],
                             capture_output=True, text=True, timeout=30, check=False)
    said = checked.stderr.strip().removeprefix("gproxy: ")
    assert reload.reload() == (False, f"reload refused: {said}; the running config stays")
    assert applied == [] and metrics.registry.get_sample_value("gproxy_config_last_reload_successful") == 0
    assert [r.levelname for r in caplog.records if said in r.getMessage()] == ["ERROR"]


def test_a_change_that_needs_a_restart_is_refused_whole(tmp_path: Path) -> None:
    reload, path, applied, metrics = reloader(tmp_path, 'upstream = "g:1"\n')
    write(path, 'upstream = "g:2"\n[retry]\nmax_attempts = 2\n')
    assert reload.reload() == (
        False, "reload refused: listen, upstream or routes cannot change without a restart; the running config stays"
    )
    assert applied == []


def test_a_good_file_is_applied_and_counted(tmp_path: Path) -> None:
    reload, path, applied, metrics = reloader(tmp_path, 'upstream = "g:1"\n')
    before = metrics.registry.get_sample_value("gproxy_config_last_reload_success_timestamp_seconds")
    write(path, 'upstream = "g:1"\n[retry]\nmax_attempts = 2\n')
    assert reload.reload() == (True, f"config reloaded from {path}")
    (new,) = applied
    assert new.policies.default.max_attempts == 2  # type: ignore[attr-defined]
    assert metrics.registry.get_sample_value("gproxy_config_last_reload_successful") == 1
    assert metrics.registry.get_sample_value("gproxy_config_last_reload_success_timestamp_seconds") >= before


def test_without_a_file_there_is_nothing_to_reload() -> None:
    metrics = Metrics()
    done, message = Reloader(ConfigSource(None), lambda: None, print, metrics).reload()  # type: ignore[arg-type]
    assert not done and "no config file" in message


def test_a_reload_under_load_loses_nothing_and_closes_nothing(gearmand: Gearmand, tmp_path: Path) -> None:
    """Jobs flowing and jobs held, with the shipped defaults; the reload lengthens the backoff
    and adds a pattern: held jobs keep their attempts, new failures follow the new policy,
    every job is answered once, and no connection closes."""
    host, port = gearmand.address
    path = write(tmp_path / "gproxy.toml", f'listen = "127.0.0.1:0"\nupstream = "{host}:{port}"\n')
    config = load_config(str(path))
    with ProxyThread(config, source=ConfigSource(str(path))) as proxy, PeerSet() as peers:
        for _ in range(3):
            peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        flaky = [start_pyclient(gearmand.address, "flaky", f"2:load-{n}") for n in range(10)]
        plain = [start_pyclient(gearmand.address, "reverse", f"job-{n}") for n in range(30)]
        wait_for(lambda: len(proxy.held()) >= 5, WAIT_S, "retries to be held")
        connections = proxy.sample("gproxy_connections", side="worker")
        write(path, f'listen = "127.0.0.1:0"\nupstream = "{host}:{port}"\n[retry]\nbackoff_initial = 0.5\n'
                    '[functions."scripted"]\nretry_on = ["boom"]\n')
        assert proxy.call(proxy.proxy.reloader.reload) == (True, f"config reloaded from {path}")  # type: ignore[union-attr]
        more = [start_pyclient(gearmand.address, "reverse", f"after-{n}") for n in range(30)]
        unmarked = start_pyclient(gearmand.address, "scripted", "plain,ok|after-reload")  # retried by the new pattern
        assert [c.result().stdout for c in flaky] == [b"ok after 3"] * 10  # their third attempt, as before
        assert [c.result().stdout for c in plain] == [f"job-{n}"[::-1].encode() for n in range(30)]
        assert [c.result().stdout for c in more] == [f"after-{n}"[::-1].encode() for n in range(30)]
        assert unmarked.result().stdout == b"ok after 2"
        assert proxy.sample("gproxy_connections", side="worker") == connections == 3
        assert proxy.sample("gproxy_retries_total", function="flaky", reason="exception") == 20
        assert proxy.proxy is not None and proxy.proxy.config.policies.default.backoff_initial == 0.5


def test_sighup_and_post_reload_on_the_running_command(gearmand: Gearmand, tmp_path: Path) -> None:
    host, port = gearmand.address
    base = f'listen = "127.0.0.1:0"\nupstream = "{host}:{port}"\nmetrics_listen = "127.0.0.1:0"\nadmin = true\n'
    path = write(tmp_path / "gproxy.toml", base)
    proc = subprocess.Popen([sys.executable, "-m", "gproxy", "--config", str(path)], stderr=subprocess.PIPE, text=True)
    try:
        metrics_url = None
        while metrics_url is None:
            line = proc.stderr.readline()
            assert line, "gproxy stopped"
            if found := re.search(r"metrics on (http://\S+)/metrics", line):
                metrics_url = found.group(1)
        write(path, base + "[retry]\nmax_attempts = 3\n")
        proc.send_signal(signal.SIGHUP)
        assert "config reloaded from" in proc.stderr.readline()
        write(path, base + "[retry]\nmax_attempts = -1\n")
        request = urllib.request.Request(f"{metrics_url}/reload", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=WAIT_S)
        assert refused.value.code == 409
        assert "retry.max_attempts: expected a whole number >= 1" in json.loads(refused.value.read())["error"]
        line = proc.stderr.readline()
        assert " ERROR gproxy.control: reload refused: configuration error: retry.max_attempts" in line
        with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=WAIT_S) as scraped:
            assert "gproxy_config_last_reload_successful 0.0" in scraped.read().decode()
        write(path, base + "[retry]\nmax_attempts = 4\n")
        with urllib.request.urlopen(request, timeout=WAIT_S) as done:
            assert json.loads(done.read()) == {"ok": f"config reloaded from {path}"}
        assert proc.poll() is None  # serving all along
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT_S)


def test_a_sighup_during_a_drain_reloads_and_does_not_cut_the_drain_short(gearmand: Gearmand, tmp_path: Path) -> None:
    host, port = gearmand.address
    path = write(tmp_path / "gproxy.toml", f'listen = "127.0.0.1:0"\nupstream = "{host}:{port}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "gproxy", "--config", str(path)], stderr=subprocess.PIPE, text=True)
    gate = tmp_path / "gate"
    try:
        listening = re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.stderr.readline())
        assert listening
        with PeerSet() as peers:
            peers.add(start_pyworker(("127.0.0.1", int(listening.group(1))), state_dir=tmp_path))
            running = start_pyclient(gearmand.address, "block", str(gate))
            wait_for(Path(f"{gate}.started").exists, WAIT_S, "the running job")
            proc.send_signal(signal.SIGTERM)
            lines = [proc.stderr.readline(), proc.stderr.readline()]
            assert "draining: " in lines[1], lines
            proc.send_signal(signal.SIGHUP)
            assert "config reloaded from" in proc.stderr.readline()
            assert proc.poll() is None  # still draining: the job runs
            gate.touch()
            assert running.result().stdout == b"unblocked"
            assert proc.wait(WAIT_S) == 0
        assert "drained: every job finished" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait(WAIT_S)


def test_a_reload_that_fails_inside_is_refused_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "gproxy.toml", 'upstream = "g:1"\n')
    running = load_config(str(path))

    def broken(config: object) -> None:
        raise RuntimeError("a bug")

    metrics = Metrics()
    done, message = Reloader(ConfigSource(str(path)), lambda: running, broken, metrics).reload()
    assert (done, message) == (False, "reload refused: internal error (see gproxy's log); the running config stays")
    assert metrics.registry.get_sample_value("gproxy_config_last_reload_successful") == 0
    assert [r.exc_info[1] for r in caplog.records if r.exc_info] and "internal error" in caplog.text
