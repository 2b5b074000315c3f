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
        self._busy = False
        # asyncio.sleep_ms allocates nothing on MicroPython; the timebase wrapper would
        sleep = getattr(asyncio, "sleep_ms", None) if clock is None else None
        self._sleep_ms = sleep if sleep is not None else self._clk.asleep_ms
        self._last = self._clk.ticks_ms()  # last activity seen on the line
        self.ok = 0
        self.err = {"mb_to": 0, "mb_crc": 0, "mb_exc": 0, "mb_addr": 0}

    def chars_ms(self, n):
        """Milliseconds the line takes to carry n characters (rounded up)."""
        return (n * self._bits * 1000 + self.baud - 1) // self.baud

    # The public methods are plain functions returning the transaction's coroutine (await
    # them as usual): one coroutine object less per call on the per-sample path.
    def read_holding(self, unit, addr, count, count_timeout=True):
        """-> list of `count` ints (function 03)."""
        return self._txn(unit, 3, addr, count, count_timeout)

    def read_input(self, unit, addr, count, count_timeout=True):
        """-> list of `count` ints (function 04)."""
        return self._txn(unit, 4, addr, count, count_timeout)

    def write_single(self, unit, addr, value):
        """-> None once the unit echoed the write (function 06)."""
        return self._txn(unit, 6, addr, value, True)

    def write_multiple(self, unit, addr, values):
        """-> None once the unit confirmed the write (function 16)."""
        return self._txn(unit, 16, addr, values, True)

    async def _txn(self, unit, fn, addr, arg, count_timeout):
        # One coroutine for the whole transaction, retries included (each coroutine frame
        # is a few hundred bytes of heap on MicroPython).
        # One transaction at a time on the bus: a flag and a 1 ms poll rather than an
        # asyncio.Lock, which allocates ~0.5 KB per acquisition on MicroPython.
        sleep_ms = self._sleep_ms
        while self._busy:
            await sleep_ms(1)
        self._busy = True
        try:
            clk = self._clk
            s = self._s
            rx = self._rx
            resp = self._resp
            tx = self._tx
            if fn == 3 or fn == 4:
                n = modbus.pack_read(tx, unit, fn, addr, arg)  # ValueError: not counted
                count = arg
                tries = self.retries
            elif fn == 6:
                n = modbus.pack_write_single(tx, unit, addr, arg)
                count = 1
                tries = 0  # writes are never retried
            else:
                n = modbus.pack_write_multiple(tx, unit, addr, arg)
                count = len(arg)
                tries = 0
            reply_ms = self.timeout_ms + self.chars_ms(modbus.reply_len(fn, count))
            while True:
                # Drop stale input and wait until the line has been silent for 3.5
                # characters. ms ticks are coarse: a difference of d ticks is more than
                # d - 1 ms, hence ">". Bounded by timeout_ms on a bus that never falls
                # silent (then send anyway).
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
                        break
                    if clk.ticks_diff(now, start) > self.timeout_ms:
                        break
                    await sleep_ms(1)
                resp.reset(unit, fn, count, tx)
                s.write(self._txv[:n])
                end_tx = clk.ticks_add(clk.ticks_ms(), self.chars_ms(n))
                self._last = end_tx
                deadline = clk.ticks_add(end_tx, reply_ms)
                try:
                    r = None
                    while r is None:
                        k = s.readinto(rx)
                        now = clk.ticks_ms()
                        if k:
                            self._last = now
                            r = resp.feed(self._rxv[:k])  # raises CrcError, AddrError, ...
                            if r is not None:
                                break
                        if clk.ticks_diff(now, deadline) >= 0:
                            raise resp.expired()
                        if not k:
                            await sleep_ms(1)
                except modbus.ModbusError as e:
                    quiet = not count_timeout and isinstance(e, modbus.Timeout)
                    if tries > 0 and not quiet and not isinstance(e, modbus.ExceptionReply):
                        tries -= 1
                        continue
                    if not quiet:
                        self.err[e.key] += 1
                    raise
                self.ok += 1
                return r if fn == 3 or fn == 4 else None
        finally:
            self._busy = False
