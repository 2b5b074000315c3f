"""The dashboard over a real store, served by uvicorn on a free port: JSON API, pages, live
updates (SSE), read-only access, and a database that appears after the dashboard. Every
test that reads a database runs on both engines (`db_url`: SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
import http.client
import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from agent.dashboard import DashboardServer, Live, make_app
from agent.dashboard.reader import SETTLE_GRACE_S, Reader
from agent.store import QuarantineRow, RawRow, Store, now_ms, record_to_row
from tests.test_dashboard_state import METER, Sim, rec, slot
from tools.postgres import PgCluster

SID = "KH-PNH-0001"
SID2 = "KH-PNH-0002"


class Served:
    """A dashboard app served in a background event loop (as inside the agent)."""

    def __init__(self, url: str, **kw: Any) -> None:
        self.live = Live(url, poll_s=0.2, records_s=0.5, **kw)
        self.app = make_app(url, live=self.live)
        self.loop = asyncio.new_event_loop()
        self.server = DashboardServer(self.app, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(20)
        self.base = self.server.url

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.base + path.lstrip("/"), timeout=10) as r:
                body = r.read()
                ctype = r.headers.get("Content-Type", "")
                return r.status, json.loads(body) if "json" in ctype else body.decode()
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(what)


def raw(sim: Sim, kind: str, body: dict[str, Any], recv: int) -> RawRow:
    return RawRow(
        sim.sid,
        body["boot"],
        body["seq"],
        kind,
        f"stations/{sim.sid}/{kind}",
        recv,
        1,
        Sim.payload(body),
    )


def status(sid: str, state: str, recv: int) -> tuple[str, int, bytes]:
    return (
        sid,
        recv,
        json.dumps(
            {"v": 1, "sid": sid, "boot": 1, "state": state, "fw": "0.1.0", "cfg": "abcdef012345"}
        ).encode(),
    )


def make_db(url: str) -> Iterator[tuple[str, Store, Sim, Sim]]:
    """Two stations' messages, a quarantined forgery, statuses and records in a real store
    (a new database at `url`)."""
    store = Store(url, synchronous="normal")
    t = now_ms()
    a, b = Sim(SID, t0=t - 60_000), Sim(SID2, t0=t - 60_000)
    rows = [raw(a, "event", a.ev("session_start", slot=1, bat="B0012345", e_mwh=1000, soc=200), t)]
    for i in range(5):
        rows.append(
            raw(
                a,
                "telemetry",
                a.tel(
                    [slot(1, "C", 84000, 10000, e=1000 + 100 * i), slot(2, "I", 0, 0)], meter=METER
                ),
                t + i,
            )
        )
    rows.append(raw(b, "telemetry", b.tel([slot(1, "F", 84000, 50)]), t + 10))
    store.write_batch(
        rows,
        [QuarantineRow(t, f"stations/{SID2}/telemetry", "bad_sig", "HMAC mismatch", SID2, b"{}")],
        status=[status(SID, "online", t), status(SID2, "online", t)],
    )
    day = t - t % 86_400_000
    store.apply_records(
        [
            record_to_row(rec("day", SID, 1, day, 2_000_000)),
            record_to_row(rec("interval", SID, 1, t - t % 900_000, 300_000, 900_000)),
        ],
        [],
    )
    yield url, store, a, b
    store.close()


@pytest.fixture
def db(db_url: str) -> Iterator[tuple[str, Store, Sim, Sim]]:
    yield from make_db(db_url)


@pytest.fixture
def served(db: tuple[str, Store, Sim, Sim]) -> Iterator[Served]:
    s = Served(db[0])
    wait(lambda: s.get("/api/health")[1]["ok"], 10, "first poll")
    yield s
    s.stop()


def test_fleet_station_alarms_and_series(served: Served) -> None:
    code, f = served.get("/api/fleet")
    assert code == 200
    assert [r["sid"] for r in f["stations"]] == [SID, SID2]
    ra = f["stations"][0]
    assert ra["state"] == "online" and ra["power_w"] == 840 and ra["meter_w"] == 2150
    assert ra["today_mwh"] == 2_000_000 and ra["co2e_point"] == "battery"
    code, st = served.get(f"/api/stations/{SID}")
    assert code == 200 and st["sid"] == SID
    s1 = st["slot_list"][0]
    assert s1["power_w"] == 840 and s1["session"]["mwh"] == 400 and s1["bat"]["soc"] == 532
    code, al = served.get("/api/alarms")
    assert code == 200
    assert {a["id"] for a in al["active"]} == {f"{SID2}:signature"}
    assert al["quarantine_total"] == {"bad_sig": 1}
    code, p = served.get(f"/api/stations/{SID}/power?minutes=5")
    assert code == 200 and p["points"] and p["points"][-1][1] == 840
    code, e = served.get("/api/energy?hours=2")
    assert code == 200 and [x[1] for x in e["points"]] == [300_000]
    code, d = served.get(f"/api/stations/{SID}/daily?days=3")
    assert code == 200 and [x[1] for x in d["points"]] == [2_000_000]
    code, h = served.get("/api/health")
    assert h["ok"] and h["stations"] == 2 and h["bad_rows"] == 0


def test_bad_requests_are_refused_with_a_reason(served: Served) -> None:
    assert served.get("/api/stations/KH-NOPE-0001")[0] == 404
    code, body = served.get("/api/stations/bad%20id")
    assert code == 400 and "station id" in body["error"]
    code, body = served.get("/api/power?minutes=abc")
    assert code == 400 and "minutes" in body["error"]
    assert served.get("/api/power?minutes=100000")[0] == 400
    assert served.get("/api/daily?sid=KH-NOPE-0001")[0] == 404
    assert served.get("/api/live?topic=everything")[0] == 400
    assert served.get("/api/live?topic=station:KH-NOPE-0001")[0] == 404
    req = urllib.request.Request(served.base + "api/fleet", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 405


def test_pages_and_static_files(served: Served) -> None:
    for path in ("/", f"/stations/{SID}", "/alarms"):
        code, html = served.get(path)
        assert code == 200 and "/static/app.js" in html and 'name="viewport"' in html
    for f in ("app.js", "chart.js", "style.css"):
        code, text = served.get("/static/" + f)
        assert code == 200 and len(text) > 500


def subscribe(port: int, topic: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", f"/api/live?topic={topic}")
    r = conn.getresponse()
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    return r


def read_events(r: http.client.HTTPResponse, want: Any, timeout: float) -> dict[str, Any]:
    """Read SSE messages until one satisfies `want`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = r.readline().decode()
        if line.startswith("data: "):
            obj = json.loads(line[6:])
            if want(obj):
                return obj  # type: ignore[no-any-return]
    raise TimeoutError("no such event")


