"""The `gproxy` command: flags and config file in, a running proxy out; and the operator's
subcommands: `gproxy held` (the jobs held for a retry), `gproxy replay` (dead letters back
to their function) and `gproxy check-config FILE`."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import os
import re
import signal
import sys
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence

import trio

from . import __version__, logs, replay
from .config import LOG_FORMATS, LOG_LEVELS, Config, ConfigError, load_config, parse_address
from .control import Proxy
from .core.fields import about
from .core.held import table
from .dataplane import DataPlane, described
from .reload import ConfigSource

log = logging.getLogger("gproxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gproxy",
        description="Gearman proxy: workers connect here instead of to gearmand.",
        epilog="Also: gproxy held [--url URL] [--function F] (the jobs held for a retry); "
        "gproxy replay --server HOST:PORT --from FUNCTION (dead letters back to their function); "
        "gproxy check-config FILE.",
    )
    env = os.environ.get
    parser.add_argument("--config", metavar="FILE", default=env("GPROXY_CONFIG"), help="TOML config file [GPROXY_CONFIG]")
    parser.add_argument("--listen", metavar="HOST:PORT", default=env("GPROXY_LISTEN"), help="where workers connect (default 127.0.0.1:4730) [GPROXY_LISTEN]")
    parser.add_argument("--upstream", metavar="HOST:PORT", default=env("GPROXY_UPSTREAM"), help="the gearmand to proxy to [GPROXY_UPSTREAM]")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", default=env("GPROXY_METRICS_LISTEN"), help="where to serve /metrics, /healthz, /readyz [GPROXY_METRICS_LISTEN]")
    parser.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper, default=env("GPROXY_LOG_LEVEL"), help="default INFO [GPROXY_LOG_LEVEL]")
    parser.add_argument("--log-format", choices=LOG_FORMATS, type=str.lower, default=env("GPROXY_LOG_FORMAT"), help="text (default) or json: one object per line [GPROXY_LOG_FORMAT]")
    parser.add_argument("--version", action="version", version=f"gproxy {__version__} ({described()})")
    return parser


DEFAULT_ADMIN_URL = "http://127.0.0.1:9464"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "held":
        return held_command(argv[1:])
    if argv and argv[0] == "check-config":
        return check_config_command(argv[1:])
    if argv and argv[0] == "replay":
        return replay_command(argv[1:])
    args = build_parser().parse_args(argv)
    flags = {
        "listen": args.listen,
        "upstream": args.upstream,
        "metrics_listen": args.metrics_listen,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    source = ConfigSource(args.config, flags)
    try:
        config = load_config(args.config, flags)
    except ConfigError as exc:
        print(f"gproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_format)
    plane = DataPlane()
    try:
        plane.run_host(run_until_signalled, config, plane, source)
    except OSError as exc:
        log.error("cannot start: %s", exc, extra=about(reason=str(exc)))
        return 1
    finally:
        plane.close()
    return 0


def held_command(argv: Sequence[str]) -> int:
    """`gproxy held`: GET /held from a running gproxy, as a table."""
    parser = argparse.ArgumentParser(prog="gproxy held", description="The jobs a running gproxy holds for a retry.")
    parser.add_argument("--url", default=os.environ.get("GPROXY_ADMIN_URL", DEFAULT_ADMIN_URL),
                        help=f"gproxy's metrics listener (default {DEFAULT_ADMIN_URL}) [GPROXY_ADMIN_URL]")
    parser.add_argument("--function", help="only this function's jobs")
    parser.add_argument("--json", action="store_true", help="the endpoint's JSON as it is")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/") + "/held"
    if args.function is not None:
        url += "?" + urllib.parse.urlencode({"function": args.function})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
    except (OSError, ValueError) as exc:  # (urllib's errors are OSErrors; a bad URL a ValueError)
        print(f"gproxy held: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(body.decode())
        return 0
    try:
        view = json.loads(body)
    except ValueError:
        print(f"gproxy held: {url} did not answer with gproxy's JSON (is it gproxy's metrics listener?)", file=sys.stderr)
        return 1
    sys.stdout.write(table(view))
    return 0


def replay_command(argv: Sequence[str]) -> int:
    """`gproxy replay`: dead letters back to their function (see replay.py)."""
    parser = argparse.ArgumentParser(
        prog="gproxy replay", description="Submit dead-lettered jobs again, at a rate, at least once.",
    )
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="the gearmand that holds the dead letters")
    parser.add_argument("--from", dest="source", required=True, metavar="FUNCTION", help="the dead-letter function")
    parser.add_argument("--to", metavar="FUNCTION", help="submit to this function (default: each job's own)")
    parser.add_argument("--rate", type=float, default=10.0, help="at most this many a second (default 10)")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N dead letters")
    parser.add_argument("--dry-run", action="store_true", help="show what would be replayed; leave the queue as it is")
    args = parser.parse_args(argv)
    if not args.rate > 0 or (args.limit is not None and args.limit < 1):
        parser.error("--rate must be > 0 and --limit >= 1")
    try:
        server = parse_address(args.server, "--server", port_zero_ok=False)
    except ConfigError as exc:
        parser.error(str(exc))
    target = args.to.encode() if args.to is not None else None
    return replay.run(server, args.source.encode(), target, args.rate, args.limit, args.dry_run, sys.stdout)


def check_config_command(argv: Sequence[str]) -> int:
    """`gproxy check-config FILE`: load it as a start would; print the routes and the
    retry policy each function resolves to. Exit 2 with the same one-line error."""
    parser = argparse.ArgumentParser(prog="gproxy check-config", description="Validate a gproxy config file.")
    parser.add_argument("file")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"gproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: ok")
    for route in config.routes:
        print(f"route: listen {route.listen} -> gearmand {route.upstream}")
        tls = config.tls_of(route)
        for side, settings in (("listen_tls", tls.listen), ("upstream_tls", tls.upstream)):
            if settings is not None:  # (the files loaded: check-config has read them)
                named = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "context"}
                print(f"  {side}: " + ", ".join(f"{k} = {_toml(v)}" for k, v in named.items() if v is not None))
    if config.metrics_listen is not None:
        print(f"metrics: {config.metrics_listen} (admin POSTs {'on' if config.admin else 'off'})")
    print("[upstream_keepalive]:")
    for field in dataclasses.fields(config.upstream_keepalive):
        print(f"  {field.name} = {_toml(getattr(config.upstream_keepalive, field.name))}")
    policies = config.policies
    for name, policy in [("[retry] (every other function)", policies.default),
                         *((f'[functions."{f.decode()}"]', p) for f, p in policies.functions.items())]:
        print(f"{name}:")
        for field in dataclasses.fields(policy):
            print(f"  {field.name} = {_toml(getattr(policy, field.name))}")
    return 0


def _toml(value: object) -> str:
    """A resolved setting as it would be written in the config file."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):  # (retry_on, fatal_on: compiled patterns)
        return "[" + ", ".join(_toml(item.pattern if isinstance(item, re.Pattern) else item) for item in value) + "]"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)  # (numbers: repr(inf) is "inf", as TOML writes it)


