"""Is the machine quiet enough to measure on? The benches ask before they start.

Figures taken beside another busy process are not comparable with any other run: a broker
left over from a crashed bench, saving its backlog every second, once cut the agent's
drain by a fifth and multiplied its p99 latency by ten, with nothing in the bench's output
to say so.
"""

from __future__ import annotations

import os
import pathlib
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_ticks() -> dict[int, tuple[int, str]]:
    """pid → (user + system ticks so far, command line) of every user-space process."""
    out: dict[int, tuple[int, str]] = {}
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if not cmd.strip():
            continue  # a kernel thread
        fields = stat.rsplit(")", 1)[1].split()
        out[int(d.name)] = (int(fields[11]) + int(fields[12]), cmd.strip())
    return out


def busy_others(seconds: float = 1.0, share: float = 0.05) -> list[tuple[int, float, str]]:
    """(pid, share of a core, command line) of the processes other than this one that used
    more than `share` of a core over the next `seconds`, busiest first. Empty where /proc
    is missing."""
    if not pathlib.Path("/proc/self/stat").exists():
        return []
    me = os.getpid()
    before = _cpu_ticks()
    time.sleep(seconds)
    after = _cpu_ticks()
    busy = []
    for pid, (ticks, cmd) in after.items():
        was = before.get(pid)
        if pid == me or was is None:
            continue
        used = (ticks - was[0]) / _TICK / seconds
        if used > share:
            busy.append((pid, used, cmd))
    return sorted(busy, key=lambda b: -b[1])


def warn_if_busy(seconds: float = 1.0) -> None:
    """Print a warning naming the processes that keep the machine busy (before a bench)."""
    for pid, used, cmd in busy_others(seconds):
        print(
            f"WARNING: another process uses {used:.0%} of a core, figures taken now are not "
            f"comparable: pid {pid}: {cmd[:120]}"
        )