def test_live_updates_reach_subscribers(db: tuple[str, Store, Sim, Sim], served: Served) -> None:
    _url, store, a, _b = db
    r = subscribe(served.server.port, f"station:{SID}")
    first = read_events(r, lambda o: True, 5)
    assert first["slot_list"][0]["power_w"] == 840
    t0 = time.monotonic()
    store.write_batch(
        [
            raw(
                a,
                "telemetry",
                a.tel([slot(1, "C", 84000, 20000, e=2000), slot(2, "I", 0, 0)], meter=METER),
                now_ms(),
            )
        ]
    )
    got = read_events(r, lambda o: o["slot_list"][0]["power_w"] == 1680, 10)
    assert got["point"][1] == 1680
    took = time.monotonic() - t0
    r.close()
    # the fleet topic carries the same change, and the alarms topic its own view
    r = subscribe(served.server.port, "fleet")
    assert read_events(r, lambda o: True, 5)["stations"][0]["power_w"] == 1680
    r.close()
    r = subscribe(served.server.port, "alarms")
    assert "active" in read_events(r, lambda o: True, 5)
    r.close()
    # a client that went away is noticed at the next write and costs nothing more
    wait(lambda: served.get("/api/health")[1]["clients"] == 0, 10, "subscribers gone")
    assert took < 10  # the figure itself is in bench_dashboard


