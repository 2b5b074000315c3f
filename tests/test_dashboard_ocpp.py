"""OCPP stations (CONTRACT §11) on the dashboard and in `stationctl watch`, beside the
project's own: a real dashboard server over a database holding own stations (the API
tests' `make_db`), two chargers' sessions (`fill_ocpp_db`) and two more chargers with a
firmware version, StatusNotifications and power; on both engines (`db_url`)."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from ocpp.v16 import call as call16
from ocpp.v201 import call as call201

from agent.store import Store, now_ms
from tests.ocpp_helpers import PASSWORD, OcppAgent, connect, energy, fill_ocpp_db, iso
from tests.test_dashboard_api import SID, SID2, Served, make_db, wait
from tests.test_dashboard_watch import ENV, STATIONCTL, run

FW16, FW201 = "OCPP-FW16", "OCPP-FW201"


async def _chargers(url: str) -> None:
    """A 1.6 charger charging (power from two registers a minute apart: 100 Wh in 60 s
    = 6 kW) and a 2.0.1 one occupied, sending its power (7.4 kW)."""
    t = now_ms() - 120_000
    async with OcppAgent(url, {FW16: PASSWORD, FW201: PASSWORD}) as ag:
        async with connect(ag.port, FW16, "ocpp1.6") as cp:
            await cp.call(
                call16.BootNotification(
                    charge_point_model="Wallbox",
                    charge_point_vendor="Acme",
                    firmware_version="4.2.0",
                )
            )
            await cp.call(
                call16.StatusNotification(connector_id=1, error_code="NoError", status="Charging")
            )
            for i, wh in enumerate((1000, 1100)):
                await cp.call(
                    call16.MeterValues(connector_id=1, meter_value=[energy(wh, ts=t + i * 60_000)])
                )
        async with connect(ag.port, FW201, "ocpp2.0.1") as cp:
            await cp.call(
                call201.BootNotification(
                    charging_station={
                        "model": "Pillar",
                        "vendor_name": "Acme",
                        "firmware_version": "2.0.1-x",
                    },
                    reason="PowerUp",
                )
            )
            await cp.call(
                call201.StatusNotification(
                    timestamp=iso(t), connector_status="Occupied", evse_id=1, connector_id=1
                )
            )
            sv = [
                {"value": 5000.0, "measurand": "Energy.Active.Import.Register"},
                {
                    "value": 7.4,
                    "measurand": "Power.Active.Import",
                    "unit_of_measure": {"unit": "kW"},
                },
            ]
            await cp.call(
                call201.MeterValues(
                    evse_id=1, meter_value=[{"timestamp": iso(t), "sampled_value": sv}]
                )
            )


@pytest.fixture
def db(db_url: str) -> Iterator[str]:
    gen = make_db(db_url)
    url, store, _a, _b = next(gen)
    fill_ocpp_db(url)
    asyncio.run(_chargers(url))
    yield url
    store.close()


@pytest.fixture
def served(db: str) -> Iterator[Served]:
    s = Served(db)
    wait(lambda: s.get("/api/health")[1]["ok"], 10, "first poll")
    yield s
    s.stop()


def _by_sid(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["sid"]: r for r in rows}


def test_fleet_shows_ocpp_stations_marked(served: Served) -> None:
    code, f = served.get("/api/fleet")
    assert code == 200
    st = _by_sid(f["stations"])
    assert set(st) == {SID, SID2, "OCPP-16", "OCPP-201", FW16, FW201}
    for own in (SID, SID2):
        assert st[own]["source"] == "own" and st[own]["mark"] is None
    assert st["OCPP-16"]["mark"] == "OCPP 1.6" and st["OCPP-16"]["protocol"] == "ocpp1.6"
    assert st["OCPP-201"]["mark"] == "OCPP 2.0.1" and st["OCPP-201"]["protocol"] == "ocpp2.0.1"
    assert {st[x]["source"] for x in ("OCPP-16", "OCPP-201", FW16, FW201)} == {"ocpp"}
    assert st["OCPP-16"]["slots"] == 2 and st["OCPP-201"]["slots"] == 1
    assert st[FW16]["fw"] == "4.2.0" and st[FW201]["fw"] == "2.0.1-x"
    versions = f["totals"]["versions"]
    assert versions["OCPP 1.6 4.2.0"] == 1 and versions["OCPP 2.0.1 2.0.1-x"] == 1
    for sid in ("OCPP-16", "OCPP-201", FW16, FW201):
        assert st[sid]["state"] == "online" and st[sid]["last_seen_ms"]
    # power: from two registers (6 kW), or the frame's own Power.Active.Import (7.4 kW)
    assert st[FW16]["power_w"] == 6000 and st[FW16]["charging"] == 1
    assert st[FW201]["power_w"] == 7400 and st[FW201]["occupied"] == 1
    assert served.get("/api/health")[1]["bad_rows"] == 0
    # connectors as slots: the last register, the status
    s16 = served.get("/api/stations/OCPP-16")[1]
    assert [(x["n"], x["e_mwh"]) for x in s16["slot_list"]] == [(1, 12_000_000), (2, 6_000_000)]
    assert all(x["signed"] is False and x["power_w"] == 0 for x in s16["slot_list"])
    s201 = served.get("/api/stations/OCPP-201")[1]
    assert [(x["n"], x["e_mwh"]) for x in s201["slot_list"]] == [(1, 21_500_000)]
    fw16 = served.get(f"/api/stations/{FW16}")[1]
    [c] = fw16["slot_list"]
    assert (c["st"], c["state"], c["ocpp_status"], c["e_mwh"]) == (
        "C",
        "charging",
        "Charging",
        1_100_000,
    )
    assert fw16["ocpp"]["vendor"] == "Acme" and fw16["ocpp"]["model"] == "Wallbox"
    [c] = served.get(f"/api/stations/{FW201}")[1]["slot_list"]
    # Occupied and drawing power: charging
    assert (c["st"], c["state"], c["ocpp_status"], c["power_w"]) == (
        "C",
        "charging",
        "Occupied",
        7400,
    )
    # no BMS alarm for a charger's connector, no fault
    assert not [a for a in served.get("/api/alarms")[1]["active"] if "OCPP" in (a["sid"] or "")]


def test_fleet_source_filter_and_csv(served: Served) -> None:
    code, f = served.get("/api/fleet?source=ocpp")
    assert code == 200
    assert [s["sid"] for s in f["stations"]] == ["OCPP-16", "OCPP-201", FW16, FW201]
    assert [s["sid"] for s in served.get("/api/fleet?source=own")[1]["stations"]] == [SID, SID2]
    assert served.get("/api/fleet?source=theirs")[0] == 400
    with urllib.request.urlopen(served.base + "api/fleet?format=csv", timeout=10) as r:
        rows = list(csv.reader(io.StringIO(r.read().decode())))
    col = rows[0].index("source")
    got = {x[0]: x[col] for x in rows[1:]}
    assert got == {
        SID: "own",
        SID2: "own",
        "OCPP-16": "OCPP 1.6",
        "OCPP-201": "OCPP 2.0.1",
        FW16: "OCPP 1.6",
        FW201: "OCPP 2.0.1",
    }


def test_energy_and_sessions_rows_of_ocpp_stations_are_unsigned(served: Served) -> None:
    day = "from=2026-12-04&to=2026-12-04"
    code, s = served.get(f"/api/sessions?{day}&sid=OCPP-16")
    assert code == 200
    assert sorted(x["mwh"] for x in s["sessions"]) == [1_000_000, 2_000_000]
    for x in s["sessions"]:
        assert x["unsigned"] and x["source"] == "ocpp"
        assert "unsigned" in x["flags"] and "ocpp" in x["flags"]
    code, e = served.get(f"/api/energy/daily?{day}&sid=OCPP-201")
    assert code == 200
    [row] = e["rows"]
    assert row["mwh"] == 1_500_000 and row["unsigned"] and "unsigned" in row["flags"]
    code, e = served.get(f"/api/energy/daily?{day}&sid=OCPP-16")
    assert [x["mwh"] for x in e["rows"]] == [3_000_000] and e["rows"][0]["unsigned"]
    # the own station's energy is signed telemetry: no mark
    t = now_ms()
    own = served.get(f"/api/energy/daily?sid={SID}")[1]["rows"]
    assert own and not any(x["unsigned"] for x in own), (own, t)


def test_watch_lists_ocpp_stations_marked(db: str) -> None:
    r = run("watch", "--db", db, "--once")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for sid, mark in (("OCPP-16", "OCPP 1.6"), ("OCPP-201", "OCPP 2.0.1"), (FW16, "OCPP 1.6")):
        i = next(i for i, ln in enumerate(lines) if f" {sid} " in ln)
        assert mark in lines[i + 1], r.stdout  # the mark under the id
    assert SID in r.stdout and "OCPP 1.6 4.2.0 ×1" in r.stdout
    for columns in ("80", "60"):
        r = subprocess.run(
            [*STATIONCTL, "watch", "--db", db, "--once"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**ENV, "COLUMNS": columns},
            check=False,
        )
        assert r.returncode == 0, r.stderr
        out = r.stdout.splitlines()
        for sid in (SID, "OCPP-16", "OCPP-201", FW16, FW201):
            assert any(sid in ln for ln in out), r.stdout
        assert "OCPP 2.0.1" in r.stdout
        assert max(len(ln) for ln in out) <= int(columns)
    r = run("watch", "--db", db, "--station", FW16, "--once")
    assert r.returncode == 0 and "(OCPP 1.6)" in r.stdout and "charging (Charging)" in r.stdout


def test_a_charger_shows_live_on_the_dashboard(db_url: str) -> None:
    """The agent's OCPP endpoint stores the frames; a dashboard beside it shows the charger
    as it boots, charges and faults."""
    Store(db_url, create=True).close()
    s = Served(db_url)

    def conn(sid: str) -> dict[str, Any] | None:
        st = s.get(f"/api/stations/{sid}")
        return st[1] if st[0] == 200 else None

    async def drive() -> None:
        async with OcppAgent(db_url, {"CP-LIVE": PASSWORD}) as ag:
            async with connect(ag.port, "CP-LIVE", "ocpp1.6") as cp:
                await cp.call(
                    call16.BootNotification(
                        charge_point_model="M", charge_point_vendor="V", firmware_version="9.9"
                    )
                )
                await cp.call(
                    call16.StatusNotification(
                        connector_id=1, error_code="NoError", status="Preparing"
                    )
                )
                st = await asyncio.to_thread(
                    wait,
                    lambda: (c := conn("CP-LIVE")) and c["slot_list"] and c,
                    10,
                    "the charger on the dashboard",
                )
                assert st["mark"] == "OCPP 1.6" and st["fw"] == "9.9" and st["state"] == "online"
                assert st["slot_list"][0]["state"] == "preparing"
                await cp.call(
                    call16.StatusNotification(
                        connector_id=1, error_code="GroundFailure", status="Faulted"
                    )
                )
                await asyncio.to_thread(
                    wait,
                    lambda: any(
                        a["id"] == "CP-LIVE:charger_fault:1"
                        for a in s.get("/api/alarms")[1]["active"]
                    ),
                    10,
                    "the fault alarm",
                )
                c = conn("CP-LIVE")
                assert c is not None
                assert c["slot_list"][0]["error"] == "GroundFailure"

    try:
        asyncio.run(drive())
    finally:
        s.stop()
