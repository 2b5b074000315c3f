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


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "list", "--db"],  # an option without its value
        ["nonsense"],  # no such command
        ["export", "--db", "x.db"],  # a required option missing
        ["verify", "--db", "x.db", "--sid"],
    ],
)
def test_argparse_errors_are_one_line(args: list[str]) -> None:
    """argparse printed its usage and then the error: two lines or more (CONTRACT §8: one)."""
    r = subprocess.run(
        [sys.executable, "-m", "stationctl", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stationctl"), r.stderr
    assert "-h)" in lines[0]


def test_export_into_a_closed_pipe_ends_quietly(tmp_path: pathlib.Path) -> None:
    """`stationctl export … | head -1` ended in a BrokenPipeError traceback."""
    from tests.agent_helpers import fill_store, fleet_stream, stored_rows

    rows, msgs = stored_rows(fleet_stream(4, 1500, sid_base="KH-PIPE", step_ms=60_000))
    url = fill_store(f"sqlite:///{tmp_path}/a.db", rows, msgs)
    full = subprocess.run(
        [sys.executable, "-m", "stationctl", "export", "--db", url, "--format", "csv"],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=ROOT,
    ).stdout
    assert (
        len(full) > 128 * 1024
    )  # more than a pipe holds (64 KiB): the writer meets the closed end
    p = subprocess.Popen(
        f"{sys.executable} -m stationctl export --db {url} --format csv | head -1",
        shell=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = p.communicate(timeout=120)
    assert out == full.split(b"\n", 1)[0] + b"\n"
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err
    assert err == b"", err