def test_offline_alarm_appears_and_clears(db: tuple[str, Store, Sim, Sim], served: Served) -> None:
    _url, store, a, _b = db
    store.put_status([status(SID, "offline", now_ms())])
    wait(
        lambda: any(x["id"] == f"{SID}:offline" for x in served.get("/api/alarms")[1]["active"]),
        10,
        "offline alarm",
    )
    assert served.get("/api/fleet")[1]["stations"][0]["state"] == "offline"
    store.put_status([status(SID, "online", now_ms())])
    store.write_batch([raw(a, "telemetry", a.tel([slot(1)]), now_ms())])
    wait(
        lambda: (
            not any(x["id"] == f"{SID}:offline" for x in served.get("/api/alarms")[1]["active"])
        ),
        10,
        "alarm cleared",
    )
    ev = [e["code"] for e in served.get("/api/alarms")[1]["events"]]
    assert "raised:offline" in ev and "cleared:offline" in ev


def test_a_resolved_quarantine_row_clears_its_alarm(
    db: tuple[str, Store, Sim, Sim], served: Served
) -> None:
    """The agent ingests a quarantined message once its key arrives (Store.resolve_quarantine):
    the dashboard notices within its records refresh and drops the signature alarm."""
    _url, store, _a, b = db
    assert any(x["id"] == f"{SID2}:signature" for x in served.get("/api/alarms")[1]["active"])
    [(qid,)] = store.db.execute("SELECT id FROM quarantine").fetchall()
    body = b.tel([slot(1, "F", 84000, 50)])
    store.resolve_quarantine([raw(b, "telemetry", body, now_ms())], [qid])
    wait(
        lambda: (
            not any(x["id"] == f"{SID2}:signature" for x in served.get("/api/alarms")[1]["active"])
        ),
        10,
        "alarm cleared",
    )
    assert "resolved:bad_sig" in [e["code"] for e in served.get("/api/alarms")[1]["events"]]


def test_the_dashboard_only_reads(served: Served) -> None:
    db = served.live.reader.db
    with pytest.raises(
        (sqlite3.OperationalError, psycopg.errors.ReadOnlySqlTransaction), match="read-?only"
    ):
        db.execute("DELETE FROM raw")


def test_a_database_that_appears_later(db_url: str) -> None:
    """SQLite: no file yet; PostgreSQL: an empty database (no tables yet; a password in its
    URL, which the test cluster's trust authentication ignores, is never shown)."""
    url = db_url.replace("postgres@", "postgres:s3cret@")
    s = Served(url)
    try:
        code, h = s.get("/api/health")
        assert code == 200 and not h["ok"] and "s3cret" not in h["db"]
        assert s.get("/api/fleet")[1]["stations"] == []
        store = Store(url)
        sim = Sim(SID, t0=now_ms())
        store.write_batch([raw(sim, "telemetry", sim.tel([slot(1)]), now_ms())])
        wait(lambda: s.get("/api/fleet")[1]["stations"], 10, "station after the db appears")
        store.close()
    finally:
        s.stop()


def test_backfill_reads_the_recent_past_and_each_stations_newest(db_url: str) -> None:
    """At start the dashboard reads the rows of its history window, and for a station
    silent for longer, its newest telemetry through the (sid, boot, seq) index."""
    url = db_url
    store = Store(url)
    t = now_ms()
    old = Sim(SID2, t0=t - 7_200_000)
    recent = Sim(SID, t0=t - 100_000)
    rows = [
        raw(old, "telemetry", old.tel([slot(1, "C", 84000, 1000 * (i + 1))]), t - 7_200_000 + i)
        for i in range(3)
    ]
    rows += [
        raw(recent, "telemetry", recent.tel([slot(1, "C", 84000, 10_000)]), t - 60_000 + i)
        for i in range(3)
    ]
    store.write_batch(rows)
    store.close()
    live = Live(url)
    assert live.poll_once()
    st = live.state.stations
    assert set(st) == {SID, SID2}
    now = now_ms()
    assert len(live.state.power(SID, now, 60)) == 1
    assert not live.state.power(SID2, now, 60)  # two hours ago: not in the last hour
    newest = st[SID2].tel
    assert newest is not None and newest["slots"][0]["ma"] == 3000  # its newest
    assert live.counters["rows"] == 4
    live.stop()


