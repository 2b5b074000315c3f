"""The dashboard's fleet picture (agent/dashboard/state.py): what operators see from rows.

Pure tests: message bodies as a station signs them, status payloads, quarantine rows and
metering records go in; the views, active alarms and series come out.
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any

import pytest

from agent import wire
from agent.dashboard.state import DAY_MS, FleetState, ViewConfig
from agent.ledger import Record, carbon

T0 = 1_764_150_000_000  # 2025-11-26T09:40:00Z
KEY = bytes(range(32))


class Sim:
    """A station's messages as bodies (and signed payloads, for the database tests)."""

    def __init__(self, sid: str, *, boot: int = 1, t0: int = T0, synced: bool = True) -> None:
        self.sid = sid
        self.boot = boot
        self.seq = 0
        self.up = 1000
        self.t0 = t0
        self.synced = synced

    def _common(self, hist: bool) -> dict[str, Any]:
        m: dict[str, Any] = {
            "v": 1,
            "sid": self.sid,
            "kid": 1,
            "boot": self.boot,
            "seq": self.seq,
            "up": self.up,
        }
        if self.synced:
            m["ts"] = self.t0 + self.up
        if hist:
            m["hist"] = 1
        self.seq += 1
        return m

    def tel(
        self,
        slots: list[dict[str, Any]],
        *,
        meter: dict[str, Any] | None = None,
        hist: bool = False,
        step_ms: int = 1000,
    ) -> dict[str, Any]:
        self.up += step_ms
        m = self._common(hist)
        if meter is not None:
            m["meter"] = meter
        m["slots"] = slots
        m["err"] = {
            "mb_to": 0,
            "mb_crc": 0,
            "mb_exc": 0,
            "mb_addr": 0,
            "ser_cs": 0,
            "ser_to": 0,
            "ser_bad": 0,
        }
        return m

    def ev(self, name: str, **fields: Any) -> dict[str, Any]:
        m = self._common(False)
        m["ev"] = name
        m.update(fields)
        return m

    @staticmethod
    def payload(body: dict[str, Any]) -> bytes:
        return wire.sign(json.dumps(body, separators=(",", ":")).encode(), KEY)

    @property
    def now(self) -> int:
        return self.t0 + self.up


def bat(**over: Any) -> dict[str, Any]:
    b = {
        "id": "B0012345",
        "soc": 532,
        "soh": 981,
        "mv": 67100,
        "ma": 15200,
        "t": 312,
        "tmin": 295,
        "cyc": 412,
        "flt": 0,
        "life_wh": 402113,
    }
    b.update(over)
    return b


def slot(
    n: int,
    st: str | None = "C",
    mv: int = 67200,
    ma: int = 15250,
    e: int = 1000,
    b: dict[str, Any] | None = None,
    with_bat: bool = True,
) -> dict[str, Any]:
    s: dict[str, Any] = {"n": n, "e_mwh": e, "b_mwh": 0}
    if st is not None:
        s.update(st=st, mv=mv, ma=ma)
        if with_bat and st in "WCVFE":
            s["bat"] = b or bat()
    return s


METER = {"e_wh": 1_234_567, "p_w": 2150, "sn": 12345678}


def online(fs: FleetState, sim: Sim, recv: int) -> None:
    fs.set_status(
        sim.sid,
        recv,
        {
            "v": 1,
            "sid": sim.sid,
            "boot": sim.boot,
            "state": "online",
            "fw": "0.1.0",
            "cfg": "abcdef012345",
        },
    )


def ids(fs: FleetState) -> set[str]:
    return {a["id"] for a in fs.active()}


