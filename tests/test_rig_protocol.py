"""Rig protocol pieces without I/O: charger lines against CONTRACT §3's golden lines, RTU
CRC and framing, fault mangling and the counters it maps to, retry semantics, scenarios."""

from __future__ import annotations

import random

import pytest
from pymodbus.framer.rtu import FramerRTU

from tools.rig import lines, rtu
from tools.rig.faults import (
    BUS_COUNTER,
    CHARGER_COUNTER,
    COUNTERS,
    BusFaults,
    ChargerFaults,
    FaultLog,
    FaultRates,
)
from tools.rig.lines import ChargerReading
from tools.rig.scenario import ScenarioError, parse

GOLDEN = [
    (
        ChargerReading(slot=1, state="C", mv=67200, ma=15250, t=312, fault=0),
        b"$C,1,C,67200,15250,312,0*31\r\n",
    ),
    (ChargerReading(slot=2, state="I", mv=0, ma=0, t=251, fault=0), b"$C,2,I,0,0,251,0*3E\r\n"),
    (
        ChargerReading(slot=3, state="E", mv=71900, ma=0, t=655, fault=17),
        b"$C,3,E,71900,0,655,17*0A\r\n",
    ),
    (ChargerReading(slot=4, state="X", mv=0, ma=0, t=0, fault=0), b"$C,4,X,0,0,0,0*2F\r\n"),
]


@pytest.mark.parametrize(("reading", "line"), GOLDEN)
def test_charger_golden_replies(reading: ChargerReading, line: bytes) -> None:
    assert lines.format_reply(reading) == line
    assert lines.parse_reply(line) == reading
    assert lines.parse_reply(line.rstrip()) == reading


def test_charger_golden_query() -> None:
    assert lines.format_query(1) == b"$Q,1*4C\r\n"
    assert lines.parse_query(b"$Q,1*4C\r\n") == 1
    assert lines.parse_query(b"$Q,1*4c\r\n") == 1  # lowercase hex accepted
    assert lines.parse_query(lines.format_query(16)) == 16


@pytest.mark.parametrize(
    "bad",
    [
        b"$Q,1*4D\r\n",
        b"$Q,01*7C\r\n",
        b"$Q,0*4D\r\n",
        b"$Q,17*7B\r\n",
        b"Q,1*4C\r\n",
        b"$Q,1*4\r\n",
        b"$Q, 1*6C\r\n",
        b"$Q,1\r\n",
        b"$Q,x*19\r\n",
    ],
)
def test_charger_bad_queries(bad: bytes) -> None:
    assert lines.parse_query(bad) is None


def test_charger_reply_rules() -> None:
    assert lines.parse_reply(lines.frame("C,1,C,67200,-150,-12,0")) is not None  # signed ma, t
    for body in (
        "C,1,C,067200,0,1,0",
        "C,1,C,1,-0,1,0",
        "C,1,Q,1,1,1,0",
        "C,1,C,1,1,1",
        "C,1,C,-1,1,1,0",
        "C,1,C,1,1,1,65536",
        "C,0,C,1,1,1,0",
    ):
        assert lines.parse_reply(lines.frame(body)) is None, body


def test_crc_matches_pymodbus_and_the_spec_example() -> None:
    assert rtu.with_crc(bytes.fromhex("01030000000a")).hex() == "01030000000ac5cd"
    rnd = random.Random(1)
    for _ in range(200):
        data = rnd.randbytes(rnd.randrange(2, 40))
        assert rtu.crc16(data) == int.from_bytes(
            FramerRTU.compute_CRC(data).to_bytes(2, "big"), "little"
        )
        assert rtu.crc_ok(rtu.with_crc(data))


def test_rtu_frame_lengths() -> None:
    assert rtu.request_length(b"\x0b") is None
    assert rtu.request_length(b"\x0b\x03") == 8
    assert rtu.request_length(b"\x01\x10\x00\x00\x00\x02") is None
    assert rtu.request_length(b"\x01\x10\x00\x00\x00\x02\x04") == 13
    assert rtu.request_length(b"\x01\x2b") == rtu.UNKNOWN
    assert rtu.reply_length(b"\x0b\x03") is None
    assert rtu.reply_length(b"\x0b\x03\x1c") == 33  # 14 registers: the 41-byte exchange
    assert rtu.reply_length(b"\x0b\x83") == 5
    assert rtu.reply_length(b"\x01\x06") == 8


REQ = rtu.with_crc(bytes((11, 3, 0, 0, 0, 14)))
REPLY = rtu.with_crc(bytes((11, 3, 28)) + bytes(range(28)))


def bus(**rates: float) -> BusFaults:
    return BusFaults(FaultRates(**rates), FaultLog(t0=0.0), seed=3)  # type: ignore[arg-type]


