"""A MicroPython process saving an increasing counter through persist.ABStore is SIGKILLed at
random moments, again and again; every restart must load a value at least as high as the
last one the killed process reported saved (it prints only after save() returns), and never
higher than one more (a save may finish just before its print)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import FIRMWARE, micropython_bin

KILLS = 25

WRITER = """
import sys
sys.path.insert(0, %(fw)r)
from persist import ABStore
s = ABStore(%(dir)r, "station")
v = s.load()
n = 0 if v is None else v["n"]
print("LOADED", n, s.seq)
if %(load_only)r:
    sys.exit(0)
sess = {"bat": "B0012345", "e0": 123456789012, "soc0": 532, "up0": 5025000}
while True:
    n += 1
    s.save({"n": n, "regs": [n * 1000 + i for i in range(16)], "sessions": {"1": sess, "2": sess}})
    print("SAVED", n)
"""


def _script(tmp: Path, data: Path, load_only: bool) -> Path:
    p = tmp / ("load.py" if load_only else "writer.py")
    p.write_text(WRITER % {"fw": str(FIRMWARE), "dir": str(data), "load_only": load_only})
    return p


def _lines(out: bytes) -> list[list[str]]:
    # only complete lines: the kill may cut the last one short
    text = out.decode(errors="replace")
    complete = text.split("\n")[:-1]
    return [ln.split() for ln in complete if ln]


def test_sigkill_during_saves_never_loses_a_reported_save(tmp_path: Path) -> None:
    sys.path.insert(0, str(FIRMWARE))
    import persist  # type: ignore[import-not-found]

    data = tmp_path / "flash"
    data.mkdir()
    writer = _script(tmp_path, data, False)
    rnd = random.Random(int.from_bytes(os.urandom(4), "big"))
    last_saved = 0
    invalid_seen = 0
    loaded_values = []
    for i in range(KILLS):
        # unbuffered: readline() must not pull later lines into a buffer that
        # communicate(), reading the descriptor itself, would never see
        proc = subprocess.Popen(
            [micropython_bin(), str(writer)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline().split()  # LOADED n seq: it has started saving
        assert first[:1] == [b"LOADED"], (first, proc.stderr.read() if proc.stderr else b"")
        loaded = int(first[1])
        loaded_values.append(loaded)
        assert last_saved <= loaded <= last_saved + 1, (i, last_saved, loaded)
        time.sleep(rnd.uniform(0.0, 0.08))
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
        saved = [int(x[1]) for x in _lines(out) if x[:1] == ["SAVED"] and len(x) == 2]
        assert saved == list(range(loaded + 1, loaded + 1 + len(saved))), saved[:5]
        if saved:
            last_saved = saved[-1]
        else:
            last_saved = loaded
        # the state the kill left: at least one intact slot, and note a damaged one
        states = []
        for suffix in ("a", "b"):
            path = data / ("station." + suffix)
            raw = path.read_bytes() if path.exists() else b""
            states.append(persist.decode(raw))
        assert any(s is not None for s in states), states
        invalid_seen += sum(1 for s in states if s is None)

    proc2 = subprocess.run(
        [micropython_bin(), str(_script(tmp_path, data, True))],
        capture_output=True,
        timeout=30,
        check=False,
    )
    fields = proc2.stdout.split()
    assert proc2.returncode == 0 and fields[0] == b"LOADED", proc2
    final = int(fields[1])
    assert last_saved <= final <= last_saved + 1
    assert last_saved > KILLS  # the writer did make progress between kills
    print(
        f"kills={KILLS} last_saved={last_saved} final={final}"
        f" damaged slot files seen after a kill={invalid_seen}"
    )
