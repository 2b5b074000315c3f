# Modbus master driver (firmware/modbus_master.py) over an in-memory scripted bus.
try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore

import modbus
import timebase
from fwtest import raises, vector
from modbus_master import ModbusMaster

V = vector("modbus.json")


def h(s):
    return bytes.fromhex(s)


def frame(*body):
    b = bytearray(body)
    c = modbus.crc16(b)
    b.append(c & 0xFF)
    b.append(c >> 8)
    return bytes(b)


def regs_reply(unit, fn, regs):
    body = [unit, fn, 2 * len(regs)]
    for v in regs:
        body.append(v >> 8)
        body.append(v & 0xFF)
    return frame(*body)


class FakeBus:
    """An RS-485 line with scripted devices: each request written takes the next script
    entry: None (no answer) or (delay_ms, reply bytes), delivered `chunk` bytes per read."""

    char_bits = 10

    def __init__(self, script, chunk=64, stale=b""):
        self.script = list(script)
        self.chunk = chunk
        self.writes = []
        self.write_ticks = []
        self.last_rx = None  # ticks of the last read that returned bytes
        self.gaps = []  # ms from the last byte read to each following write
        self._out = stale
        self._due = timebase.ticks_ms()

    def write(self, data):
        now = timebase.ticks_ms()
        assert not self._out, "request written while a reply is still on the line"
        if self.last_rx is not None:
            self.gaps.append(timebase.ticks_diff(now, self.last_rx))
        self.writes.append(bytes(data))
        self.write_ticks.append(now)
        item = self.script.pop(0) if self.script else None
        if item is not None:
            self._due = timebase.ticks_add(now, item[0])
            self._out = item[1]
        return len(data)

    def readinto(self, buf):
        if not self._out or timebase.ticks_diff(timebase.ticks_ms(), self._due) < 0:
            return 0
        n = min(len(buf), len(self._out), self.chunk)
        for i in range(n):
            buf[i] = self._out[i]
        self._out = self._out[n:]
        self.last_rx = timebase.ticks_ms()
        return n


def run(coro):
    return asyncio.run(coro)


async def _call(coro):
    try:
        return await coro
    except Exception as e:  # return the error to assert on it
        return e


def master(bus, **kw):
    kw.setdefault("baud", 115200)
    kw.setdefault("timeout_ms", 30)
    return ModbusMaster(bus, **kw)


ZERO = {"mb_to": 0, "mb_crc": 0, "mb_exc": 0, "mb_addr": 0}


def test_read_holding_and_input():
    rh = V["responses"][1]  # unit 11, 14 registers
    ri = V["responses"][2]  # unit 1, fn 4, 2 registers
    bus = FakeBus([(2, h(rh["hex"])), (2, h(ri["hex"]))])
    m = master(bus)
    assert run(m.read_holding(11, 0, 14)) == rh["regs"]
    assert run(m.read_input(1, 0x48, 2)) == ri["regs"]
    assert bus.writes == [h(V["requests"][2]["hex"]), h(V["requests"][4]["hex"])]
    assert m.ok == 2 and m.err == ZERO


def test_writes():
    w6 = V["responses"][4]
    w16 = V["responses"][5]
    bus = FakeBus([(1, h(w6["hex"])), (1, h(w16["hex"]))])
    m = master(bus)
    run(m.write_single(17, 1, 3))
    run(m.write_multiple(17, 1, [10, 258]))
    assert bus.writes == [h(V["requests"][6]["hex"]), h(V["requests"][8]["hex"])]
    assert m.ok == 2 and m.err == ZERO


def test_reply_in_one_byte_chunks_with_delay():
    rh = V["responses"][1]
    bus = FakeBus([(5, h(rh["hex"]))], chunk=1)
    m = master(bus)
    assert run(m.read_holding(11, 0, 14)) == rh["regs"]


def test_read_timeout_retried_then_counted_once():
    bus = FakeBus([None, None, None, None])
    m = master(bus, retries=2)
    t0 = timebase.ticks_ms()
    e = run(_call(m.read_holding(11, 0, 14)))
    assert isinstance(e, modbus.Timeout), e
    assert len(bus.writes) == 3  # one try + 2 retries
    assert m.err == {"mb_to": 1, "mb_crc": 0, "mb_exc": 0, "mb_addr": 0} and m.ok == 0
    # each try waited at least its response timeout
    assert timebase.ticks_diff(timebase.ticks_ms(), t0) >= 3 * 30


def test_retry_succeeds_counts_no_error():
    rh = V["responses"][1]
    bus = FakeBus([None, (2, h(rh["hex"]))])
    m = master(bus, retries=1)
    assert run(m.read_holding(11, 0, 14)) == rh["regs"]
    assert len(bus.writes) == 2 and bus.writes[0] == bus.writes[1]
    assert m.err == ZERO and m.ok == 1