def test_fleet_and_station_views_from_newest_telemetry() -> None:
    fs = FleetState(ViewConfig())
    a = Sim("KH-PNH-0001")
    online(fs, a, a.now)
    body = a.tel(
        [slot(1, "C", 84000, 15000), slot(2, "I", 0, 0), slot(3, "F", 84000, 100)], meter=METER
    )
    fs.add_raw(a.sid, "telemetry", a.now + 50, body)
    now = a.now + 1000
    fs.tick(now)
    f = fs.fleet(now)
    [row] = f["stations"]
    assert row["sid"] == a.sid and row["state"] == "online" and row["fw"] == "0.1.0"
    assert row["power_w"] == 84000 * 15000 // 10**6 + 84000 * 100 // 10**6  # 1260 + 8 W
    assert row["meter_w"] == 2150 and row["slots"] == 3
    assert row["charging"] == 1 and row["occupied"] == 2
    assert f["totals"]["online"] == 1 and f["totals"]["power_w"] == 1268
    st = fs.station(a.sid, now)
    assert st is not None
    s1, s2, s3 = st["slot_list"]
    assert (s1["state"], s1["power_w"], s1["bat"]["id"]) == ("charging CC", 1260, "B0012345")
    assert s2["state"] == "empty" and s2["bat"] is None and s2["power_w"] == 0
    assert s3["state"] == "full"
    assert st["meter"]["e_wh"] == 1_234_567 and st["err"]["mb_to"] == 0
    assert fs.station("KH-PNH-9999", now) is None


def test_the_newest_boot_and_seq_wins_whatever_the_arrival_order() -> None:
    fs = FleetState()
    a = Sim("KH-PNH-0001", boot=5)
    new = a.tel([slot(1, "C", 84000, 10000)])
    a.boot = 4  # an older boot's message arriving late
    old = a.tel([slot(1, "C", 84000, 20000)])
    fs.add_raw(a.sid, "telemetry", T0 + 10, new)
    fs.add_raw(a.sid, "telemetry", T0 + 20, old)
    st = fs.station(a.sid, T0 + 30)
    assert st is not None
    assert st["slot_list"][0]["power_w"] == 840 and st["telemetry"]["boot"] == 5


def test_offline_by_last_will_and_by_silence_and_back() -> None:
    cfg = ViewConfig(offline_after_s=30)
    fs = FleetState(cfg)
    a, b = Sim("KH-PNH-0001"), Sim("KH-PNH-0002")
    for s in (a, b):
        online(fs, s, T0)
        fs.add_raw(s.sid, "telemetry", T0, s.tel([slot(1)]))
    fs.tick(T0 + 1000)
    assert not ids(fs)
    fs.set_status(a.sid, T0 + 2000, {"v": 1, "sid": a.sid, "boot": 1, "state": "offline"})
    fs.tick(T0 + 3000)
    assert ids(fs) == {"KH-PNH-0001:offline"}
    row = fs.fleet(T0 + 3000)["stations"][0]
    assert row["state"] == "offline" and row["power_w"] is None  # no stale power shown as now
    assert fs.fleet(T0 + 3000)["totals"]["online"] == 1
    # since: when the will arrived, not when the dashboard looked
    assert fs.active()[0]["level"] == "crit" and fs.active()[0]["since_ms"] == T0 + 2000
    # b says nothing for longer than the window: silent
    fs.tick(T0 + 31_000)
    assert ids(fs) == {"KH-PNH-0001:offline", "KH-PNH-0002:offline"}
    assert fs.fleet(T0 + 31_000)["stations"][1]["state"] == "silent"
    # a comes back: birth, then telemetry; the alarm clears, the raise and clear are logged
    online(fs, a, T0 + 32_000)
    fs.add_raw(a.sid, "telemetry", T0 + 32_500, a.tel([slot(1)]))
    fs.tick(T0 + 33_000)
    assert ids(fs) == {"KH-PNH-0002:offline"}
    codes = [(e["sid"], e["code"]) for e in fs.events]
    assert ("KH-PNH-0001", "cleared:offline") in codes and (
        "KH-PNH-0001",
        "raised:offline",
    ) in codes


