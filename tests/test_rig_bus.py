"""The Modbus bus simulator (real pymodbus RTU server behind the pacing relay), seen from
the station's side of the pty: pymodbus' own RTU client for the normal reads, raw bytes
with pyserial for the fault symptoms."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

import pytest
import serial
from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ModbusIOException

from tools.rig import PACKS, FaultRates, Rig, rtu


def client(rig: Rig, timeout: float = 0.4) -> ModbusSerialClient:
    c = ModbusSerialClient(rig.bus_path, baudrate=rig.bus_baud, timeout=timeout, retries=0)
    assert c.connect()
    return c


def f32(regs: list[int]) -> float:
    return float(struct.unpack(">f", struct.pack(">HH", regs[0], regs[1]))[0])


def bms_request(unit: int) -> bytes:
    return rtu.with_crc(bytes((unit, 3, 0, 0, 0, 14)))


def exchange(port: serial.Serial, req: bytes, wait: float) -> tuple[bytes, float]:
    """Send one request, collect what comes back within `wait` s (stop at a whole frame)."""
    port.reset_input_buffer()
    t0 = time.monotonic()
    port.write(req)
    buf = b""
    deadline = t0 + wait
    while time.monotonic() < deadline:
        port.timeout = max(0.001, min(0.02, deadline - time.monotonic()))
        buf += port.read(max(1, port.in_waiting))
        n = rtu.reply_length(buf)
        if n is not None and n != rtu.UNKNOWN and len(buf) >= n:
            break
    return buf, time.monotonic() - t0


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig(slots=3, seed=7, meter_serial=31415926, meter_start_kwh=1234.5) as r:
        yield r


def test_bms_present_and_absent(rig: Rig) -> None:
    c = client(rig)
    try:
        with pytest.raises(ModbusIOException):  # empty slot: the BMS does not answer
            c.read_holding_registers(0, count=14, device_id=12)
        bat = rig.insert(2, pack="72V", power_w=1000, capacity_wh=10, soc=0.55, serial="B0000042")
        r = c.read_holding_registers(0, count=14, device_id=12)
        assert not r.isError()
        regs = r.registers
        assert len(regs) == 14
        assert regs[0] == 550  # soc 0.1 %
        assert regs[1] == bat.soh
        assert regs[2] == round(PACKS["72V"].ocv(0.55) * 100)  # open-circuit, 10 mV
        assert regs[3] == 0  # W: not charging yet
        assert regs[4] > regs[5]  # highest and lowest cell temperature
        assert regs[6] == bat.cycles
        assert b"".join(x.to_bytes(2, "big") for x in regs[8:12]) == b"B0000042"
        assert regs[12:14] == [0, 0]
        time.sleep(2.5)
        regs = c.read_holding_registers(0, count=14, device_id=12).registers
        assert regs[3] == round(1000 / 84.0 * 100)  # CC current, 10 mA
        with pytest.raises(ModbusIOException):
            c.read_holding_registers(0, count=14, device_id=11)
        rig.remove(2)
        with pytest.raises(ModbusIOException):
            c.read_holding_registers(0, count=14, device_id=12)
    finally:
        c.close()
    stats = rig.stats()["BusRelay"]
    assert stats["unanswered"] == 3 and stats["server_silent"] == 0


def test_meter_registers(rig: Rig) -> None:
    c = client(rig)
    try:
        sn = c.read_holding_registers(0xFC00, count=2, device_id=1).registers
        assert (sn[0] << 16) | sn[1] == 31415926
        regs = c.read_input_registers(0, count=0x4A, device_id=1).registers
        v, a, w, kwh = f32(regs[0:2]), f32(regs[6:8]), f32(regs[0x34:0x36]), f32(regs[0x48:0x4A])
        assert 228 < v < 232
        assert w == pytest.approx(15.0, rel=1e-4)  # idle load only
        assert a == pytest.approx(w / v, rel=1e-4)
        assert 1234.5 <= kwh < 1234.6
        r = c.read_holding_registers(0, count=2, device_id=1)  # no such register: exception
        assert r.isError()
    finally:
        c.close()


def test_a_bms_read_takes_the_wire_time_at_9600(rig: Rig) -> None:
    rig.insert(1, soc=0.5)
    with serial.Serial(rig.bus_path, 9600) as port:
        for _ in range(3):
            reply, dt = exchange(port, bms_request(11), 0.5)
            assert len(reply) == 33 and rtu.crc_ok(reply)
            assert dt >= 0.040  # 41 characters × 10 bits / 9600 baud = 42.7 ms


def test_requests_to_units_off_the_bus_are_silent_and_never_faults() -> None:
    rates = FaultRates(mb_crc=1.0, retry_window_s=0)
    with Rig(slots=2, faults=rates, meter=False) as rig, serial.Serial(rig.bus_path, 9600) as p:
        for unit in (1, 11, 12, 5, 247):
            reply, _ = exchange(p, bms_request(unit), 0.25)
            assert reply == b""
        p.write(b"\x0b\x03\x00\x00")  # half a frame, then silence: dropped, no reply
        time.sleep(0.2)
        assert rig.fault_log() == [] and sum(rig.fault_totals().values()) == 0
        assert rig.stats()["BusRelay"]["unanswered"] == 5
        assert rig.stats()["BusRelay"]["bad_request_bytes"] == 4
        rig.insert(1)
        reply, _ = exchange(p, bms_request(11), 0.6)
        assert len(reply) == 33 and not rtu.crc_ok(reply)  # now present: faulted
        assert rig.fault_totals()["mb_crc"] == 1


N = 6


@pytest.mark.parametrize(
    ("kind", "counter"),
    [
        ("crc", "mb_crc"),
        ("silence", "mb_to"),
        ("garbage", "mb_crc"),
        ("slow", "mb_to"),
        ("exception", "mb_exc"),
        ("wrong_unit", "mb_addr"),
    ],
)
def test_each_fault_kind(kind: str, counter: str) -> None:
    # the station's timeout is 0.15 s; a slow reply comes after 0.3 s
    rates = FaultRates(bus_timeout_s=0.15, slow_factor=2.0, retry_window_s=0, **{f"mb_{kind}": 1.0})
    with Rig(slots=1, faults=rates, seed=3) as rig, serial.Serial(rig.bus_path, 9600) as p:
        rig.insert(1)
        # the station gives up after 0.15 s; the other faults answer at once (wait longer
        # for them so that a loaded machine cannot turn them into timeouts)
        wait = 0.15 if kind in ("silence", "slow") else 0.6
        for _ in range(N):
            reply, dt = exchange(p, bms_request(11), wait)
            if kind in ("crc", "garbage"):
                assert len(reply) == 33 and reply[:3] == b"\x0b\x03\x1c"
                assert not rtu.crc_ok(reply)
            elif kind in ("silence", "slow"):
                assert reply == b""
            elif kind == "exception":
                assert rtu.crc_ok(reply) and reply[:2] == b"\x0b\x83" and len(reply) == 5
            else:
                assert rtu.crc_ok(reply) and reply[0] != 11 and len(reply) == 33
            if kind == "slow":  # the reply comes after the station gave up
                late, dt2 = exchange(p, b"", 0.4)
                assert len(late) == 33 and rtu.crc_ok(late) and dt + dt2 >= 0.3
            if kind == "silence":
                late, _ = exchange(p, b"", 0.2)
                assert late == b""
        log = rig.fault_log()
        assert len(log) == N
        assert all(
            e["kind"] == kind
            and e["counter"] == counter
            and e["link"] == "bus"
            and e["unit"] == 11
            and e["attempts"] == 1
            for e in log
        )
        totals = rig.fault_totals()
        assert totals[counter] == N and sum(totals.values()) == N


def test_a_retried_read_fails_the_same_way_and_is_logged_once() -> None:
    rates = FaultRates(mb_crc=0.5, mb_exception=0.5, retry_window_s=0.6)
    with Rig(slots=1, faults=rates, seed=3) as rig, serial.Serial(rig.bus_path, 9600) as p:
        rig.insert(1)
        replies = [exchange(p, bms_request(11), 0.4)[0] for _ in range(3)]  # read + 2 retries
        assert all(len(r) >= 5 and not (rtu.crc_ok(r) and r[1] == 3) for r in replies)
        assert len({r[1] for r in replies}) == 1  # same failure each time (0x03 or 0x83)
        log = rig.fault_log()
        assert len(log) == 1 and log[0]["attempts"] == 3
        time.sleep(0.7)  # the next poll of the same register is a new transaction
        exchange(p, bms_request(11), 0.4)
        assert len(rig.fault_log()) == 2 and sum(rig.fault_totals().values()) == 2


def test_pymodbus_client_sees_each_symptom() -> None:
    """pymodbus' own master: CRC-broken and silent replies are IO errors, an exception
    reply is an error response."""
    for kind, symptom in (("crc", "io"), ("silence", "io"), ("exception", "exc")):
        rates = FaultRates(retry_window_s=0, **{f"mb_{kind}": 1.0})
        with Rig(slots=1, faults=rates) as rig:
            rig.insert(1)
            c = client(rig, timeout=0.25 if symptom == "io" else 1.0)
            try:
                if symptom == "io":
                    with pytest.raises(ModbusIOException):
                        c.read_holding_registers(0, count=14, device_id=11)
                else:
                    r = c.read_holding_registers(0, count=14, device_id=11)
                    assert r.isError() and r.exception_code == 6
            finally:
                c.close()
            assert (
                rig.fault_totals()[
                    {"crc": "mb_crc", "silence": "mb_to", "exception": "mb_exc"}[kind]
                ]
                == 1
            )
