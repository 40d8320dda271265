"""The `gproxy` command: flags and config file in, a running proxy out."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import trio

from . import __version__
from .config import LOG_LEVELS, Config, ConfigError, load_config
from .dataplane import DataPlane
from .proxy import Proxy

log = logging.getLogger("gproxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gproxy",
        description="Gearman proxy: workers connect here instead of to gearmand.",
    )
    env = os.environ.get
    parser.add_argument("--config", metavar="FILE", default=env("GPROXY_CONFIG"), help="TOML config file [GPROXY_CONFIG]")
    parser.add_argument("--listen", metavar="HOST:PORT", default=env("GPROXY_LISTEN"), help="where workers connect (default 127.0.0.1:4730) [GPROXY_LISTEN]")
    parser.add_argument("--upstream", metavar="HOST:PORT", default=env("GPROXY_UPSTREAM"), help="the gearmand to proxy to [GPROXY_UPSTREAM]")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", default=env("GPROXY_METRICS_LISTEN"), help="where to serve /metrics, /healthz, /readyz [GPROXY_METRICS_LISTEN]")
    parser.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper, default=env("GPROXY_LOG_LEVEL"), help="default INFO [GPROXY_LOG_LEVEL]")
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
    plane = DataPlane()
    try:
        plane.run_host(run_until_signalled, config, plane)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        plane.close()
    return 0


async def run_until_signalled(config: Config, plane: DataPlane | None = None) -> None:
    """Serve until SIGINT or SIGTERM; then drain for up to the grace period (a second signal
    cuts it short), close every connection (gearmand requeues whatever is left) and return,
    so the process exits 0. `plane`: the data plane hosting this trio run, if one does."""
    proxy = Proxy(config, plane=plane)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await proxy.listen()
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            signum = await signals.__anext__()
            log.info("%s received: stopping (send it again to stop at once)", signal.Signals(signum).name)
            async with trio.open_nursery() as draining:
                draining.start_soon(_cancel_on_next_signal, signals, draining.cancel_scope)
                await proxy.shutdown(config.shutdown_grace_period)
                draining.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    log.info("stopped")


async def _cancel_on_next_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    signum = await signals.__anext__()
    log.warning("%s received again: stopping now", signal.Signals(signum).name)
    scope.cancel()
