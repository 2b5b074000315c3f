# Register maps (firmware/registers.py): float32 -> integer conversions against vectors
# derived with struct + Fraction (tests/vectors/registers.json), BMS decoding, and the meter
# and BMS reads through the real ModbusMaster against a simulated device on an in-memory bus.
try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore

import modbus
import registers
import timebase
from fwtest import raises, vector
from modbus_master import ModbusMaster

V = vector("registers.json")


def words(hexbits):
    b = int(hexbits, 16)
    return b >> 16, b & 0xFFFF


def test_f32_kwh_to_wh_vectors():
    for c in V["float32"]:
        hi, lo = words(c["hex"])
        assert registers.f32_kwh_to_wh(hi, lo) == c["wh"], c


def test_f32_to_int_vectors():
    for c in V["float32"]:
        hi, lo = words(c["hex"])
        assert registers.f32_to_int(hi, lo) == c["int"], c


def test_f32_exact_beyond_float32_precision():
    # 2^24 + 2 kWh: a float32 "* 1000" would land on a multiple of 2^11 or so; the
    # integer path gives the exact product
    hi, lo = words("4b800001")
    assert registers.f32_kwh_to_wh(hi, lo) == (2**24 + 2) * 1000
    # every power of two from 2^-20 to 2^100 kWh, exactly
    for e in range(-20, 101):
        bits = (e + 127) << 23
        wh = registers.f32_kwh_to_wh(bits >> 16, bits & 0xFFFF)
        if e >= 0:
            assert wh == 1000 * 2**e
        else:
            assert wh == (1000 + (1 << (-e - 1))) >> (-e), e  # 1000/2^k, ties up


def test_f32_bad_words():
    raises(ValueError, registers.f32_to_int, 0x10000, 0)
    raises(ValueError, registers.f32_to_int, 0, -1)


def test_decode_bms_vectors():
    for c in V["bms"]:
        got = registers.decode_bms(c["regs"])
        assert got == c["bat"], (c["what"], got)


def test_decode_bms_into_given_dict_and_keys():
    out = {}
    c = V["bms"][0]
    assert registers.decode_bms(c["regs"], out) is out
    assert sorted(out) == sorted(
        ["id", "soc", "soh", "mv", "ma", "t", "tmin", "cyc", "flt", "life_wh"]
    )
    raises(ValueError, registers.decode_bms, c["regs"][:13])


def test_meter_map():
    assert registers.meter_map("sdm630") == (0x34, 0x48)
    assert registers.meter_map("sdm120") == (0x0C, 0x48)
    assert registers.meter_map({"power": 2, "energy": 4}) == (2, 4)
    raises(ValueError, registers.meter_map, "sdm999")
    raises(ValueError, registers.meter_map, {"power": 2})
    raises(ValueError, registers.meter_map, {"power": -1, "energy": 4})
    raises(ValueError, registers.meter_map, {"power": 2, "energy": 0xFFFF})
    raises(ValueError, registers.meter_map, 5)


class SimBus:
    """A stream with Modbus devices behind it: {unit: {"hold": {addr: v}, "inp": {addr: v}}}.
    Answers 03/04 from the maps (exception 2 for an unmapped register); records requests."""

    char_bits = 10

    def __init__(self, devices):
        self.devices = devices
        self.requests = []
        self._out = b""

    def write(self, data):
        req = bytes(data)
        assert modbus.crc16(req) == 0
        self.requests.append(req)
        unit, fn = req[0], req[1]
        addr = (req[2] << 8) | req[3]
        count = (req[4] << 8) | req[5]
        dev = self.devices.get(unit)
        if dev is None:
            return len(req)
        regs = dev["hold" if fn == 3 else "inp"]
        body = bytearray([unit, fn, 2 * count])
        for a in range(addr, addr + count):
            if a not in regs:
                body = bytearray([unit, fn | 0x80, 2])
                break
            body.append(regs[a] >> 8)
            body.append(regs[a] & 0xFF)
        c = modbus.crc16(body)
        body.append(c & 0xFF)
        body.append(c >> 8)
        self._out = bytes(body)
        return len(req)

    def readinto(self, buf):
        n = min(len(buf), len(self._out))
        for i in range(n):
            buf[i] = self._out[i]
        self._out = self._out[n:]
        return n


def put_f32(regs, addr, hexbits):
    hi, lo = words(hexbits)
    regs[addr] = hi
    regs[addr + 1] = lo


def meter_regs(energy_hex, power_hex, power_at=0x34):
    inp = {}
    for a in range(0x50):
        inp[a] = 0
    put_f32(inp, 0x48, energy_hex)
    put_f32(inp, power_at, power_hex)
    return {"hold": {0xFC00: 0x00BC, 0xFC01: 0x614E}, "inp": inp}


def run(coro):
    return asyncio.run(coro)


async def _call(coro):
    try:
        return await coro
    except Exception as e:
        return e


