"""The package people install: `python -m build` makes an sdist and a wheel that `twine
check` accepts, with complete metadata and nothing of the tests in the wheel."""

from __future__ import annotations

import email.parser
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import gproxy

ROOT = Path(__file__).resolve().parent.parent


def test_the_sdist_and_wheel_build_and_pass_twine_check(tmp_path: Path) -> None:
    # --no-isolation: the pinned setuptools of the test environment, no network needed.
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    version = gproxy.__version__
    wheel, sdist = tmp_path / f"gproxy-{version}-py3-none-any.whl", tmp_path / f"gproxy-{version}.tar.gz"
    assert wheel.exists() and sdist.exists(), sorted(p.name for p in tmp_path.iterdir())
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and checked.stdout.count("PASSED") == 2, checked.stdout + checked.stderr

    with zipfile.ZipFile(wheel) as files:
        names = files.namelist()
        metadata = email.parser.Parser().parsestr(files.read(f"gproxy-{version}.dist-info/METADATA").decode())
        entry_points = files.read(f"gproxy-{version}.dist-info/entry_points.txt").decode()
    assert {"gproxy/cli.py", "gproxy/core/held.py", "gproxy/core/session.py", "gproxy/py.typed"} <= set(names)
    assert not [name for name in names if name.startswith(("tests/", "bench/"))]
    assert f"gproxy-{version}.dist-info/licenses/LICENSE" in names
    assert metadata["Name"] == "gproxy" and metadata["Version"] == version
    assert metadata["License-Expression"] == "MIT" and metadata["Requires-Python"] == ">=3.11"
    assert "gearman" in metadata["Keywords"] and metadata["Summary"]
    assert "Programming Language :: Python :: 3.11" in metadata.get_all("Classifier")
    assert {req.split(">")[0].split("<")[0] for req in metadata.get_all("Requires-Dist") if "extra ==" not in req} == {
        "trio", "construct", "prometheus-client"
    }
    assert "gproxy = gproxy.cli:main" in entry_points
    with tarfile.open(sdist) as archive:
        members = {Path(name).name for name in archive.getnames()}
    assert {"LICENSE", "README.md", "pyproject.toml"} <= members


def test_the_changelog_starts_with_this_release() -> None:
    first = next(line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## "))
    assert first.startswith(f"## {gproxy.__version__} ")
