"""Every target of bench/fuzz.py for a few hundred cases, in-process, so that the harnesses
and generators cannot rot between full runs (`make fuzz`). A finding fails the test unless
it is one of the open entries of tests/vectors/fuzz_findings.json (same target, same
exception type); a hang always fails."""

from __future__ import annotations

import json
import pathlib
import time

import pytest

from bench import fuzz
from tests.helpers import ROOT

CASES = 300
OPEN = {
    (e["target"], e["raises"])
    for e in json.loads((ROOT / "tests" / "vectors" / "fuzz_findings.json").read_text())["findings"]
    if e["status"] == "open"
}


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_target_runs_clean(target: str, tmp_path: pathlib.Path) -> None:
    res = fuzz.fuzz_target(
        target, CASES, seed=20261203, limit_s=2.0, tmp=str(tmp_path), shrink=False
    )
    assert res.cases == CASES
    assert res.hangs == 0, res.examples
    unknown = {
        sig: msg
        for sig, (_case, msg) in res.examples.items()
        if (target, sig.split(" ")[0]) not in OPEN
    }
    assert not unknown, unknown


def test_a_hang_is_caught() -> None:
    """The per-case limit: CPU time for a case that spins, wall time for one that blocks."""

    def spin(_: bytes) -> None:
        while True:
            pass

    def block(_: bytes) -> None:
        time.sleep(30)

    for h in (spin, block):
        with fuzz._Timers():
            t0 = time.monotonic()
            err = fuzz.run_case(h, b"", 0.05)
        assert isinstance(err, fuzz.Hang), h
        assert time.monotonic() - t0 < 5