def test_conditions_from_telemetry_raise_and_clear() -> None:
    fs = FleetState(ViewConfig(debounce_s=0))
    a = Sim("KH-PNH-0001")
    online(fs, a, T0)
    fs.add_raw(a.sid, "telemetry", T0 + 100, a.tel([slot(1)], meter=METER))
    # the meter stops answering (omitted), and one slot shows each condition
    bad = a.tel(
        [
            slot(1, "C", b=bat(t=655)),
            slot(2, "C", b=bat(flt=4)),
            slot(3, "E", 71900, 0),
            slot(4, None),
            slot(5, "C", with_bat=False),
        ]
    )
    fs.add_raw(a.sid, "telemetry", T0 + 200, bad)
    fs.tick(T0 + 1000)
    assert ids(fs) == {
        "KH-PNH-0001:over_temp:1",
        "KH-PNH-0001:bms_fault:2",
        "KH-PNH-0001:charger_fault:3",
        "KH-PNH-0001:charger_stale:4",
        "KH-PNH-0001:bms_stale:5",
        "KH-PNH-0001:meter_stale",
    }
    levels = {a["code"]: a["level"] for a in fs.active()}
    assert levels["over_temp"] == levels["bms_fault"] == levels["charger_fault"] == "crit"
    assert levels["meter_stale"] == "warn"
    assert "65.5 °C" in next(x["msg"] for x in fs.active() if x["code"] == "over_temp")
    row = fs.fleet(T0 + 1000)["stations"][0]
    assert row["alarms"] == {"crit": 3, "warn": 3}
    fs.add_raw(a.sid, "telemetry", T0 + 1500, a.tel([slot(n) for n in range(1, 6)], meter=METER))
    fs.tick(T0 + 2000)
    assert not ids(fs)


def test_stale_sources_are_debounced() -> None:
    fs = FleetState(ViewConfig(debounce_s=15))
    a = Sim("KH-PNH-0001")
    online(fs, a, T0)
    fs.add_raw(a.sid, "telemetry", T0, a.tel([slot(1, "W", with_bat=False)]))
    fs.tick(T0 + 1000)
    fs.tick(T0 + 10_000)
    assert not ids(fs)  # a new battery's BMS not read yet: normal for a cycle or two
    fs.add_raw(a.sid, "telemetry", T0 + 15_000, a.tel([slot(1, "W", with_bat=False)]))
    fs.tick(T0 + 16_500)
    assert ids(fs) == {"KH-PNH-0001:bms_stale:1"}
    # a fault is never debounced
    fs.add_raw(a.sid, "telemetry", T0 + 17_000, a.tel([slot(1, "E", 0, 0, b=bat())]))
    fs.tick(T0 + 17_001)
    assert ids(fs) == {"KH-PNH-0001:charger_fault:1"}


def test_rejected_messages_raise_alarms_for_a_while() -> None:
    fs = FleetState(ViewConfig(recent_s=600))
    fs.add_quarantine(
        T0, "KH-PNH-0001", "bad_sig", "HMAC mismatch", "stations/KH-PNH-0001/telemetry"
    )
    fs.add_quarantine(
        T0 + 1, "KH-PNH-0001", "bad_sig", "HMAC mismatch", "stations/KH-PNH-0001/telemetry"
    )
    fs.add_quarantine(T0 + 2, None, "bad_topic", "x/y", "x/y")
    fs.add_agent_alarm(
        T0 + 3, "KH-PNH-0002", "conflict", "crit", "(KH-PNH-0002, 1, 5) already stored"
    )
    fs.tick(T0 + 1000)
    act = {a["id"]: a for a in fs.active()}
    assert set(act) == {"KH-PNH-0001:signature", "-:quarantine", "KH-PNH-0002:agent_alarm"}
    assert act["KH-PNH-0001:signature"]["level"] == "crit"
    assert "bad_sig ×2" in act["KH-PNH-0001:signature"]["msg"]
    assert act["-:quarantine"]["level"] == "warn"
    assert fs.alarms(T0 + 1000)["quarantine_total"] == {"bad_sig": 2, "bad_topic": 1}
    assert {e["code"] for e in fs.events} >= {"quarantine:bad_sig", "conflict"}
    fs.tick(T0 + 600_100)  # older than recent_s: gone
    assert not fs.active()


