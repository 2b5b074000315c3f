"""The firmware's Modbus RTU master against an independent peer: a real pymodbus 3.16 RTU
server on the far end of a socat pty pair, driven in-process on CPython and as a script on
the MicroPython unix port. Also pins the golden vectors to pymodbus's own framer and the
float32 conversions to struct + Fraction, so neither depends on the firmware's code."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import pathlib
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadInputRegistersResponse,
    WriteMultipleRegistersRequest,
    WriteMultipleRegistersResponse,
    WriteSingleRegisterRequest,
    WriteSingleRegisterResponse,
)
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from tests.helpers import FIRMWARE, ROOT, micropython_bin

sys.path.insert(0, str(FIRMWARE))
import modbus
import registers
from hal.unix import Serial
from modbus_master import ModbusMaster

VECTORS = ROOT / "tests" / "vectors"
MB = json.loads((VECTORS / "modbus.json").read_text())
REG = json.loads((VECTORS / "registers.json").read_text())

BAUD = 9600  # a pty ignores it; the master's timings use it
TIMEOUT_MS = 400  # generous: the machine is shared, the server may be scheduled late

# ---------------------------------------------------------------- vectors vs pymodbus


def _frame(pdu: ModbusPDU) -> str:
    return FramerRTU(DecodePDU(False)).buildFrame(pdu).hex()


def test_request_vectors_match_pymodbus_framer() -> None:
    for r in MB["requests"]:
        fn, unit, addr = r["fn"], r["unit"], r["addr"]
        pdu: ModbusPDU
        if fn == 3:
            pdu = ReadHoldingRegistersRequest(dev_id=unit, address=addr, count=r["count"])
        elif fn == 4:
            pdu = ReadInputRegistersRequest(dev_id=unit, address=addr, count=r["count"])
        elif fn == 6:
            pdu = WriteSingleRegisterRequest(dev_id=unit, address=addr, registers=[r["value"]])
        else:
            pdu = WriteMultipleRegistersRequest(dev_id=unit, address=addr, registers=r["values"])
        assert _frame(pdu) == r["hex"], r


def test_response_vectors_match_pymodbus_framer() -> None:
    decoder = FramerRTU(DecodePDU(False))
    for r in MB["responses"]:
        unit, fn = r["unit"], r["fn"]
        pdu: ModbusPDU
        if "exc" in r:
            pdu = ExceptionResponse(fn, r["exc"], device_id=unit)
        elif fn == 3:
            pdu = ReadHoldingRegistersResponse(dev_id=unit, registers=r["regs"])
        elif fn == 4:
            pdu = ReadInputRegistersResponse(dev_id=unit, registers=r["regs"])
        elif fn == 6:
            req = bytes.fromhex(r["request"])
            value = int.from_bytes(req[4:6], "big")
            pdu = WriteSingleRegisterResponse(
                dev_id=unit, address=int.from_bytes(req[2:4], "big"), registers=[value]
            )
        else:
            req = bytes.fromhex(r["request"])
            pdu = WriteMultipleRegistersResponse(
                dev_id=unit, address=int.from_bytes(req[2:4], "big"), count=r["count"]
            )
        assert _frame(pdu) == r["hex"], r
        # and pymodbus decodes the vector back to the same content
        _, got = decoder.handleFrame(bytes.fromhex(r["hex"]), 0, 0)
        assert got is not None and got.dev_id == unit, r
        if "regs" in r:
            assert list(got.registers) == r["regs"]
        if "exc" in r:
            assert got.exception_code == r["exc"]


def test_crc_vectors_match_pymodbus() -> None:
    for c in MB["crc"]:
        assert FramerRTU.compute_CRC(bytes.fromhex(c["hex"])) == int.from_bytes(
            c["crc"].to_bytes(2, "little"), "big"
        )  # pymodbus gives the CRC as its wire bytes read big-endian


# ------------------------------------------------------- float32 vs struct + Fraction


def _exact(bits: int) -> tuple[int | None, int | None]:
    """(Wh from kWh, rounded int) from CPython's float and Fraction: exact rational math."""
    v = struct.unpack(">f", bits.to_bytes(4, "big"))[0]
    if math.isnan(v) or math.isinf(v):
        return None, None
    x = Fraction(v)
    half = Fraction(1, 2)
    wh = None if x < 0 else math.floor(x * 1000 + half)
    return wh, math.floor(x + half)


