"""The hardware-in-the-loop suite on the virtual rig (hil_tests/, README there), run as the
CI runs it: `python -m pytest hil_tests --rig virtual` in a subprocess, so that the default
test command covers it. Never skipped: the virtual rig needs no hardware."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.timeout(900)
def test_hil_suite_on_the_virtual_rig() -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "hil_tests",
            "--rig",
            "virtual",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=-ra",
        ],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=850,
        env=env,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert " passed" in out and "skipped" not in out.split("\n")[-2], out[-2000:]
