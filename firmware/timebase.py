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


def _time_scale():
    """STATION_TIME_SCALE (unix port only; the fleet simulator's "a day in minutes"): the
    uptime runs this many times faster than the host clock, in per mille (1000 = real time).
    Only the uptime is scaled, so energy, stale windows, persistence and sessions follow the
    simulated clock, while serial timeouts, sampling period and MQTT keep real time."""
    try:
        import os

        s = os.getenv("STATION_TIME_SCALE")  # type: ignore[attr-defined]
    except (ImportError, AttributeError):  # the ESP32's os has no environment
        return 1000
    if not s:
        return 1000
    try:
        k = int(float(s) * 1000 + 0.5)
    except ValueError:
        return 1000
    return k if k >= 1 else 1000


SCALE_PERMILLE = _time_scale()


class Uptime:
    """Milliseconds since boot that never wrap: ticks_ms wraps (2**30 on the ESP32), so the
    difference is accumulated into an unbounded int at every call (call at least once a
    wrap period, ~6 days; the sampling loop calls it every cycle). With a time scale the
    real difference is scaled in integers, the remainder carried."""

    def __init__(self, scale_permille=None):
        self._last = ticks_ms()
        self._up = 0
        self._rem = 0
        self._k = SCALE_PERMILLE if scale_permille is None else scale_permille

    def ms(self):
        now = ticks_ms()
        d = ticks_diff(now, self._last)
        self._last = now
        if self._k == 1000:
            self._up += d
        else:
            d = d * self._k + self._rem
            self._up += d // 1000
            self._rem = d % 1000
        return self._up
