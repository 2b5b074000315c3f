# Modbus RTU master: drives the sans-I/O core (modbus.py) over a stream with write(bytes),
# non-blocking readinto(buf) -> int and char_bits (hal Serial). The RS-485 direction pin is
# the HAL's business: this only calls write(), which must send the whole frame.
#
# One transaction: wait for 3.5 characters of silence on the line (reading and dropping
# stale input meanwhile), send the request, then poll for the reply until
#   end of the request's transmission + timeout_ms + the reply's own transmission time
# (both computed from baud and char_bits; the device's turnaround is timeout_ms).
# Reads are retried up to `retries` times (not after an exception reply: that is the
# device's answer; not after a timeout when count_timeout is False: an empty slot's BMS
# will not answer the second time either). Writes are never retried. A failed transaction
# is counted once, after its retries, in err[<key>], then its error is raised.
try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[no-redef,misc]
        return x

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore

import modbus
import timebase

_RX = const(64)  # receive chunk; the frame itself is assembled in the parser's buffer
_TX = const(256)  # largest request: 16 with 123 registers is 255 bytes
_DRAIN = const(16)  # reads per poll when dropping stale input (bounded on a babbling bus)


class ModbusMaster:
    def __init__(self, stream, baud=9600, timeout_ms=100, retries=1, clock=None):
        if not isinstance(baud, int) or baud <= 0:
            raise ValueError("baud must be a positive int")
        if not isinstance(timeout_ms, int) or timeout_ms <= 0:
            raise ValueError("timeout_ms must be a positive int")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError("retries must be >= 0")
        self._s = stream
        self.baud = baud
        self.timeout_ms = timeout_ms
        self.retries = retries
        self._clk = clock if clock is not None else timebase
        self._bits = getattr(stream, "char_bits", 10)
        # 3.5 characters, fixed at 1750 us above 19200 baud (Modbus over serial line, 2.5.1.1)
        us = 1750 if baud > 19200 else (35 * self._bits * 100000 + baud - 1) // baud
        self.silence_ms = (us + 999) // 1000
        self._tx = bytearray(_TX)
        self._txv = memoryview(self._tx)
        self._rx = bytearray(_RX)
        self._rxv = memoryview(self._rx)
        self._resp = modbus.Response()
        self._lock = asyncio.Lock()
        self._last = self._clk.ticks_ms()  # last activity seen on the line
        self.ok = 0
        self.err = {"mb_to": 0, "mb_crc": 0, "mb_exc": 0, "mb_addr": 0}

    def chars_ms(self, n):
        """Milliseconds the line takes to carry n characters (rounded up)."""
        return (n * self._bits * 1000 + self.baud - 1) // self.baud

    async def read_holding(self, unit, addr, count, count_timeout=True):
        return await self._read(unit, 3, addr, count, count_timeout)

    async def read_input(self, unit, addr, count, count_timeout=True):
        return await self._read(unit, 4, addr, count, count_timeout)

    async def write_single(self, unit, addr, value):
        async with self._lock:
            n = modbus.pack_write_single(self._tx, unit, addr, value)
            await self._write(n, unit, 6, 1)

    async def write_multiple(self, unit, addr, values):
        async with self._lock:
            n = modbus.pack_write_multiple(self._tx, unit, addr, values)
            await self._write(n, unit, 16, len(values))

    async def _write(self, n, unit, fn, count):
        try:
            await self._once(n, unit, fn, count)
        except modbus.ModbusError as e:
            self.err[e.key] += 1
            raise
        self.ok += 1

    async def _read(self, unit, fn, addr, count, count_timeout):
        async with self._lock:
            n = modbus.pack_read(self._tx, unit, fn, addr, count)  # ValueError: not counted
            tries = 0
            while True:
                try:
                    regs = await self._once(n, unit, fn, count)
                except modbus.ModbusError as e:
                    quiet = not count_timeout and isinstance(e, modbus.Timeout)
                    if (tries < self.retries and not quiet
                            and not isinstance(e, modbus.ExceptionReply)):
                        tries += 1
                        continue
                    if not quiet:
                        self.err[e.key] += 1
                    raise
                self.ok += 1
                return regs

    async def _quiet(self):
        # Drop stale input and wait until the line has been silent for 3.5 characters.
        # ms ticks are coarse: a difference of d ticks is more than d - 1 ms, hence ">".
        # Bounded by timeout_ms on a bus that never falls silent (then send anyway).
        clk = self._clk
        s = self._s
        rx = self._rx
        start = clk.ticks_ms()
        while True:
            got = False
            for _ in range(_DRAIN):
                if not s.readinto(rx):
                    break
                got = True
            now = clk.ticks_ms()
            if got:
                self._last = now
            if clk.ticks_diff(now, self._last) > self.silence_ms:
                return
            if clk.ticks_diff(now, start) > self.timeout_ms:
                return
            await clk.asleep_ms(1)

    async def _once(self, n, unit, fn, count):
        clk = self._clk
        s = self._s
        rx = self._rx
        rxv = self._rxv
        resp = self._resp
        await self._quiet()
        resp.reset(unit, fn, count, self._tx)
        s.write(self._txv[:n])
        end_tx = clk.ticks_add(clk.ticks_ms(), self.chars_ms(n))
        self._last = end_tx
        deadline = clk.ticks_add(end_tx, self.timeout_ms + self.chars_ms(modbus.reply_len(fn, count)))
        while True:
            k = s.readinto(rx)
            now = clk.ticks_ms()
            if k:
                self._last = now
                r = resp.feed(rxv[:k])  # raises CrcError / AddrError / ExceptionReply
                if r is not None:
                    return r
            if clk.ticks_diff(now, deadline) >= 0:
                raise resp.expired()
            if not k:
                await clk.asleep_ms(1)
