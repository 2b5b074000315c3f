"""The dashboard's history features over a real SQLite agent database made from a simulated
fleet (tests/agent_helpers.py): completed sessions, kWh per station per day with the
completeness flag, CSV downloads equal to the JSON, filtering and sorting of the fleet, the
alarm history with an acknowledgement, and the "example parameters, not validated" mark
(absent with a validated parameter file); `stationctl watch` carries the same mark."""

from __future__ import annotations

import asyncio
import csv
import io
import pathlib
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest

from agent.dashboard import DashboardServer, Live, make_app
from agent.dashboard.auth import Auth
from agent.dashboard.history import NOT_VALIDATED, iso
from agent.dashboard.users import UserStore
from agent.ledger import carbon
from agent.store import Store, now_ms, row_to_record
from agent.wire import decode_record
from tests.agent_helpers import fill_store, fleet_stream, stored_rows
from tests.test_dashboard_login import Resp

DAY = 86_400_000
GAP_SID = "KH-TST-0001"
# the stream starts 2025-11-26 09:40 UTC (agent_helpers.T0_MS) and runs 50 h, a reading
# every 5 min: the 26th is partial, the 27th full (but for GAP_SID, 2 h missing), the 28th
# is the stations' today
D26, D27, D28 = "2025-11-26", "2025-11-27", "2025-11-28"
D27_MS = 1_764_201_600_000
GAP = (D27_MS + 3 * 3_600_000, D27_MS + 5 * 3_600_000)
RANGE = f"from={D26}&to={D28}"


def make_fleet_db(path: pathlib.Path, silent_s: int = 120) -> str:
    """3 stations × 2 slots and a grid meter, 50 h of telemetry every 5 min, a session per
    station, a reboot each; GAP_SID's telemetry missing for 2 h of the 27th. The last
    message arrived `silent_s` ago on the agent's clock (so the stations are silent: an
    offline alarm each), the stations' clocks say the 28th."""
    stream = fleet_stream(stations=3, per_station=600, step_ms=300_000)

    def keep(item: tuple[str, bytes]) -> bool:
        b = decode_record(item[1])
        return not (b["sid"] == GAP_SID and "slots" in b and GAP[0] <= b["ts"] < GAP[1])

    stream = [x for x in stream if keep(x)]
    last = now_ms() - silent_s * 1000
    rows, msgs = stored_rows(stream, recv_ms=lambda i: last - (len(stream) - 1 - i))
    return fill_store(f"sqlite:///{path}", rows, msgs)


