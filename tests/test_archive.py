"""The raw archive (agent/archive/, `stationctl archive`): closed months sealed per station
into segment files, rows out of `raw` only after their segment is safe, archive and live
table read as one, `verify` through both. Real SQLite files, no mocks."""

from __future__ import annotations

import json
import pathlib
import random
import sqlite3
import subprocess

import pytest

from agent.archive import (
    ArchiveError,
    ArchiveReader,
    archived_keys,
    first_open_month,
    read_segment,
    seal,
    segments,
)
from agent.archive.seal import month_start_ms
from agent.store import RawRow, Store
from tests.agent_helpers import STATIONCTL, fill_store, fleet_stream, stored_rows
from tests.helpers import ROOT

DAY = 86_400_000
BASE = month_start_ms("2025-10") + 9 * DAY  # 2025-10-10: the stream spans Oct .. Dec
NOW = month_start_ms("2025-12") + 20 * DAY  # Oct and Nov closed (7-day grace), Dec open


def stationctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*STATIONCTL, *args], cwd=ROOT, capture_output=True, timeout=120, check=False
    )


def build(path: pathlib.Path | str) -> str:
    """Two stations' signed messages received over ~2 months (one every 6 h), a few of
    them late (received 40 days after their neighbours: gaps in the early months' key
    runs, keys of later months interleaved with them), their records, their keys."""
    url = path if isinstance(path, str) else f"sqlite:///{path}"
    stream = fleet_stream(2, 80, sid_base="KH-ARC", step_ms=60_000)
    late = set(random.Random(7).sample(range(len(stream)), 12))
    rows, msgs = stored_rows(
        stream, lambda i: BASE + i * 6 * 3_600_000 + (40 * DAY if i in late else 0)
    )
    return fill_store(url, rows, msgs)


def everything(st: Store) -> dict[str, list[RawRow]]:
    """The live table's rows (the store's own iter_raw_keys reads the archive too)."""
    return {sid: list(st.iter_live_keys(sid)) for sid in st.raw_sids()}


def months_of(st: Store) -> set[str]:
    from agent.archive import month_of

    return {month_of(r[0]) for r in st.db.execute("SELECT recv_ms FROM raw")}


