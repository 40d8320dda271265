"""log_format = "json": one object per line, every line's fields as fields."""

from __future__ import annotations

import ast
import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gproxy.config import ConfigError, load_config
from gproxy.core.fields import about, about_job
from gproxy import logs
from gproxy.logs import JsonFormatter
from tests.gearmand import Gearmand
from tests.peer_procs import PeerSet, start_pyclient, start_pyworker

GPROXY_DIR = Path(__file__).resolve().parent.parent / "gproxy"
LOGGING_CALLS = {"debug", "info", "warning", "error", "exception", "critical", "log"}
WAIT_S = 30


def test_every_log_line_of_gproxy_carries_its_fields() -> None:
    """A line without `extra=` would reach a JSON log store as bare text."""
    bare = []
    for path in sorted(GPROXY_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOGGING_CALLS and isinstance(node.func.value, ast.Name)
                and node.func.value.id in {"log", "logger", "pair_log", "pair_logger"}
                and not any(keyword.arg == "extra" for keyword in node.keywords)
            ):
                bare.append(f"{path.relative_to(GPROXY_DIR.parent)}:{node.lineno}")
    assert bare == []


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("gproxy.retry", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_a_json_line_has_time_level_logger_message_and_the_fields() -> None:
    line = json.loads(JsonFormatter().format(record(
        "retrying %s %s", "resize", "H:1", **about_job(b"resize", b"H:1", attempt=2, seconds=0.5),
    )))
    assert line.pop("time").endswith("+00:00")
    assert line == {"level": "INFO", "logger": "gproxy.retry", "message": "retrying resize H:1",
                    "function": "resize", "handle": "H:1", "attempt": 2, "seconds": 0.5}


def test_the_time_is_rfc_3339_with_microseconds() -> None:
    made = record("x")
    made.created = 1_800_000_000.25
    assert json.loads(JsonFormatter().format(made))["time"] == "2027-01-15T08:00:00.250000+00:00"
    assert datetime.datetime.fromisoformat("2027-01-15T08:00:00.250000+00:00").timestamp() == made.created


def test_a_traceback_is_one_field_and_fields_never_hide_the_line_s_own_keys() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        made = logging.LogRecord("gproxy.control", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    made.fields = {"message": "not this", "task": "timer"}
    line = json.loads(JsonFormatter().format(made))
    assert line["message"] == "failed" and line["task"] == "timer"
    assert line["traceback"].startswith("Traceback (most recent call last):") and "RuntimeError: boom" in line["traceback"]


def test_fields_leave_out_what_is_not_known() -> None:
    assert about(peer="1.2.3.4:5", reason=None) == {"fields": {"peer": "1.2.3.4:5"}}


def test_log_format_is_text_or_json(tmp_path: Path) -> None:
    path = tmp_path / "gproxy.toml"
    path.write_text('upstream = "g:1"\nlog_format = "json"\n')
    assert load_config(str(path)).log_format == "json"
    assert load_config(str(path), {"log_format": "text"}).log_format == "text"
    path.write_text('upstream = "g:1"\nlog_format = "xml"\n')
    with pytest.raises(ConfigError, match='log_format: expected "text" or "json", got \'xml\''):
        load_config(str(path))


def test_every_line_of_a_real_run_is_one_json_object_with_its_fields(gearmand: Gearmand, tmp_path: Path) -> None:
    """GPROXY_LOG_FORMAT=json: a retry, bad input, a drain: every line parses, and the lines
    about a job, a worker's connection and the process carry what they are about."""
    config = tmp_path / "gproxy.toml"
    config.write_text(f'listen = "127.0.0.1:0"\nupstream = "{gearmand.address[0]}:{gearmand.address[1]}"\n'
                      "[retry]\nbackoff_initial = 0.2\njitter = false\n")
    env = {**os.environ, "GPROXY_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "gproxy", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(proc.stderr.readline())
        assert first["message"].startswith("listening on") and first["upstream"] == "{}:{}".format(*gearmand.address)
        host, port = first["via"].rsplit(":", 1)
        with PeerSet() as peers:
            peers.add(start_pyworker((host, int(port)), state_dir=tmp_path))
            run = start_pyclient(gearmand.address, "flaky", "1:json").result()
            assert run.stdout == b"ok after 2", run.report
            with socket.create_connection((host, int(port)), timeout=WAIT_S) as bad:
                bad.sendall(b"\0BAD" + bytes(8))  # a binary packet's header with a wrong magic
                assert bad.recv(1) == b""  # closed for bad input
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
    finally:
        proc.kill()
        proc.wait(WAIT_S)
    lines = [first] + [json.loads(text) for text in proc.stderr.read().splitlines()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
    retrying = [line for line in lines if line["message"].startswith("retrying flaky")]
    assert len(retrying) == 1 and {
        key: retrying[0][key] for key in ("function", "attempt", "max_attempts", "seconds", "reason")
    } == {"function": "flaky", "attempt": 2, "max_attempts": 5, "seconds": 0.2, "reason": "exception"}
    assert retrying[0]["handle"] in retrying[0]["message"]
    closed = [line for line in lines if "closed: protocol error" in line["message"]]
    assert len(closed) == 1 and closed[0]["level"] == "WARNING" and closed[0]["logger"] == "gproxy.pair"
    assert closed[0]["via"] == first["via"] and closed[0]["upstream"] == first["upstream"]
    assert closed[0]["peer"] in closed[0]["message"] and closed[0]["reason"].startswith("protocol error")
    assert [line["signal"] for line in lines if "received: stopping" in line["message"]] == ["SIGTERM"]
    assert any(line["message"] == "drained: every job finished" for line in lines)


def test_configuring_again_changes_gproxy_s_handler_and_leaves_the_others(caplog: pytest.LogCaptureFixture) -> None:
    root = logging.getLogger()
    level, before = root.level, list(root.handlers)
    try:
        logs.reconfigure("INFO", "json")  # not set up by gproxy: a reload leaves it alone
        assert root.handlers == before and root.level == level
        logs.configure("INFO", "text")
        logs.reconfigure("WARNING", "json")  # a reload
        ours = [h for h in root.handlers if h not in before]
        assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter) and root.level == logging.WARNING
        assert caplog.handler in root.handlers
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