def test_meter_register_alarms_stand_while_the_agent_raises_them_daily() -> None:
    """meter_overdue / meter_due_soon (agent/meters.py, raised once a UTC day) were folded
    into "agent alarms in 10 min" as crit for ten minutes; they stand with their own code
    and level for as long as the agent keeps raising them."""
    fs = FleetState(ViewConfig(recent_s=600))
    day = 86_400_000
    fs.add_agent_alarm(T0, "KH-PNH-0001", "meter_overdue", "warn", "meter 123 overdue")
    fs.add_agent_alarm(T0, "KH-PNH-0002", "meter_due_soon", "warn", "meter 456 due in 9 d")
    fs.tick(T0 + 3_600_000)  # an hour on: long past recent_s
    act = {a["id"]: a for a in fs.active()}
    assert set(act) == {"KH-PNH-0001:meter_overdue", "KH-PNH-0002:meter_due_soon"}
    assert act["KH-PNH-0001:meter_overdue"]["level"] == "warn"
    assert act["KH-PNH-0001:meter_overdue"]["msg"] == "meter 123 overdue"
    # the next day's raise (now crit: over 30 days) replaces it; the other one stops
    fs.add_agent_alarm(T0 + day, "KH-PNH-0001", "meter_overdue", "crit", "meter 123 overdue 31 d")
    fs.tick(T0 + day + 3 * 3_600_000)  # 27 h after the first raises
    act = {a["id"]: a for a in fs.active()}
    assert set(act) == {"KH-PNH-0001:meter_overdue"}
    assert act["KH-PNH-0001:meter_overdue"]["level"] == "crit"
    fs.tick(T0 + 2 * day + 27 * 3_600_000)  # no raise for a day and more: cleared
    assert not fs.active()


def test_quarantined_messages_the_agent_resolved_later_stop_alarming() -> None:
    """A station's key that arrives late: the agent ingests its quarantined messages after
    all (schema 2 marks the rows resolved); the alarm goes, the story stays in the log."""
    fs = FleetState()
    fs.add_quarantine(T0, "KH-PNH-0001", "unknown_station", "no key", "t", qid=7)
    fs.add_quarantine(T0 + 1, "KH-PNH-0001", "unknown_station", "no key", "t", qid=8)
    fs.add_quarantine(
        T0 + 2, "KH-PNH-0002", "unknown_station", "no key", "t", qid=9, resolved_to="stored"
    )  # already resolved when first read
    fs.tick(T0 + 10)
    assert ids(fs) == {"KH-PNH-0001:signature"} and fs.first_reject_id() == 7
    fs.resolve([(7, "stored")])
    fs.tick(T0 + 20)
    assert ids(fs) == {"KH-PNH-0001:signature"}  # 8 still unresolved
    fs.resolve([(8, "duplicate")])
    fs.tick(T0 + 30)
    assert not ids(fs) and fs.first_reject_id() is None
    codes = [e["code"] for e in fs.events]
    assert codes.count("resolved:unknown_station") == 2
    assert next(e for e in fs.events if e["sid"] == "KH-PNH-0002")["level"] == "info"


def test_sessions_in_progress_follow_events_by_key() -> None:
    fs = FleetState()
    a = Sim("KH-PNH-0001")
    start = a.ev("session_start", slot=1, bat="B0012345", e_mwh=1000, soc=300)
    fs.add_raw(a.sid, "event", T0, start)
    fs.add_raw(a.sid, "telemetry", T0 + 1, a.tel([slot(1, e=1500)]))
    st = fs.station(a.sid, T0 + 2)
    assert st is not None
    ses = st["slot_list"][0]["session"]
    assert ses["bat"] == "B0012345" and ses["mwh"] == 500 and ses["soc0"] == 300
    assert ses["since_ms"] == start["ts"]
    end = a.ev(
        "session_end",
        slot=1,
        bat="B0012345",
        e0_mwh=1000,
        e1_mwh=1500,
        soc0=300,
        soc1=1000,
        up0=1,
        up1=2,
        why="full",
    )
    fs.add_raw(a.sid, "event", T0 + 3, end)
    fs.add_raw(a.sid, "event", T0 + 4, start)  # a late copy of the older start changes nothing
    st = fs.station(a.sid, T0 + 5)
    assert st is not None and st["slot_list"][0]["session"] is None


def test_station_events_go_to_the_log() -> None:
    fs = FleetState()
    a = Sim("KH-PNH-0001")
    fs.add_raw(
        a.sid,
        "event",
        T0,
        a.ev("alarm", code="unmetered", level="warn", msg="slot 2 unmetered for 9000 ms", slot=2),
    )
    fs.add_raw(a.sid, "event", T0 + 1, a.ev("outbox_drop", n=17))
    ev = fs.alarms(T0 + 2)["events"]
    assert [(e["code"], e["slot"]) for e in ev] == [("outbox_drop", None), ("unmetered", 2)]
    assert "17 messages" in ev[0]["msg"] and ev[1]["source"] == "station"


