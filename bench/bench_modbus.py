# Modbus master costs: CPU time of the CRC and the reply parser, and heap per transaction.
# Run with CPython (`make bench`): prints CPython times, then re-runs itself on the
# MicroPython unix port (-X heapsize=100k, about an ESP32's Python heap) for its times and
# gc.mem_alloc() growth per call. The ESP32 runs MicroPython roughly 10-30x slower than
# this port; heap figures carry over (the unix port's ints are wider, so it allocates less
# for values between 2**30 and 2**62, e.g. the f32 intermediate m * 1000).
import sys

HERE = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path.insert(0, HERE + "/../firmware")
try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore

import modbus  # noqa: E402
import registers  # noqa: E402
import timebase  # noqa: E402
from modbus_master import ModbusMaster  # noqa: E402

MP = sys.implementation.name == "micropython"


def _reply(unit, fn, regs):
    b = bytearray([unit, fn, 2 * len(regs)])
    for v in regs:
        b.append(v >> 8)
        b.append(v & 0xFF)
    c = modbus.crc16(b)
    b.append(c & 0xFF)
    b.append(c >> 8)
    return bytes(b)


class Instant:
    """A stream whose devices answer at once: bms regs for unit 11, floats for unit 1."""

    char_bits = 10

    def __init__(self):
        self.out = b""
        self.bms = _reply(
            11,
            3,
            [532, 981, 6710, 1520, 312, 295, 412, 0, 0x4230, 0x3031, 0x3233, 0x3435, 6, 0x22C1],
        )
        self.f32 = _reply(1, 4, [0x4996, 0xB43F])
        self.pos = 0

    def write(self, data):
        self.out = self.bms if data[0] == 11 else self.f32
        self.pos = 0
        return len(data)

    def readinto(self, buf):  # allocation-free, so the figures are the master's own
        out = self.out
        n = len(out) - self.pos
        if n > len(buf):
            n = len(buf)
        p = self.pos
        for i in range(n):
            buf[i] = out[p + i]
        self.pos = p + n
        return n


def per_us(fn, n):
    t0 = timebase.ticks_us()
    for _ in range(n):
        fn()
    return timebase.ticks_diff(timebase.ticks_us(), t0) / n


def heap_per_call(fn, n):
    try:
        import gc

        alloc = gc.mem_alloc  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        return None
    fn()
    gc.collect()
    gc.disable()
    a = alloc()
    for _ in range(n):
        fn()
    used = alloc() - a
    gc.enable()
    return used / n


def main():
    frame = _reply(
        11, 3, [532, 981, 6710, 1520, 312, 295, 412, 0, 0x4230, 0x3031, 0x3233, 0x3435, 6, 0x22C1]
    )
    p = modbus.Response(11, 3, 14)
    mv = memoryview(frame)

    def crc():
        modbus.crc16(frame)

    def whole():
        p.reset(11, 3, 14)
        p.feed(frame)

    def bytewise():
        p.reset(11, 3, 14)
        for i in range(len(frame)):
            p.feed(mv[i : i + 1])

    def garbage():
        p.reset(11, 3, 14)
        p.feed(b"\x00\x0b\x03\xff\x01\x04")
        p.feed(frame)

    def f32():
        registers.f32_kwh_to_wh(0x4996, 0xB43F)

    def decode():
        registers.decode_bms(
            [532, 981, 6710, 1520, 312, 295, 412, 0, 0x4230, 0x3031, 0x3233, 0x3435, 6, 0x22C1], out
        )

    out = {}
    print("%s:" % sys.implementation.name)
    for name, fn, n in (
        ("crc16, 33-byte frame", crc, 2000),
        ("parse BMS reply fed whole", whole, 2000),
        ("parse BMS reply byte by byte", bytewise, 300),
        ("parse BMS reply behind 6 garbage bytes", garbage, 1000),
        ("f32_kwh_to_wh", f32, 5000),
        ("decode_bms into a reused dict", decode, 2000),
    ):
        us = per_us(fn, n)
        h = heap_per_call(fn, 20)
        print("  %-42s %8.1f us%s" % (name, us, "" if h is None else "  heap %6.0f B/call" % h))

    m = ModbusMaster(Instant(), baud=115200, timeout_ms=50)
    bat = {}
    met = {}

    async def transactions(n):
        t0 = timebase.ticks_ms()
        for _ in range(n):
            await registers.read_bms(m, 11, True, bat)
        t1 = timebase.ticks_ms()
        for _ in range(n):
            await m.read_input(1, 0x48, 2)
        t2 = timebase.ticks_ms()
        return timebase.ticks_diff(t1, t0) / n, timebase.ticks_diff(t2, t1) / n

    tb, tm = asyncio.run(transactions(50))
    print(
        "  read_bms transaction (instant device)      %8.2f ms  (3.5-char silence: %d ms)"
        % (tb, m.silence_ms)
    )
    print("  read_input 2 regs (instant device)         %8.2f ms" % tm)

    def one_bms():
        asyncio.run(registers.read_bms(m, 11, True, bat))

    def one_meter():
        asyncio.run(registers.read_meter(m, 1, {"power": 0x48, "energy": 0x48}, met))

    for name, fn in (
        ("asyncio.run(read_bms) incl. loop start", one_bms),
        ("asyncio.run(read_meter, 1 transaction)", one_meter),
    ):
        h = heap_per_call(fn, 20)
        if h is not None:
            print("  %-42s heap %6.0f B/call" % (name, h))
    assert m.err == {"mb_to": 0, "mb_crc": 0, "mb_exc": 0, "mb_addr": 0}

    async def in_loop(n):
        import gc

        gc.collect()
        gc.disable()
        a = gc.mem_alloc()  # type: ignore[attr-defined]
        for _ in range(n):
            await registers.read_bms(m, 11, True, bat)
        b = gc.mem_alloc()  # type: ignore[attr-defined]
        for _ in range(n):
            await registers.read_meter(m, 1, "sdm630", met)
        c = gc.mem_alloc()  # type: ignore[attr-defined]
        gc.enable()
        return (b - a) / n, (c - b) / n

    if MP:
        hb, hm = asyncio.run(in_loop(5))
        print("  read_bms inside a running loop             heap %6.0f B/call" % hb)
        print("  read_meter sdm630 (2 transactions)         heap %6.0f B/call" % hm)


main()

if not MP:
    import subprocess

    mp = sys.executable.rsplit("/", 1)[0] + "/micropython"
    r = subprocess.run(
        [mp, "-X", "heapsize=100k", __file__], capture_output=True, text=True, timeout=300
    )
    print(r.stdout + r.stderr, end="")
    if r.returncode:
        sys.exit(r.returncode)
