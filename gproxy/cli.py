"""The `gproxy` command: flags and config file in, a running proxy out."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .config import LOG_LEVELS, ConfigError, load_config
from .proxy import serve

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
        trio.run(serve, config)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.info("interrupted, exiting")
    return 0
