# The sampling loop's logic with the charger and the bus replaced by scripted objects of the
# same duck type (the real drivers run against the rig in tests/test_fw_integration.py).
import struct

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore

import charger
import config
import modbus
import persist
import station
from fwtest import tmpdir


class Clock:
    def __init__(self):
        self.t = 0

    def ms(self):
        return self.t


class Link:
    def __init__(self):
        self.err = {"ser_to": 0, "ser_cs": 0, "ser_bad": 0}
        self.state = {}  # slot -> (state, mv, ma) or None for silence

    async def poll(self, slot):
        s = self.state.get(slot, ("I", 0, 0))
        if s is None:
            self.err["ser_to"] += 1
            return None
        return charger.Reply(slot, s[0], s[1], s[2], 250, 0)


def f32(x):
    b = struct.pack(">f", x)
    return [(b[0] << 8) | b[1], (b[2] << 8) | b[3]]


class Bus:
    def __init__(self):
        self.err = {"mb_to": 0, "mb_crc": 0, "mb_exc": 0, "mb_addr": 0}
        self.kwh = 100.0
        self.w = 500.0
        self.sn = 1234
        self.silent = False
        self.bms = {}  # unit -> 14 holding registers; no BMS on this bus by default

    async def read_input(self, unit, addr, count, count_timeout=True):
        if self.silent:
            self.err["mb_to"] += 1
            raise modbus.Timeout()
        return f32(self.kwh if addr == 0x48 else self.w)

    async def read_holding(self, unit, addr, count, count_timeout=True):
        if not self.silent and addr == 0 and unit in self.bms:
            return list(self.bms[unit])
        if self.silent or addr != 0xFC00:
            raise modbus.Timeout()
        return [self.sn >> 16, self.sn & 0xFFFF]


def make(root, link=None, bus=None, clock=None, **over):
    cfg = config.example(slots=2)
    cfg.update({"stale_s": 3, "boot_base": 5})
    cfg.update(over)
    cfg = config.validate(cfg)
    st = station.Station(
        cfg, link or Link(), bus or Bus(), persist.ABStore(root, "state", 4096), clock or Clock()
    )
    st.start()
    return st


def run(coro):
    return asyncio.run(coro)


def evs(st, name):
    return [e for e in st.take_events() if e["ev"] == name]


def test_boot_counter_grows_from_boot_base_and_is_saved_first():
    d = tmpdir("st-boot")
    assert make(d).boot == 5
    assert persist.ABStore(d, "state", 4096).load()["boot"] == 5
    assert make(d).boot == 6
    assert make(d, boot_base=40).boot == 40  # a re-flashed board continues above the agent's


def test_registers_restored_and_reported_as_b_mwh():
    d = tmpdir("st-regs")
    link, clock = Link(), Clock()
    st = make(d, link, clock=clock)
    link.state[1] = ("C", 72000, 10000)  # 720 W
    for _ in range(11):
        run(st.cycle())
        clock.t += 1000
    assert st.slots[0].mwh == 2000  # 720 W for 10 s
    st.persist_now()
    st2 = make(d)
    assert st2.restored == [2000, 0]
    boot = [e for e in st2.take_events() if e["ev"] == "boot"][0]
    assert boot["restored"] == {"1": 2000, "2": 0}
    snap = st2.snapshot()
    assert snap["slots"][0]["e_mwh"] == 2000 and snap["slots"][0]["b_mwh"] == 2000


def test_meter_swap_and_register_down_raise_meter_reset():
    d = tmpdir("st-meter")
    bus, clock = Bus(), Clock()
    st = make(d, bus=bus, clock=clock)
    run(st.cycle())
    assert st.snapshot()["meter"] == {"e_wh": 100000, "p_w": 500, "sn": 1234}
    st.take_events()
    bus.silent = True  # the bus goes quiet past the stale window, and a new meter answers
    for _ in range(4):
        clock.t += 1000
        run(st.cycle())
    assert "meter" not in st.snapshot()
    assert [e["code"] for e in evs(st, "alarm")] == ["meter_stale"]
    bus.silent, bus.sn, bus.kwh = False, 999, 3.25
    clock.t += 1000
    run(st.cycle())
    assert evs(st, "meter_reset") == [
        {"ev": "meter_reset", "from_wh": 100000, "to_wh": 3250, "sn": 999}
    ]
    bus.kwh = 2.0  # the same meter's register goes down
    clock.t += 1000
    run(st.cycle())
    assert evs(st, "meter_reset") == [
        {"ev": "meter_reset", "from_wh": 3250, "to_wh": 2000, "sn": 999}
    ]