def test_read_meter_sdm630_two_transactions():
    bus = SimBus({1: meter_regs("4996b43f", "4506699a")})  # 1234567.9 kWh, 2150.6 W
    m = ModbusMaster(bus, baud=115200, timeout_ms=30)
    got = run(registers.read_meter(m, 1, "sdm630"))
    assert got == {"e_wh": 1234567875, "p_w": 2151}
    assert [(r[1], (r[2] << 8) | r[3], r[5]) for r in bus.requests] == [(4, 0x48, 2), (4, 0x34, 2)]
    out = {}
    assert run(registers.read_meter(m, 1, "sdm630", out)) is out and out["p_w"] == 2151


def test_read_meter_sdm120_and_config_map_merged():
    bus = SimBus({1: meter_regs("3f800000", "c5066666", power_at=0x0C)})
    m = ModbusMaster(bus, baud=115200, timeout_ms=30)
    assert run(registers.read_meter(m, 1, "sdm120")) == {"e_wh": 1000, "p_w": -2150}
    # registers close together: one transaction spanning both
    bus = SimBus({1: meter_regs("3f800000", "40200000", power_at=0x40)})
    m = ModbusMaster(bus, baud=115200, timeout_ms=30)
    got = run(registers.read_meter(m, 1, {"power": 0x40, "energy": 0x48}))
    assert got == {"e_wh": 1000, "p_w": 3}
    assert len(bus.requests) == 1 and bus.requests[0][5] == 10  # 0x40..0x49


def test_read_meter_bad_floats_are_bad_readings():
    for e_hex, p_hex in (
        ("7fc00000", "3f800000"),
        ("bf800000", "3f800000"),
        ("7f800000", "3f800000"),
        ("3f800000", "7fc00000"),
    ):
        bus = SimBus({1: meter_regs(e_hex, p_hex)})
        m = ModbusMaster(bus, baud=115200, timeout_ms=30)
        e = run(_call(registers.read_meter(m, 1, "sdm630")))
        assert isinstance(e, ValueError), (e_hex, p_hex, e)
        assert m.err == {"mb_to": 0, "mb_crc": 0, "mb_exc": 0, "mb_addr": 0}
    # -0.0 kWh is zero, not negative
    bus = SimBus({1: meter_regs("80000000", "80000000")})
    m = ModbusMaster(bus, baud=115200, timeout_ms=30)
    assert run(registers.read_meter(m, 1, "sdm630")) == {"e_wh": 0, "p_w": 0}


def test_read_meter_values_out_of_range_are_bad_readings():
    # CONTRACT §4.1/§2: energy above 10^8 kWh, power beyond +-10^7 W; the garbage floats a
    # meter or a noisy line can give (the largest float32 kWh would be 3.4e41 Wh)
    cases = (
        ("7fc00000", "3f800000", "meter e_wh"),  # NaN
        ("ffc00000", "3f800000", "meter e_wh"),  # negative NaN
        ("7f800000", "3f800000", "meter e_wh"),  # +inf
        ("ff800000", "3f800000", "meter e_wh"),  # -inf
        ("bf800000", "3f800000", "meter e_wh"),  # -1 kWh
        ("7149f2ca", "3f800000", "meter e_wh"),  # 1e30 kWh
        ("7f7fffff", "3f800000", "meter e_wh"),  # the largest float32
        ("4cbebc21", "3f800000", "meter e_wh"),  # 100,000,008 kWh: the next float above 1e8
        ("4d0f0d18", "3f800000", "meter e_wh"),  # 1.5e8 kWh
        ("5f800000", "3f800000", "meter e_wh"),  # 2^64 kWh (not converted: too large)
        ("3f800000", "7fc00000", "meter p_w"),  # NaN W
        ("3f800000", "ff800000", "meter p_w"),  # -inf W
        ("3f800000", "7149f2ca", "meter p_w"),  # 1e30 W
        ("3f800000", "f149f2ca", "meter p_w"),  # -1e30 W
        ("3f800000", "4b189681", "meter p_w"),  # 10,000,001 W
        ("3f800000", "cb189681", "meter p_w"),  # -10,000,001 W
    )
    for e_hex, p_hex, field in cases:
        for power_at in (0x34, 0x40):  # two transactions, and one spanning both
            bus = SimBus({1: meter_regs(e_hex, p_hex, power_at)})
            m = ModbusMaster(bus, baud=115200, timeout_ms=30)
            out = {"e_wh": 7, "p_w": 8}
            model = {"power": power_at, "energy": 0x48}
            e = run(_call(registers.read_meter(m, 1, model, out)))
            assert isinstance(e, registers.BadReading), (e_hex, p_hex, e)
            assert isinstance(e, ValueError) and str(e) == field, (e_hex, p_hex, str(e))
            assert out == {"e_wh": 7, "p_w": 8}  # the caller's reading is left as it was
            assert m.err == {"mb_to": 0, "mb_crc": 0, "mb_exc": 0, "mb_addr": 0}
            if field == "meter e_wh" and power_at == 0x34:
                assert len(bus.requests) == 1  # no power read after a bad energy
    # the edges are readings: exactly 10^8 kWh, +-10^7 W, 0
    for e_hex, p_hex, want in (
        ("4cbebc20", "4b189680", {"e_wh": 10**11, "p_w": 10**7}),
        ("00000000", "cb189680", {"e_wh": 0, "p_w": -(10**7)}),
    ):
        bus = SimBus({1: meter_regs(e_hex, p_hex)})
        m = ModbusMaster(bus, baud=115200, timeout_ms=30)
        assert run(registers.read_meter(m, 1, "sdm630")) == want


