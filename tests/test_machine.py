"""tools/machine.py: the benches' check that nothing else keeps the machine busy."""

from __future__ import annotations

import subprocess
import sys

from tools.machine import busy_others


def test_a_busy_process_is_named_and_an_idle_one_is_not() -> None:
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        busy = {pid: (used, cmd) for pid, used, cmd in busy_others(seconds=1.0)}
        assert spin.pid in busy, busy
        used, cmd = busy[spin.pid]
        assert used > 0.3 and "while True" in cmd
        assert idle.pid not in busy
    finally:
        spin.kill()
        idle.kill()
        spin.wait()
        idle.wait()