def flip_byte(path: pathlib.Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_closed_month_is_sealed_and_leaves_raw(tmp_path: pathlib.Path) -> None:
    url = build(tmp_path / "a.db")
    with Store(url) as st:
        n0 = st.raw_count()
        assert months_of(st) == {"2025-10", "2025-11", "2025-12"}
        rep = seal(st, now_ms=NOW)
        assert rep.cutoff == "2025-12"
        assert {(sid, m) for sid, m, _, _ in rep.sealed} == {
            (s, m) for s in ("KH-ARC-0000", "KH-ARC-0001") for m in ("2025-10", "2025-11")
        }
        # the rows really left the live table: only the open month is there
        assert months_of(st) == {"2025-12"}
        assert st.raw_count() == n0 - rep.rows > 0
        segs = segments(st)
        assert len(segs) == 4 and sum(s.n_rows for s in segs) == rep.rows
        d = tmp_path / "a.db.archive"
        for s in segs:
            f = d / s.file
            assert f.is_file() and f.stat().st_size == s.n_bytes
            assert s.sha256 in f.name and s.sid in f.name and s.month in f.name
            assert s.n_bytes < s.raw_bytes
        # ranges split at the gaps the late messages left
        n_ranges = st.db.execute("SELECT COUNT(*) FROM archive_ranges").fetchone()[0]
        assert n_ranges > len(segs)
        # sealing again finds nothing more to do
        assert seal(st, now_ms=NOW).sealed == []


def test_merged_reading_equals_the_rows_before_sealing(tmp_path: pathlib.Path) -> None:
    url = build(tmp_path / "b.db")
    with Store(url) as st:
        before = everything(st)
        boots = {sid: sorted({r.boot for r in rows}) for sid, rows in before.items()}
        seal(st, now_ms=NOW)
        reader = ArchiveReader(st)
        assert reader.sids() == sorted(before)
        assert reader.count() == sum(map(len, before.values()))
        for sid, rows in before.items():
            assert list(reader.iter_raw_keys(sid)) == rows  # same bytes, same order
            assert list(reader.iter_raw_keys(sid, page=7)) == rows
            keys = [(r.boot, r.seq) for r in rows]
            for start in [keys[0], keys[13], keys[len(keys) // 2], keys[-1], (keys[-1][0], 10**6)]:
                want = [r for r in rows if (r.boot, r.seq) >= start]
                assert list(reader.iter_raw_keys(sid, start)) == want, start
            for b in boots[sid]:
                assert list(reader.iter_raw_keys(sid, boot=b)) == [r for r in rows if r.boot == b]
                mid = keys[len(keys) // 3]
                assert list(reader.iter_raw_keys(sid, mid, boot=b)) == [
                    r for r in rows if r.boot == b and (r.boot, r.seq) >= mid
                ]
            assert reader.max_boot(sid) == max(boots[sid])
            assert reader.raw_after(sid, keys[-2]) and not reader.raw_after(sid, keys[-1])
        assert list(reader.iter_all()) == [r for sid in sorted(before) for r in before[sid]]
        # everything sealed (a later now): the live table is empty, the reading the same
        seal(st, now_ms=NOW + 365 * DAY)
        assert st.raw_count() == 0
        for sid, rows in before.items():
            assert list(reader.iter_raw_keys(sid)) == rows
            assert reader.max_boot(sid) == max(boots[sid])


def test_both_engines(db_url: str, tmp_path: pathlib.Path) -> None:
    """The same SQL on SQLite and PostgreSQL (which needs the directory given)."""
    url = build(db_url)
    d = tmp_path / "vault"
    with Store(url) as st:
        before = everything(st)
        rep = seal(st, d, now_ms=NOW)
        assert len(rep.sealed) == 4 and months_of(st) == {"2025-12"}
        reader = ArchiveReader(st, d)
        for sid, rows in before.items():
            assert list(reader.iter_raw_keys(sid)) == rows
            b = rows[0].boot
            assert list(reader.iter_raw_keys(sid, boot=b)) == [r for r in rows if r.boot == b]
        archived = [
            r for sid in before for r in before[sid] if r.recv_ms < month_start_ms("2025-12")
        ]
        assert sorted(archived_keys(st, archived)) == list(range(len(archived)))
    if url.startswith("postgresql"):
        with Store(url) as st, pytest.raises(ValueError, match="archive directory"):
            seal(st, now_ms=NOW)


def test_a_crash_before_the_transaction_keeps_the_live_rows(tmp_path: pathlib.Path) -> None:
    url = build(tmp_path / "c.db")

    class Crash(Exception):
        pass

    def crash(sealed: object) -> None:
        raise Crash

    with Store(url) as st:
        before = everything(st)
        n0 = st.raw_count()
        with pytest.raises(Crash):
            seal(st, now_ms=NOW, before_commit=crash)
        # the segment was written and read back, but the rows never left raw
        assert st.raw_count() == n0 and everything(st) == before
        assert segments(st) == []
        d = tmp_path / "c.db.archive"
        orphans = sorted(d.glob("*/*.rawz"))
        assert len(orphans) == 1
        assert list(ArchiveReader(st).iter_raw_keys("KH-ARC-0000")) == before["KH-ARC-0000"]
        # the next seal removes the orphan (all its rows are still stored) and seals
        rep = seal(st, now_ms=NOW)
        assert rep.orphans_removed and not rep.orphans_kept
        assert len(rep.sealed) == 4
        assert sorted(p.relative_to(d).as_posix() for p in d.glob("*/*.rawz")) == sorted(
            s.file for s in segments(st)
        )
        assert everything(st) != before
        reader = ArchiveReader(st)
        for sid, rows in before.items():
            assert list(reader.iter_raw_keys(sid)) == rows
            assert list(st.iter_raw_keys(sid)) == rows  # what metering reads: both as one


def test_open_months_are_not_sealed(tmp_path: pathlib.Path) -> None:
    dec = month_start_ms("2025-12")
    assert first_open_month(dec + 7 * DAY + 1) == "2025-12"  # Nov ended 7 days + 1 ms ago
    assert first_open_month(dec + 7 * DAY) == "2025-11"  # exactly 7 days: not more
    assert first_open_month(dec + 3 * DAY) == "2025-11"
    assert first_open_month(dec + 3 * DAY, grace_days=0) == "2025-12"
    assert first_open_month(month_start_ms("2026-01") + 8 * DAY) == "2026-01"
    url = build(tmp_path / "d.db")
    with Store(url) as st:
        rep = seal(st, now_ms=dec + 3 * DAY)  # November ended 3 days ago: still open
        assert {m for _, m, _, _ in rep.sealed} == {"2025-10"}
        assert months_of(st) == {"2025-11", "2025-12"}
        rep = seal(st, now_ms=NOW, before="2025-11")  # --before holds November back
        assert rep.sealed == [] and months_of(st) == {"2025-11", "2025-12"}


def test_a_row_reaching_a_sealed_month_goes_into_its_next_part(tmp_path: pathlib.Path) -> None:
    url = build(tmp_path / "e.db")
    with Store(url) as st:
        seal(st, now_ms=NOW)
        # a message quarantined in October and resolved now keeps its October recv_ms
        s = everything(st)["KH-ARC-0000"][-1]
        late = s._replace(seq=s.seq + 1000, recv_ms=BASE + DAY)
        st.write_batch([late])
        rep = seal(st, now_ms=NOW)
        assert [(m, p) for _, m, p, _ in rep.sealed] == [("2025-10", 2)]
        assert list(ArchiveReader(st).iter_raw_keys("KH-ARC-0000"))[-1] == late


def test_a_replayed_archived_key_is_detected(tmp_path: pathlib.Path) -> None:
    url = build(tmp_path / "f.db")
    with Store(url) as st:
        assert archived_keys(st, everything(st)["KH-ARC-0000"]) == {}  # nothing sealed yet
        seal(st, now_ms=NOW)
        live = everything(st)
        reader = ArchiveReader(st)
        rows = list(reader.iter_all())
        got = archived_keys(st, rows)
        live_keys = {(r.sid, r.boot, r.seq) for rs in live.values() for r in rs}
        for i, r in enumerate(rows):
            assert (i in got) == ((r.sid, r.boot, r.seq) not in live_keys), r[:3]
        segs = {s.id: s for s in segments(st)}
        assert all(len(v) == 1 and v[0] in segs for v in got.values())
        # a replay of an archived message: the raw table's UNIQUE no longer sees it
        archived = [r for i, r in enumerate(rows) if i in got]
        replay = archived[5]
        assert archived_keys(st, [replay]) == {0: got[rows.index(replay)]}
        # what the ingest path compares its bytes with (duplicate, or conflict)
        assert reader.archived_record(replay.sid, replay.boot, replay.seq) == replay.record
        assert reader.archived_record(replay.sid, replay.boot, 10**6) is None
        # a new key, a key in a gap of an archived run (a late message still to come) and
        # a key of another station: not archived
        gap_row = None
        by_sid = [r for r in rows if r.sid == replay.sid and r.boot == replay.boot]
        seqs = {r.seq for r in by_sid}
        for q in range(min(seqs), max(seqs)):
            if q not in seqs:
                gap_row = replay._replace(seq=q)
                break
        fresh = replay._replace(seq=10**6)
        other = replay._replace(sid="KH-ARC-0009")
        probe = [fresh, other] + ([gap_row] if gap_row is not None else [])
        assert archived_keys(st, probe) == {}
        # until the ingest path asks archived_keys, a replay lands in raw again: the
        # merged reader still yields the key once (the sealed copy stands)
        before = list(reader.iter_raw_keys(replay.sid))
        st.write_batch([replay])
        assert list(reader.iter_raw_keys(replay.sid)) == before


def test_a_flipped_byte_in_a_segment_is_named(tmp_path: pathlib.Path) -> None:
    url = build(tmp_path / "g.db")
    with Store(url) as st:
        seal(st, now_ms=NOW)
        seg = segments(st)[0]
        path = tmp_path / "g.db.archive" / seg.file
        flip_byte(path)
        with pytest.raises(ArchiveError, match=seg.sha256):
            list(ArchiveReader(st).iter_raw_keys(seg.sid))
        with pytest.raises(ArchiveError, match=str(path)):
            list(read_segment(path, sha256=seg.sha256))


def test_verify_reads_the_archive_and_names_a_bad_segment(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "h.db"
    url = build(path)
    r = stationctl("verify", "--db", url, "--json")
    assert r.returncode == 0, r.stdout
    n_raw = json.loads(r.stdout)["raw"]
    r = stationctl("archive", "seal", "--db", url)  # today: every month of 2025 is closed
    assert r.returncode == 0, r.stderr
    assert b"sealed KH-ARC-0000 2025-10 part 1" in r.stdout
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM raw").fetchone()[0] == 0
    r = stationctl("verify", "--db", url, "--json")
    assert r.returncode == 0, r.stdout
    s = json.loads(r.stdout)
    assert s["ok"] is True and s["raw"] == s["verified"] == n_raw and s["archive_errors"] == 0
    assert s["records_stored"] == s["records_recomputed"] > 10
    # one flipped byte in one segment: verify fails and names it
    with Store(url, readonly=True) as st:
        seg = segments(st)[1]
    flip_byte(path.with_name("h.db.archive") / seg.file)
    r = stationctl("verify", "--db", url)
    assert r.returncode == 1
    assert seg.file.encode() in r.stdout and b"FAILED" in r.stdout
    r = stationctl("verify", "--db", url, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["archive_errors"] == 1


def test_an_archive_elsewhere(tmp_path: pathlib.Path) -> None:
    url = build(tmp_path / "i.db")
    elsewhere = tmp_path / "vault"
    r = stationctl("archive", "seal", "--db", url, "--dir", str(elsewhere), "--before", "2025-11")
    assert r.returncode == 0, r.stderr
    assert list(elsewhere.glob("*/*.2025-10.*.rawz")) and not (tmp_path / "i.db.archive").exists()
    r = stationctl("verify", "--db", url, "--archive", str(elsewhere), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    # without it verify looks beside the database, finds no segment and says which
    r = stationctl("verify", "--db", url)
    assert r.returncode == 1 and b"missing" in r.stdout
    r = stationctl("archive", "list", "--db", url, "--dir", str(elsewhere), "--json")
    listed = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0 and {x["month"] for x in listed} == {"2025-10"}
    assert all(pathlib.Path(x["path"]).is_file() for x in listed)
    r = stationctl("archive", "list", "--db", url, "--sid", "KH-ARC-0001")
    assert r.returncode == 0 and r.stdout.count(b"KH-ARC-0001 2025-10") == 1
    assert b"KH-ARC-0000 " not in r.stdout


def test_archive_check(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "j.db"
    url = build(path)
    r = stationctl("archive", "check", "--db", url)  # nothing sealed: nothing to check
    assert r.returncode == 0 and b"0 segments checked" in r.stdout
    assert stationctl("archive", "seal", "--db", url).returncode == 0
    r = stationctl("archive", "check", "--db", url)
    assert r.returncode == 0 and b"6 segments checked, 0 bad" in r.stdout, r.stdout
    d = path.with_name("j.db.archive")
    with Store(url, readonly=True) as st:
        segs = segments(st)
    flip_byte(d / segs[0].file, at=-10)
    (d / segs[2].file).unlink()
    r = stationctl("archive", "check", "--db", url)
    assert r.returncode == 1
    bad = [line for line in r.stdout.splitlines() if line.startswith(b"BAD")]
    assert len(bad) == 2
    assert segs[0].file.encode() in bad[0] and segs[2].file.encode() in bad[1]
    assert b"missing" in bad[1]


def test_archive_usage_errors(tmp_path: pathlib.Path) -> None:
    absent = tmp_path / "absent.db"
    for args in (
        ("archive", "seal", "--db", str(absent)),
        ("archive", "list", "--db", f"sqlite:///{absent}"),
        ("archive", "check", "--db", str(absent)),
    ):
        r = stationctl(*args)
        assert r.returncode == 2 and r.stderr.count(b"\n") == 1, (args, r.stderr)
        assert str(absent).encode() in r.stderr
    assert not absent.exists() and not absent.with_name("absent.db.archive").exists()
    url = build(tmp_path / "k.db")
    for args, what in (
        (("--before", "2025-13"), b"--before"),
        (("--before", "last"), b"--before"),
        (("--grace-days", "-1"), b"--grace-days"),
        (("--level", "0"), b"--level"),
    ):
        r = stationctl("archive", "seal", "--db", url, *args)
        assert r.returncode == 2 and r.stderr.count(b"\n") == 1 and what in r.stderr, args
    r = stationctl("archive", "seal", "--db", url, "--grace-days", "x")  # argparse's own
    assert r.returncode == 2
    r = stationctl("archive")
    assert r.returncode == 2
    r = stationctl("archive", "list")
    assert r.returncode == 2 and b"--db" in r.stderr
    with Store(url, readonly=True) as st:
        assert segments(st) == []  # nothing was sealed by a refused command


# ---- the agent's store reads and writes through the archive -------------------------------------


def _archive_kw(db_url: str, tmp_path: pathlib.Path) -> str | None:
    return None if db_url.startswith("sqlite") else str(tmp_path / "segments")


def test_a_late_copy_of_an_archived_message_is_a_duplicate_or_a_conflict(
    db_url: str, tmp_path: pathlib.Path
) -> None:
    url = build(db_url)
    where = _archive_kw(db_url, tmp_path)
    with Store(url) as st:
        st.archive_dir = where
        before = {sid: list(st.iter_raw_keys(sid)) for sid in st.raw_sids()}
        seal(st, where, now_ms=NOW)
        old = before["KH-ARC-0000"][0]  # received in October: sealed
        assert not st.db.execute(
            "SELECT 1 FROM raw WHERE sid = ? AND boot = ? AND seq = ?", (old.sid, old.boot, old.seq)
        ).fetchall()  # it left the live table
        n = st.raw_count()
        res = st.write_batch([old, old._replace(record=old.record + b" ")])
        assert (res.new, res.duplicates, res.conflicts) == ([], 1, 1)
        assert st.raw_count() == n  # nothing stored anew: no watt-hour counted twice
        assert [q.reason for q in st.quarantine_rows()] == ["conflict"]


def test_metering_from_raw_after_a_seal_reads_the_archive(
    db_url: str, tmp_path: pathlib.Path
) -> None:
    from agent.ledger import MeterParams
    from agent.ledger.agent_meter import StoreMeter

    url = build(db_url)
    where = _archive_kw(db_url, tmp_path)
    with Store(url) as st:
        st.archive_dir = where
        records = st.record_rows()
        top = {sid: st.max_boot(sid) for sid in st.raw_sids()}
        assert seal(st, where, now_ms=NOW).sealed
        meter = StoreMeter(MeterParams(), st)
        with st.transaction():
            for sid in sorted(top):
                meter.rebuild(sid)  # from raw alone: archived and live
        assert st.record_rows() == records
        assert {sid: st.max_boot(sid) for sid in top} == top  # boot_base stays above
