"""The grid meter register's crediting layer (agent/meters.py): the pure policy function,
export with a register (both engines), the schema 4 → 5 upgrade, and the agent's
meter_overdue alarm (once per meter per day)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import random
import time
from dataclasses import replace

import pytest

from agent import meters
from agent.config import AgentConfig, DbConfig, IngestConfig, MetersConfig
from agent.ledger.export import render
from agent.ledger.records import DAY_MS, Record, make_record
from agent.meters import (
    FLAG_OVERDUE,
    FLAG_UNCALIBRATED,
    FLAG_UNREGISTERED,
    Calibration,
    Install,
    Meter,
    Register,
    apply_policy,
    credit,
    day_ms,
    shares,
)
from agent.service import Service
from agent.sources.mqtt import BrokerConfig
from agent.store import SCHEMA_VERSION, Store, record_to_row
from agent.store.sql import METER_DDL, SchemaError
from stationctl.cli import main
from tools.mosquitto import Mosquitto

SID = "KH-MTR-0001"
OTHER = "KH-MTR-0002"
I15 = 900_000
DUE = "2026-01-01"
OVER = day_ms(DUE) + DAY_MS  # 2026-01-02T00:00Z: the first overdue ms


def rec(start: int, mwh: int, *, slot: int = 0, sid: str = SID, end: int | None = None) -> Record:
    return make_record(
        "interval",
        sid,
        slot,
        start,
        start + I15 if end is None else end,
        mwh,
        0,
        (),
        (1, 1),
        (1, 2),
        0,
        mwh,
    )


def register(
    cls: str = "1.0",
    *,
    cals: tuple[tuple[str, str], ...] = (("2025-01-01", DUE),),
    installed: int | None = None,
) -> Register:
    m = Meter("SN-1", "SDM630", cls, 0)
    return Register(
        {"SN-1": m},
        {"SN-1": tuple(Calibration("SN-1", a, b, f"CERT-{a}", 0) for a, b in cals)},
        (
            Install(
                "SN-1", SID, day_ms("2025-06-01") if installed is None else installed, None, "t", 0
            ),
        ),
    )


# ---- the pure layer ------------------------------------------------------------------------


def test_before_the_due_date_a_record_is_unchanged_but_names_its_meter() -> None:
    r = rec(OVER - I15, 123_457)  # the last interval of the due day: still in calibration
    c = credit(r, register())
    assert c.mwh == 123_457 and c.flags == () and c.metered_mwh == 123_457
    assert c.meter is not None and c.meter.serial == "SN-1" and c.meter.due == DUE
    assert c.meter.policy == "discount" and c.meter.accuracy_class == "1.0"
    assert c.meter.register == register().digest() != ""


@pytest.mark.parametrize(("cls", "want"), [("1.0", 122_222), ("0.5", 122_839), ("2", 120_987)])
def test_after_the_due_date_discount_is_the_floor_of_mwh_times_one_minus_class(
    cls: str, want: int
) -> None:
    c = credit(rec(OVER, 123_457), register(cls))
    assert c.mwh == want == 123_457 * (1000 - int(float(cls) * 10)) // 1000
    assert c.flags == (FLAG_OVERDUE,) and c.metered_mwh == 123_457 and c.policy == "discount"


def test_a_straddling_record_is_pro_rated_by_time_with_largest_remainder() -> None:
    reg = register()
    # 10 min before the boundary, 20 min after: 30,000 ok + 60,000 overdue (less 1 %)
    c = credit(rec(OVER - 600_000, 90_000, end=OVER + 1_200_000), reg)
    assert c.mwh == 30_000 + 59_400 and c.flags == (FLAG_OVERDUE,)
    # 100 mWh over 1:2 -> shares 33 and 67 (the remainder to the larger fraction); 67 less
    # 1 % is 66.33 -> 66
    c = credit(rec(OVER - 600_000, 100, end=OVER + 1_200_000), reg)
    assert shares(100, [600_000, 1_200_000]) == [33, 67] and c.mwh == 33 + 66
    c = credit(rec(OVER - 600_000, 100, end=OVER + 1_200_000), reg, "exclude")
    assert c.mwh == 33


def test_exclude_credits_nothing_and_none_flags_only() -> None:
    c = credit(rec(OVER, 5_000), register(), "exclude")
    assert c.mwh == 0 and c.flags == (FLAG_OVERDUE,) and c.metered_mwh == 5_000
    c = credit(rec(OVER, 5_000), register(), "none")
    assert c.mwh == 5_000 and c.flags == (FLAG_OVERDUE,) and c.meter and c.meter.policy == "none"
    with pytest.raises(ValueError, match="overdue policy"):
        credit(rec(OVER, 5_000), register(), "halve")


def test_a_station_without_a_meter_is_flagged_unregistered_and_not_discounted() -> None:
    c = credit(rec(OVER, 5_000, sid=OTHER), register())
    assert c.mwh == 5_000 and c.flags == (FLAG_UNREGISTERED,)
    assert c.meter is not None and c.meter.serial == "" and c.meter.policy == "discount"
    # installed half-way through the interval: half unregistered, half overdue
    reg = register(installed=OVER + I15 // 2)
    c = credit(rec(OVER, 10_000), reg)
    assert c.mwh == 5_000 + 4_950 and c.flags == (FLAG_OVERDUE, FLAG_UNREGISTERED)


def test_battery_side_and_an_empty_register_pass_through() -> None:
    b = rec(OVER, 5_000, slot=3)
    c = credit(b, register())
    assert (c.mwh, c.flags, c.meter, c.policy) == (5_000, (), None, "")
    assert Record(**{f: getattr(c, f) for f in Record.__dataclass_fields__}) == b
    (c,) = apply_policy([rec(OVER, 5_000)], Register())
    assert (c.mwh, c.flags, c.meter) == (5_000, (), None)


def test_a_new_calibration_ends_the_overdue_span_and_history_is_kept() -> None:
    reg = register(cals=(("2025-01-01", DUE), ("2026-01-10", "2027-01-10")))
    assert credit(rec(OVER + 3 * DAY_MS, 1_000), reg).mwh == 990  # 2026-01-05: overdue
    c = credit(rec(day_ms("2026-01-10"), 1_000), reg)  # the new calibration's first day
    assert c.mwh == 1_000 and c.flags == () and c.meter and c.meter.due == "2027-01-10"
    # before the first calibration: uncalibrated, under the same policy
    reg = register(cals=(("2025-07-01", DUE),))
    c = credit(rec(day_ms("2025-06-10"), 1_000), reg)
    assert c.mwh == 990 and c.flags == (FLAG_UNCALIBRATED,) and c.meter and c.meter.due == ""


def test_the_layer_never_creates_energy_and_keeps_a_reduction_whole() -> None:
    rnd = random.Random(7)
    reg = register("1.5", installed=OVER - 5 * I15)
    for _ in range(300):
        start = OVER - rnd.randrange(10 * I15)
        r = rec(start, rnd.randrange(-5_000, 50_000), end=start + rnd.randrange(1, 20 * I15))
        w = [rnd.randrange(0, 100) for _ in range(rnd.randrange(1, 6))]
        if sum(w):
            assert sum(shares(r.mwh, w)) == r.mwh
        for policy in meters.POLICIES:
            c = credit(r, reg, policy)
            assert c.mwh <= r.mwh if r.mwh >= 0 else c.mwh == r.mwh
    adj = replace(rec(OVER, -4_000), flags=("adjustment",))
    assert credit(adj, reg).mwh == -4_000


# ---- export with a register (both engines) -------------------------------------------------


def _records() -> list[Record]:
    return [
        rec(OVER - I15, 40_000),  # grid, in calibration
        rec(OVER, 123_457),  # grid, overdue
        rec(OVER - I15, 30_000, slot=1),  # battery side
        rec(OVER, 35_000, slot=1),
        rec(OVER, 7_000, sid=OTHER),  # a station with no meter registered
    ]


@pytest.fixture
def store_db(db_url: str) -> str:
    with Store(db_url) as st:
        st.replace_records({"": [record_to_row(r) for r in _records()]}, everything=True)
    return db_url


def _export(capsysbinary: pytest.CaptureFixture[bytes], *args: str) -> bytes:
    capsysbinary.readouterr()
    assert main(["export", *args]) == 0
    return capsysbinary.readouterr().out


def _register_meter(url: str) -> None:
    with Store(url, create=False) as st:
        meters.add_meter(
            st,
            serial="SN-1",
            model="SDM630",
            accuracy_class="1.0",
            calibrated_on="2025-01-01",
            next_due=DUE,
            certificate="CERT-1",
            at_ms=1,
        )
        meters.install(st, serial="SN-1", sid=SID, from_ms=day_ms("2025-06-01"), by="t", at_ms=1)


def test_an_empty_register_exports_the_stored_records_byte_for_byte(
    store_db: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    for fmt in ("csv", "json"):
        out = _export(capsysbinary, "--db", store_db, "--format", fmt)
        assert out == render(_records(), fmt)
        assert b"meter" not in out


def test_export_credits_overdue_grid_energy_and_states_the_meter(
    store_db: str, capsysbinary: pytest.CaptureFixture[bytes], tmp_path: pathlib.Path
) -> None:
    _register_meter(store_db)
    raw_csv = render(_records(), "csv")
    assert (
        _export(capsysbinary, "--db", store_db, "--format", "csv", "--no-meter-policy") == raw_csv
    )
    assert _export(capsysbinary, "--db", store_db, "--format", "json", "--no-meter-policy") == (
        render(_records(), "json")
    )
    objs = [
        json.loads(x)
        for x in _export(capsysbinary, "--db", store_db, "--format", "json").splitlines()
    ]
    by = {(o["sid"], o["slot"], o["start"][11:16]): o for o in objs}
    before, after = by[(SID, 0, "23:45")], by[(SID, 0, "00:00")]
    assert before["mwh"] == 40_000 and before["flags"] == []
    assert before["meter"]["serial"] == "SN-1" and before["meter"]["metered_mwh"] == 40_000
    assert after["mwh"] == 122_222 and after["flags"] == [FLAG_OVERDUE]
    assert (
        after["meter"]
        == {
            "serial": "SN-1",
            "class": "1.0",
            "due": DUE,
            "policy": "discount",
            "metered_mwh": 123_457,
            "register": after["meter"]["register"],
        }
        and len(after["meter"]["register"]) == 16
    )
    for t in ("23:45", "00:00"):  # the battery side is the station's own: untouched
        b = by[(SID, 1, t)]
        assert b["flags"] == [] and b["meter"] is None and b["mwh"] in (30_000, 35_000)
    other = by[(OTHER, 0, "00:00")]
    assert other["mwh"] == 7_000 and other["flags"] == [FLAG_UNREGISTERED]

    csv_out = _export(capsysbinary, "--db", store_db, "--format", "csv").decode().splitlines()
    raw_head = raw_csv.decode().splitlines()[0]
    assert csv_out[0] == raw_head + (
        ",meter_serial,meter_class,meter_due,meter_policy,metered_mwh,meter_register"
    )
    row = next(x for x in csv_out if x.startswith(f"{SID},0,2026-01-02T00:00"))
    cells = row.split(",")
    assert cells[4] == "122222" and cells[6] == FLAG_OVERDUE and cells[-7] == "0.122222"
    assert cells[-6:-1] == ["SN-1", "1.0", DUE, "discount", "123457"]
    battery = next(x for x in csv_out if x.startswith(f"{SID},1,2026-01-02T00:00"))
    assert battery.endswith(",0.035000,,,,,,")

    ex = _export(capsysbinary, "--db", store_db, "--format", "json", "--overdue-policy", "exclude")
    assert b'"mwh":0,' in ex and b'"policy":"exclude"' in ex
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[meters]\noverdue_policy = "none"\n')
    out = _export(capsysbinary, "--db", store_db, "--format", "json", "--config", str(cfg))
    assert b'"mwh":123457,' in out and b'"policy":"none"' in out
    assert main(["export", "--db", store_db, "--format", "csv", "--no-meter-policy",
                 "--overdue-policy", "none"]) == 2  # fmt: skip


# ---- schema 4 -> now ----------------------------------------------------------------------------


def test_a_schema_4_database_is_refused_then_upgraded_in_place_with_its_data(
    store_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # the old DDL: today's without the register's tables, at version 4
    with Store(store_db, create=False) as st, st.transaction() as db:
        for t in ("meter_installs", "meter_calibrations", "meters"):
            db.execute(f"DROP TABLE {t}")
        db.execute("UPDATE meta SET v = '4' WHERE k = 'schema'")
    assert len(METER_DDL) == 4 and SCHEMA_VERSION >= 5
    with pytest.raises(SchemaError, match=f"schema 4, this program needs {SCHEMA_VERSION}"):
        Store(store_db)  # what the agent says
    # reading it (export) still works, as the register it has: none
    assert main(["export", "--db", store_db, "--format", "csv"]) == 0
    assert capsys.readouterr().out.encode() == render(_records(), "csv")
    # writing to the register asks for the upgrade
    assert main(["meter", "add", "--db", store_db, "--serial", "S", "--model", "M",
                 "--class", "1", "--calibrated", "2025-01-01", "--due", "2026-01-01",
                 "--certificate", "C"]) == 2  # fmt: skip
    assert "db upgrade" in capsys.readouterr().err
    assert main(["db", "upgrade", "--db", store_db]) == 0
    v = SCHEMA_VERSION
    assert f"schema {v}, this program's {v}" in capsys.readouterr().out
    with Store(store_db) as st:
        assert st.schema_version() == v
        assert len(st.record_rows()) == len(_records())
        assert meters.load_register(st).empty
    _register_meter(store_db)
    with Store(store_db, create=False, readonly=True) as st:
        assert [m["serial"] for m in meters.register_status(st, OVER)] == ["SN-1"]


# ---- the agent's alarm ------------------------------------------------------------------------


def test_check_alarms_once_per_meter_and_day_warn_then_crit(db_url: str) -> None:
    Store(db_url).close()
    _register_meter(db_url)
    with Store(db_url, create=False) as st:
        t = OVER + 3_600_000  # 2026-01-02 01:00Z: one day overdue
        (a,) = meters.check_alarms(st, t, "exclude")
        assert a[:3] == (SID, "meter_overdue", "warn")
        assert "SN-1" in a[3] and DUE in a[3] and "'exclude'" in a[3]
        assert meters.check_alarms(st, t + 3_600_000) == []  # the same day: not again
        assert meters.check_alarms(st, t + DAY_MS)[0][1] == "meter_overdue"  # the next day
        (late,) = meters.check_alarms(st, t + 40 * DAY_MS)
        assert late[2] == "crit" and "overdue 41 day(s)" in late[3]
        (soon,) = meters.check_alarms(st, day_ms("2025-12-10"))
        assert soon[1:3] == ("meter_due_soon", "warn") and "in 22 day(s)" in soon[3]
        assert meters.check_alarms(st, day_ms("2025-11-01")) == []  # 61 days ahead: ok
        codes = [(sid, code) for _t, sid, code, _l, _d in st.alarms()]
        assert codes.count((SID, "meter_overdue")) == 3


async def test_the_agent_raises_meter_overdue_at_start_and_once(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    db = f"sqlite:///{tmp_path}/agent.db"
    Store(db).close()
    _register_meter(db)  # due 2026-01-01: overdue by now (the clock says 2026-12 or later)
    cfg = AgentConfig(
        db=DbConfig(url=db, synchronous="normal"),
        broker=BrokerConfig(port=mosquitto.port, client_id="meters-agent"),
        ingest=IngestConfig(records_interval_ms=50),
        meters=MetersConfig(overdue_policy="none"),
    )
    svc = Service(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))

    def overdue() -> list[tuple[int, str | None, str, str, str]]:
        with Store(db, create=False, readonly=True) as s:
            return [a for a in s.alarms() if a[2] == "meter_overdue"]

    end = time.monotonic() + 20
    while not await asyncio.to_thread(overdue):
        assert time.monotonic() < end
        await asyncio.sleep(0.05)
    assert await asyncio.get_running_loop().run_in_executor(svc._db, svc.check_meters) == []
    stop.set()
    await asyncio.wait_for(task, 10)
    (a,) = overdue()
    assert a[1] == SID and a[3] == "crit" and "'none'" in a[4]  # > 30 days overdue