def test_a_failing_or_silent_agent_shows_as_a_banner(
    db: tuple[str, Store, Sim, Sim], served: Served
) -> None:
    # agent/health.py: the agent upserts its state row; the dashboard turns it into a line
    store = db[1]
    assert served.get("/api/fleet")[1]["agent"]["banner"] is None  # no agent row: all well
    t = now_ms()
    store.put_agent_health(t, json.dumps({"status": "ok", "failing_since_ms": None}))
    time.sleep(0.5)
    assert served.get("/api/fleet")[1]["agent"]["banner"] is None
    failing = {"failing_since_ms": t - 5000, "last_error": "OperationalError: database is locked"}
    store.put_agent_health(t, json.dumps(failing))
    b = wait(lambda: served.get("/api/fleet")[1]["agent"]["banner"], 10, "failing banner")
    assert b.startswith("agent failing since ") and b.endswith(
        ": OperationalError: database is locked"
    )
    # the same line reaches live subscribers, on every page's topic
    r = subscribe(served.server.port, "alarms")
    d = read_events(r, lambda d: d.get("agent", {}).get("banner"), 10)
    assert d["agent"]["banner"] == b
    r.close()
    store.put_agent_health(t - 60_000, json.dumps({"status": "ok"}))  # not refreshed for 60 s
    b = wait(
        lambda: (served.get("/api/fleet")[1]["agent"]["banner"] or "").startswith("agent silent"),
        10,
        "silent banner",
    )
    assert served.get("/api/fleet")[1]["agent"]["banner"] in (
        "agent silent for 60 s",
        "agent silent for 61 s",
    )


def test_reader_hands_over_rows_committed_below_the_last_id(pg_cluster: PgCluster) -> None:
    """PostgreSQL only (SQLite has one writer at a time: its ids become visible in order):
    a transaction takes its id when it inserts and shows it when it commits, so the live
    tail must hand over a row that appears below an id it has read already, once."""
    url = pg_cluster.create_db()
    slow, fast = Store(url), Store(url)
    sim = Sim(SID, t0=now_ms())
    r1, r2, r3 = (raw(sim, "telemetry", sim.tel([slot(1)]), now_ms()) for _ in range(3))
    reader = Reader(url)
    try:
        assert reader.open()
        slow.db.execute("BEGIN")
        slow.db.execute(
            "INSERT INTO raw (sid, boot, seq, kind, topic, recv_ms, kid, record) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            r1,
        )
        fast.write_batch([r2])
        got = reader.raw_after(0, 100)
        assert [(x.seq, x.id) for x in got] == [(r2.seq, 2)]
        assert reader.raw_after(2, 100) == []
        slow.db.execute("COMMIT")
        fast.write_batch([r3])
        got = reader.raw_after(2, 100)
        assert [(x.seq, x.id) for x in got] == [(r1.seq, 1), (r3.seq, 3)]  # the late one first
        assert reader.raw_after(3, 100) == []  # each row once
        # once every transaction that was open has ended (and a grace period), the ids up
        # to the last read are settled: no more looking back
        time.sleep(SETTLE_GRACE_S + 0.1)
        assert reader.raw_after(3, 100) == [] and reader.raw_after(3, 100) == []
        assert reader._tails["raw"].floor == 3 and not reader._tails["raw"].seen
    finally:
        reader.close()
        slow.close()
        fast.close()
