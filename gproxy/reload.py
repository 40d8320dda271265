"""A changed config file, applied to a running proxy (SIGHUP, or POST /reload with admin):
what may change live does, from the next decision on; nothing is closed, nothing held is
forgotten. A file that does not load, or that changes what cannot change live, changes
nothing: one ERROR line says why, and the running config stays whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import logs
from .config import Config, ConfigError, load_config, unreloadable
from .core.fields import about
from .core.metrics import Metrics

log = logging.getLogger("gproxy.control")


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the running config came from: its file (None: flags only) and the flags, which
    win over the file at every reload as at the start."""

    path: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)


class Reloader:
    """`running`: the config in force; `apply`: puts a new one in force (Proxy.reconfigure)."""

    def __init__(
        self, source: ConfigSource, running: Callable[[], Config], apply: Callable[[Config], None], metrics: Metrics,
    ) -> None:
        self._source, self._running, self._apply, self._metrics = source, running, apply, metrics
        self._metrics.reload_successful.set(1)
        self._metrics.reload_success_time.set(time.time())

    def reload(self) -> tuple[bool, str]:
        """Re-read the file and apply it; (done, what happened) for the one asking. Never
        raises: a signal handler's caller is the process itself."""
        try:
            return self._reload()
        except Exception:  # a bug must cost the reload, never the process
            log.exception("reload: internal error; the running config stays", extra=about(path=self._source.path))
            self._metrics.reload_successful.set(0)
            return False, "reload refused: internal error (see gproxy's log); the running config stays"

    def _reload(self) -> tuple[bool, str]:
        path = self._source.path
        if path is None:
            return self._refused("no config file to read again (gproxy was started with flags only)")
        try:
            new = load_config(path, dict(self._source.overrides))
        except ConfigError as exc:
            return self._refused(f"configuration error: {exc}")
        if (key := unreloadable(self._running(), new)) is not None:
            return self._refused(f"{key} cannot change without a restart")
        self._apply(new)
        logs.reconfigure(new.log_level, new.log_format)
        self._metrics.reload_successful.set(1)
        self._metrics.reload_success_time.set(time.time())
        message = f"config reloaded from {path}"
        log.info("%s", message, extra=about(path=path))
        return True, message

    def _refused(self, why: str) -> tuple[bool, str]:
        self._metrics.reload_successful.set(0)
        message = f"reload refused: {why}; the running config stays"
        log.error("%s", message, extra=about(path=self._source.path, reason=why))
        return False, message
