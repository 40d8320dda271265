"""Settings from a TOML file and command-line flags, checked once at start.

Every mistake is reported as one ConfigError naming the key, so gproxy stops before it
listens rather than misbehaving later.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final

from .core.metrics import DEFAULT_MAX_FUNCTIONS
from .core.policy import FinalException, Mode, OnDisconnect, Policies, Priority, RetryPolicy
from .core.protocol import DEFAULT_MAX_PACKET_SIZE
from .tls import PLAIN, CertificateError, ListenTls, RouteTls, UpstreamTls, client_context, server_context

DEFAULT_LISTEN = "127.0.0.1:4730"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
_TOP_LEVEL_KEYS = {
    "listen", "upstream", "metrics_listen", "metrics_max_functions", "max_packet_size",
    "log_level", "log_format", "routes", "retry", "functions", "shutdown_grace_period", "admin",
    "upstream_keepalive", "listen_tls", "upstream_tls",
}
DEFAULT_SHUTDOWN_GRACE_PERIOD = 25.0
_ROUTE_KEYS = {"listen", "upstream", "listen_tls", "upstream_tls"}
_LISTEN_TLS_KEYS = ("cert", "key", "client_ca")
_UPSTREAM_TLS_KEYS = ("ca", "cert", "key", "server_name")


class ConfigError(Exception):
    """A missing or wrong setting; the message names the key."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def host_port(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class Route:
    """Workers that connect to `listen` are proxied to the gearmand at `upstream`."""

    listen: Address
    upstream: Address
    _hash: int = field(init=False, repr=False, compare=False)
    """A route keys the Retrier's tables on every job: hashed once, not on every lookup."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.listen, self.upstream)))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, slots=True)
class Keepalive:
    """TCP keepalive on every connection to gearmand: a gearmand whose host vanished without
    a word (power lost, a network partition: no FIN, no RST) is noticed after about
    `idle + interval * count` seconds of silence, and its connections end as any broken one.
    Whole seconds, as the kernel takes them."""

    enabled: bool = True
    idle: int = 30
    """Seconds without traffic before the first probe."""
    interval: int = 10
    """Seconds between unanswered probes."""
    count: int = 3
    """Unanswered probes after which the connection is dead."""

    @property
    def deadline(self) -> int:
        """Seconds of silence after which the connection is given up."""
        return self.idle + self.interval * self.count


_KEEPALIVE_LIMITS = {"idle": 32767, "interval": 32767, "count": 127}
"""The kernel's largest TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT."""


@dataclass(frozen=True, slots=True)
class Config:
    routes: tuple[Route, ...]
    metrics_listen: Address | None = None
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    log_level: str = "INFO"
    log_format: str = "text"
    """"json": one object per line, the fields of each line as fields (gproxy.logs)."""
    policies: Policies = field(default_factory=Policies)
    metrics_max_functions: int = DEFAULT_MAX_FUNCTIONS
    shutdown_grace_period: float = DEFAULT_SHUTDOWN_GRACE_PERIOD
    admin: bool = False
    """The metrics listener also takes the POSTs that steer held retries (unauthenticated)."""
    upstream_keepalive: Keepalive = Keepalive()
    tls: dict[Route, RouteTls] = field(default_factory=dict)
    """The routes that speak TLS on either side, and how (their certificates loaded)."""

    def tls_of(self, route: Route) -> RouteTls:
        return self.tls.get(route, PLAIN)


LIVE: Final = frozenset({"policies", "log_level", "log_format", "shutdown_grace_period", "tls"})
"""What a reload changes in a running gproxy (the retry keys are `policies`; `tls` applies
to the next handshakes): the rest is bound to sockets, listeners or label sets made at start."""
_KEYS_OF: Final = {"policies": "retry or functions", "routes": "listen, upstream or routes"}


def unreloadable(running: Config, new: Config) -> str | None:
    """The first setting that differs between `running` and `new` and cannot change without
    a restart (as the config file names it), or None."""
    for setting in fields(Config):
        if setting.name not in LIVE and getattr(running, setting.name) != getattr(new, setting.name):
            return _KEYS_OF.get(setting.name, setting.name)
    return None


