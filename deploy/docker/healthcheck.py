#!/usr/bin/env python3
"""The container image's HEALTHCHECK: GET /healthz on gproxy's metrics address.

The address is found the way gproxy itself finds it: its flags (read from the command line
of the running gproxy, PID 1 in the container, or the PID given as the only argument), then
the GPROXY_* environment variables, then the config file (GPROXY_CONFIG or --config). So a
config mounted at /etc/gproxy/gproxy.toml, `-e GPROXY_METRICS_LISTEN=...` and
`docker run IMAGE --metrics-listen ...` all work without repeating the port here.

Exit status 0: healthy; 1: unhealthy (not answering, or no metrics address configured:
/healthz is served only with metrics_listen set).
"""

from __future__ import annotations

import os
import sys
import tomllib
import urllib.request

from gproxy.cli import build_parser
from gproxy.config import ConfigError, parse_address

TIMEOUT = 3.0


def gproxy_argv(pid: str) -> list[str]:
    """The arguments gproxy was started with (after the `gproxy` script), or [] if that
    process is not gproxy or cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [arg.decode(errors="replace") for arg in f.read().split(b"\0")[:-1]]
    except OSError:
        return []
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "gproxy":
            return argv[i + 1 :]
    return []


def healthz_url(pid: str) -> str:
    """Where gproxy serves /healthz: --metrics-listen, else GPROXY_METRICS_LISTEN (both read
    by gproxy's own parser), else metrics_listen in the config file."""
    args, _ = build_parser().parse_known_args(gproxy_argv(pid))
    value = args.metrics_listen
    if value is None and args.config:
        try:
            with open(args.config, "rb") as f:
                value = tomllib.load(f).get("metrics_listen")
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {args.config}: {exc}") from exc
    if not value:
        raise ConfigError("metrics_listen is not set, so gproxy serves no /healthz")
    address = parse_address(value, "metrics_listen", port_zero_ok=False)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{address.port}/healthz"


def main(argv: list[str]) -> int:
    pid = argv[1] if len(argv) > 1 else "1"
    try:
        url = healthz_url(pid)
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            status = response.status
    except OSError as exc:  # URLError, HTTPError (non-2xx), timeouts
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"healthy: {url}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
