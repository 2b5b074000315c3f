"""Serial lines between the station and the simulated devices: pty pairs, byte pacing at
the configured baud, and the relays that see every transaction (and inject faults).

    station ──pty── BusRelay ──pty── pymodbus RTU server (meter, BMS ×N)
    station ──pty── ChargerRelay (answers from the model itself)

Pacing: a character takes `char_bits / baud` seconds on a real line (10 bits for 8N1).
A request is taken to have arrived when its last character would have (first byte seen +
n characters); the reply starts `turnaround_chars` later (the RTU 3.5-character silence)
and each reply byte is handed to the pty when it would start on the wire, in bursts:
every wake-up writes the bytes that start within the next two `burst_s`, then sleeps
about one `burst_s`. So a reply reaches the station no earlier than 2 × burst_s before
it would on a real line, and the loop wakes about once a millisecond per active line,
not once per byte. If the loop falls behind it catches up at once: it never leaves a gap
inside a frame longer than its own scheduling delay.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import tty
from collections.abc import Callable
from typing import Any

from . import lines, rtu
from .faults import BusFaults, ChargerFaults
from .model import RigModel

log = logging.getLogger(__name__)

BURST_S = 0.001


class Pty:
    """A pty pair. The rig keeps the master (non-blocking) and also holds the slave open,
    so that nothing is lost and no EIO/hang-up happens while the peer has not opened
    `path` yet or reopens it. Both ends are raw."""

    def __init__(self) -> None:
        m, s = os.openpty()
        tty.setraw(m)
        tty.setraw(s)
        os.set_blocking(m, False)
        self.master = m
        self.slave = s
        self.path = os.ttyname(s)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class Rx:
    """Bytes read from a master fd by the event loop, with arrival times."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.fd = fd
        self.loop = loop
        self.buf = bytearray()
        self.t_start = 0.0  # when the first byte now in buf arrived
        self.t_last = 0.0
        self.total = 0
        self._ev = asyncio.Event()
        loop.add_reader(fd, self._ready)

    def _ready(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("read from fd %d failed: %s; line closed", self.fd, exc)
            self.loop.remove_reader(self.fd)
            return
        if not data:
            return
        now = time.monotonic()
        if not self.buf:
            self.t_start = now
        self.buf += data
        self.t_last = now
        self.total += len(data)
        self._ev.set()

    def consumed(self, n: int) -> None:
        """Drop n bytes from the front; what is left arrived no earlier than t_last."""
        del self.buf[:n]
        if self.buf:
            self.t_start = self.t_last

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for new bytes; False on timeout."""
        self._ev.clear()
        if timeout is None:
            await self._ev.wait()
            return True
        if timeout <= 0:
            return False
        try:
            # not wait_for: Python 3.11's returns the event's result when a cancellation
            # comes in the same turn, and the relay's loop would go on (its stop hung)
            async with asyncio.timeout(timeout):
                await self._ev.wait()
        except TimeoutError:
            return False
        return True

    async def idle_until(self, t: float) -> bool:
        """Sleep until t unless bytes come in first (then False)."""
        while True:
            if self.buf:
                return False
            remaining = t - time.monotonic()
            if remaining <= 0:
                return True
            await self.wait(remaining)

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.fd)
        except (ValueError, OSError):
            pass


async def sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        await asyncio.sleep(d)


async def paced_write(
    fd: int,
    data: bytes,
    *,
    start: float,
    char_s: float,
    stats: dict[str, int],
    burst_s: float = BURST_S,
) -> None:
    """Write data so that byte k reaches the pty about when it starts on the wire
    (start + k·char_s); char_s = 0 writes at once."""
    n = len(data)
    sent = 0
    while sent < n:
        now = time.monotonic()
        if char_s <= 0:
            upto = n
        else:
            upto = min(n, math.floor((now + 2 * burst_s - start) / char_s) + 1)
        if upto > sent:
            try:
                w = os.write(fd, data[sent:upto])
            except OSError:  # the station does not read: the pty is full
                w = 0
            if w < upto - sent:
                stats["overflow_bytes"] += n - sent - w
                return
            sent = upto
        if sent < n:
            await asyncio.sleep(max(0.0, start + sent * char_s - burst_s - time.monotonic()))


def _new_stats(*keys: str) -> dict[str, int]:
    return dict.fromkeys(("requests", "replies", "bad_request_bytes", "overflow_bytes") + keys, 0)


class BusRelay:
    """Between the station's bus pty and the pymodbus server's pty: frames each request,
    drops those for units that are not on the bus (no reply, not a fault), asks the
    server, mangles or delays the reply per the fault decision, paces it back."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        model: RigModel,
        station: Pty,
        server: Pty,
        baud: int,
        faults: BusFaults,
        pace: bool = True,
        char_bits: int = 10,
        turnaround_chars: float = 3.5,
        server_timeout_s: float = 0.5,
    ) -> None:
        self.model = model
        self.station = station
        self.server = server
        self.faults = faults
        self.char_s = char_bits / baud if pace else 0.0
        # silence that ends a request: 3.5 characters, at least 1.75 ms (§4), but a
        # partial frame is only abandoned after a generous gap (a loaded station)
        self.turnaround_s = max(turnaround_chars * char_bits / baud, 0.00175) if pace else 0.0
        self.gap_s = max(20 * char_bits / baud, 0.05)
        self.server_timeout_s = server_timeout_s
        self.rx = Rx(loop, station.master)
        self.srx = Rx(loop, server.master)
        self.stats = _new_stats("unanswered", "server_silent", "slow_dropped", "faulted")

    def close(self) -> None:
        self.rx.close()
        self.srx.close()

    async def run(self) -> None:
        while True:
            req, t_first = await self._next_request()
            try:
                await self._transaction(req, t_first)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not kill the bus for the rest of a test
                log.exception("bus transaction failed")

    async def _next_request(self) -> tuple[bytes, float]:
        rx = self.rx
        while True:
            buf = rx.buf
            if not buf:
                await rx.wait()
                continue
            n = rtu.request_length(buf)
            if n is None or (n != rtu.UNKNOWN and len(buf) < n):
                if not await rx.wait(self.gap_s):
                    self.stats["bad_request_bytes"] += len(rx.buf)
                    rx.buf.clear()
                continue
            if n == rtu.UNKNOWN:  # frame by silence
                if await rx.wait(self.gap_s):
                    continue
                n = len(buf)
            frame = bytes(buf[:n])
            if rtu.crc_ok(frame):
                t = rx.t_start
                rx.consumed(n)
                self.stats["requests"] += 1
                return frame, t
            rx.consumed(1)  # resynchronise one byte later
            self.stats["bad_request_bytes"] += 1

    async def _transaction(self, req: bytes, t_first: float) -> None:
        unit = req[0]
        if unit == 0 or not self.model.unit_present(unit):
            self.stats["unanswered"] += 1
            return
        kind = self.faults.decide(req, time.monotonic())
        arrival = t_first + len(req) * self.char_s
        if kind is not None:
            self.stats["faulted"] += 1
        if kind == "silence":
            return
        reply = await self._ask_server(req)
        if reply is None:
            self.stats["server_silent"] += 1
            return
        reply = self.faults.mangle(kind, req, reply)
        if kind == "slow":
            start = arrival + self.faults.slow_delay()
            if not await self.rx.idle_until(start):
                self.stats["slow_dropped"] += 1
                return
        else:
            start = arrival + self.turnaround_s
        await paced_write(
            self.station.master, reply, start=start, char_s=self.char_s, stats=self.stats
        )
        self.stats["replies"] += 1

    async def _ask_server(self, req: bytes) -> bytes | None:
        srx = self.srx
        srx.buf.clear()
        os.write(self.server.master, req)
        deadline = time.monotonic() + self.server_timeout_s
        while True:
            n = rtu.reply_length(srx.buf)
            if n is not None and n != rtu.UNKNOWN and len(srx.buf) >= n:
                out = bytes(srx.buf[:n])
                srx.consumed(n)
                return out
            remaining = deadline - time.monotonic()
            if n == rtu.UNKNOWN:
                if not await srx.wait(min(remaining, 0.02)):
                    out = bytes(srx.buf)
                    srx.buf.clear()
                    return out
                continue
            if remaining <= 0 or not await srx.wait(remaining):
                return None


