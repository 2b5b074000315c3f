"""`python -m stationctl` and `python -m stationctl.cli`: bad usage is one line on stderr and
exit status 2, whichever way the command line is started (UsageError is in
stationctl/errors.py, so running cli.py as __main__ does not make a second class)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import stationctl.cli
import stationctl.errors

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_usage_error_alias() -> None:
    assert stationctl.cli.UsageError is stationctl.errors.UsageError


@pytest.mark.parametrize("module", ["stationctl", "stationctl.cli"])
def test_python_m_bad_usage_exits_2(tmp_path: pathlib.Path, module: str) -> None:
    cases = [
        ["export", "--db", str(tmp_path / "missing.db"), "--format", "json"],  # raised in a command
        [
            "keys",
            "add",
            "--db",
            str(tmp_path / "k.db"),
            "bad sid",
            "--generate",
            str(tmp_path / "k.hex"),
        ],
    ]
    for args in cases:
        r = subprocess.run(
            [sys.executable, "-m", module, *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"stationctl {args[0]}: "), r.stderr