def test_firmware_versions_and_updates_in_the_fleet_view() -> None:
    """Fleet versions and rollout progress (issue 15): each station's firmware from its boot
    event, the newest `ota` step (whatever order they arrive in), versions counted."""
    fs = FleetState()
    a, b = Sim("KH-PNH-0001"), Sim("KH-PNH-0002")
    fs.add_raw(a.sid, "event", T0, a.ev("boot", fw="0.1.0", reset="power", restored={}))
    fs.add_raw(b.sid, "event", T0, b.ev("boot", fw="0.1.0", reset="power", restored={}))
    staged = b.ev("ota", phase="staged", **{"from": "0.1.0", "to": "0.2.0"})
    rolled = b.ev("ota", phase="rolled_back", why="crash", **{"from": "0.2.0", "to": "0.1.0"})
    fs.add_raw(b.sid, "event", T0 + 2, rolled)
    fs.add_raw(b.sid, "event", T0 + 3, staged)  # older, arriving late: not the newest step
    f = fs.fleet(T0 + 5)
    rows = {r["sid"]: r for r in f["stations"]}
    assert rows[a.sid]["fw"] == "0.1.0" and rows[a.sid]["ota"] is None
    assert rows[b.sid]["ota"]["phase"] == "rolled_back" and rows[b.sid]["ota"]["why"] == "crash"
    assert f["totals"]["versions"] == {"0.1.0": 2}
    assert any(e["code"] == "ota_rolled_back" and e["level"] == "warn" for e in fs.events)
    fs.add_raw(a.sid, "event", T0 + 9, a.ev("boot", fw="0.2.0", reset="soft", restored={}))
    assert fs.fleet(T0 + 10)["totals"]["versions"] == {"0.1.0": 1, "0.2.0": 1}


def test_power_history_per_station_and_fleet_carry_forward() -> None:
    cfg = ViewConfig(bucket_s=5, history_s=600, offline_after_s=30)
    fs = FleetState(cfg)
    a, b = Sim("KH-PNH-0001"), Sim("KH-PNH-0002")
    base = T0 - T0 % 5000
    fs.add_raw(a.sid, "telemetry", base + 1000, a.tel([slot(1, "C", 100_000, 10_000)]))  # 1000 W
    fs.add_raw(b.sid, "telemetry", base + 6000, b.tel([slot(1, "C", 100_000, 5_000)]))  # 500 W
    fs.add_raw(
        a.sid, "telemetry", base + 11_000, a.tel([slot(1, "C", 100_000, 20_000)], meter=METER)
    )  # 2000 W
    # a backlog reading is not drawn
    fs.add_raw(a.sid, "telemetry", base + 12_000, a.tel([slot(1, "C", 100_000, 90_000)], hist=True))
    now = base + 14_000
    assert fs.power(a.sid, now, 10) == [[base, 1000, None], [base + 10_000, 2000, 2150]]
    assert fs.power(None, now, 10) == [
        [base, 1000, None],
        [base + 5000, 1500, None],  # a carried forward, b new
        [base + 10_000, 2500, 2150],
    ]
    # history keeps the newest reading of the bucket
    fs.add_raw(a.sid, "telemetry", base + 13_000, a.tel([slot(1, "C", 100_000, 30_000)]))
    assert fs.power(a.sid, now, 10)[-1][1] == 3000
    assert fs.fleet(now)["point"] == [base + 10_000, 3500, None]


def test_fleet_power_after_a_silence_longer_than_offline_after() -> None:
    """/api/power answered HTTP 500 once any station had been silent for more than
    offline_after_s: the default (60.0 s, a float) made a bucket index a float."""
    fs = FleetState(ViewConfig())
    a = Sim("KH-PNH-0001")
    for i in range(3):  # every second, then silence
        fs.add_raw(a.sid, "telemetry", T0 + i * 1000, a.tel([slot(1, "C", 100_000, 10_000)]))
    now = T0 + 2000 + 120_000
    pts = fs.power(None, now, 10)
    assert pts and all(type(p[0]) is int for p in pts) and pts[0][1] == 1000
    # carried forward for offline_after_s (60 s) after the last reading, not to now
    bucket = ViewConfig().bucket_s * 1000
    assert T0 + 50_000 < pts[-1][0] < T0 + 2000 + 60_000 + bucket


