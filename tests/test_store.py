"""agent/store/: SQLite WAL schema, append-only raw with duplicate/conflict rules."""

from __future__ import annotations

import os
import pathlib
import sqlite3
import threading
import time

import psycopg
import pytest

from agent.store import QuarantineRow, RawRow, RecordRow, Store, sqlite_path

SID = "KH-PNH-0001"


def row(seq: int, record: bytes | None = None, boot: int = 1, sid: str = SID) -> RawRow:
    return RawRow(
        sid,
        boot,
        seq,
        "telemetry",
        f"stations/{sid}/telemetry",
        1000 + seq,
        1,
        record if record is not None else b"rec-%d-%d" % (boot, seq),
    )


def test_urls() -> None:
    assert sqlite_path("sqlite:///rel/a.db") == "rel/a.db"
    assert sqlite_path("sqlite:////abs/a.db") == "/abs/a.db"
    assert sqlite_path("/plain/a.db") == "/plain/a.db"
    with pytest.raises(ValueError, match="postgresql"):  # not a file path: the other engine
        sqlite_path("postgresql://u@h/db")
    with pytest.raises(ValueError, match="'mysql'"):
        sqlite_path("mysql://x")


def test_wal_mode_and_schema(tmp_path: pathlib.Path) -> None:
    with Store(f"sqlite:///{tmp_path}/a.db") as st:
        assert st.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert st.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        names = {r[0] for r in st.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"raw", "quarantine", "alarms", "records", "keys", "status", "meta"} <= names
    with Store(str(tmp_path / "a.db"), synchronous="normal") as st:  # reopen: idempotent
        assert st.db.execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(FileNotFoundError):
        Store(str(tmp_path / "missing.db"), create=False)


def test_new_duplicate_and_conflict(db_url: str) -> None:
    with Store(db_url) as st:
        r = st.write_batch([row(0), row(1), row(2)])
        assert r.new == [0, 1, 2] and r.duplicates == 0 and r.conflicts == 0
        # a batch mixing new keys, a byte-identical repeat, a conflict and a repeat within the batch
        r = st.write_batch(
            [row(3), row(1), row(2, b"other bytes"), row(4), row(4)],
            [QuarantineRow(5, "t", "bad_sig", "HMAC mismatch", SID, b"zz")],
        )
        assert r.new == [0, 3] and r.duplicates == 2 and r.conflicts == 1
        assert st.raw_count() == 5
        # the first copy stands
        got = {(x.boot, x.seq): x.record for b in st.iter_raw() for x in b}
        assert got[(1, 2)] == b"rec-1-2"
        q = st.quarantine_rows()
        assert [(x.reason, x.record) for x in q] == [
            ("conflict", b"other bytes"),
            ("bad_sig", b"zz"),
        ]
        assert "(KH-PNH-0001, 1, 2)" in q[0].detail
        alarms = st.alarms()
        assert len(alarms) == 1 and alarms[0][1:4] == (SID, "conflict", "crit")


def test_failed_batch_rolls_back_whole(db_url: str) -> None:
    with Store(db_url) as st:
        bad = RawRow(SID, 1, 9, "telemetry", "t", 1, 1, None)  # type: ignore[arg-type]
        with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
            st.write_batch([row(0), bad])
        assert st.raw_count() == 0
        st.write_batch([row(0)])
        assert st.raw_count() == 1


def test_iter_raw_pages_in_arrival_order(db_url: str) -> None:
    with Store(db_url) as st:
        st.write_batch([row(s, boot=2) for s in range(7)] + [row(0, boot=1)])
        pages = list(st.iter_raw(batch=3))
        assert [len(p) for p in pages] == [3, 3, 2]
        assert [(r.boot, r.seq) for p in pages for r in p][-2:] == [(2, 6), (1, 0)]
        assert st.max_boot(SID) == 2
        assert list(st.iter_raw(sid="KH-OTHER-1")) == []


def test_records_replace_per_station(db_url: str) -> None:
    def rec(sid: str, slot: int, start: int, mwh: int) -> RecordRow:
        return RecordRow(
            rid=f"interval/{sid}/{slot}/{start}",
            sid=sid,
            kind="interval",
            slot=slot,
            start_ms=start,
            end_ms=start + 900_000,
            mwh=mwh,
            held_mwh=0,
            flags="",
            from_boot=1,
            from_seq=0,
            to_boot=1,
            to_seq=5,
            e_from=0,
            e_to=mwh,
            version="1",
            extra="{}",
        )

    with Store(db_url) as st:
        st.replace_records(
            {"A-01": [rec("A-01", 1, 0, 5), rec("A-01", 0, 0, 7)], "B-01": [rec("B-01", 1, 0, 9)]}
        )
        st.replace_records({"A-01": [rec("A-01", 1, 0, 6)]})
        rows = st.record_rows()
        assert [(r.sid, r.slot, r.mwh) for r in rows] == [("A-01", 1, 6), ("B-01", 1, 9)]
        assert rows[0] == rec("A-01", 1, 0, 6)
        assert st.record_rows(kind="session") == []
        assert st.record_rows(start_ms=900_001) == []
        assert len(st.record_rows(start_ms=0, end_ms=1)) == 2
        # incremental: upsert by rid, delete gone rids
        st.apply_records([rec("A-01", 1, 0, 8), rec("A-01", 2, 0, 1)], ["interval/B-01/1/0"])
        rows = st.record_rows()
        assert [(r.sid, r.slot, r.mwh) for r in rows] == [("A-01", 1, 8), ("A-01", 2, 1)]
        st.replace_records({"C-01": [rec("C-01", 1, 0, 3)]}, everything=True)
        assert [r.sid for r in st.record_rows()] == ["C-01"]