def test_no_retries_configured():
    bus = FakeBus([None, None])
    m = master(bus, retries=0)
    assert isinstance(run(_call(m.read_input(1, 0, 2))), modbus.Timeout)
    assert len(bus.writes) == 1 and m.err["mb_to"] == 1


def test_writes_never_retried():
    bus = FakeBus([None, None, None])
    m = master(bus, retries=3)
    assert isinstance(run(_call(m.write_single(17, 1, 3))), modbus.Timeout)
    assert len(bus.writes) == 1 and m.err["mb_to"] == 1
    bad = bytearray(h(V["responses"][5]["hex"]))
    bad[-1] ^= 1
    bus.script = [(1, bytes(bad)), None]
    assert isinstance(run(_call(m.write_multiple(17, 1, [10, 258]))), modbus.CrcError)
    assert len(bus.writes) == 2 and m.err["mb_crc"] == 1 and m.ok == 0


def test_crc_error_retried_and_counted_once():
    rh = V["responses"][1]
    bad = bytearray(h(rh["hex"]))
    bad[10] ^= 0x10
    bus = FakeBus([(1, bytes(bad)), (1, bytes(bad))])
    m = master(bus, retries=1)
    assert isinstance(run(_call(m.read_holding(11, 0, 14))), modbus.CrcError)
    assert len(bus.writes) == 2
    assert m.err == {"mb_to": 0, "mb_crc": 1, "mb_exc": 0, "mb_addr": 0}
    # a bad reply then a good one: no error counted
    bus.script = [(1, bytes(bad)), (1, h(rh["hex"]))]
    assert run(m.read_holding(11, 0, 14)) == rh["regs"]
    assert m.err["mb_crc"] == 1 and m.ok == 1


def test_exception_reply_not_retried():
    ex = V["responses"][6]  # unit 1, fn 3, code 2
    bus = FakeBus([(1, h(ex["hex"])), (1, h(ex["hex"]))])
    m = master(bus, retries=2)
    e = run(_call(m.read_holding(1, 0, 10)))
    assert isinstance(e, modbus.ExceptionReply) and e.code == 2
    assert len(bus.writes) == 1
    assert m.err == {"mb_to": 0, "mb_crc": 0, "mb_exc": 1, "mb_addr": 0}


def test_wrong_unit_and_function_counted_as_addr():
    bus = FakeBus([(1, regs_reply(12, 3, [1] * 14)), (1, regs_reply(12, 3, [1] * 14))])
    m = master(bus, retries=1)
    assert isinstance(run(_call(m.read_holding(11, 0, 14))), modbus.AddrError)
    assert len(bus.writes) == 2 and m.err["mb_addr"] == 1
    bus.script = [(1, regs_reply(11, 4, [1] * 14)), (1, regs_reply(11, 3, [7] * 14))]
    assert run(m.read_holding(11, 0, 14)) == [7] * 14  # retried after the wrong function
    assert m.err["mb_addr"] == 1 and m.ok == 1


def test_count_timeout_false_for_an_empty_slot():
    bus = FakeBus([None, None])
    m = master(bus, retries=1)
    e = run(_call(m.read_holding(13, 0, 14, count_timeout=False)))
    assert isinstance(e, modbus.Timeout)
    assert m.err == ZERO  # an empty slot's silence is not an error
    assert len(bus.writes) == 1  # and it is not asked twice
    # other errors are still counted
    bad = bytearray(regs_reply(13, 3, [0] * 14))
    bad[-2] ^= 1
    bus.script = [(1, bytes(bad)), (1, bytes(bad))]
    assert isinstance(run(_call(m.read_holding(13, 0, 14, False))), modbus.CrcError)
    assert m.err["mb_crc"] == 1 and m.err["mb_to"] == 0


def test_stale_input_flushed_before_request():
    rh = V["responses"][1]
    stale = regs_reply(11, 3, [9] * 14)  # a late reply to an earlier request, same shape
    bus = FakeBus([(2, h(rh["hex"]))], stale=stale)
    m = master(bus)
    assert run(m.read_holding(11, 0, 14)) == rh["regs"]


def test_silence_before_each_request():
    # 9600 baud, 10-bit characters: 3.5 characters are 3.65 ms -> at least 4 ms of ticks
    rh = V["responses"][1]
    bus = FakeBus([(1, h(rh["hex"]))] * 3)
    m = ModbusMaster(bus, baud=9600, timeout_ms=50)
    assert m.silence_ms == 4
    for _ in range(3):
        run(m.read_holding(11, 0, 14))
    assert len(bus.gaps) == 2 and min(bus.gaps) >= 4, bus.gaps
    assert ModbusMaster(bus, baud=38400).silence_ms == 2  # 1750 us above 19200 baud
    assert ModbusMaster(bus, baud=19200).silence_ms == 2  # 1823 us