async def run_until_signalled(
    config: Config, plane: DataPlane | None = None, source: ConfigSource | None = None
) -> None:
    """Serve until SIGINT or SIGTERM; then drain for up to the grace period (a second signal
    cuts it short), close every connection (gearmand requeues whatever is left) and return,
    so the process exits 0. SIGHUP reloads the config file (`source`). `plane`: the data
    plane hosting this trio run, if one does."""
    proxy = Proxy(config, plane=plane, source=source)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        await proxy.listen()
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            while (signum := await signals.__anext__()) == signal.SIGHUP:
                proxy.reloader.reload()
            log.info(
                "%s received: stopping (send it again to stop at once)", signal.Signals(signum).name,
                extra=about(signal=signal.Signals(signum).name),
            )
            async with trio.open_nursery() as draining:
                draining.start_soon(_cancel_on_next_signal, signals, draining.cancel_scope, proxy.reloader.reload)
                await proxy.shutdown(proxy.config.shutdown_grace_period)
                draining.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    log.info("stopped", extra=about())


async def _cancel_on_next_signal(
    signals: AsyncIterator[int], scope: trio.CancelScope, reload: Callable[[], object]
) -> None:
    """A second SIGINT or SIGTERM cuts the drain short; a SIGHUP still reloads."""
    while (signum := await signals.__anext__()) == signal.SIGHUP:
        reload()
    log.warning(
        "%s received again: stopping now", signal.Signals(signum).name,
        extra=about(signal=signal.Signals(signum).name),
    )
    scope.cancel()
