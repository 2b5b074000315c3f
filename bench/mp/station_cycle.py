# Run on MicroPython: cost of one sampling cycle and steady-state heap with N slots.
# The charger and the bus answer instantly from memory (valid frames built with the
# firmware's own codecs), so the figures are the firmware's own cost, not the line's.
import asyncio
import gc
import sys

import charger
import modbus
import persist
import station
import timebase

SLOTS = int(sys.argv[1]) if len(sys.argv) > 1 else 8
CYCLES = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
ROOT = sys.argv[3] if len(sys.argv) > 3 else "/tmp"


class Answering:
    """Hands the prepared answer to the next readinto(), once."""

    out = None

    def readinto(self, buf):
        o = self.out
        if not o:
            return 0
        n = len(o)
        buf[:n] = o
        self.out = None
        return n


class ChargerStream(Answering):
    """Answers each $Q poll with a charging reply for that slot."""

    def __init__(self):
        self.replies = {}
        for s in range(1, 17):
            self.replies[s] = charger.reply_line(s, "C", 67200, 15250, 312, 0)
        self.out = None

    def write(self, data):
        slot = int(bytes(data[3 : data.index(b"*")]))
        self.out = self.replies[slot]
        return len(data)


def frame(body):
    crc = modbus.crc16(body)
    return bytes(body) + bytes((crc & 0xFF, crc >> 8))


class BusStream(Answering):
    """A meter on unit 1 and a BMS on every unit 11..26, from fixed register images."""

    char_bits = 10

    def __init__(self):
        bms = [532, 981, 6710, 1520, 312, 295, 412, 0, 0x4230, 0x3031, 0x3233, 0x3435, 0, 40211]
        self.bms = bytes([3, 28]) + b"".join(bytes((r >> 8, r & 0xFF)) for r in bms)
        self.out = None

    def write(self, data):
        unit, fn, addr, count = data[0], data[1], (data[2] << 8) | data[3], (data[4] << 8) | data[5]
        if fn == 3 and addr == 0xFC00:
            body = bytes([unit, 3, 4, 0x01, 0x02, 0x03, 0x04])
        elif fn == 3:
            body = bytes([unit]) + self.bms
        else:  # meter input registers: 1234.5 kWh (0x449A5000) everywhere
            body = bytes([unit, 4, 2 * count]) + bytes((0x44, 0x9A, 0x50, 0x00)) * (count // 2)
        self.out = frame(body)
        return len(data)


def config():
    return {
        "slots": SLOTS,
        "stale_s": 5,
        "sample_ms": 1000,
        "boot_base": 0,
        "persist": {"every_mwh": 10000, "every_s": 60},
        "meter": {"unit": 1, "model": "sdm630"},
        "bms": {"unit_base": 10, "per_cycle": 2},
    }


async def main():
    import charger_link
    import modbus_master

    gc.collect()
    code = gc.mem_alloc()  # modules loaded (bytecode in RAM on the unix port; frozen on a board)

    link = charger_link.ChargerLink(ChargerStream(), 200, 0)
    master = modbus_master.ModbusMaster(BusStream(), 115200, 100, 1)
    master.silence_ms = 0  # no line: nothing to wait for between frames
    st = station.Station(
        config(), link, master, persist.ABStore(ROOT, "bench", 4096), timebase.Uptime()
    )
    st.start()
    st.take_events()
    for _ in range(50):  # warm up: every BMS read once, dict shapes settled
        await st.cycle()
    st.take_events()
    gc.collect()
    base = gc.mem_alloc()
    t0 = timebase.ticks_us()
    worst = 0
    samples = [0] * (CYCLES // 1000)  # preallocated: the list must not count as growth
    for i in range(CYCLES):
        c0 = timebase.ticks_us()
        await st.cycle()
        dt = timebase.ticks_diff(timebase.ticks_us(), c0)
        if dt > worst:
            worst = dt
        if i % 1000 == 999:
            st.take_events()
            gc.collect()
            samples[i // 1000] = gc.mem_alloc()
        if i % 16 == 0:
            st.snapshot()
    total = timebase.ticks_diff(timebase.ticks_us(), t0)
    gc.collect()
    end = gc.mem_alloc()
    print("slots", SLOTS, "cycles", CYCLES)
    print("cycle_us_mean", total // CYCLES, "cycle_us_max", worst)
    print("heap_in_use_bytes", base, "after", end, "growth", end - base)
    print("heap_code_bytes", code, "heap_data_bytes", end - code)
    print("heap_samples", samples)
    print("errors", st.errors())


asyncio.run(main())
