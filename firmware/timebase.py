# Monotonic time for drivers and the sampling loop, the same on the ESP32, the MicroPython
# unix port and CPython (where the firmware's unit tests also run). Not hardware: no machine.
import time

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore

_MP = hasattr(time, "ticks_ms")

if _MP:
    ticks_ms = time.ticks_ms  # type: ignore[attr-defined]
    ticks_diff = time.ticks_diff  # type: ignore[attr-defined]
    ticks_add = time.ticks_add  # type: ignore[attr-defined]
    ticks_us = time.ticks_us  # type: ignore[attr-defined]
else:
    def ticks_ms():  # type: ignore[misc]
        return time.monotonic_ns() // 1000000  # type: ignore[attr-defined]

    def ticks_us():  # type: ignore[misc]
        return time.monotonic_ns() // 1000  # type: ignore[attr-defined]

    def ticks_diff(a, b):  # type: ignore[misc]
        return a - b

    def ticks_add(a, b):  # type: ignore[misc]
        return a + b


def sleep_ms(ms):
    """Blocking sleep (only for short, bounded waits outside the event loop)."""
    time.sleep(ms / 1000)


async def asleep_ms(ms):
    """asyncio sleep in ms on both interpreters (CPython's asyncio has no sleep_ms)."""
    if hasattr(asyncio, "sleep_ms"):
        await asyncio.sleep_ms(ms)  # type: ignore[attr-defined]
    else:
        await asyncio.sleep(ms / 1000)


class Uptime:
    """Milliseconds since boot that never wrap: ticks_ms wraps (2**30 on the ESP32), so the
    difference is accumulated into an unbounded int at every call (call at least once a
    wrap period, ~6 days; the sampling loop calls it every cycle)."""

    def __init__(self):
        self._last = ticks_ms()
        self._up = 0

    def ms(self):
        now = ticks_ms()
        self._up += ticks_diff(now, self._last)
        self._last = now
        return self._up