def test_read_bms_fields_out_of_range_are_bad_readings():
    good = list(V["bms"][0]["regs"])
    for i, v, field in (
        (0, 1001, "BMS soc"),
        (0, 65535, "BMS soc"),
        (1, 1001, "BMS soh"),
        (4, 2001, "BMS t"),
        (4, 0x10000 - 1001, "BMS t"),  # -100.1 degC
        (4, 0x8000, "BMS t"),
        (5, 0x10000 - 1001, "BMS tmin"),
        (5, 0x7FFF, "BMS tmin"),
    ):
        regs = list(good)
        regs[i] = v
        bus = SimBus({11: _bms(regs)})
        m = ModbusMaster(bus, baud=115200, timeout_ms=20)
        out = {"id": "kept"}
        e = run(_call(registers.read_bms(m, 11, True, out)))
        assert isinstance(e, registers.BadReading) and str(e) == field, (i, v, e)
        assert out == {"id": "kept"}  # nothing written into the caller's dict
    for i, v in ((0, 1000), (1, 0), (4, 2000), (4, 0x10000 - 1000), (5, 2000), (5, 0xFC18)):
        regs = list(good)
        regs[i] = v
        bus = SimBus({11: _bms(regs)})
        bat = run(registers.read_bms(ModbusMaster(bus, baud=115200, timeout_ms=20), 11))
        assert bat["soc"] <= 1000 and -1000 <= bat["t"] <= 2000 and -1000 <= bat["tmin"]
    # a bad serial is a bad reading too
    bus = SimBus({12: _bms(V["bms"][3]["regs"])})
    e = run(_call(registers.read_bms(ModbusMaster(bus, baud=115200, timeout_ms=20), 12)))
    assert isinstance(e, registers.BadReading)


def test_read_meter_bus_errors_raise():
    bus = SimBus({})
    m = ModbusMaster(bus, baud=115200, timeout_ms=20, retries=0)
    assert isinstance(run(_call(registers.read_meter(m, 1, "sdm630"))), modbus.Timeout)
    assert m.err["mb_to"] == 1
    dev = meter_regs("3f800000", "3f800000")
    del dev["inp"][0x34]
    m = ModbusMaster(SimBus({1: dev}), baud=115200, timeout_ms=20)
    e = run(_call(registers.read_meter(m, 1, "sdm630")))
    assert isinstance(e, modbus.ExceptionReply) and e.code == 2


def test_read_meter_sn():
    bus = SimBus({1: meter_regs("3f800000", "3f800000")})
    m = ModbusMaster(bus, baud=115200, timeout_ms=30)
    assert run(registers.read_meter_sn(m, 1)) == 12345678
    r = bus.requests[0]
    assert r[1] == 3 and (r[2] << 8) | r[3] == 0xFC00 and r[5] == 2


def _bms(regs):
    hold = {}
    for i, v in enumerate(regs):
        hold[i] = v
    return {"hold": hold, "inp": {}}


def test_read_bms():
    good = V["bms"][0]
    bad = V["bms"][3]
    bus = SimBus({11: _bms(good["regs"]), 12: _bms(bad["regs"])})
    m = ModbusMaster(bus, baud=115200, timeout_ms=20, retries=1)
    assert run(registers.read_bms(m, 11)) == good["bat"]
    assert bus.requests[0] == bytes.fromhex("0b030000000ec4a4")
    e = run(_call(registers.read_bms(m, 12)))
    assert isinstance(e, ValueError)
    # an empty slot: timeout raised, not counted, not retried
    n = len(bus.requests)
    e = run(_call(registers.read_bms(m, 13, False)))
    assert isinstance(e, modbus.Timeout) and m.err["mb_to"] == 0
    assert len(bus.requests) == n + 1
    # a slot that should hold a battery: counted once after the retry
    e = run(_call(registers.read_bms(m, 13)))
    assert isinstance(e, modbus.Timeout) and m.err["mb_to"] == 1
    assert len(bus.requests) == n + 3


def test_bms_decode_allocation_bounded():
    # the decode into a reused dict allocates only the serial string (MicroPython heap)
    try:
        import gc

        alloc = gc.mem_alloc  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        return  # CPython: no heap figures
    regs = V["bms"][0]["regs"]
    out = {}
    registers.decode_bms(regs, out)
    gc.collect()
    a = alloc()
    for _ in range(10):
        registers.decode_bms(regs, out)
    used = alloc() - a
    assert used <= 10 * 96, used  # ~64 bytes: the 8-character str
    _ = timebase  # keep the import: the master in these tests uses it
