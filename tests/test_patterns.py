"""retry_on / fatal_on: what an operator knows of a worker's failures that it cannot mark."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gproxy.config import ConfigError, load_config
from gproxy.core.policy import PATTERN_WINDOW, Reason, RetryPolicy, Verdict, classify
from gproxy.core.protocol import PacketType

P = PacketType
DEADLOCK = (
    b"SQLSTATE[40001]: Serialization failure: 1213 Deadlock found when trying to get lock; "
    b"try restarting transaction"
)
GONE_AWAY = b"MySQL server has gone away"
PATTERNED = RetryPolicy(
    retry_on=(re.compile(rb"SQLSTATE\[40001\]"), re.compile(rb"server has gone away")),
    fatal_on=(re.compile(rb"SQLSTATE\[23000\]"),),
)


def storable(text: bytes) -> bytes:
    """A Perl `die` message as Gearman::Worker sends it (Storable nfreeze of a scalar)."""
    return b"\x05\x0b\x0a" + bytes([len(text)]) + text


@pytest.mark.parametrize(
    ("payload", "verdict"),
    [
        (DEADLOCK, Verdict(Reason.PATTERN, pattern=rb"SQLSTATE\[40001\]")),
        (b"PDOException: " + GONE_AWAY, Verdict(Reason.PATTERN, pattern=rb"server has gone away")),
        (storable(b"DBD::mysql::st execute failed: " + GONE_AWAY + b" at worker.pl line 9.\n"),
         Verdict(Reason.PATTERN, pattern=rb"server has gone away")),
        (b"SQLSTATE[23000]: Integrity constraint violation", None),  # fatal_on
        (b"SQLSTATE[23000] after " + DEADLOCK, None),  # fatal_on wins over retry_on
        (b"RETRY: SQLSTATE[23000] duplicate", None),  # and over the worker's marker
        (b"RETRY: plain", Verdict(Reason.EXCEPTION)),  # the marker, as ever
        (b"FATAL: " + DEADLOCK, None),  # the fatal marker wins over retry_on
        (b"Division by zero", None),  # neither marked nor matched: forwarded
    ],
)
def test_patterns_classify_what_the_worker_did_not_mark(payload: bytes, verdict: Verdict | None) -> None:
    assert classify(PATTERNED, P.WORK_EXCEPTION, payload) == verdict


def test_patterns_see_only_the_start_of_the_text() -> None:
    """A 64 MiB payload costs a pattern what its first PATTERN_WINDOW bytes cost."""
    late = b"x" * PATTERN_WINDOW + DEADLOCK
    early = b"x" * (PATTERN_WINDOW - len(DEADLOCK)) + DEADLOCK
    assert classify(PATTERNED, P.WORK_EXCEPTION, late) is None
    assert classify(PATTERNED, P.WORK_EXCEPTION, early) == Verdict(Reason.PATTERN, pattern=rb"SQLSTATE\[40001\]")


def test_a_work_fail_has_no_text_to_match() -> None:
    assert classify(PATTERNED, P.WORK_FAIL, b"") is None


def test_a_pattern_verdict_names_its_pattern_in_the_log_line() -> None:
    assert Verdict(Reason.PATTERN, pattern=rb"SQLSTATE\[40001\]").why == r'pattern "SQLSTATE\[40001\]"'
    assert Verdict(Reason.EXCEPTION).why == "exception"


@given(st.binary(max_size=200))
def test_without_patterns_nothing_changes(payload: bytes) -> None:
    plain = RetryPolicy()
    assert classify(plain, P.WORK_EXCEPTION, payload) == classify(
        RetryPolicy(retry_on=(), fatal_on=()), P.WORK_EXCEPTION, payload
    )
    if classify(PATTERNED, P.WORK_EXCEPTION, payload) is not None and not payload.startswith(b"RETRY"):
        assert re.search(rb"SQLSTATE\[40001\]|server has gone away", payload[:PATTERN_WINDOW])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gproxy.toml"
    path.write_text(text)
    return path


def test_patterns_are_read_per_function_and_compiled_once(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, (
        'upstream = "g:1"\n[retry]\nretry_on = ["Lock wait timeout exceeded"]\n'
        '[functions."billing"]\nretry_on = ["SQLSTATE\\\\[40001\\\\]", "Deadlock found"]\nfatal_on = ["SQLSTATE\\\\[23"]\n'
    )), {})
    default, billing = config.policies.default, config.policies.for_function(b"billing")
    assert [p.pattern for p in default.retry_on] == [b"Lock wait timeout exceeded"] and default.fatal_on == ()
    assert [p.pattern for p in billing.retry_on] == [rb"SQLSTATE\[40001\]", b"Deadlock found"]
    assert classify(billing, P.WORK_EXCEPTION, DEADLOCK) == Verdict(Reason.PATTERN, pattern=rb"SQLSTATE\[40001\]")
    assert classify(billing, P.WORK_EXCEPTION, b"SQLSTATE[23000]: Deadlock found") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"Deadlock"', r"retry\.retry_on: expected a list of non-empty strings \(regular expressions\), got 'Deadlock'"),
        ('[""]', r"retry\.retry_on: expected a list of non-empty strings"),
        ("[3]", r"retry\.retry_on: expected a list of non-empty strings"),
        ('["SQLSTATE[40001"]', r"retry\.retry_on: 'SQLSTATE\[40001' is not a regular expression: unterminated character set at position 8"),
    ],
)
def test_a_bad_pattern_is_one_configuration_error(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, f'upstream = "g:1"\n[retry]\nretry_on = {value}\n'), {})


def test_check_config_names_a_bad_pattern_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'upstream = "g:1"\n[functions."x"]\nfatal_on = ["(unclosed"]\n')
    checked = subprocess.run([sys.executable, "-m", "gproxy", "check-config", str(path)],
                             capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode != 0
    lines = checked.stderr.strip().splitlines()
    assert len(lines) == 1 and "functions.\"x\".fatal_on: '(unclosed' is not a regular expression" in lines[0], lines


def test_check_config_shows_the_patterns_as_they_are_written(tmp_path: Path) -> None:
    path = write(tmp_path, 'upstream = "g:1"\n[functions."billing"]\nretry_on = ["SQLSTATE\\\\[40001\\\\]", "Deadlock"]\n')
    checked = subprocess.run([sys.executable, "-m", "gproxy", "check-config", str(path)],
                             capture_output=True, text=True, timeout=30, check=True)
    lines = checked.stdout.splitlines()
    billing = lines.index('[functions."billing"]:')
    assert '  retry_on = ["SQLSTATE\\\\[40001\\\\]", "Deadlock"]' in lines[billing:]
    assert "  fatal_on = []" in lines[billing:]


def test_the_readme_example_is_a_config_that_does_what_it_says(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Workers you cannot change", 1)[1]
    block = section.split('    [functions."billing"]', 1)[1].split("\n\n", 1)[0]
    example = '[functions."billing"]' + "\n".join(line.removeprefix("    ") for line in block.splitlines())
    billing = load_config(write(tmp_path, f'upstream = "g:1"\n{example}\n'), {}).policies.for_function(b"billing")
    assert classify(billing, P.WORK_EXCEPTION, b"PDOException: " + DEADLOCK) == Verdict(
        Reason.PATTERN, pattern=rb"SQLSTATE\[40001\]"
    )
    assert classify(billing, P.WORK_EXCEPTION, b"mysqli_sql_exception: MySQL " + GONE_AWAY) is not None
    assert classify(billing, P.WORK_EXCEPTION, b"SQLSTATE[23000]: Duplicate entry") is None
