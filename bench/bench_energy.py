# Heap per energy sample: run with CPython (`make bench`) or with micropython directly.
#
# The unix port is 64-bit: its small ints hold 62 bits, where the ESP32's hold 30 (anything
# beyond +-2**30 is a heap object there). So this prints two things:
#  1. under CPython: the largest intermediate value SlotEnergy.sample() computes, traced with an
#     int subclass, against 2**30: below it, the ESP32 allocates nothing for the arithmetic;
#  2. under the MicroPython unix port (re-run as a subprocess): gc.mem_alloc() growth and time
#     per sample, measured, with values scaled past 2**62 where the ESP32 would pass 2**30.
import os
import sys

HERE = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path.insert(0, HERE + "/../firmware")
from energy import SlotEnergy  # noqa: E402

N = 2000
SMALL = 1 << 30  # ESP32 small-int limit (magnitude)


class Naive:
    """The obvious form: Q += (p0 + p1) * dt in one int, then divmod."""

    def __init__(self, mwh=0):
        self.q = 0
        self.mwh = mwh
        self.last = None
        self.p = 0

    def sample(self, up, mv, ma):
        p = mv * ma if ma > 0 else 0
        if self.last is not None:
            self.q += (self.p + p) * (up - self.last)
            add, self.q = divmod(self.q, 7200000000)
            self.mwh += add
        self.last = up
        self.p = p
        return 0


CASES = [
    # label, factory, first uptime, mv, ma
    ("SlotEnergy 84 V x 15 A", SlotEnergy, 0, 84000, 15000),
    ("SlotEnergy 200 V x 200 A (parser limits)", SlotEnergy, 0, 199000, 199000),
    ("SlotEnergy discharging (clamped)", SlotEnergy, 0, 84000, -15000),
    ("naive big-int Q 84 V x 15 A", Naive, 0, 84000, 15000),
]


def trace_cpython():
    top = [0]

    class T(int):
        def _t(self, o, v):
            # an operation allocates on the ESP32 when an operand or its result is boxed
            m = max(abs(int(self)), abs(int(o)), abs(v))
            if m > top[0]:
                top[0] = m
            return T(v)

    for name in ("add", "sub", "mul", "floordiv", "mod"):
        for pre in ("__", "__r"):
            op = getattr(int, pre + name + "__")
            setattr(T, pre + name + "__", (lambda op: lambda s, o: s._t(o, op(s, o)))(op))  # noqa: B023

    print("CPython trace: largest intermediate per sample (ESP32 boxes ints beyond 2**30)")
    for label, make, up0, mv, ma in CASES:
        for up_label, base in (("", 0), (", uptime 2**31 ms", 1 << 31)):
            e = make()
            top[0] = 0
            for i in range(200):
                e.sample(T(base + up0 + i * 1000), T(mv + (i & 7)), T(ma - (i & 15)))
            verdict = "small ints only" if top[0] < SMALL else "ALLOCATES on ESP32"
            print("  %-58s max |x| = %14d  %s" % (label + up_label, top[0], verdict))


def measure(label, obj, up0, mv, ma):
    import gc
    import time

    obj.sample(up0, mv, ma)
    ups = [up0 + (i + 1) * 1000 for i in range(N)]  # built before measuring: only sample() counts
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()  # type: ignore[attr-defined]
    t0 = time.ticks_us()  # type: ignore[attr-defined]
    for i in range(N):
        obj.sample(ups[i], mv + (i & 7), ma - (i & 15))
    t1 = time.ticks_us()  # type: ignore[attr-defined]
    b = gc.mem_alloc()  # type: ignore[attr-defined]
    gc.enable()
    us = time.ticks_diff(t1, t0) / N  # type: ignore[attr-defined]
    print("  %-50s %6.1f bytes/sample %6.2f us/sample" % (label, (b - a) / N, us))


def measure_micropython():
    big = 1 << 62  # the 64-bit port's small-int limit, standing in for the ESP32's 2**30
    print("MicroPython %s: gc.mem_alloc() growth, %d samples each, gc off" % (sys.version, N))
    for label, make, up0, mv, ma in CASES:
        measure(label, make(), up0, mv, ma)
    measure("SlotEnergy uptime past the small-int limit", SlotEnergy(), big, 84000, 15000)
    measure("SlotEnergy register past the small-int limit", SlotEnergy(mwh=big), 0, 84000, 15000)
    measure("naive big-int Q, register past the limit", Naive(mwh=big), 0, 84000, 15000)


if sys.implementation.name == "micropython":
    measure_micropython()
else:
    import subprocess

    trace_cpython()
    mp = os.path.join(os.path.dirname(sys.executable), "micropython")
    sys.exit(subprocess.call([mp, "-X", "heapsize=2m", os.path.abspath(__file__)]))