class ChargerRelay:
    """The charger controller itself: reads `$Q` lines, answers from the model."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        model: RigModel,
        station: Pty,
        baud: int,
        faults: ChargerFaults,
        pace: bool = True,
        char_bits: int = 10,
        latency_s: float = 0.002,
        reading: Callable[[int], lines.ChargerReading] | None = None,
    ) -> None:
        self.model = model
        self.station = station
        self.faults = faults
        self.char_s = char_bits / baud if pace else 0.0
        self.latency_s = latency_s
        self.reading = reading or model.charger_reading
        self.rx = Rx(loop, station.master)
        self.stats = _new_stats("bad_requests", "slow_dropped", "faulted")

    def close(self) -> None:
        self.rx.close()

    async def run(self) -> None:
        while True:
            line, t_first = await self._next_line()
            try:
                await self._query(line, t_first)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("charger query failed")

    async def _next_line(self) -> tuple[bytes, float]:
        rx = self.rx
        while True:
            buf = rx.buf
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > 128:  # no line is that long: noise
                    self.stats["bad_request_bytes"] += len(buf)
                    buf.clear()
                if buf:
                    if not await rx.wait(0.5):
                        self.stats["bad_request_bytes"] += len(rx.buf)
                        rx.buf.clear()
                else:
                    await rx.wait()
                continue
            t = rx.t_start
            line = bytes(buf[: nl + 1])
            rx.consumed(nl + 1)
            dollar = line.rfind(b"$")
            if dollar > 0:  # noise before the line: resynchronise on the last '$'
                self.stats["bad_request_bytes"] += dollar
                line = line[dollar:]
            self.stats["requests"] += 1
            return line, t

    async def _query(self, line: bytes, t_first: float) -> None:
        slot = lines.parse_query(line)
        if slot is None:
            self.stats["bad_requests"] += 1
            return
        faults = self.faults
        kind = faults.decide(slot, time.monotonic())
        if kind is not None:
            self.stats["faulted"] += 1
        if kind == "silence":
            return
        arrival = t_first + len(line) * self.char_s
        if kind == "slow":
            start = arrival + faults.slow_delay()
            if not await self.rx.idle_until(start):
                self.stats["slow_dropped"] += 1
                return
        else:
            start = arrival + self.latency_s
            await sleep_until(start)  # the reading is taken when the reply goes out
        if kind == "garbage":
            out = faults.garbage_line(slot)
        else:
            target = faults.other_slot(slot, self.model.slots) if kind == "other_slot" else slot
            out = lines.format_reply(self.reading(target))
            if kind == "checksum":
                out = faults.bad_checksum(out)
        await paced_write(
            self.station.master, out, start=time.monotonic(), char_s=self.char_s, stats=self.stats
        )
        self.stats["replies"] += 1


def stats_json(*relays: Any) -> dict[str, dict[str, int]]:
    return {type(r).__name__: dict(r.stats) for r in relays}
