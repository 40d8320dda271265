"""gproxy.core is the sans-IO core: bytes and events in, decisions out. None of its modules
may reach for I/O or a clock of its own; the shell (gproxy/*.py) passes `now` in."""

import ast
import pathlib

import pytest

CORE = pathlib.Path(__file__).parent.parent / "gproxy" / "core"
FORBIDDEN = {
    "trio", "socket", "select", "selectors", "asyncio", "threading", "subprocess", "signal",
    "time", "datetime", "os", "urllib", "http",
}
"""I/O, concurrency and clocks: what only the shell may use."""
OUTSIDE_CORE = {"config"}
"""gproxy modules outside the core that it may name: the configuration's plain types."""


def _imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """(module, level) of every import in `path`, at any depth (TYPE_CHECKING ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


MODULES = sorted(CORE.glob("*.py"))


def test_the_core_has_its_modules() -> None:
    names = {path.stem for path in MODULES}
    assert {"protocol", "session", "retry", "submitter", "reconnect"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.stem)
def test_a_core_module_imports_no_io_and_no_clock(path: pathlib.Path) -> None:
    for module, level in _imports(path):
        top = module.split(".")[0]
        if level == 0:
            assert top not in FORBIDDEN, f"{path.name} imports {module}"
            assert top != "gproxy", f"{path.name} imports {module}: the core names its peers relatively"
        elif level == 2:  # gproxy.<module>: the shell
            assert top in OUTSIDE_CORE, f"{path.name} imports the shell's {module}"
        else:
            assert level == 1, f"{path.name}: a relative import beyond gproxy"


def test_the_check_sees_a_forbidden_import(tmp_path: pathlib.Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trio\nfrom ..pair import Pair\n")
    assert ("trio", 0) in _imports(sneaky)
    assert ("pair", 2) in _imports(sneaky)
