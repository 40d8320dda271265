"""Settings: defaults, flags over file, routes, and one clear message naming each wrong key."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from gproxy.cli import main
from gproxy.config import Address, ConfigError, Keepalive, Route, load_config
from gproxy.core.policy import FinalException, Mode, OnDisconnect, Priority, RetryPolicy


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gproxy.toml"
    path.write_text(text)
    return str(path)


def test_defaults_keep_the_worker_on_its_usual_port() -> None:
    config = load_config(None, {"upstream": "gearmand.internal:4730"})
    assert config.routes == (Route(Address("127.0.0.1", 4730), Address("gearmand.internal", 4730)),)
    assert (config.metrics_listen, config.max_packet_size, config.log_level) == (None, 64 << 20, "INFO")
    assert config.admin is False  # the listener is unauthenticated: steering is asked for


def test_a_flag_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = "0.0.0.0:4730"\nupstream = "a:1"\nmetrics_listen = "[::1]:0"\n')
    config = load_config(path, {"upstream": "b:2", "listen": None})
    assert config.routes == (Route(Address("0.0.0.0", 4730), Address("b", 2)),)
    assert config.metrics_listen == Address("::1", 0)
    assert str(config.metrics_listen) == "[::1]:0"


def test_several_routes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'max_packet_size = 2048\n[[routes]]\nlisten = "127.0.0.1:4730"\nupstream = "g1:4730"\n'
        '[[routes]]\nlisten = "127.0.0.1:4731"\nupstream = "g2:4730"\n',
    )
    config = load_config(path)
    assert [str(r.upstream) for r in config.routes] == ["g1:4730", "g2:4730"]
    assert config.max_packet_size == 2048


@pytest.mark.parametrize(
    "text, flags, message",
    [
        ("", {}, "upstream: required"),
        ('upstream = "g:4730"\nlisten = "nope"', {}, "listen: expected HOST:PORT"),
        ('upstream = "g:0"', {}, "upstream: port must be 1-65535"),
        ('upstream = "g:70000"', {}, "upstream: port must be"),
        ('upstream = 4730', {}, "upstream: expected a string"),
        ('upstream = "g:1"\nmax_packet_size = 10', {}, "max_packet_size: expected a whole number"),
        ('upstream = "g:1"\nmax_packet_size = "1M"', {}, "max_packet_size"),
        ('upstream = "g:1"\nlog_level = "loud"', {}, "log_level: expected one of"),
        ('upstream = "g:1"\nlisten_port = 1', {}, "unknown setting 'listen_port'"),
        ('[[routes]]\nlisten = "127.0.0.1:1"', {}, r"routes\[0\].upstream: required"),
        ('[[routes]]\nupstream = "g:1"\nport = 3', {}, r"routes\[0\].port: unknown route setting"),
        ('[[routes]]\nupstream = "g:1"', {"upstream": "g:2"}, "upstream: cannot be combined with"),
        (
            '[[routes]]\nlisten = "127.0.0.1:9"\nupstream = "g:1"\n'
            '[[routes]]\nlisten = "127.0.0.1:9"\nupstream = "g:2"',
            {},
            r"routes\[1\].listen: 127.0.0.1:9 is already used",
        ),
        ("upstream = ", {}, "is not valid TOML"),
        ('upstream = "g:1"\n[retry]\nmax_attempts = 0', {}, "retry.max_attempts: expected a whole number >= 1"),
        ('upstream = "g:1"\n[retry]\nbackoff_multiplier = 0.5', {}, "retry.backoff_multiplier: expected a number >= 1"),
        ('upstream = "g:1"\n[retry]\njitter = "yes"', {}, "retry.jitter: expected true or false"),
        ('upstream = "g:1"\n[retry]\nmode = "dry-run"', {}, 'retry.mode: expected "enforce" or "observe"'),
        ('upstream = "g:1"\n[retry]\nexception_marker = ""', {}, "retry.exception_marker: expected a non-empty string"),
        ('upstream = "g:1"\n[retry]\nretries = 3', {}, "retry.retries: unknown retry setting"),
        ('upstream = "g:1"\n[functions.resize]\nmax_held = 0', {}, 'functions."resize".max_held: expected a whole number >= 1'),
        ('upstream = "g:1"\n[retry]\nbudget_ttl = 0', {}, "retry.budget_ttl: expected a number > 0"),
        ('upstream = "g:1"\n[retry]\nmax_hold_time = -3', {}, "retry.max_hold_time: expected a number > 0"),
        ('upstream = "g:1"\n[retry]\nbudget_min_per_second = -1', {}, "retry.budget_min_per_second: expected a number > 0"),
        ('upstream = "g:1"\n[retry]\nbudget_min_per_second = 0', {}, "retry.budget_min_per_second: must be > 0: with no floor"),
        ('upstream = "g:1"\n[retry]\nretry_priority = "urgent"', {}, 'retry.retry_priority: expected "normal", "high" or "low"'),
        ('upstream = "g:1"\n[functions."x"]\non_disconnect = true', {}, 'functions."x".on_disconnect: expected "requeue" or "retry"'),
        ('upstream = "g:1"\n[retry]\nfinal_exception = "warn"', {}, 'retry.final_exception: expected "exception", "fail" or "both"'),
        ('upstream = "g:1"\n[retry]\neject_after = 2.5', {}, "retry.eject_after: expected a whole number >= 0"),
        ('upstream = "g:1"\n[retry]\neject_for = 0', {}, "retry.eject_for: expected a number > 0"),
        ('upstream = "g:1"\n[retry]\ntimeout = -1', {}, "retry.timeout: expected a number >= 0"),
        ('upstream = "g:1"\nadmin = "yes"', {}, "admin: expected true or false"),
        # The budget's keys of 0.1 meant a cap on jobs held at once: refused, with what to write.
        (
            'upstream = "g:1"\n[retry]\nbudget_ratio = 0.5\nbudget_min = 10', {},
            "retry.budget_min: no longer exists: the retry budget is now a rate .* budget_min_per_second",
        ),
        ('upstream = "g:1"\nfunctions = 3', {}, "functions: expected tables"),
        ('upstream = "g:1"\nshutdown_grace_period = -1', {}, "shutdown_grace_period: expected a number of seconds"),
        ('upstream = "g:1"\nmetrics_max_functions = 0', {}, "metrics_max_functions: expected a whole number >= 1"),
        ('upstream = "g:1"\nupstream_keepalive = 30', {}, r"upstream_keepalive: expected a table \[upstream_keepalive\]"),
        ('upstream = "g:1"\n[upstream_keepalive]\nidle = 0', {}, "upstream_keepalive.idle: expected a whole number of seconds, 1-32767, got 0"),
        ('upstream = "g:1"\n[upstream_keepalive]\nidle = 1.5', {}, "upstream_keepalive.idle: expected a whole number of seconds"),
        ('upstream = "g:1"\n[upstream_keepalive]\nidle = 32768', {}, "upstream_keepalive.idle: .* 1-32767, got 32768"),
        ('upstream = "g:1"\n[upstream_keepalive]\ninterval = -1', {}, "upstream_keepalive.interval: expected a whole number of seconds, 1-32767"),
        ('upstream = "g:1"\n[upstream_keepalive]\ninterval = true', {}, "upstream_keepalive.interval: expected a whole number"),
        ('upstream = "g:1"\n[upstream_keepalive]\ncount = 128', {}, "upstream_keepalive.count: expected a whole number of probes, 1-127, got 128"),
        ('upstream = "g:1"\n[upstream_keepalive]\ncount = "3"', {}, "upstream_keepalive.count: expected a whole number of probes"),
        ('upstream = "g:1"\n[upstream_keepalive]\nenabled = "no"', {}, "upstream_keepalive.enabled: expected true or false"),
        ('upstream = "g:1"\n[upstream_keepalive]\ntime = 30', {}, "upstream_keepalive.time: unknown keepalive setting .*idle"),
    ],
)
def test_a_wrong_setting_is_named(tmp_path: Path, text: str, flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), flags)


def test_the_retry_budget_and_its_caps_are_read_per_function(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'upstream = "g:1"\n[retry]\nbudget_ratio = 0.1\nbudget_min_per_second = 2\nbudget_ttl = 30\n'
        '[functions."resize"]\nmax_held = 50\nmax_hold_time = 120\nretry_priority = "high"\n'
        '[functions."report"]\nbudget_min_per_second = inf\n[functions."convert"]\non_disconnect = "retry"\nfinal_exception = "both"\neject_after = 5\neject_for = 20\ntimeout = 120\n',
    )
    policies = load_config(path).policies
    base = RetryPolicy(budget_ratio=0.1, budget_min_per_second=2.0, budget_ttl=30.0)
    assert policies.for_function(b"other") == base
    assert policies.for_function(b"resize") == replace(base, max_held=50, max_hold_time=120.0, retry_priority=Priority.HIGH)
    assert policies.for_function(b"report").budget_min_per_second == float("inf")  # no budget
    assert policies.for_function(b"convert").on_disconnect is OnDisconnect.RETRY
    assert policies.for_function(b"convert").final_exception is FinalException.BOTH
    assert base.final_exception is FinalException.EXCEPTION
    convert = policies.for_function(b"convert")
    assert (convert.eject_after, convert.eject_for, convert.eject_for_max) == (5, 20.0, 600.0)
    assert base.eject_after == 0  # no ejection unless asked
    assert (convert.timeout, base.timeout) == (120.0, 0.0)  # none unless asked (or CAN_DO_TIMEOUT)
    assert base.on_disconnect is OnDisconnect.REQUEUE  # gearmand's own behaviour unless asked


def test_function_tables_override_the_retry_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'upstream = "g:1"\n[retry]\nmax_attempts = 3\nmode = "observe"\n'
        '[functions."resize"]\non_fail = true\nbackoff_initial = 0.5\ndead_letter = "dead.{function}"\n',
    )
    policies = load_config(path).policies
    assert policies.for_function(b"other") == RetryPolicy(max_attempts=3, mode=Mode.OBSERVE)
    assert policies.for_function(b"resize") == RetryPolicy(
        max_attempts=3, mode=Mode.OBSERVE, on_fail=True, backoff_initial=0.5, dead_letter="dead.{function}"
    )
    assert policies.for_function(b"resize").dead_letter_function(b"resize") == b"dead.resize"


def test_upstream_keepalive_notices_a_silent_gearmand_in_about_a_minute_unless_told_otherwise(tmp_path: Path) -> None:
    default = load_config(None, {"upstream": "g:1"}).upstream_keepalive
    assert default == Keepalive(enabled=True, idle=30, interval=10, count=3)
    assert default.deadline == 60
    some = load_config(write(tmp_path, 'upstream = "g:1"\n[upstream_keepalive]\nidle = 5\ncount = 127\n')).upstream_keepalive
    assert some == Keepalive(enabled=True, idle=5, interval=10, count=127)
    every = load_config(write(tmp_path, 'upstream = "g:1"\n[upstream_keepalive]\nenabled = false\nidle = 32767\n'
                                        'interval = 32767\ncount = 1\n')).upstream_keepalive
    assert every == Keepalive(enabled=False, idle=32767, interval=32767, count=1)


def test_check_config_shows_the_upstream_keepalive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", write(tmp_path, 'upstream = "g:1"\n[upstream_keepalive]\ninterval = 5\n')]) == 0
    out = capsys.readouterr().out
    assert "[upstream_keepalive]:\n  enabled = true\n  idle = 30\n  interval = 5\n  count = 3\n" in out
    assert main(["check-config", write(tmp_path, 'upstream = "g:1"\n[upstream_keepalive]\ncount = 0\n')]) == 2
    assert capsys.readouterr().err == (
        "gproxy: configuration error: upstream_keepalive.count: expected a whole number of probes, 1-127, got 0\n"
    )


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*missing.toml"):
        load_config(str(tmp_path / "missing.toml"))


def test_environment_variables_stand_in_for_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GPROXY_UPSTREAM", "g:1")
    monkeypatch.setenv("GPROXY_LISTEN", "bad")
    assert main([]) == 2  # the environment's listen was used, and named when wrong
    assert "listen: expected HOST:PORT, got 'bad'" in capsys.readouterr().err
    assert main(["--listen", "also bad"]) == 2  # a flag wins over the environment
    assert "got 'also bad'" in capsys.readouterr().err


def test_the_command_stops_with_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--upstream", "g:1", "--listen", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "gproxy: configuration error: listen: expected HOST:PORT, got 'x'\n"


def test_a_route_hashes_once_and_compares_by_its_addresses() -> None:
    from gproxy.config import Address, Route

    a = Route(Address("127.0.0.1", 4730), Address("10.0.0.5", 4730))
    b = Route(Address("127.0.0.1", 4730), Address("10.0.0.5", 4730))
    c = Route(Address("127.0.0.1", 4730), Address("10.0.0.6", 4730))
    assert a == b and hash(a) == hash(b) and a != c and {a: 1}[b] == 1
    assert "_hash" not in repr(a)