def test_stale_charger_is_omitted_and_a_long_gap_is_not_integrated():
    d = tmpdir("st-stale")
    link, clock = Link(), Clock()
    st = make(d, link, clock=clock)
    link.state[1] = ("C", 72000, 10000)
    run(st.cycle())
    clock.t += 1000
    run(st.cycle())
    assert st.slots[0].mwh == 200
    link.state[1] = None  # silent for 10 s: longer than the 3 s stale window
    for _ in range(10):
        clock.t += 1000
        run(st.cycle())
    s = st.snapshot()["slots"][0]
    assert "st" not in s and "mv" not in s and s["e_mwh"] == 200
    assert [e["code"] for e in evs(st, "alarm")] == ["charger_stale"]
    link.state[1] = ("C", 72000, 10000)
    clock.t += 1000
    run(st.cycle())
    assert st.slots[0].mwh == 200  # the gap is not bridged
    alarms = evs(st, "alarm")
    assert [a["code"] for a in alarms] == ["unmetered"] and "11000 ms" in alarms[0]["msg"]
    assert st.errors()["ser_to"] == 10


def test_a_session_is_saved_when_it_opens_and_closed_as_reboot_after_a_cut():
    d = tmpdir("st-sess")

    class Bms(Bus):
        async def read_holding(self, unit, addr, count, count_timeout=True):
            if addr == 0xFC00:
                return [0, 1234]
            # 8 ASCII chars "B0000042" in registers 8..11
            return [500, 990, 7200, 1000, 250, 240, 3, 0, 0x4230, 0x3030, 0x3030, 0x3432, 0, 7]

    link, clock = Link(), Clock()
    st = make(d, link, Bms(), clock, persist={"every_mwh": 10**9, "every_s": 3600})
    link.state[1] = ("C", 72000, 10000)
    for _ in range(3):
        run(st.cycle())
        clock.t += 1000
    assert [e["ev"] for e in st.take_events() if e["ev"].startswith("session")] == ["session_start"]
    # power cut now: no periodic save was due, yet the open session is on flash
    st2 = make(d)
    ends = [e for e in st2.take_events() if e["ev"] == "session_end"]
    assert len(ends) == 1 and ends[0]["why"] == "reboot" and ends[0]["bat"] == "B0000042"


def test_an_idle_slot_raises_no_unmetered_alarm_after_a_gap():
    d = tmpdir("st-idle")
    link, clock = Link(), Clock()
    st = make(d, link, clock=clock)
    run(st.cycle())
    link.state[2] = None  # an empty slot's channel goes quiet, then answers again
    for _ in range(6):
        clock.t += 1000
        run(st.cycle())
    link.state[2] = ("I", 0, 0)
    clock.t += 1000
    run(st.cycle())
    codes = [(a["code"], a.get("slot")) for a in evs(st, "alarm")]
    assert codes == [("charger_stale", 2)]  # stale said once; no unmetered for an idle slot


ERR7 = ["mb_addr", "mb_crc", "mb_exc", "mb_to", "ser_bad", "ser_cs", "ser_to"]


