"""The `gproxy` command: flags and config file in, a running proxy out."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .config import LOG_LEVELS, Config, ConfigError, load_config
from .proxy import Proxy

log = logging.getLogger("gproxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gproxy",
        description="Gearman proxy: workers connect here instead of to gearmand.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument("--listen", metavar="HOST:PORT", help="where workers connect (default 127.0.0.1:4730)")
    parser.add_argument("--upstream", metavar="HOST:PORT", help="the gearmand to proxy to")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", help="where to serve metrics")
    parser.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper, help="default INFO")
    parser.add_argument("--version", action="version", version=f"gproxy {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(
            args.config,
            {
                "listen": args.listen,
                "upstream": args.upstream,
                "metrics_listen": args.metrics_listen,
                "log_level": args.log_level,
            },
        )
    except ConfigError as exc:
        print(f"gproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        trio.run(run_until_signalled, config)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


async def run_until_signalled(config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then close every connection (gearmand requeues what
    the workers held) and return, so the process exits 0."""
    proxy = Proxy(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await proxy.listen()
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            async for signum in signals:
                log.info("%s received, stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