def test_record_round_trip(db_url: str) -> None:
    from agent.ledger import Record, record_id
    from agent.store import record_to_row, row_to_record

    r = Record(
        kind="session",
        sid="A-01",
        slot=3,
        start_ms=5,
        end_ms=9,
        mwh=4,
        held_mwh=1,
        flags=("hist", "reboot"),
        from_key=(1, 2),
        to_key=(3, -1),
        e_from=10,
        e_to=14,
        version="m1",
        extra={"why": "full", "bat": None, "reg_mwh": 4},
    )
    with Store(db_url) as st:
        st.apply_records([record_to_row(r)], [])
        (row,) = st.record_rows()
        # the columns as stored: a session is named by its end event's key, flags are
        # "|"-joined, extra is JSON with sorted keys
        assert st.db.execute("SELECT * FROM records").fetchall() == [
            (
                "session/A-01/3/3:-1",
                "A-01",
                "session",
                3,
                5,
                9,
                4,
                1,
                "hist|reboot",
                1,
                2,
                3,
                -1,
                10,
                14,
                "m1",
                '{"bat":null,"reg_mwh":4,"why":"full"}',
            )
        ]
    assert row.rid == record_id(r) and row.flags == "hist|reboot" and row.to_seq == -1
    assert row_to_record(row) == r
    # an update by id: a session's start can move (its start event arrived late), an
    # interval's indexed columns stay and the rest follows
    import dataclasses

    moved = dataclasses.replace(r, start_ms=2, mwh=7)
    iv = dataclasses.replace(r, kind="interval", start_ms=0, end_ms=900_000, extra={})
    with Store(db_url) as st:
        st.apply_records([record_to_row(moved), record_to_row(iv)], [])
        st.apply_records([record_to_row(dataclasses.replace(iv, mwh=9, flags=("gap",)))], [])
        got = {x.kind: row_to_record(x) for x in st.record_rows()}
        assert got["session"] == moved
        assert got["interval"] == dataclasses.replace(iv, mwh=9, flags=("gap",))
        assert [x.rid for x in st.record_rows(start_ms=0, end_ms=1)] == [record_id(iv)]


def test_status_upsert(db_url: str) -> None:
    with Store(db_url) as st:
        st.put_status([(SID, 1, b'{"state":"online"}')])
        st.put_status([(SID, 2, b'{"state":"offline"}')])
        assert st.db.execute("SELECT recv_ms, record FROM status").fetchall() == [
            (2, b'{"state":"offline"}')
        ]


def test_two_connections_share_the_database(db_url: str) -> None:
    # the agent writes while a CLI (export, keys) reads and writes through its own connection
    a = Store(db_url)
    b = Store(db_url)
    a.write_batch([row(0)])
    assert b.raw_count() == 1
    b.write_batch([row(1)])
    assert a.raw_count() == 2
    a.close()
    b.close()


def test_a_new_sqlite_database_is_private_and_the_agent_refuses_one_that_is_not(
    tmp_path: pathlib.Path,
) -> None:
    # it holds every station's HMAC key (CONTRACT §5): 0600 from its first byte, and an
    # agent will not run on one that others can read
    import os

    from agent.config import AgentConfig, ConfigError, DbConfig
    from agent.service import Service

    path = tmp_path / "agent.db"
    with Store(str(path)) as st:
        st.write_batch([row(0)])  # the WAL and its index exist now too
    for f in [path, *tmp_path.glob("agent.db-*")]:
        assert os.stat(f).st_mode & 0o777 == 0o600, f
    Service(AgentConfig(db=DbConfig(url=str(path)))).store.close()  # private: it starts
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 0644\).*chmod 600"):
        Service(AgentConfig(db=DbConfig(url=str(path))))


def _wal_grows_to(tmp_path: pathlib.Path, restart_pages: int) -> int:
    """A writer commits small batches a couple of milliseconds apart (a fleet's live load)
    while another connection checkpoints every 20 ms: the WAL file's size at the end."""
    url = f"sqlite:///{tmp_path}/w{restart_pages}.db"
    writer = Store(url, synchronous="normal", autocheckpoint=100_000)
    ck = Store(url, synchronous="normal", create=False)
    done = threading.Event()

    def write() -> None:
        for b in range(300):
            writer.write_batch([row(b * 50 + i, os.urandom(1000)) for i in range(50)], [])
            time.sleep(0.002)
        done.set()

    t = threading.Thread(target=write)
    t.start()
    while not done.is_set():
        ck.checkpoint(restart_pages=restart_pages)
        time.sleep(0.02)
    t.join()
    size = os.path.getsize(f"{tmp_path}/w{restart_pages}.db-wal")
    writer.close()
    ck.close()
    return size


def test_the_wal_starts_over_under_a_steady_writer(tmp_path: pathlib.Path) -> None:
    # 15 MB written: PASSIVE checkpoints alone never copy every frame (the writer appends
    # during each pass), so SQLite never starts the WAL over and it holds everything; a
    # RESTART from 64 pages on keeps it to about a megabyte
    restarted = _wal_grows_to(tmp_path, restart_pages=64)
    passive_only = _wal_grows_to(tmp_path, restart_pages=0)
    assert restarted < 4_000_000, restarted
    assert passive_only > 3 * restarted, (passive_only, restarted)
