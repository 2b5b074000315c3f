"""Messages that arrive before their station's key (a freshly flashed station publishing a
moment before the agent reloads its keys) are quarantined as unknown_station/unknown_kid;
once the key is added (`stationctl keys add` in another process, or a KeyStore on another
connection, or while the agent is down) the agent re-verifies them from their stored bytes
and ingests them: the export then equals a run where the key was known from the start.
A message with a bad signature stays in quarantine. Real Mosquitto, real SQLite files."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import subprocess
import sys
from typing import Any

import pytest

from agent.config import AgentConfig, DbConfig, IngestConfig
from agent.keys import KeyStore
from agent.ledger.export import render
from agent.service import Service
from agent.sources.mqtt import BrokerConfig
from agent.store import SCHEMA_VERSION, QuarantineRow, RawRow, Store, row_to_record
from agent.store.sql import SchemaError
from tests.agent_helpers import STATIONCTL, Publisher, Station, key_for
from tests.helpers import ROOT
from tools.mosquitto import Mosquitto

OLD = "KH-REK-0001"  # known from the start in both runs
NEW = "KH-REK-0002"  # provisioned while the agent runs


async def wait_for(cond: Any, timeout: float = 30.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


def streams(prefix: str) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]], bytes, bytes]:
    """(before, after, bad_sig payload, kid-2 payload): what NEW publishes before its key is
    loaded (boot event, telemetry, a repeat, a forged message, one signed with kid 2) and
    after (more telemetry, a session end, a resend of an early message), with OLD's
    messages in between. Identical bytes for any prefix."""
    old, new = Station(OLD, slots=1), Station(NEW, slots=2)
    before: list[tuple[str, bytes]] = []
    after: list[tuple[str, bytes]] = []

    def add(to: list[tuple[str, bytes]], st: Station, kp: tuple[str, bytes]) -> None:
        to.append((st.topic(kp[0], prefix), kp[1]))

    add(before, new, new.boot_event())
    add(before, new, new.event("session_start", slot=1, bat="B0000001", e_mwh=0, soc=200))
    for i in range(12):
        old.advance()
        add(before, old, old.telemetry())
        new.advance(w=1200 + 10 * i)
        add(before, new, new.telemetry())
    before.append(before[5])  # a byte-identical repeat, quarantined twice
    forger = Station(NEW, key=key_for("KH-XXX-0000"), boot=1)
    forger.seq = 500
    bad = forger.telemetry()[1]
    kid2 = Station(NEW, kid=2, boot=1)
    kid2.seq = 501
    k2 = kid2.event("outbox_drop", n=0)[1]
    before += [(f"{prefix}/{NEW}/telemetry", bad), (f"{prefix}/{NEW}/event", k2)]
    for i in range(8):
        old.advance()
        add(after, old, old.telemetry())
        new.advance(w=1500 - 20 * i)
        add(after, new, new.telemetry())
    add(
        after,
        new,
        new.event(
            "session_end",
            slot=1,
            bat="B0000001",
            e0_mwh=0,
            e1_mwh=new.e_mwh[0],
            soc0=200,
            soc1=800,
            up0=1000,
            up1=new.up,
            why="full",
        ),
    )
    after.append(before[7])  # the station resends an early message: a duplicate
    return before, after, bad, k2


def config(db: str, port: int, name: str, prefix: str) -> AgentConfig:
    return AgentConfig(
        db=DbConfig(url=db, synchronous="normal"),
        broker=BrokerConfig(port=port, client_id=name, prefix=prefix),
        ingest=IngestConfig(records_interval_ms=50, key_reload_s=0.3),
    )


async def start(cfg: AgentConfig) -> tuple[Service, asyncio.Event, asyncio.Task[None]]:
    svc = Service(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    await asyncio.wait_for(svc.ready.wait(), 20)
    return svc, stop, task


async def publish(port: int, items: list[tuple[str, bytes]], name: str) -> None:
    pub = Publisher(port, name)
    try:
        await asyncio.to_thread(pub.send, items)
    finally:
        pub.close()


def exports(db: str) -> dict[str, bytes]:
    with Store(db, readonly=True) as st:
        return {
            by: render([row_to_record(r) for r in st.record_rows(kind=by)], "json", None, None, by)
            for by in ("interval", "session", "day")
        }


def raw_set(db: str) -> set[tuple[str, int, int, str, bytes]]:
    with Store(db, readonly=True) as st:
        return {(r.sid, r.boot, r.seq, r.kind, r.record) for p in st.iter_raw() for r in p}


def open_quarantine(db: str) -> list[tuple[str, str, bytes]]:
    """(kind, reason, bytes) of what is still in quarantine (topic prefix left out)."""
    with Store(db, readonly=True) as st:
        return sorted(
            (q.topic.rsplit("/", 1)[-1], q.reason, q.record) for q in st.quarantine_rows()
        )


async def test_key_added_while_running_reingests_the_quarantine(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    # reference: both stations' kid 1 known from the start
    ref_db = f"sqlite:///{tmp_path}/ref.db"
    with KeyStore(ref_db) as ks:
        ks.add(OLD, key_for(OLD))
        ks.add(NEW, key_for(NEW))
    before, after, bad, k2 = streams("ref")
    svc, stop, task = await start(config(ref_db, mosquitto.port, "rk-ref", "ref"))
    await publish(mosquitto.port, before + after, "rk-pub-ref")
    await wait_for(lambda: svc.counters["received"] >= len(before) + len(after))
    stop.set()
    await task
    assert svc.counters["q.bad_sig"] == 1 and svc.counters["q.unknown_kid"] == 1
    assert svc.counters["duplicate"] == 2

    # the run under test: NEW has no key when its first messages arrive
    db = f"sqlite:///{tmp_path}/agent.db"
    with KeyStore(db) as ks:
        ks.add(OLD, key_for(OLD))
    before, after, bad, k2 = streams("live")
    svc, stop, task = await start(config(db, mosquitto.port, "rk-live", "live"))
    try:
        await publish(mosquitto.port, before, "rk-pub-1")
        await wait_for(lambda: svc.counters["received"] >= len(before))
        await svc.flush()
        n_new = sum(1 for t, _ in before if NEW in t)
        assert svc.counters["q.unknown_station"] == n_new
        assert [r for r in raw_set(db) if r[0] == NEW] == []

        # `stationctl keys add` from another process, the way an operator or the flashing
        # tool provisions a station
        kf = tmp_path / "new.key"
        kf.write_text(key_for(NEW).hex() + "\n")
        r = await asyncio.to_thread(
            subprocess.run,
            [*STATIONCTL, "keys", "add", "--db", db, NEW, "--key-file", str(kf)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        # everything of NEW but the forged and the kid-2 message: the repeat once stored,
        # once a duplicate
        await wait_for(
            lambda: svc.counters["rekey.stored"] + svc.counters["rekey.duplicate"] >= n_new - 2,
            what="re-ingest after keys add",
        )
        c = svc.counters
        assert (c["rekey.stored"], c["rekey.duplicate"], c["rekey.conflict"]) == (n_new - 3, 1, 0)
        assert c["rekey.rejected"] == 1 and c["rekey.waiting"] == 1

        await publish(mosquitto.port, after, "rk-pub-2")
        await wait_for(lambda: svc.counters["received"] >= len(before) + len(after))
        await svc.flush()
        assert svc.counters["duplicate"] == 1  # the early message resent after its rescue

        # the same raw messages, the same export as the reference run, byte for byte
        assert raw_set(db) == raw_set(ref_db)
        assert exports(db) == exports(ref_db)
        assert NEW.encode() in exports(db)["session"]
        # still in quarantine, with the reason that holds now: the forgery (bad_sig) and the
        # kid-2 message (unknown_kid), exactly as in the reference run
        assert (
            open_quarantine(db)
            == open_quarantine(ref_db)
            == sorted([("telemetry", "bad_sig", bad), ("event", "unknown_kid", k2)])
        )
        with Store(db, readonly=True) as st:
            q = {x.record: x for x in st.quarantine_rows()}
            assert "first quarantined as unknown_station" in q[bad].detail
            everything = st.quarantine_rows(include_resolved=True)
        assert len(everything) == n_new  # resolved rows are kept for the audit trail
        con = sqlite3.connect(f"file:{tmp_path}/agent.db?mode=ro", uri=True)
        try:
            resolved = con.execute(
                "SELECT resolved_to, COUNT(*), MIN(resolved_ms) > MAX(recv_ms) FROM quarantine "
                "WHERE resolved_ms IS NOT NULL GROUP BY resolved_to ORDER BY 1"
            ).fetchall()
            # raw keeps the arrival time of a re-ingested message, not the re-check's
            recv_raw = dict(con.execute("SELECT record, recv_ms FROM raw WHERE sid = ?", (NEW,)))
            recv_q = dict(
                con.execute("SELECT record, MIN(recv_ms) FROM quarantine GROUP BY record")
            )
        finally:
            con.close()
        assert resolved == [("duplicate", 1, 1), ("stored", n_new - 3, 1)]
        assert all(recv_raw[p] == recv_q[p] for _, p in before if p in recv_raw)

        # kid 2 added by a KeyStore on another connection: the waiting message goes in too
        with KeyStore(db) as ks:
            ks.add(NEW, key_for(NEW, 2), kid=2)
        await wait_for(lambda: svc.counters["rekey.stored"] == n_new - 2, what="kid 2")
        assert open_quarantine(db) == [("telemetry", "bad_sig", bad)]
        assert (NEW, 1, 501, "event", k2) in raw_set(db)
    finally:
        stop.set()
        await task


async def test_key_added_while_the_agent_is_down_reingests_at_start(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    db = f"sqlite:///{tmp_path}/agent.db"
    with KeyStore(db) as ks:
        ks.add(OLD, key_for(OLD))
    before, _after, _bad, _k2 = streams("down")
    cfg = config(db, mosquitto.port, "rk-down", "down")
    svc, stop, task = await start(cfg)
    await publish(mosquitto.port, before, "rk-pub-d")
    await wait_for(lambda: svc.counters["received"] >= len(before))
    stop.set()
    await task
    n_new = sum(1 for t, _ in before if NEW in t)
    assert svc.counters["q.unknown_station"] == n_new and svc.counters["rekey.stored"] == 0

    with KeyStore(db) as ks:  # provisioned while the agent was stopped
        ks.add(NEW, key_for(NEW))
    svc, stop, task = await start(cfg)
    try:
        await wait_for(lambda: svc.counters["rekey.stored"] >= n_new - 3, what="rekey at start")
        await svc.flush()
        assert svc.counters["rekey.duplicate"] == 1 and svc.counters["rekey.rejected"] == 1
        assert NEW.encode() in exports(db)["interval"]
        with Store(db, readonly=True) as st:
            assert {q.reason for q in st.quarantine_rows()} == {"bad_sig", "unknown_kid"}
    finally:
        stop.set()
        await task
    # a third start finds nothing left to do (resolved rows are not checked again, and the
    # two left are checked once, with no change)
    svc, stop, task = await start(cfg)
    try:
        await wait_for(lambda: svc.counters["rekey.checked"] >= 1)
        await svc.flush()
        assert svc.counters["rekey.stored"] == 0 and svc.counters["rekey.checked"] == 1
    finally:
        stop.set()
        await task


# ---- store and key ring, without a broker ---------------------------------------------------

SID = "KH-PNH-0001"


def _raw(seq: int, record: bytes) -> RawRow:
    return RawRow(SID, 1, seq, "telemetry", f"stations/{SID}/telemetry", 100 + seq, 1, record)


def _q(seq: int, record: bytes, reason: str = "unknown_station") -> QuarantineRow:
    return QuarantineRow(100 + seq, f"stations/{SID}/telemetry", reason, "no key", SID, record)


def test_resolve_quarantine_applies_the_raw_rules(tmp_path: pathlib.Path) -> None:
    with Store(str(tmp_path / "a.db")) as st:
        st.write_batch([_raw(0, b"r0")])
        st.write_batch(
            [],
            [
                _q(0, b"r0"),
                _q(1, b"r1"),
                _q(1, b"r1"),
                _q(0, b"other"),
                _q(2, b"forged"),
                _q(3, b"x", "bad_sig"),
            ],
        )
        ids = [e.id for e in st.open_quarantine(SID, ("unknown_station", "unknown_kid"))]
        assert len(ids) == 5  # the bad_sig row is not a candidate
        assert st.quarantined_sids(("unknown_station",)) == [SID]
        res, outcomes = st.resolve_quarantine(
            [_raw(0, b"r0"), _raw(1, b"r1"), _raw(1, b"r1"), _raw(0, b"other")],
            ids[:4],
            [(ids[4], "bad_sig", "HMAC mismatch")],
            at_ms=999,
        )
        assert outcomes == ["duplicate", "stored", "duplicate", "conflict"]
        assert res.new == [1] and res.duplicates == 2 and res.conflicts == 1
        # open: the forged row (now bad_sig), the old bad_sig row, the conflict's own row
        assert [(q.reason, q.record) for q in st.quarantine_rows()] == [
            ("bad_sig", b"forged"),
            ("bad_sig", b"x"),
            ("conflict", b"other"),
        ]
        assert len(st.quarantine_rows(include_resolved=True)) == 7
        assert st.open_quarantine(SID, ("unknown_station",)) == []
        assert st.alarms()[0][2] == "conflict"
        got = st.db.execute(
            "SELECT resolved_ms, resolved_to FROM quarantine WHERE "
            "resolved_ms IS NOT NULL ORDER BY id"
        ).fetchall()
        assert got == [(999, "duplicate"), (999, "stored"), (999, "duplicate"), (999, "conflict")]


V1_QUARANTINE = """CREATE TABLE quarantine (
    id INTEGER PRIMARY KEY,
    recv_ms BIGINT NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, sid TEXT, record BLOB NOT NULL)"""


def test_schema_1_database_is_refused_then_upgraded_in_place(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
    con.execute("INSERT INTO meta VALUES ('schema', '1')")
    con.execute(V1_QUARANTINE)
    con.execute(
        "INSERT INTO quarantine (recv_ms, topic, reason, detail, sid, record) VALUES "
        "(5, 't', 'unknown_station', 'no key', ?, x'01')",
        (SID,),
    )
    con.commit()
    con.close()
    with pytest.raises(SchemaError, match="schema 1, this program needs .*stationctl db upgrade"):
        Store(str(path))  # an agent, `keys add`: refused, with what to run
    up = subprocess.run(
        [sys.executable, "-m", "stationctl", "db", "upgrade", "--db", str(path)],
        capture_output=True,
        text=True,
    )
    assert up.returncode == 0, up.stderr
    assert f"schema {SCHEMA_VERSION}" in up.stdout
    with KeyStore(str(path)) as ks:  # what `stationctl keys add` opens
        ks.add(SID, key_for(SID))
    with Store(str(path)) as st:  # reopening: nothing more to do
        assert st.db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone() == (
            str(SCHEMA_VERSION),
        )
        cols = [r[1] for r in st.db.execute("PRAGMA table_info(quarantine)")]
        assert cols[-2:] == ["resolved_ms", "resolved_to"]
        assert [q.record for q in st.quarantine_rows()] == [b"\x01"]
        (e,) = st.open_quarantine(SID, ("unknown_station",))
        st.resolve_quarantine([_raw(0, b"\x01")], [e.id])
        assert st.quarantine_rows() == [] and st.raw_count() == 1
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET v = ? WHERE k = 'schema'", (str(SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    try:
        Store(str(path))
    except ValueError as err:
        assert f"schema {SCHEMA_VERSION + 1}" in str(err)
    else:
        raise AssertionError("a newer schema must be refused")


def test_key_ring_reports_stations_that_gained_a_key(tmp_path: pathlib.Path) -> None:
    db = f"sqlite:///{tmp_path}/k.db"
    with KeyStore(db) as agent, KeyStore(db) as other:
        other.add("KH-AAA-0001", key_for("KH-AAA-0001"))
        other.add("KH-AAA-0002", key_for("KH-AAA-0002"))
        other.revoke("KH-AAA-0002")
        ring = agent.ring(min_reload_s=0.0)
        assert ring.take_learned() == {"KH-AAA-0001"}  # the first load: every usable key
        assert ring.take_learned() == set()
        ring.reload()
        assert ring.take_learned() == set()  # nothing new
        other.add("KH-AAA-0001", key_for("KH-AAA-0001", 2))
        other.add("KH-AAA-0003", key_for("KH-AAA-0003"))
        other.revoke("KH-AAA-0001", 1)
        ring.reload()
        assert ring.take_learned() == {"KH-AAA-0001", "KH-AAA-0003"}
        other.add("KH-AAA-0004", key_for("KH-AAA-0004"))
        ring.key("KH-AAA-0004", 1)  # learned on a miss (the hot path's reload)
        assert ring.take_learned() == {"KH-AAA-0004"}
