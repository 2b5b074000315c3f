"""Processes' CPU time, and whether the machine is quiet enough to measure on (the benches
ask before they start).

Figures taken beside another busy process are not comparable with any other run: a broker
left over from a crashed bench, saving its backlog every second, once cut the agent's
drain by a fifth and multiplied its p99 latency by ten, with nothing in the bench's output
to say so.
"""

from __future__ import annotations

import os
import pathlib
import time


def _stat(path: str) -> list[str] | None:
    """The fields of a /proc `stat` file after the command name (whose parentheses may
    hold spaces): [0] the state, [11] / [12] user / system ticks, [13] / [14] those of the
    children waited for. None when the process or thread is gone."""
    try:
        return pathlib.Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cpu_s(path: str, children: bool = False) -> float:
    f = _stat(path)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of a live process (0 when it is gone); with `children`,
    those of its children that were waited for too."""
    return _cpu_s(f"/proc/{pid}/stat", children)


def thread_cpu_s(native_id: int) -> float:
    """User + system CPU seconds of a thread of this process (threading.Thread.native_id;
    0 when it is gone)."""
    return _cpu_s(f"/proc/self/task/{native_id}/stat")


def proc_state(pid: int) -> str | None:
    """A process's state letter (R running, S sleeping, Z exited and not yet reaped …),
    None when it is gone."""
    f = _stat(f"/proc/{pid}/stat")
    return None if f is None else f[0]


def _user_processes() -> dict[int, str]:
    """pid → command line of every user-space process (kernel threads have none)."""
    out: dict[int, str] = {}
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if cmd.strip():
            out[int(d.name)] = cmd.strip()
    return out


def busy_others(seconds: float = 1.0, share: float = 0.05) -> list[tuple[int, float, str]]:
    """(pid, share of a core, command line) of the processes other than this one that used
    more than `share` of a core over the next `seconds`, busiest first. Empty where /proc
    is missing."""
    if not pathlib.Path("/proc/self/stat").exists():
        return []
    me = os.getpid()
    procs = _user_processes()
    before = {pid: proc_cpu_s(pid) for pid in procs if pid != me}
    time.sleep(seconds)
    busy = []
    for pid, was in before.items():
        used = (proc_cpu_s(pid) - was) / seconds  # (a process gone meanwhile: negative)
        if used > share:
            busy.append((pid, used, procs[pid]))
    return sorted(busy, key=lambda b: -b[1])


def warn_if_busy(seconds: float = 1.0) -> None:
    """Print a warning naming the processes that keep the machine busy (before a bench)."""
    for pid, used, cmd in busy_others(seconds):
        print(
            f"WARNING: another process uses {used:.0%} of a core, figures taken now are not "
            f"comparable: pid {pid}: {cmd[:120]}"
        )