def test_meter_values_out_of_range_are_counted_and_omitted_at_once():
    d = tmpdir("st-badmeter")
    link, bus, clock = Link(), Bus(), Clock()
    st = make(d, link, bus, clock)
    link.state[1] = ("C", 72000, 10000)
    run(st.cycle())
    assert st.snapshot()["meter"] == {"e_wh": 100000, "p_w": 500, "sn": 1234}
    assert sorted(st.errors()) == ERR7  # no bad reading yet: the seven counters only
    bad = 0
    for kwh, w in (
        (float("nan"), 500.0),
        (float("inf"), 500.0),
        (-1.0, 500.0),
        (1e30, 500.0),
        (3.4028234663852886e38, 500.0),  # the largest float32: would be 3.4e41 Wh
        (1.5e8, 500.0),
        (100.0, float("nan")),
        (100.0, 1e30),
        (100.0, -2e7),
    ):
        bus.kwh, bus.w = kwh, w
        clock.t += 1000
        run(st.cycle())
        bad += 1
        snap = st.snapshot()
        assert "meter" not in snap, (kwh, w, snap.get("meter"))  # at once, not after stale_s
        assert [s["n"] for s in snap["slots"]] == [1, 2]  # every slot register stays
        assert snap["err"]["mb_bad"] == bad and snap["err"]["mb_to"] == 0
    assert st.meter_wh == 100000  # no garbage became the meter's register
    assert st.slots[0].mwh > 0
    evs_ = st.take_events()
    assert not [e for e in evs_ if e["ev"] == "meter_reset"]
    # the bad readings outlast the stale window: the meter is said to be stale, once
    assert [e["code"] for e in evs_ if e["ev"] == "alarm"] == ["meter_stale"]
    bus.kwh, bus.w = 100.5, 600.0
    clock.t += 1000
    run(st.cycle())
    snap = st.snapshot()
    assert snap["meter"] == {"e_wh": 100500, "p_w": 600, "sn": 1234}
    assert snap["err"]["mb_bad"] == bad  # cumulative within the boot
    assert not [e for e in st.take_events() if e["ev"] == "meter_reset"]


def test_bms_fields_out_of_range_are_counted_and_omitted_at_once():
    d = tmpdir("st-badbms")
    link, bus, clock = Link(), Bus(), Clock()
    good = [500, 990, 7200, 1000, 250, 240, 3, 0, 0x4230, 0x3030, 0x3030, 0x3432, 0, 7]
    bus.bms = {11: good, 12: good}
    st = make(d, link, bus, clock)
    link.state[1] = ("C", 72000, 10000)
    link.state[2] = ("W", 72000, 0)
    run(st.cycle())
    assert st.snapshot()["slots"][0]["bat"]["soc"] == 500
    bad = list(good)
    bad[0] = 1001  # soc 100.1 %
    bus.bms = {11: bad, 12: good}
    clock.t += 1000
    run(st.cycle())
    snap = st.snapshot()
    assert "bat" not in snap["slots"][0] and snap["slots"][1]["bat"]["soc"] == 500
    assert snap["err"]["mb_bad"] == 1 and snap["slots"][0]["e_mwh"] == st.slots[0].mwh
    bad[0], bad[4] = 500, 0x8000  # t -3276.8 degC
    clock.t += 1000
    run(st.cycle())
    assert "bat" not in st.snapshot()["slots"][0] and st.errors()["mb_bad"] == 2
    bus.bms = {11: good, 12: good}
    clock.t += 1000
    run(st.cycle())
    assert st.snapshot()["slots"][0]["bat"]["t"] == 250
    # a bad reading never ended or changed the open session
    assert [e["ev"] for e in st.take_events() if e["ev"].startswith("session")] == ["session_start"]


def test_a_garbage_meter_register_on_flash_is_forgotten():
    d = tmpdir("st-badflash")
    # what firmware before the range checks could persist after a garbage float
    persist.ABStore(d, "state", 4096).save(
        {
            "boot": 3,
            "regs": [5, 6],
            "meter_sn": 1234,
            "meter_wh": 340282346638528859811704183484516925440000,
        }
    )
    bus, clock = Bus(), Clock()
    st = make(d, bus=bus, clock=clock)
    assert st.meter_wh is None and st.meter_sn == 1234 and st.restored == [5, 6]
    run(st.cycle())
    assert not [e for e in st.take_events() if e["ev"] == "meter_reset"]  # no from_wh of 3.4e41
    assert st.snapshot()["meter"]["e_wh"] == 100000 and st.meter_wh == 100000
    persist.ABStore(d, "state", 4096).save({"boot": 4, "meter_sn": -1, "meter_wh": "x"})
    st = make(d)
    assert st.meter_sn is None and st.meter_wh is None
