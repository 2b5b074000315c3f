"""The charger controller simulator over a real pty (pyserial on the station side):
answers per CONTRACT §3, and each fault kind shows its symptom and is logged once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import serial

from tools.rig import PACKS, FaultRates, Rig, RigHost, format_query, parse_reply
from tools.rig.lines import _body, frame


def open_port(rig: Rig, timeout: float = 0.5) -> serial.Serial:
    return serial.Serial(rig.charger_path, rig.charger_baud, timeout=timeout)


def query(port: serial.Serial, slot: int) -> bytes:
    port.reset_input_buffer()
    port.write(format_query(slot))
    return bytes(port.readline())


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig(slots=3, seed=2) as r:
        yield r


def test_replies_per_contract(rig: Rig) -> None:
    with open_port(rig) as port:
        r1 = parse_reply(query(port, 1))
        assert r1 is not None and (r1.slot, r1.state, r1.mv, r1.ma, r1.fault) == (1, "I", 0, 0, 0)
        assert 240 <= r1.t <= 260  # ambient 25 °C
        r4 = parse_reply(query(port, 4))  # beyond the controller's 3 channels
        assert r4 is not None and (r4.slot, r4.state, r4.mv, r4.ma, r4.t) == (4, "X", 0, 0, 0)
        r16 = parse_reply(query(port, 16))
        assert r16 is not None and r16.state == "X"
        rig.insert(
            2, pack="60V", power_w=800, capacity_wh=10, soc=0.4, start_delay_s=0.3, ramp_s=0.5
        )
        r2 = parse_reply(query(port, 2))
        assert r2 is not None and r2.state == "W" and r2.ma == 0
        assert r2.mv == round(PACKS["60V"].ocv(0.4) * 1000)  # open-circuit voltage, 16S at 40 %
        time.sleep(1.2)
        r2 = parse_reply(query(port, 2))
        assert r2 is not None and r2.state == "C"
        assert r2.ma == round(800 / 67.2 * 1000)
        rig.set_fault(2, 17)
        time.sleep(0.8)
        r2 = parse_reply(query(port, 2))
        assert r2 is not None and (r2.state, r2.ma, r2.fault) == ("E", 0, 17)
        rig.remove(2)
        r2 = parse_reply(query(port, 2))
        assert r2 is not None and (r2.state, r2.mv, r2.ma) == ("I", 0, 0)


def test_bad_queries_get_no_answer(rig: Rig) -> None:
    with open_port(rig, timeout=0.3) as port:
        for bad in (b"$Q,1*4D\r\n", b"$Q,0*7D\r\n", b"hello\r\n", b"$Q,17*7B\r\n"):
            port.write(bad)
            assert port.readline() == b""
        # noise before a good query does not hide it
        port.write(b"\x00\xff$Q" + format_query(1))
        r = parse_reply(bytes(port.readline()))
        assert r is not None and r.slot == 1
    assert rig.stats()["ChargerRelay"]["bad_requests"] == 4
    assert sum(rig.fault_totals().values()) == 0


def test_paced_at_the_baud_rate() -> None:
    with Rig(slots=1, charger_baud=9600, seed=1) as rig, open_port(rig) as port:
        t0 = time.monotonic()
        line = query(port, 1)
        dt = time.monotonic() - t0
        # 10 + 21 characters at 9600 baud = 32 ms on a real line
        assert len(line) == 21 and dt >= 0.027


N = 8


@pytest.mark.parametrize(
    ("kind", "counter"),
    [
        ("checksum", "ser_cs"),
        ("silence", "ser_to"),
        ("garbage", "ser_bad"),
        ("other_slot", "ser_bad"),
        ("slow", "ser_to"),
    ],
)
def test_each_fault_kind(kind: str, counter: str) -> None:
    rates = FaultRates(charger_timeout_s=0.1, slow_factor=2.5, **{f"ser_{kind}": 1.0})
    # the station gives up after 0.1 s; wait 0.15 s for silence and slow, longer for the
    # faults that answer at once (a loaded machine must not turn them into timeouts)
    wait = 0.15 if kind in ("silence", "slow") else 0.6
    with Rig(slots=3, faults=rates, seed=5) as rig, open_port(rig, timeout=wait) as port:
        rig.insert(1, capacity_wh=10, soc=0.5)
        for _ in range(N):
            t0 = time.monotonic()
            port.reset_input_buffer()
            port.write(format_query(1))
            line = bytes(port.readline())
            if kind == "checksum":
                assert line.endswith(b"\r\n") and parse_reply(line) is None
                body = line[1 : line.rindex(b"*")].decode()
                fixed = parse_reply(frame(body))  # only the checksum was wrong
                assert fixed is not None and fixed.slot == 1 and fixed.state in "WC"
            elif kind in ("silence", "slow"):
                assert line == b""
            elif kind == "garbage":
                assert line.startswith(b"$") and _body(line) is not None  # checksum good
                assert parse_reply(line) is None  # ... and still malformed
            else:
                r = parse_reply(line)
                assert r is not None and r.slot != 1
            if kind == "slow":  # the reply does come, late
                port.timeout = 0.5
                late = bytes(port.readline())
                port.timeout = wait
                assert parse_reply(late) is not None
                assert time.monotonic() - t0 >= 0.2
        log = rig.fault_log()
        assert len(log) == N
        assert all(
            e["kind"] == kind
            and e["counter"] == counter
            and e["link"] == "charger"
            and e["unit"] == 1
            and e["attempts"] == 1
            for e in log
        )
        totals = rig.fault_totals()
        assert totals[counter] == N and sum(totals.values()) == N


def test_slow_reply_is_dropped_when_the_station_asks_again() -> None:
    rates = FaultRates(ser_slow=1.0, charger_timeout_s=0.1, slow_factor=3.0)
    with Rig(slots=2, faults=rates, seed=5) as rig, open_port(rig, timeout=0.12) as port:
        port.write(format_query(1))
        assert port.readline() == b""
        port.write(format_query(2))  # the next query before the late reply: it is dropped
        port.timeout = 0.6
        late = parse_reply(bytes(port.readline()))
        assert late is not None and late.slot == 2  # only the second one's (late) reply
        assert rig.stats()["ChargerRelay"]["slow_dropped"] == 1
        assert rig.fault_totals()["ser_to"] == 2


def test_many_rigs_share_one_host_thread() -> None:
    import threading

    before = threading.active_count()
    with RigHost() as host:
        rigs = [Rig(slots=2, seed=k, host=host, name=f"r{k}").start() for k in range(3)]
        assert threading.active_count() == before + 1
        rigs[1].insert(2, soc=0.3)
        ports = [open_port(r) for r in rigs]
        try:
            states = [parse_reply(query(p, 2)) for p in ports]
            assert [s.state if s else None for s in states] == ["I", "W", "I"]
        finally:
            for p in ports:
                p.close()
            for r in rigs:
                r.stop()
        assert threading.active_count() == before + 1
    assert threading.active_count() == before