def _fw(bits: int) -> tuple[int | None, int | None]:
    hi, lo = bits >> 16, bits & 0xFFFF
    return registers.f32_kwh_to_wh(hi, lo), registers.f32_to_int(hi, lo)


def test_float32_vectors_are_exact() -> None:
    for c in REG["float32"]:
        assert _exact(int(c["hex"], 16)) == (c["wh"], c["int"]), c


@settings(max_examples=3000, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_float32_conversion_exact_for_any_bits(bits: int) -> None:
    assert _fw(bits) == _exact(bits)


def test_float32_conversion_exact_at_every_exponent() -> None:
    # every exponent with mantissas at the edges, and values just around the .5 ties
    for e in range(256):
        for m in (0, 1, 2, 0x400000, 0x7FFFFE, 0x7FFFFF, 0x123457, 0x5555555 & 0x7FFFFF):
            for s in (0, 1):
                bits = (s << 31) | (e << 23) | m
                assert _fw(bits) == _exact(bits), hex(bits)
    for wh in range(0, 5000, 7):
        for d in (-1, 0, 1):
            bits = struct.unpack(">I", struct.pack(">f", (wh + 0.5) / 1000))[0] + d
            assert _fw(bits) == _exact(bits), hex(bits)


# -------------------------------------------------- parser properties (hypothesis)


@settings(max_examples=400, deadline=None)
@given(
    unit=st.integers(1, 247),
    regs=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=40),
    garbage=st.binary(max_size=40),
    cuts=st.lists(st.integers(0, 300), max_size=6),
)
def test_parser_finds_pymodbus_reply_however_fed(
    unit: int, regs: list[int], garbage: bytes, cuts: list[int]
) -> None:
    # a pymodbus-built reply behind noise that holds no byte equal to our unit (noise that
    # does may be a header of ours: see the framing rule in firmware/modbus.py), cut anywhere
    noise = bytes(b for b in garbage if b != unit)
    reply = bytes.fromhex(_frame(ReadHoldingRegistersResponse(dev_id=unit, registers=regs)))
    data = noise + reply
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    p = modbus.Response(unit, 3, len(regs))
    got = None
    for a, b in itertools.pairwise(points):
        assert got is None
        got = p.feed(data[a:b])
    assert got == regs


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), unit=st.integers(1, 247), count=st.integers(1, 125))
def test_parser_never_crashes_on_noise(data: bytes, unit: int, count: int) -> None:
    p = modbus.Response(unit, 3, count)
    for i in range(0, len(data), 7):
        try:
            r = p.feed(data[i : i + 7])
        except modbus.ModbusError:
            p.reset(unit, 3, count)
            continue
        assert r is None or (isinstance(r, list) and len(r) == count)
    assert p._n <= 256
    assert isinstance(p.expired(), (modbus.Timeout, modbus.CrcError))


# ------------------------------------------------------------- pymodbus server on ptys


