"""The package people install: `python -m build` makes an sdist and a wheel that `twine
check` accepts, with complete metadata and nothing of the tests in the wheel."""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import gproxy

ROOT = Path(__file__).resolve().parent.parent


def test_the_sdist_and_wheel_build_and_pass_twine_check(tmp_path: Path) -> None:
    # --no-isolation: the pinned setuptools of the test environment, no network needed. The
    # default build, even where the tests run on the pure data plane (make test-pure).
    default = {name: value for name, value in os.environ.items() if name != "GPROXY_NO_EXTENSIONS"}
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=300, env=default)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    version = gproxy.__version__
    (wheel,) = tmp_path.glob(f"gproxy-{version}-cp3*-linux_*.whl")  # (the compiled fast path: a platform wheel)
    sdist = tmp_path / f"gproxy-{version}.tar.gz"
    assert sdist.exists(), sorted(p.name for p in tmp_path.iterdir())
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and checked.stdout.count("PASSED") == 2, checked.stdout + checked.stderr

    with zipfile.ZipFile(wheel) as files:
        names = files.namelist()
        metadata = email.parser.Parser().parsestr(files.read(f"gproxy-{version}.dist-info/METADATA").decode())
        entry_points = files.read(f"gproxy-{version}.dist-info/entry_points.txt").decode()
    assert {"gproxy/cli.py", "gproxy/core/held.py", "gproxy/core/session.py", "gproxy/py.typed"} <= set(names)
    assert [name for name in names if name.startswith("gproxy/_dataplane") and name.endswith(".so")]
    assert "gproxy/dataplane.py" in names  # (the pure one beside it)
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
    assert {"LICENSE", "README.md", "pyproject.toml", "setup.py", "_dataplane.pyx"} <= members


def test_a_wheel_built_without_a_compiler_runs_the_pure_data_plane(tmp_path: Path) -> None:
    """No C compiler (CC=false): the extension is optional, the build goes on, gproxy works.
    (The wheel is built from the sdist, as pip builds one: an extension a build of the
    checkout left in its build/ would otherwise be packed without being compiled.)"""
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CC": "false"},
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = tmp_path.glob("gproxy-*.whl")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as files:
        assert not [name for name in files.namelist() if name.endswith(".so")]
        files.extractall(unpacked)
    # (Without the editable install's finder, which would find the checkout's extension.)
    probe = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
        "from gproxy.dataplane import fast_path; print(fast_path())"
    )
    ran = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(unpacked)}, cwd=tmp_path,
    )
    assert ran.stdout.strip() == "pure", ran.stdout + ran.stderr


def test_a_checked_build_makes_its_own_c_file_whatever_was_built_before(tmp_path: Path) -> None:
    """GPROXY_CHECKED_BUILD=1 (the fuzz tier's build) turns Cython's checks on in the C it
    generates: a C file left by an unchecked build must not be compiled again as it is, nor
    the other way round. (CC=false: only the C file is made, the compile fails and the
    extension is optional.)"""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "gproxy", source / "gproxy", ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))

    def generated(checked: bool) -> bytes:
        env = {name: value for name, value in os.environ.items() if name != "GPROXY_CHECKED_BUILD"}
        env["CC"] = "false"
        if checked:
            env["GPROXY_CHECKED_BUILD"] = "1"
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                       cwd=source, env=env, capture_output=True, timeout=300)
        return (source / "gproxy" / "_dataplane.c").read_bytes()

    unchecked = generated(checked=False)
    checked = generated(checked=True)
    assert checked != unchecked
    assert generated(checked=False) == unchecked


def test_the_changelog_starts_with_this_release() -> None:
    first = next(line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## "))
    assert first.startswith(f"## {gproxy.__version__} ")
