"""A real haproxy (2.6, Debian's) terminating TLS in front of gearmand, for tests: `bind ...
ssl crt` (and `verify required` for mutual TLS), as an operator would put one there."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.gearmand import find_free_port

HAPROXY_BIN = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin:/bin") or "haproxy"
_CONFIG = """\
global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend gearmand_tls
    bind 127.0.0.1:{port} ssl crt {crt}{verify}
    default_backend gearmand
backend gearmand
    server gearmand {upstream}
"""


class Haproxy:
    """haproxy on a free loopback port, proxying TLS to the plain gearmand at `upstream`.
    `client_ca`: every client must present a certificate it signed."""

    def __init__(self, upstream: tuple[str, int], crt: Path, client_ca: Path | None = None) -> None:
        self.upstream, self.crt, self.client_ca = upstream, crt, client_ca
        self.directory = Path(tempfile.mkdtemp(prefix="haproxy-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def __enter__(self) -> Haproxy:
        for _ in range(5):  # (a free port may be taken before haproxy binds it: try another)
            self.port = find_free_port()
            verify = f" ca-file {self.client_ca} verify required" if self.client_ca else ""
            config = self.directory / "haproxy.cfg"
            config.write_text(_CONFIG.format(
                port=self.port, crt=self.crt, verify=verify, upstream=f"{self.upstream[0]}:{self.upstream[1]}"
            ))
            log = open(self.directory / "haproxy.log", "ab")
            self.proc = subprocess.Popen([HAPROXY_BIN, "-db", "-f", str(config)], stdout=log, stderr=log)
            log.close()
            if self._listening():
                return self
            self.__exit__()
        raise RuntimeError(f"haproxy did not start: {(self.directory / 'haproxy.log').read_text()}")

    def _listening(self, timeout: float = 10.0) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                socket.create_connection(self.address, timeout=1).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