@pytest.fixture
def pty_pair(tmp_path: pathlib.Path) -> Iterator[tuple[str, str]]:
    """Two linked ptys from socat: the master's end and the server's end."""
    a, b = str(tmp_path / "master"), str(tmp_path / "server")
    proc = subprocess.Popen(
        ["socat", "-d", f"PTY,link={a},rawer", f"PTY,link={b},rawer"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not (os.path.exists(a) and os.path.exists(b)):
            assert proc.poll() is None, "socat exited"
            assert time.monotonic() < deadline, "socat made no ptys"
            time.sleep(0.02)
        yield a, b
    finally:
        proc.terminate()
        proc.wait(5)


METER_UNIT = 1
BMS_UNIT = 11
BMS_REGS = REG["bms"][0]["regs"]
ENERGY_KWH = 1234567.9
POWER_W = -2150.4


def _meter() -> SimDevice:
    bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
    hold = [SimData(0xFC00, values=12345678, datatype=DataType.UINT32)]
    inp = [
        SimData(0x00, count=0x34, values=0, datatype=DataType.REGISTERS),
        SimData(0x34, values=POWER_W, datatype=DataType.FLOAT32),
        SimData(0x36, count=0x12, values=0, datatype=DataType.REGISTERS),
        SimData(0x48, values=ENERGY_KWH, datatype=DataType.FLOAT32),
    ]
    return SimDevice(id=METER_UNIT, simdata=(bits, bits, hold, inp))


def _bms() -> SimDevice:
    bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
    hold = [
        SimData(0, values=BMS_REGS, datatype=DataType.REGISTERS),
        SimData(20, count=10, values=0, datatype=DataType.REGISTERS),  # writable scratch
    ]
    inp = [SimData(0, values=0, datatype=DataType.REGISTERS)]
    return SimDevice(id=BMS_UNIT, simdata=(bits, bits, hold, inp))


class Peer:
    """A pymodbus RTU server with a meter and a BMS. Replies for other units are dropped
    (an absent device is silent; pymodbus 3.16's SimCore answers an unknown unit with
    exception 4 even with ignore_missing_devices). `corrupt` flips a bit in the next N
    replies. `requests` counts the requests pymodbus decoded, per unit."""

    def __init__(self, port: str) -> None:
        self.corrupt = 0
        self.requests: dict[int, int] = {}
        self.server = ModbusSerialServer(
            [_meter(), _bms()],
            port=port,
            baudrate=BAUD,
            trace_packet=self._packet,
            trace_pdu=self._pdu,
        )

    def _packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            return data
        if data[0] not in (METER_UNIT, BMS_UNIT):
            return b""
        if self.corrupt:
            self.corrupt -= 1
            return data[:-1] + bytes([data[-1] ^ 0x01])
        return data

    def _pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests[pdu.dev_id] = self.requests.get(pdu.dev_id, 0) + 1
        return pdu


@pytest.fixture
async def peer(pty_pair: tuple[str, str]) -> AsyncIterator[tuple[Peer, str]]:
    p = Peer(pty_pair[1])
    await p.server.serve_forever(background=True)
    await asyncio.sleep(0.1)
    yield p, pty_pair[0]
    await p.server.shutdown()  # type: ignore[no-untyped-call]


def _f32(v: float) -> int:
    return int.from_bytes(struct.pack(">f", v), "big")


def _expected_meter() -> dict[str, int]:
    e, p = _f32(ENERGY_KWH), _f32(POWER_W)
    wh, _ = _exact(e)
    _, w = _exact(p)
    assert wh is not None and w is not None
    return {"e_wh": wh, "p_w": w}


async def test_master_against_pymodbus(peer: tuple[Peer, str]) -> None:
    server, path = peer
    ser = Serial(path, BAUD)
    try:
        m = ModbusMaster(ser, baud=BAUD, timeout_ms=TIMEOUT_MS, retries=1)
        # read holding (BMS) and input (meter), through the register maps
        assert await m.read_holding(BMS_UNIT, 0, 14) == BMS_REGS
        assert await registers.read_bms(m, BMS_UNIT) == REG["bms"][0]["bat"]
        assert await m.read_input(METER_UNIT, 0x48, 2) == [
            _f32(ENERGY_KWH) >> 16,
            _f32(ENERGY_KWH) & 0xFFFF,
        ]
        assert await registers.read_meter(m, METER_UNIT, "sdm630") == _expected_meter()
        assert await registers.read_meter_sn(m, METER_UNIT) == 12345678
        # write single, write multiple, read back
        await m.write_single(BMS_UNIT, 21, 0xBEEF)
        await m.write_multiple(BMS_UNIT, 24, [1, 2, 65535])
        assert await m.read_holding(BMS_UNIT, 20, 6) == [0, 0xBEEF, 0, 0, 1, 2]
        assert await m.read_holding(BMS_UNIT, 26, 1) == [65535]
        assert m.err == {"mb_to": 0, "mb_crc": 0, "mb_exc": 0, "mb_addr": 0}
        ok = m.ok
        # exception reply: illegal data address, not retried, counted once
        before = server.requests.get(BMS_UNIT, 0)
        with pytest.raises(modbus.ExceptionReply) as ei:
            await m.read_holding(BMS_UNIT, 100, 2)
        assert ei.value.code == 2
        assert server.requests[BMS_UNIT] == before + 1
        assert m.err["mb_exc"] == 1
        # missing unit: timeout after one retry, counted once
        with pytest.raises(modbus.Timeout):
            await m.read_holding(5, 0, 2)
        assert server.requests[5] == 2 and m.err["mb_to"] == 1
        # an empty slot's BMS: not retried, not counted
        with pytest.raises(modbus.Timeout):
            await m.read_holding(13, 0, 14, count_timeout=False)
        assert server.requests[13] == 1 and m.err["mb_to"] == 1
        # a write to a missing unit: never retried
        with pytest.raises(modbus.Timeout):
            await m.write_single(6, 0, 1)
        assert server.requests[6] == 1 and m.err["mb_to"] == 2
        # a garbled reply, then a good one on the retry: no error
        server.corrupt = 1
        assert await m.read_holding(BMS_UNIT, 0, 14) == BMS_REGS
        assert m.err["mb_crc"] == 0
        # garbled twice: one CRC error for the transaction
        server.corrupt = 2
        with pytest.raises(modbus.CrcError):
            await m.read_input(METER_UNIT, 0x34, 2)
        assert m.err == {"mb_to": 2, "mb_crc": 1, "mb_exc": 1, "mb_addr": 0}
        assert m.ok == ok + 1
    finally:
        ser.close()


MP_SCRIPT = r"""
import sys
sys.path.insert(0, %(fw)r)
import asyncio, json
import modbus, registers
from hal.unix import Serial
from modbus_master import ModbusMaster

async def call(coro):
    try:
        return await coro
    except modbus.ModbusError as e:
        return type(e).__name__ + (":%%d" %% e.code if hasattr(e, "code") else "")

async def main():
    m = ModbusMaster(Serial(%(path)r, %(baud)d), baud=%(baud)d, timeout_ms=%(to)d, retries=1)
    out = {}
    out["holding"] = await call(m.read_holding(11, 0, 14))
    out["bms"] = await call(registers.read_bms(m, 11))
    out["meter"] = await call(registers.read_meter(m, 1, "sdm630"))
    out["sn"] = await call(registers.read_meter_sn(m, 1))
    out["w6"] = await call(m.write_single(11, 22, 4660))
    out["w16"] = await call(m.write_multiple(11, 27, [7, 8, 9]))
    out["back"] = await call(m.read_holding(11, 20, 10))
    out["exc"] = await call(m.read_holding(11, 200, 1))
    out["missing"] = await call(m.read_input(7, 0, 2))
    out["empty"] = await call(m.read_holding(14, 0, 14, False))
    out["err"] = m.err
    out["ok"] = m.ok
    print("RESULT " + json.dumps(out))

asyncio.run(main())
"""


async def test_micropython_master_against_pymodbus(
    peer: tuple[Peer, str], tmp_path: pathlib.Path
) -> None:
    server, path = peer
    script = tmp_path / "mb_peer.py"
    script.write_text(
        MP_SCRIPT % {"fw": str(FIRMWARE), "path": path, "baud": BAUD, "to": TIMEOUT_MS}
    )
    proc = await asyncio.create_subprocess_exec(
        micropython_bin(),
        "-X",
        "heapsize=100k",
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = stdout.decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, text
    got: dict[str, Any] = json.loads(lines[0][7:])
    assert got["holding"] == BMS_REGS
    assert got["bms"] == REG["bms"][0]["bat"]
    assert got["meter"] == _expected_meter()
    assert got["sn"] == 12345678
    assert got["w6"] is None and got["w16"] is None
    assert got["back"] == [0, 0, 4660, 0, 0, 0, 0, 7, 8, 9]
    assert got["exc"] == "ExceptionReply:2"
    assert got["missing"] == "Timeout" and server.requests[7] == 2
    assert got["empty"] == "Timeout" and server.requests[14] == 1
    assert got["err"] == {"mb_to": 1, "mb_crc": 0, "mb_exc": 1, "mb_addr": 0}
    assert got["ok"] == 8  # meter: energy and power in two transactions
