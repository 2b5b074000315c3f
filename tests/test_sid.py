"""One station-id pattern (CONTRACT §1): the host's (agent/wire.py) and the firmware's own
check (firmware/config.py, on CPython and on MicroPython) agree on every id tried."""

from __future__ import annotations

import json
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.wire import check_sid
from tests.helpers import ROOT, micropython_bin
from tools.fwbuild import firmware_module

EDGES = [
    "KH-PNH-0001", "ABC", "AB", "A" * 32, "A" * 33, "-AB", "ab1", "KH_PNH", "KH PNH",
    "KH-PNH-0001\n", "", "0--", "É12", "KH/PNH", "9-9",
]  # fmt: skip
ALPHABET = "AZ09-az_ /\n\x00É+#"


def host_ok(sid: str) -> bool:
    try:
        check_sid(sid)
    except ValueError:
        return False
    return True


def firmware_ok(sid: str) -> bool:
    return firmware_module("config")._sid(sid) is None


def test_edges() -> None:
    assert [host_ok(s) for s in EDGES] == [
        True, True, False, True, False, False, False, False, False, False, False, True,
        False, False, True,
    ]  # fmt: skip
    assert [firmware_ok(s) for s in EDGES] == [host_ok(s) for s in EDGES]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALPHABET, min_size=0, max_size=40))
def test_firmware_and_host_agree(sid: str) -> None:
    assert firmware_ok(sid) == host_ok(sid), repr(sid)


def test_firmware_agrees_on_micropython(tmp_path: pytest.TempPathFactory) -> None:
    corpus = EDGES + ["K" + "-" * n for n in range(1, 35)] + ["Z9" * n for n in range(1, 20)]
    script = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(ROOT / 'firmware')!r})\n"
        "import config\n"
        "ids = json.loads(sys.stdin.read())\n"
        "print(json.dumps([config._sid(s) is None for s in ids]))\n"
    )
    r = subprocess.run(
        [micropython_bin(), "-c", script],
        input=json.dumps(corpus),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(r.stdout) == [host_ok(s) for s in corpus]
