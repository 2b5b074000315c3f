"""`python -m agent.cli` runs cli.py as __main__ while the commands import agent.cli: bad
usage must still be one line on stderr and exit status 2 (UsageError is in agent/errors.py)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import agent.cli
import agent.errors

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_usage_error_alias() -> None:
    assert agent.cli.UsageError is agent.errors.UsageError


def test_python_m_agent_cli_bad_usage_exits_2(tmp_path: pathlib.Path) -> None:
    cases = [
        ["export", "--db", str(tmp_path / "missing.db"), "--format", "json"],  # raised in a command
        ["keys", "add", "--db", str(tmp_path / "k.db"), "bad sid", "--generate",
         str(tmp_path / "k.hex")],
    ]
    for args in cases:
        r = subprocess.run([sys.executable, "-m", "agent.cli", *args], check=False,
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"stationctl {args[0]}: "), r.stderr
