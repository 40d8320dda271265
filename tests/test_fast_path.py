"""Which data plane runs, and how to tell: the compiled one (gproxy/_dataplane.pyx) wherever
it was built, the pure-Python one with GPROXY_NO_EXTENSIONS=1 or where it was not; `gproxy
--version` and gproxy_build_info say which. (Both pass the data plane's tests: `make test`
runs them again with GPROXY_NO_EXTENSIONS=1.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import gproxy
from gproxy import dataplane
from gproxy.config import Address, Config, Route
from gproxy.control import Proxy


def _version(**env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "gproxy", "--version"], capture_output=True, text=True, timeout=60,
        env={**os.environ, **env}, check=True,
    )
    return done.stdout.strip()


@pytest.mark.skipif(bool(os.environ.get("GPROXY_NO_EXTENSIONS")), reason="the pure path is forced")
def test_the_compiled_data_plane_is_built_and_runs_by_default() -> None:
    """make test builds it: a build that failed must not pass for a pure run unnoticed."""
    assert dataplane.fast_path() == "compiled"
    assert dataplane.DataPlane is not dataplane.DataPlanePy
    assert dataplane.DataPlane.__module__ == "gproxy._dataplane"
    assert _version() == f"gproxy {gproxy.__version__} (compiled data plane)"


def test_gproxy_no_extensions_forces_the_pure_data_plane() -> None:
    assert _version(GPROXY_NO_EXTENSIONS="1") == f"gproxy {gproxy.__version__} (pure data plane)"


async def test_gproxy_build_info_says_which_runs() -> None:
    proxy = Proxy(Config(routes=(Route(Address("127.0.0.1", 0), Address("127.0.0.1", 1)),)))
    labels = {"version": gproxy.__version__, "data_plane": dataplane.fast_path()}
    assert proxy.metrics.registry.get_sample_value("gproxy_build_info", labels) == 1
