"""Sampling-cycle cost and steady-state heap of the firmware on MicroPython (8 slots).

Prints: mean and worst µs per cycle over 10,000 cycles (charger and bus answering from
memory, so this is the firmware's own cost; a real 9600-baud bus adds ~40 ms per BMS read),
heap in use after gc.collect() at the start and end, and its samples every 1,000 cycles.
Target (issue 2): under 48 KB in use, no growth over 10,000 cycles.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools import fwbuild  # noqa: E402
from tools.station_proc import micropython_bin  # noqa: E402


def main() -> None:
    fw = fwbuild.build()
    slots = sys.argv[1] if len(sys.argv) > 1 else "8"
    cycles = sys.argv[2] if len(sys.argv) > 2 else "10000"
    with tempfile.TemporaryDirectory() as d:
        # the bench itself as bytecode too, so that compiling it costs no heap
        subprocess.run([fwbuild.mpy_cross_bin(), "-o", f"{d}/station_cycle.mpy",
                        str(ROOT / "bench" / "mp" / "station_cycle.py")], check=True)
        out = subprocess.run(
            [micropython_bin(), "-X", "heapsize=100k", "-c",
             f"import sys; sys.argv[1:] = [{slots!r}, {cycles!r}, {d!r}]; import station_cycle"],
            capture_output=True, text=True, timeout=600, env={"MICROPYPATH": f"{d}:{fw}:.frozen"},
        )
    print(out.stdout, end="")
    if out.returncode:
        print(out.stderr, file=sys.stderr)
        sys.exit(out.returncode)


if __name__ == "__main__":
    main()