def parse_address(value: Any, key: str, *, port_zero_ok: bool) -> Address:
    """`HOST:PORT` or `[IPV6]:PORT`; port 0 (any free port) only where we listen."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string HOST:PORT, got {value!r}")
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if port > 65535 or (port == 0 and not port_zero_ok):
        raise ConfigError(f"{key}: port must be 1-65535{' (or 0)' if port_zero_ok else ''}, got {port}")
    return Address(host, port)


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read `path` (if any), apply `overrides` (flags, None = not given), validate everything."""
    settings: dict[str, Any] = {}
    if path is not None:
        settings = _read_toml(path)
    for key, value in (overrides or {}).items():
        if value is not None:
            settings[key] = value
    unknown = sorted(set(settings) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} (known: {', '.join(sorted(_TOP_LEVEL_KEYS))})")
    routes, tls = _routes(settings, os.path.dirname(os.path.abspath(path)) if path is not None else os.getcwd())
    return Config(
        routes=routes,
        tls=tls,
        metrics_listen=(
            parse_address(settings["metrics_listen"], "metrics_listen", port_zero_ok=True)
            if settings.get("metrics_listen")
            else None
        ),
        max_packet_size=_max_packet_size(settings.get("max_packet_size", DEFAULT_MAX_PACKET_SIZE)),
        log_level=_log_level(settings.get("log_level", "INFO")),
        log_format=_log_format(settings.get("log_format", "text")),
        policies=_policies(settings.get("retry", {}), settings.get("functions", {})),
        metrics_max_functions=_whole(
            settings.get("metrics_max_functions", DEFAULT_MAX_FUNCTIONS), "metrics_max_functions", 1
        ),
        shutdown_grace_period=_seconds(
            settings.get("shutdown_grace_period", DEFAULT_SHUTDOWN_GRACE_PERIOD), "shutdown_grace_period"
        ),
        admin=_flag(settings.get("admin", False), "admin"),
        upstream_keepalive=_keepalive(settings.get("upstream_keepalive", {})),
    )


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _seconds(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{key}: expected a number of seconds >= 0, got {value!r}")
    return float(value)


def _whole(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected a whole number >= {minimum}, got {value!r}")
    return value


def _keepalive(table: Any) -> Keepalive:
    if not isinstance(table, dict):
        raise ConfigError("upstream_keepalive: expected a table [upstream_keepalive]")
    known = [f.name for f in fields(Keepalive)]
    changes: dict[str, Any] = {}
    for key, value in table.items():
        name = f"upstream_keepalive.{key}"
        if key == "enabled":
            changes[key] = _flag(value, name)
        elif key in _KEEPALIVE_LIMITS:
            most = _KEEPALIVE_LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                what = "probes" if key == "count" else "seconds"
                raise ConfigError(f"{name}: expected a whole number of {what}, 1-{most}, got {value!r}")
            changes[key] = value
        else:
            raise ConfigError(f"{name}: unknown keepalive setting (known: {', '.join(known)})")
    return Keepalive(**changes)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _routes(settings: dict[str, Any], base: str) -> tuple[tuple[Route, ...], dict[Route, RouteTls]]:
    """The routes, and the TLS of those that have any (files relative to `base`)."""
    if "routes" not in settings:
        if "upstream" not in settings:
            raise ConfigError("upstream: required (the gearmand to proxy to, HOST:PORT)")
        route = _route(settings, "", default_listen=DEFAULT_LISTEN)
        return (route,), _tls_by_route([(route, _route_tls(settings, "", route, base))])
    for key in ("listen", "upstream", "listen_tls", "upstream_tls"):
        if key in settings:
            raise ConfigError(
                f"{key}: cannot be combined with [[routes]]; give each route its own {key}"
            )
    tables = settings["routes"]
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("routes: expected one or more [[routes]] tables")
    routes = tuple(_route(table, f"routes[{i}].") for i, table in enumerate(tables))
    seen: set[Address] = set()
    for i, route in enumerate(routes):
        if route.listen in seen and route.listen.port != 0:
            raise ConfigError(f"routes[{i}].listen: {route.listen} is already used by another route")
        seen.add(route.listen)
    return routes, _tls_by_route(
        [(route, _route_tls(table, f"routes[{i}].", route, base)) for i, (route, table) in enumerate(zip(routes, tables, strict=True))]
    )


def _tls_by_route(pairs: list[tuple[Route, RouteTls]]) -> dict[Route, RouteTls]:
    return {route: tls for route, tls in pairs if tls != PLAIN}


def _route_tls(table: dict[str, Any], prefix: str, route: Route, base: str) -> RouteTls:
    listen, upstream = table.get("listen_tls"), table.get("upstream_tls")
    listen_name, upstream_name = f"{prefix}listen_tls", f"{prefix}upstream_tls"
    return RouteTls(
        listen=None if listen is None else _listen_tls(_tls_table(listen, listen_name, _LISTEN_TLS_KEYS, base), listen_name),
        upstream=(
            None if upstream is None
            else _upstream_tls(_tls_table(upstream, upstream_name, _UPSTREAM_TLS_KEYS, base), upstream_name, route)
        ),
    )


def _tls_table(value: Any, name: str, known: tuple[str, ...], base: str) -> dict[str, str]:
    """Its settings, every one a non-empty string; file paths made absolute."""
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a table with {', '.join(known)}")
    settings = {}
    for key, setting in value.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown TLS setting (known: {', '.join(known)})")
        if not isinstance(setting, str) or not setting:
            raise ConfigError(f"{name}.{key}: expected a non-empty string, got {setting!r}")
        settings[key] = setting if key == "server_name" else os.path.join(base, setting)
    if "key" in settings and "cert" not in settings:
        raise ConfigError(f"{name}.key: given without cert (the certificate the key belongs to)")
    return settings


def _listen_tls(settings: dict[str, str], name: str) -> ListenTls:
    if "cert" not in settings:
        raise ConfigError(f"{name}.cert: required (gproxy's certificate for workers, PEM)")
    cert, key, client_ca = settings["cert"], settings.get("key"), settings.get("client_ca")
    try:
        context = server_context(cert, key, client_ca)
    except CertificateError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return ListenTls(cert=cert, key=key, client_ca=client_ca, context=context)


def _upstream_tls(settings: dict[str, str], name: str, route: Route) -> UpstreamTls:
    ca, cert, key = settings.get("ca"), settings.get("cert"), settings.get("key")
    try:
        context = client_context(ca, cert, key)
    except CertificateError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    server_name = settings.get("server_name", route.upstream.host)
    return UpstreamTls(server_name=server_name, ca=ca, cert=cert, key=key, context=context)


def _route(table: dict[str, Any], prefix: str, default_listen: str | None = None) -> Route:
    if prefix:
        unknown = sorted(set(table) - _ROUTE_KEYS)
        if unknown:
            raise ConfigError(f"{prefix}{unknown[0]}: unknown route setting (known: {', '.join(sorted(_ROUTE_KEYS))})")
    for key in ("listen", "upstream"):
        if key not in table and not (key == "listen" and default_listen):
            raise ConfigError(f"{prefix}{key}: required")
    return Route(
        listen=parse_address(table.get("listen", default_listen), f"{prefix}listen", port_zero_ok=True),
        upstream=parse_address(table["upstream"], f"{prefix}upstream", port_zero_ok=False),
    )


def _max_packet_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
        raise ConfigError(f"max_packet_size: expected a whole number of bytes >= 1024, got {value!r}")
    if value > 0xFFFFFFFF:
        raise ConfigError(f"max_packet_size: at most {0xFFFFFFFF} (the protocol's size field)")
    return value


def _log_format(value: Any) -> str:
    if value not in LOG_FORMATS:
        raise ConfigError(f"log_format: expected \"text\" or \"json\", got {value!r}")
    return str(value)


def _log_level(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.upper()


def _policies(retry: Any, functions: Any) -> Policies:
    default = _policy(retry, RetryPolicy(), "retry")
    if not isinstance(functions, dict):
        raise ConfigError('functions: expected tables like [functions."NAME"]')
    return Policies(
        default,
        {
            name.encode(): _policy(table, default, f'functions."{name}"')
            for name, table in functions.items()
        },
    )


_POLICY_KEYS = [f.name for f in fields(RetryPolicy)]
_RETIRED_POLICY_KEYS = {
    "budget_min": (
        "no longer exists: the retry budget is now a rate that defers retries instead of "
        "failing them. Use budget_min_per_second (retries per second always allowed) and "
        "budget_ttl (the window); budget_ratio now means retries allowed per first attempt. "
        "See the README, 'Retry budget'"
    ),
}
"""Keys of earlier releases whose meaning changed: refused with what to write instead."""


def _policy(table: Any, base: RetryPolicy, prefix: str) -> RetryPolicy:
    """`base` with the keys of `table` applied, each checked."""
    if not isinstance(table, dict):
        raise ConfigError(f"{prefix}: expected a table")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key in _RETIRED_POLICY_KEYS:
            raise ConfigError(f"{prefix}.{key}: {_RETIRED_POLICY_KEYS[key]}")
        if key not in _POLICY_KEYS:
            raise ConfigError(f"{prefix}.{key}: unknown retry setting (known: {', '.join(_POLICY_KEYS)})")
        changes[key] = _policy_value(key, value, f"{prefix}.{key}")
    return replace(base, **changes)


def patterns(value: Any, name: str) -> tuple[re.Pattern[bytes], ...]:
    """A list of regular expressions (Python's syntax, matched against bytes), compiled once."""
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ConfigError(f"{name}: expected a list of non-empty strings (regular expressions), got {value!r}")
    compiled = []
    for item in value:
        try:
            compiled.append(re.compile(item.encode()))
        except re.error as exc:
            raise ConfigError(f"{name}: {item!r} is not a regular expression: {exc}") from None
    return tuple(compiled)


def _policy_value(key: str, value: Any, name: str) -> Any:
    def number(minimum: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise ConfigError(f"{name}: expected a number >= {minimum:g}, got {value!r}")
        return float(value)

    def whole(minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
        return value

    def positive() -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{name}: expected a number > 0, got {value!r}")
        return float(value)

    def text(allow_empty: bool) -> str:
        if not isinstance(value, str) or not (value or allow_empty):
            raise ConfigError(f"{name}: expected a {'' if allow_empty else 'non-empty '}string, got {value!r}")
        return value

    match key:
        case "retry_on" | "fatal_on":
            return patterns(value, name)
        case "exception_marker":
            return text(allow_empty=False).encode()
        case "fatal_marker":
            return text(allow_empty=True).encode()
        case "on_fail" | "jitter":
            if not isinstance(value, bool):
                raise ConfigError(f"{name}: expected true or false, got {value!r}")
            return value
        case "max_attempts":
            return whole(1)
        case "timeout":
            return number(0)
        case "eject_after":
            return whole(0)
        case "eject_for" | "eject_for_max":
            return positive()
        case "backoff_initial" | "backoff_max" | "budget_ratio":
            return number(0)
        case "budget_ttl" | "max_hold_time":
            return positive()
        case "budget_min_per_second":
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
                raise ConfigError(
                    f"{name}: must be > 0: with no floor, a function whose first attempts stop "
                    "gets no retries at all, and its held jobs fail when max_hold_time runs out"
                )
            return positive()
        case "backoff_multiplier":
            return number(1)
        case "max_held":
            return whole(1)
        case "retry_priority":
            if value not in ("normal", "high", "low"):
                raise ConfigError(f"{name}: expected \"normal\", \"high\" or \"low\", got {value!r}")
            return Priority(value)
        case "dead_letter":
            return text(allow_empty=True)
        case "final_exception":
            if value not in ("exception", "fail", "both"):
                raise ConfigError(f"{name}: expected \"exception\", \"fail\" or \"both\", got {value!r}")
            return FinalException(value)
        case "on_disconnect":
            if value not in ("requeue", "retry"):
                raise ConfigError(f"{name}: expected \"requeue\" or \"retry\", got {value!r}")
            return OnDisconnect(value)
        case "mode":
            if value not in ("enforce", "observe"):
                raise ConfigError(f"{name}: expected \"enforce\" or \"observe\", got {value!r}")
            return Mode(value)
    raise AssertionError(key)
