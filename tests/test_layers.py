"""Imports only point down (docs/architecture.md).

    stationctl/  the command line: imports agent/ and tools/; nothing imports it
    tools/       flashing, rigs, fleet: may import agent/'s public API
    agent/       the ledger service: imports neither tools/ nor stationctl/
    firmware/    MicroPython: imports only itself and MicroPython's own modules

Every import statement is read with ast, those inside functions included, so a lazy
import cannot hide an arrow that points up."""

from __future__ import annotations

import ast
import pathlib

import pytest

from tests.helpers import ROOT

HOST_PACKAGES = {"agent", "tools", "stationctl", "tests", "hil_tests", "bench"}
FORBIDDEN = {
    "agent": {"tools", "stationctl", "tests", "hil_tests", "bench"},
    "tools": {"stationctl", "tests", "hil_tests", "bench"},
}
# what the firmware may import besides its own modules: MicroPython's built-in and
# frozen modules on the ESP32 and the unix port (typing only inside try, for annotations)
MICROPYTHON = {
    "array", "asyncio", "binascii", "collections", "errno", "esp", "esp32", "gc", "hashlib",
    "io", "json", "machine", "micropython", "network", "ntptime", "os", "random", "re",
    "select", "socket", "ssl", "struct", "sys", "termios", "time", "tty", "typing",
    "uasyncio", "vfs",
}  # fmt: skip


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def files(package: str) -> list[pathlib.Path]:
    found = sorted((ROOT / package).rglob("*.py"))
    assert found, package
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_host_layers_import_only_downwards(package: str) -> None:
    up = [
        f"{f.relative_to(ROOT)}:{line} imports {mod}"
        for f in files(package)
        for line, mod in imports(f)
        if mod in FORBIDDEN[package]
    ]
    assert not up, "\n".join(up)


def test_nothing_imports_the_command_line() -> None:
    up = [
        f"{f.relative_to(ROOT)}:{line}"
        for package in ("agent", "tools", "firmware")
        for f in files(package)
        for line, mod in imports(f)
        if mod == "stationctl"
    ]
    assert not up, "\n".join(up)


def test_firmware_imports_nothing_of_the_host() -> None:
    own = {p.stem for p in (ROOT / "firmware").glob("*.py")} | {"hal"}
    bad = [
        f"{f.relative_to(ROOT)}:{line} imports {mod}"
        for f in files("firmware")
        for line, mod in imports(f)
        if mod not in own and mod not in MICROPYTHON
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_imports(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def run():\n    from tools.flash import plan\n    import stationctl.cli\n")
    assert imports(f) == [(2, "tools"), (3, "stationctl")]
