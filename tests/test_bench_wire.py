"""bench/bench_wire.py runs to its end on the MicroPython interpreter (under a second).

`make bench` stops at the first bench that fails, and nothing else runs this one: when it
copied the firmware modules it needed by name, one the firmware started importing
(persist.py) broke it unseen. Its figures are not checked here, only that every one of
them is printed."""

from __future__ import annotations

import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "bench_wire.py"


def test_bench_wire_prints_every_figure() -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH)], capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for label in (
        "heap kept by each import",
        "Wire.telemetry, 8 slots",
        "sign + CommandGate.check",
        "Outbox append + pending(1) + ack",
        "gc.mem_free after",
    ):
        assert label in r.stdout, r.stdout