def rec(kind: str, sid: str, slot: int, start: int, mwh: int, length: int = DAY_MS) -> Record:
    return Record(
        kind=kind,
        sid=sid,
        slot=slot,
        start_ms=start,
        end_ms=start + length,
        mwh=mwh,
        held_mwh=0,
        flags=(),
        from_key=(1, 0),
        to_key=(1, 9),
        e_from=0,
        e_to=mwh,
        version="m1",
    )


def test_today_energy_and_co2e_from_day_records() -> None:
    params = carbon.load_params()
    fs = FleetState(params=params)
    a, b = Sim("KH-PNH-0001"), Sim("KH-PNH-0002")
    now = T0 + 1000
    for s in (a, b):
        fs.add_raw(s.sid, "telemetry", now, s.tel([slot(1)]))
    day = now - now % DAY_MS
    days = [
        rec("day", a.sid, 0, day, 5_000_000),
        rec("day", a.sid, 1, day, 2_000_000),
        rec("day", a.sid, 2, day, 2_500_000),
        rec("day", b.sid, 1, day, 3_000_000),
        rec("day", a.sid, 1, day - DAY_MS, 7_000_000),
    ]
    fs.set_records(
        days,
        [
            (a.sid, 1, day + 900_000, 400),
            (a.sid, 0, day + 900_000, 1000),
            (b.sid, 2, day + 900_000, 50),
        ],
        now,
    )
    f = fs.fleet(now)
    ra, rb = f["stations"]
    assert (ra["today_mwh"], ra["today_grid_mwh"]) == (4_500_000, 5_000_000)
    assert (rb["today_mwh"], rb["today_grid_mwh"]) == (3_000_000, 0)
    # grid side where the station has a meter record (the certified source), else battery
    er_a = carbon.reduction(days[0], params).er
    er_b = carbon.reduction(days[3], params).er
    assert (ra["co2e_point"], rb["co2e_point"]) == ("grid", "battery")
    assert ra["co2e_today_kg"] == carbon.fmt(er_a * 1000, 3)
    assert f["totals"]["co2e_today_kg"] == carbon.fmt((er_a + er_b) * Fraction(1000), 3)
    assert f["totals"]["today_mwh"] == 7_500_000
    assert f["carbon"]["id"] == params.id and f["carbon"]["placeholders"]
    assert fs.daily(a.sid, now, 14) == [[day - DAY_MS, 7_000_000, 0], [day, 4_500_000, 5_000_000]]
    assert fs.energy(None, now, 12) == [[day + 900_000, 450, 1000]]


def test_today_follows_the_station_clock() -> None:
    """A simulated fleet runs days ahead of the agent's clock: its 'today' is its own."""
    fs = FleetState(params=carbon.load_params())
    ahead = 3 * DAY_MS + 5000
    a = Sim("KH-SIM-0001", t0=T0 + ahead)
    now = T0 + 2000
    fs.add_raw(a.sid, "telemetry", now, a.tel([slot(1)]))
    t = T0 + ahead
    vday = t - t % DAY_MS
    fs.set_records(
        [
            rec("day", a.sid, 1, vday, 1_000_000),
            rec("day", a.sid, 1, now - now % DAY_MS, 9_000_000),
        ],
        [],
        now,
    )
    row = fs.fleet(now)["stations"][0]
    assert row["today_mwh"] == 1_000_000 and row["co2e_today_kg"] is not None
    st = fs.station(a.sid, now)
    assert st is not None and abs(st["clock_ms"] - (now + ahead)) < 5000
    days_from, _ = fs.records_since(now)
    assert days_from == vday - 13 * DAY_MS


def test_view_config_is_checked() -> None:
    with pytest.raises(ValueError):
        ViewConfig(bucket_s=0)
    with pytest.raises(ValueError):
        ViewConfig(offline_after_s=0)