def test_timeout_counts_from_end_of_transmission():
    # 9600 baud: the request takes 9 ms, the 33-byte reply 35 ms; a reply that starts
    # 40 ms after the write with timeout_ms=20 is still in time (40 < 9 + 20 + 35)
    rh = V["responses"][1]
    bus = FakeBus([(40, h(rh["hex"]))])
    m = ModbusMaster(bus, baud=9600, timeout_ms=20, retries=0)
    assert m.chars_ms(8) == 9 and m.chars_ms(33) == 35
    assert run(m.read_holding(11, 0, 14)) == rh["regs"]


def test_transactions_serialised():
    rh = V["responses"][1]
    ri = V["responses"][2]
    bus = FakeBus([(3, h(rh["hex"])), (3, h(ri["hex"]))])
    m = master(bus)

    async def both():
        return await asyncio.gather(m.read_holding(11, 0, 14), m.read_input(1, 0x48, 2))

    a, b = run(both())  # FakeBus asserts no request is written over a pending reply
    assert a == rh["regs"] and b == ri["regs"]


def test_bad_arguments_raise_valueerror_uncounted():
    bus = FakeBus([])
    m = master(bus)
    assert isinstance(run(_call(m.read_holding(0, 0, 1))), ValueError)
    assert isinstance(run(_call(m.read_input(1, 0, 126))), ValueError)
    assert isinstance(run(_call(m.write_single(1, 0, 70000))), ValueError)
    assert isinstance(run(_call(m.write_multiple(1, 0, []))), ValueError)
    assert bus.writes == [] and m.err == ZERO and m.ok == 0
    raises(ValueError, ModbusMaster, bus, 0)
    raises(ValueError, ModbusMaster, bus, 9600, 0)
    raises(ValueError, ModbusMaster, bus, 9600, 100, -1)


def test_recovers_after_garbage_reply():
    rh = V["responses"][1]
    bus = FakeBus([(1, b"\xff\x00\x0b\x03"), (1, b"\x00\x00" + h(rh["hex"]))])
    m = master(bus, retries=1)
    # first try: noise then silence -> (a header of ours began) CRC error -> retry -> good
    assert run(m.read_holding(11, 0, 14)) == rh["regs"]
    assert m.err == ZERO and len(bus.writes) == 2


class VirtualClock:
    """Injected clock: time moves only when the master sleeps, so waits are exact."""

    def __init__(self):
        self.t = 1000

    def ticks_ms(self):
        return self.t

    def ticks_diff(self, a, b):
        return a - b

    def ticks_add(self, a, b):
        return a + b

    async def asleep_ms(self, ms):
        self.t += ms
        await asyncio.sleep(0)


class ClockedBus(FakeBus):
    def __init__(self, clock, script):
        FakeBus.__init__(self, script)
        self.clock = clock

    def write(self, data):
        self.writes.append(bytes(data))
        self.write_ticks.append(self.clock.t)
        item = self.script.pop(0) if self.script else None
        if item is not None:
            self._due = self.clock.t + item[0]
            self._out = item[1]
        return len(data)

    def readinto(self, buf):
        if not self._out or self.clock.t < self._due:
            return 0
        n = len(self._out)
        for i in range(n):
            buf[i] = self._out[i]
        self._out = b""
        return n


def test_injected_clock_exact_deadlines():
    clk = VirtualClock()
    rh = V["responses"][1]
    # 9600 baud: request 9 ms, 33-byte reply 35 ms, timeout 100 ms: deadline 144 ms
    bus = ClockedBus(clk, [None, (144, h(rh["hex"])), (145, h(rh["hex"]))])
    m = ModbusMaster(bus, baud=9600, timeout_ms=100, retries=0, clock=clk)
    e = run(_call(m.read_holding(11, 0, 14)))
    assert isinstance(e, modbus.Timeout)
    assert clk.t - bus.write_ticks[0] == 144  # gave up exactly at the deadline
    assert run(m.read_holding(11, 0, 14)) == rh["regs"]  # in time at the deadline
    assert clk.t - bus.write_ticks[1] == 144
    # the next request waited for 3.5 characters of silence after the reply (4 ms ticks
    # mean more than 3.65 ms): a ms tick difference must exceed silence_ms
    assert isinstance(run(_call(m.read_holding(11, 0, 14))), modbus.Timeout)  # 1 ms late
    assert bus.write_ticks[2] - (bus.write_ticks[1] + 144) == m.silence_ms + 1
    assert m.err["mb_to"] == 2 and m.ok == 1
