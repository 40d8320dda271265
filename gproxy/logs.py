"""gproxy's log lines, as text (the default) or as one JSON object per line.

Every line names what it is about in its text; the same values travel with the record as
`fields` (see `core.fields`), so a JSON line carries them as fields of its own: a log
store filters on `function` or `peer` without parsing the message.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any, Final

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """time (RFC 3339, UTC, microseconds), level, logger, message, the line's fields, and a
    traceback as one field."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update((key, value) for key, value in fields.items() if key not in line)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """gproxy's own handler on the root logger: a reload changes it, and only it."""


def configure(level: str, log_format: str) -> None:
    """gproxy's lines to stderr at `level`, in `log_format` ("text" or "json"): the
    command's, at its start."""
    root = logging.getLogger()
    if _ours(root) is None:
        root.addHandler(_Stderr())
    reconfigure(level, log_format)


def reconfigure(level: str, log_format: str) -> None:
    """A reload: gproxy's handler takes the new format, the root logger the new level. In a
    process whose logging gproxy did not set up (a proxy run as a library, the tests'),
    nothing changes: its logging is its owner's."""
    root = logging.getLogger()
    if (handler := _ours(root)) is None:
        return
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root.setLevel(level)


def _ours(root: logging.Logger) -> logging.Handler | None:
    return next((h for h in root.handlers if isinstance(h, _Stderr)), None)