class Served:
    """The dashboard over `url` (login off, loopback) in a background loop; with a users
    database, acknowledgements are recorded (by local@127.0.0.1)."""

    def __init__(
        self, url: str, users: pathlib.Path | None = None, carbon_params: str | None = None
    ) -> None:
        self.live = Live(url, poll_s=0.2, records_s=0.5, carbon_params=carbon_params)
        auth = Auth(UserStore.open(users), mode="off") if users else None
        self.app = make_app(url, live=self.live, auth=auth)
        self.loop = asyncio.new_event_loop()
        self.server = DashboardServer(self.app, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(20)
        self.port = self.server.port
        self.origin = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while not self.get("/api/health").json["ok"]:
            assert time.monotonic() < deadline, "no first poll"
            time.sleep(0.05)

    def req(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Resp:
        import http.client

        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.request(method, path, body=body, headers=headers)
            return Resp(c.getresponse())
        finally:
            c.close()

    def get(self, path: str) -> Resp:
        return self.req("GET", path)

    def ok(self, path: str) -> Any:
        r = self.get(path)
        assert r.status == 200, (path, r.status, r.body)
        return r.json

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_fleet_db(tmp_path_factory.mktemp("features") / "agent.db")


@pytest.fixture(scope="module")
def served(db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    users = tmp_path_factory.mktemp("users") / "users.db"
    UserStore.open(users, create=True).close()
    s = Served(db, users)
    try:
        yield s
    finally:
        s.stop()


def stored(db: str, kind: str) -> list[Any]:
    with Store(db, create=False) as st:
        return [row_to_record(r) for r in st.record_rows() if r[2] == kind]


def csv_rows(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode())))


def kwh(mwh: int) -> str:
    return carbon.fmt(Fraction(mwh, 1_000_000), 6)


# ---- sessions ---------------------------------------------------------------------------------


def test_sessions_are_the_session_records_newest_first_and_paged(served: Served, db: str) -> None:
    recs = sorted(stored(db, "session"), key=lambda r: (r.start_ms, r.end_ms), reverse=True)
    assert len(recs) == 3
    d = served.ok(f"/api/sessions?{RANGE}")
    assert (d["from"], d["to"], d["total"], d["offset"]) == (D26, D28, 3, 0)
    got = [
        (s["sid"], s["slot"], s["bat"], s["start_ms"], s["end_ms"], s["mwh"]) for s in d["sessions"]
    ]
    assert got == [(r.sid, r.slot, r.extra["bat"], r.start_ms, r.end_ms, r.mwh) for r in recs]
    s0 = d["sessions"][0]
    assert s0["duration_ms"] == s0["end_ms"] - s0["start_ms"] > 0
    assert (s0["soc0"], s0["soc1"], s0["why"], s0["flags"]) == (200, 900, "full", [])
    # a page, one station, a range without sessions
    p = served.ok(f"/api/sessions?{RANGE}&limit=2&offset=2")
    assert (p["total"], len(p["sessions"])) == (3, 1)
    assert p["sessions"][0]["start_ms"] == recs[2].start_ms
    one = served.ok(f"/api/sessions?{RANGE}&sid=KH-TST-0002")
    assert [s["sid"] for s in one["sessions"]] == ["KH-TST-0002"]
    assert served.ok("/api/sessions?from=2025-11-01&to=2025-11-25")["total"] == 0
    # the default range: the last 7 days of the stations' clocks (their today is the 28th)
    assert served.ok("/api/sessions")["to"] == D28
    for bad in ("from=2025-13-01", f"from={D28}&to={D26}", "limit=0", "sid=bad", "format=xml"):
        r = served.get(f"/api/sessions?{bad}")
        assert r.status == 400 and r.json["error"], bad


def test_sessions_csv_equals_the_json_rows(served: Served) -> None:
    q = f"/api/sessions?{RANGE}&limit=2"
    d = served.ok(q)
    r = served.get(q + "&format=csv")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
    assert r.headers["Content-Disposition"] == f'attachment; filename="sessions_{D26}_{D28}.csv"'
    rows = csv_rows(r.body)
    assert rows[0][:7] == [
        "station",
        "slot",
        "battery",
        "start_utc",
        "end_utc",
        "duration_s",
        "kwh",
    ]
    assert rows[1:] == [
        [
            s["sid"],
            str(s["slot"]),
            s["bat"],
            iso(s["start_ms"]),
            iso(s["end_ms"]),
            carbon.fmt(Fraction(s["duration_ms"], 1000), 3),
            kwh(s["mwh"]),
            "20.0",
            "90.0",
            "full",
            "",
        ]
        for s in d["sessions"]
    ]


# ---- energy per day and its completeness ----------------------------------------------------------


def test_daily_kwh_is_the_sum_of_the_stored_day_records(served: Served, db: str) -> None:
    days = stored(db, "day")
    d = served.ok(f"/api/energy/daily?{RANGE}")
    assert [(x["sid"], x["day"]) for x in d["rows"]] == [
        (f"KH-TST-{i:04d}", day) for i in range(3) for day in (D26, D27, D28)
    ]
    for x in d["rows"]:
        mine = [r for r in days if r.sid == x["sid"] and r.start_ms == x["day_ms"]]
        assert mine, x
        assert x["mwh"] == sum(r.mwh for r in mine if r.slot != 0) > 0
        assert x["grid_mwh"] == sum(r.mwh for r in mine if r.slot == 0) > 0
    assert d["totals"]["mwh"] == sum(r.mwh for r in days if r.slot != 0)
    assert d["totals"]["grid_mwh"] == sum(r.mwh for r in days if r.slot == 0)
    # CO2e of a day: the grid meter's records through agent.ledger.carbon
    params = carbon.load_params()
    x = d["rows"][1]
    grid = [r for r in days if r.sid == x["sid"] and r.start_ms == x["day_ms"] and r.slot == 0]
    er = sum((carbon.reduction(r, params).er for r in grid), Fraction(0))
    assert (x["co2e_kg"], x["co2e_point"]) == (carbon.fmt(er * 1000, 3), "grid")
    # one station
    one = served.ok(f"/api/energy/daily?{RANGE}&sid=KH-TST-0002")
    assert [x["day"] for x in one["rows"]] == [D26, D27, D28]
    assert one["rows"] == [x for x in d["rows"] if x["sid"] == "KH-TST-0002"]


def test_a_day_is_complete_only_with_every_interval_and_over(served: Served) -> None:
    d = served.ok(f"/api/energy/daily?{RANGE}")
    by = {(x["sid"], x["day"]): x for x in d["rows"]}
    for sid in ("KH-TST-0000", "KH-TST-0002"):
        full = by[(sid, D27)]
        assert (full["intervals"], full["intervals_expected"], full["complete"]) == (96, 96, True)
        first = by[(sid, D26)]  # the stream began at 09:40
        assert first["complete"] is False and first["intervals"] == 58
    # two hours of telemetry missing: the energy across the gap is in the records (spread,
    # flagged gap), but those intervals do not count as data
    gap = by[(GAP_SID, D27)]
    assert gap["complete"] is False and "gap" in gap["flags"]
    assert 96 - 10 <= gap["intervals"] < 96
    # today is never complete
    assert all(by[(f"KH-TST-{i:04d}", D28)]["today"] for i in range(3))
    assert not any(by[(f"KH-TST-{i:04d}", D28)]["complete"] for i in range(3))
    assert d["totals"]["incomplete"] == 3 + 1 + 3
    # a range beyond the stations' today has no rows for it
    assert [
        x["day"]
        for x in served.ok("/api/energy/daily?sid=KH-TST-0000&from=2025-11-28&to=2025-11-30")[
            "rows"
        ]
    ] == [D28]


def test_energy_csv_equals_the_json_rows(served: Served) -> None:
    d = served.ok(f"/api/energy/daily?{RANGE}&sid={GAP_SID}")
    r = served.get(f"/api/energy/daily?{RANGE}&sid={GAP_SID}&format=csv")
    assert r.status == 200
    assert (
        r.headers["Content-Disposition"] == f'attachment; filename="energy-daily_{D26}_{D28}.csv"'
    )
    rows = csv_rows(r.body)
    assert rows[0] == [
        "station",
        "day_utc",
        "battery_kwh",
        "grid_kwh",
        "intervals",
        "complete",
        "co2e_kg",
        "co2e_point",
        "flags",
        "carbon_params",
    ]
    mark = f"example-kh 2026.1 ({NOT_VALIDATED})"
    assert rows[1:] == [
        [
            x["sid"],
            x["day"],
            kwh(x["mwh"]),
            kwh(x["grid_mwh"]),
            f"{x['intervals']}/96",
            "yes" if x["complete"] else "no",
            x["co2e_kg"],
            "grid",
            " ".join(x["flags"]),
            mark,
        ]
        for x in d["rows"]
    ]
    assert [row[5] for row in rows[1:]] == ["no", "no", "no"]


# ---- the fleet: filter, sort, CSV --------------------------------------------------------------


def test_fleet_filter_sort_and_csv(served: Served) -> None:
    all_ = served.ok("/api/fleet")["stations"]
    assert [s["sid"] for s in all_] == [f"KH-TST-{i:04d}" for i in range(3)]
    assert {s["state"] for s in all_} == {"silent"}
    f = served.ok("/api/fleet?q=tst-0001")["stations"]
    assert [s["sid"] for s in f] == ["KH-TST-0001"]
    assert served.ok("/api/fleet?state=online")["stations"] == []
    assert len(served.ok("/api/fleet?state=silent")["stations"]) == 3
    by_today = served.ok("/api/fleet?sort=today&dir=desc")["stations"]
    want = sorted(all_, key=lambda s: s["today_mwh"], reverse=True)
    assert [s["sid"] for s in by_today] == [s["sid"] for s in want]
    assert by_today[0]["today_mwh"] > by_today[-1]["today_mwh"]
    r = served.get("/api/fleet?sort=today&dir=desc&q=TST&format=csv")
    assert r.status == 200
    assert r.headers["Content-Disposition"].startswith('attachment; filename="stations_')
    rows = csv_rows(r.body)
    assert rows[0][:3] == ["station", "state", "last_seen_utc"]
    assert [(x[0], x[1], x[7]) for x in rows[1:]] == [
        (s["sid"], s["state"], kwh(s["today_mwh"])) for s in by_today
    ]
    assert all(x[-1] == f"example-kh 2026.1 ({NOT_VALIDATED})" for x in rows[1:])
    fw = rows[0].index("firmware")
    assert [x[fw] for x in rows[1:]] == [s["fw"] or "" for s in by_today]
    for bad in ("state=asleep", "sort=color", "dir=up"):
        assert served.get(f"/api/fleet?{bad}").status == 400


# ---- alarm history ----------------------------------------------------------------------------


def test_alarm_history_with_an_acknowledgement(served: Served) -> None:
    active = served.ok("/api/alarms")["active"]
    off = {a["id"]: a for a in active if a["code"] == "offline"}
    assert set(off) == {f"KH-TST-{i:04d}:offline" for i in range(3)}
    me = served.ok("/api/me")
    aid = f"{GAP_SID}:offline"
    r = served.req(
        "POST",
        "/api/alarms/ack",
        b'{"id": "%s"}' % aid.encode(),
        **{"Content-Type": "application/json", "X-CSRF-Token": me["csrf"]},
    )
    assert r.status == 200, r.body
    acked_at = r.json["acked_at"]
    h = served.ok("/api/alarms/history")
    items = {x["id"]: x for x in h["items"]}
    assert h["total"] == len(h["items"]) >= 3
    x = items[aid]
    assert (x["source"], x["raised_ms"], x["cleared_ms"]) == (
        "dashboard",
        off[aid]["since_ms"],
        None,
    )
    assert (x["acked_by"], x["acked_at"]) == ("local@127.0.0.1", acked_at)
    assert items["KH-TST-0000:offline"]["acked_by"] is None
    # newest first; one station; a page; CSV of the page
    raised = [x["raised_ms"] for x in h["items"]]
    assert raised == sorted(raised, reverse=True)
    one = served.ok(f"/api/alarms/history?sid={GAP_SID}")
    assert [x["id"] for x in one["items"]] == [aid]
    page = served.ok("/api/alarms/history?limit=1&offset=1")
    assert page["items"] == h["items"][1:2]
    rows = csv_rows(served.get(f"/api/alarms/history?sid={GAP_SID}&format=csv").body)
    assert rows[1][2:5] == [GAP_SID, "", "offline"] and rows[1][8] == "local@127.0.0.1"
    assert served.ok("/api/alarms/history?from=2020-01-01&to=2020-01-02")["items"] == []
    # an acknowledgement of an occurrence the dashboard does not remember (raised before it
    # started): in the history all the same, with who and when
    since = now_ms() - 3_600_000
    served.app.state.auth.store.ack("KH-TST-0000:bms_fault:1", since, "ana")
    old = {x["id"]: x for x in served.ok("/api/alarms/history?sid=KH-TST-0000")["items"]}
    x = old["KH-TST-0000:bms_fault:1"]
    assert (x["source"], x["code"], x["slot"], x["raised_ms"], x["acked_by"]) == (
        "ack",
        "bms_fault",
        1,
        since,
        "ana",
    )


def test_alarm_history_keeps_cleared_occurrences() -> None:
    from agent.dashboard.state import FleetState

    fs = FleetState()
    t = 1_764_150_000_000
    fs.set_status("KH-A-0001", t, {"state": "offline", "boot": 1})
    fs.tick(t + 1000)
    fs.set_status("KH-A-0001", t + 5000, {"state": "online", "boot": 2})
    fs.add_raw("KH-A-0001", "event", t + 5000, {"ev": "boot", "boot": 2, "seq": 0})
    fs.tick(t + 6000)
    (occ,) = fs.history(None, t - DAY, t + DAY)
    assert (occ["id"], occ["since_ms"], occ["raised_ms"], occ["cleared_ms"]) == (
        "KH-A-0001:offline",
        t,
        t + 1000,
        t + 6000,
    )
    assert fs.history("KH-A-0002", t - DAY, t + DAY) == []
    assert fs.history(None, t + 7000, t + DAY) == []  # cleared before the range


# ---- the carbon mark --------------------------------------------------------------------------


def test_carbon_mark_while_the_parameters_are_not_validated(served: Served) -> None:
    assert carbon.load_params().validated is False  # the shipped example says so
    c = served.ok("/api/fleet")["carbon"]
    assert (c["id"], c["version"], c["validated"]) == ("example-kh", "2026.1", False)
    assert served.ok(f"/api/stations/{GAP_SID}")["carbon"]["validated"] is False
    assert served.ok(f"/api/energy/daily?{RANGE}")["carbon"]["validated"] is False


def test_no_mark_with_a_validated_parameter_file(db: str, tmp_path: pathlib.Path) -> None:
    src = carbon.DEFAULT_PATH.read_text()
    assert "\nvalidated = false\n" in src
    p = tmp_path / "validated.toml"
    p.write_text(src.replace("\nvalidated = false\n", "\nvalidated = true\n"))
    assert carbon.load_params(p).validated is True
    # absent: not validated (a file must say it is)
    q = tmp_path / "silent.toml"
    q.write_text(src.replace("\nvalidated = false\n", "\n"))
    assert carbon.load_params(q).validated is False
    bad = tmp_path / "bad.toml"
    bad.write_text(src.replace("\nvalidated = false\n", '\nvalidated = "yes"\n'))
    with pytest.raises(carbon.CarbonParamsError, match="validated"):
        carbon.load_params(bad)
    s = Served(db, carbon_params=str(p))
    try:
        assert s.ok("/api/fleet")["carbon"]["validated"] is True
        r = s.get(f"/api/energy/daily?{RANGE}&format=csv")
        rows = csv_rows(r.body)
        assert rows[1][-1] == "example-kh 2026.1"
        assert NOT_VALIDATED not in r.body.decode()
    finally:
        s.stop()


def test_watch_header_carries_the_mark(db: str, tmp_path: pathlib.Path) -> None:
    from rich.console import Console

    from stationctl.watch import db_source, render

    def header(params: str | None) -> str:
        fleet, _ = db_source(db, None, params)()
        con = Console(width=200, record=True)
        con.print(render(fleet, None, None))
        return con.export_text().splitlines()[0]

    line = header(None)
    assert "CO2e avoided today" in line and f"({NOT_VALIDATED}: example-kh 2026.1)" in line
    p = tmp_path / "validated.toml"
    p.write_text(carbon.DEFAULT_PATH.read_text().replace("validated = false", "validated = true"))
    assert NOT_VALIDATED not in header(str(p))
