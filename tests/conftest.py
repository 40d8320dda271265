"""Shared fixtures. The real gearmand fixtures are synchronous (see tests/gearmand.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.gearmand import Gearmand, PerlGearmanServer
from tests.proxy_thread import ProxyThread


@pytest.fixture(scope="session")
def gearmand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gearmand]:
    """One gearmand for the whole session: cheap, so tests only need distinct function
    names or uniques to stay independent. Do not restart it; use fresh_gearmand."""
    server = Gearmand(tmp_path_factory.mktemp("gearmand")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_gearmand(tmp_path: Path) -> Iterator[Gearmand]:
    """A private gearmand for one test, which may stop() or restart() it."""
    server = Gearmand(tmp_path / "gearmand").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def perl_gearmand(tmp_path: Path) -> Iterator[PerlGearmanServer]:
    """A private Perl job server (Gearman::Server) for one test; it has gearmand's interface
    (tests/gearmand.py) but its own semantics (see PerlGearmanServer)."""
    server = PerlGearmanServer(tmp_path / "perl-gearmand").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(gearmand: Gearmand) -> Iterator[ProxyThread]:
    """gproxy in front of the session's gearmand, in a thread, for synchronous real-peer tests."""
    with ProxyThread.to(gearmand.address) as running:
        yield running
