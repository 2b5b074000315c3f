"""Sampling-cycle cost and steady-state heap of the firmware on MicroPython (8 slots).

Prints: mean and worst µs per cycle over 10,000 cycles (charger and bus answering from
memory, so this is the firmware's own cost; a real 9600-baud bus adds ~40 ms per BMS read),
heap in use after gc.collect() at the start and end, and its samples every 1,000 cycles.
Target (issue 2): under 48 KB in use, no growth over 10,000 cycles.
"""

from __future__ import annotations

import sys

from mp_runner import run


def main() -> None:
    slots = sys.argv[1] if len(sys.argv) > 1 else "8"
    cycles = sys.argv[2] if len(sys.argv) > 2 else "10000"
    run("station_cycle.py", [slots, cycles], "100k")  # last argument: a scratch flash folder


if __name__ == "__main__":
    main()