def test_bus_mangling_produces_the_symptom_of_its_counter() -> None:
    f = bus()
    for _ in range(100):
        out = f.mangle("crc", REQ, REPLY)
        assert len(out) == len(REPLY) and out[:3] == REPLY[:3] and not rtu.crc_ok(out)
        assert sum((a ^ b).bit_count() for a, b in zip(out, REPLY, strict=True)) == 1
        out = f.mangle("garbage", REQ, REPLY)
        assert len(out) == len(REPLY) and out[:3] == REPLY[:3] and not rtu.crc_ok(out)
    exc = f.mangle("exception", REQ, REPLY)
    assert rtu.crc_ok(exc) and exc[0] == 11 and exc[1] == 0x83 and len(exc) == 5
    wrong = f.mangle("wrong_unit", REQ, REPLY)
    assert rtu.crc_ok(wrong) and wrong[0] != 11 and wrong[1:-2] == REPLY[1:-2]
    assert f.mangle(None, REQ, REPLY) == REPLY
    assert set(BUS_COUNTER.values()) | set(CHARGER_COUNTER.values()) == set(COUNTERS)


def test_charger_mangling() -> None:
    f = ChargerFaults(FaultRates(), FaultLog(t0=0.0), seed=3)
    good = lines.format_reply(GOLDEN[0][0])
    for _ in range(50):
        bad = f.bad_checksum(good)
        assert bad[:-4] == good[:-4] and bad != good and lines.parse_reply(bad) is None
        assert bad[-4:-2].decode().isupper() or bad[-4:-2].isdigit()
        g = f.garbage_line(3)
        assert lines._body(g) is not None  # checksum fine: it is a malformed line (ser_bad)
        assert lines.parse_reply(g) is None
        other = f.other_slot(2, 4)
        assert other in (1, 3, 4)
    assert f.other_slot(1, 1) == 2  # a one-channel controller: the other slot answers X


def test_rates_validation_and_uniform() -> None:
    with pytest.raises(ValueError, match="more than 1"):
        FaultRates(mb_crc=0.6, mb_silence=0.5)
    with pytest.raises(ValueError, match="within 0..1"):
        FaultRates(ser_slow=-0.1)
    u = FaultRates.uniform(0.06, bus_timeout_s=0.3)
    assert u.mb_crc == pytest.approx(0.01) and u.ser_slow == pytest.approx(0.012)
    assert sum(u.bus_rates().values()) == pytest.approx(0.06)
    assert u.retry_window == pytest.approx(0.55)


def test_fault_rates_are_honoured_and_seeded() -> None:
    rates = {"mb_crc": 0.1, "mb_silence": 0.2, "mb_exception": 0.05}
    a, b = bus(**rates, retry_window_s=0), bus(**rates, retry_window_s=0)
    kinds_a = [a.decide(REQ, float(k)) for k in range(5000)]
    assert kinds_a == [b.decide(REQ, float(k)) for k in range(5000)]
    assert kinds_a.count("silence") == pytest.approx(1000, rel=0.15)
    assert kinds_a.count("crc") == pytest.approx(500, rel=0.2)
    totals = a.log.totals()
    assert totals["mb_to"] == kinds_a.count("silence")
    assert totals["mb_crc"] == kinds_a.count("crc")
    assert totals["mb_exc"] == kinds_a.count("exception")


def test_retries_of_a_faulted_read_fail_alike_and_log_once() -> None:
    f = bus(mb_crc=0.5, mb_exception=0.5, retry_window_s=0.5)
    first = f.decide(REQ, 10.0)
    assert first is not None
    assert f.decide(REQ, 10.3) == first  # retry
    assert f.decide(REQ, 10.7) == first  # retry of the retry (window from the last attempt)
    log = f.log.entries()
    assert len(log) == 1 and log[0]["attempts"] == 3 and log[0]["unit"] == 11
    assert sum(f.log.totals().values()) == 1
    f.decide(REQ, 20.0)  # next poll, outside the window: a new transaction
    assert len(f.log.entries()) == 2
    other = rtu.with_crc(bytes((12, 3, 0, 0, 0, 14)))
    f.decide(other, 20.1)  # a different request is never a retry
    assert len(f.log.entries()) == 3


def test_scenario_parse() -> None:
    sc = parse(
        {
            "duration_s": 5,
            "events": [
                {"t": 2, "remove": 1},
                {"t": 0.5, "insert": 1, "pack": "60V", "power_w": 800, "soc": 0.5},
                {"t": 1, "fault": 2, "code": 17},
                {"t": 1.5, "clear": 2},
            ],
        },
        slots=2,
    )
    assert [e.action for e in sc.events] == ["insert", "fault", "clear", "remove"]
    assert sc.events[0].args == {"pack": "60V", "power_w": 800, "soc": 0.5}
    assert sc.duration_s == 5
    for bad, msg in [
        ({"events": [{"t": 0, "insert": 3}]}, "slot"),
        ({"events": [{"t": 0, "insert": 1, "remove": 1}]}, "exactly one"),
        ({"events": [{"t": -1, "remove": 1}]}, "'t'"),
        ({"events": [{"t": 0, "insert": 1, "colour": "red"}]}, "unknown key"),
        ({"events": [{"t": 0, "insert": 1, "soc": "half"}]}, "wrong type"),
        ({"events": [{"t": 0, "fault": 1}]}, "code"),
        ({"evts": []}, "unknown scenario key"),
        ([], "object"),
    ]:
        with pytest.raises(ScenarioError, match=msg):
            parse(bad, slots=2)
