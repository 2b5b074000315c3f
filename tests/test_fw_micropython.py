"""Run every firmware unit-test module on the real MicroPython interpreter (unix port)."""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

from tests.helpers import micropython_bin

FW_TESTS = pathlib.Path(__file__).parent / "fw"
MODULES = sorted(p.stem for p in FW_TESTS.glob("test_*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_firmware_module_on_micropython(module: str, tmp_path: pathlib.Path) -> None:
    proc = subprocess.run(
        [micropython_bin(), "-X", "heapsize=2m", str(FW_TESTS / "run.py"), module],
        capture_output=True,
        text=True,
        timeout=240,
        env={"FWTEST_TMP": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    out = proc.stdout + proc.stderr
    m = re.search(r"^(\d+) passed, (\d+) failed$", proc.stdout, re.M)
    assert m, out
    assert int(m.group(1)) > 0 and int(m.group(2)) == 0 and proc.returncode == 0, out
