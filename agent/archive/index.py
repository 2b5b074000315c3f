"""Questions to the manifest: where the archive lives, which segments exist, and which keys
it holds (the duplicate rule for a late copy of an archived message)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

from agent.archive.schema import has_archive
from agent.store import RawRow, sqlite_path
from agent.store.sql import is_postgres

_IN_CHUNK: Final = 500  # sids per IN (…) list: under every engine's parameter limit


class Segment(NamedTuple):
    """A row of archive_segments."""

    id: int
    sid: str
    month: str
    part: int
    file: str
    sha256: str
    format: str
    n_rows: int
    n_bytes: int
    raw_bytes: int
    first_boot: int
    first_seq: int
    last_boot: int
    last_seq: int
    sealed_ms: int


SEGMENT_COLUMNS: Final = ", ".join(Segment._fields)


def archive_dir(db: Any, directory: str | Path | None = None) -> Path:
    """Where a database's segments live: `directory` when given; else, for SQLite,
    `<database path>.archive/` beside it. `db` is a Store or a database URL. Other
    engines (PostgreSQL) have no file of their own: they need `directory`."""
    if directory is not None:
        return Path(directory)
    if isinstance(db, str):
        if is_postgres(db):
            raise ValueError("a PostgreSQL database needs the archive directory given")
        return Path(sqlite_path(db) + ".archive")
    if getattr(db, "path", None) is None:
        raise ValueError("a PostgreSQL database needs the archive directory given")
    return Path(str(db.path) + ".archive")


def has_segments(store: Any) -> bool:
    """Has anything been sealed? (Until then no archive directory is needed.)"""
    if not has_archive(store):
        return False
    return store.db.execute("SELECT 1 FROM archive_segments LIMIT 1").fetchone() is not None


def segments(store: Any, sid: str | None = None) -> list[Segment]:
    """The manifest's segments (of one station), by station, month, part."""
    if not has_archive(store):
        return []
    q = f"SELECT {SEGMENT_COLUMNS} FROM archive_segments"
    args: tuple[Any, ...] = ()
    if sid is not None:
        q += " WHERE sid = ?"
        args = (sid,)
    rows = store.db.execute(q + " ORDER BY sid, month, part", args).fetchall()
    return [Segment._make(r) for r in rows]


def segment_by_id(store: Any, ids: Iterable[int]) -> dict[int, Segment]:
    out: dict[int, Segment] = {}
    ids = sorted(set(ids))
    for i in range(0, len(ids), _IN_CHUNK):
        part = ids[i : i + _IN_CHUNK]
        marks = ", ".join("?" * len(part))
        for r in store.db.execute(
            f"SELECT {SEGMENT_COLUMNS} FROM archive_segments WHERE id IN ({marks})", part
        ).fetchall():
            out[int(r[0])] = Segment._make(r)
    return out


def archived_sids(store: Any) -> list[str]:
    if not has_archive(store):
        return []
    return [r[0] for r in store.db.execute("SELECT sid FROM archive_stations ORDER BY sid")]


def archived_count(store: Any, sid: str | None = None) -> int:
    if not has_archive(store):
        return 0
    q = "SELECT COALESCE(SUM(n_rows), 0) FROM archive_segments"
    args: tuple[Any, ...] = ()
    if sid is not None:
        q += " WHERE sid = ?"
        args = (sid,)
    return int(store.db.execute(q, args).fetchone()[0])


def archived_top(store: Any, sid: str) -> tuple[int, int] | None:
    """A station's highest archived key (None: nothing archived). With max_boot of the
    live table, what the flashing tool's boot_base must stay above."""
    if not has_archive(store):
        return None
    row = store.db.execute(
        "SELECT top_boot, top_seq FROM archive_stations WHERE sid = ?", (sid,)
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def archived_keys(
    store: Any, rows: Sequence[RawRow], *, checked: bool = False
) -> dict[int, tuple[int, ...]]:
    """Which of a batch's rows have a key the archive holds: {row index: (segment id,)}.

    A key that was sealed has left `raw`, so its UNIQUE (sid, boot, seq) no longer catches
    a late copy: the ingest path asks this, in its transaction, and treats such a row as
    a duplicate (or, with other bytes, a conflict: `archived_record` reads the stored
    bytes). Cheap in the usual case: one query per batch (each station's highest archived
    key, `archive_stations`); only a row at or below it costs one indexed lookup in
    `archive_ranges`. `checked`: the caller knows the archive tables exist."""
    if not rows or (not checked and not has_archive(store)):
        return {}
    db = store.db
    sids = sorted({r.sid for r in rows})
    tops: dict[str, tuple[int, int]] = {}
    for i in range(0, len(sids), _IN_CHUNK):
        part = sids[i : i + _IN_CHUNK]
        marks = ", ".join("?" * len(part))
        for sid, b, q in db.execute(
            f"SELECT sid, top_boot, top_seq FROM archive_stations WHERE sid IN ({marks})", part
        ).fetchall():
            tops[sid] = (int(b), int(q))
    out: dict[int, tuple[int, ...]] = {}
    if not tops:
        return out
    for i, r in enumerate(rows):
        top = tops.get(r.sid)
        if top is None or (r.boot, r.seq) > top:
            continue
        seg = segment_of(store, r.sid, r.boot, r.seq)
        if seg is not None:
            out[i] = (seg,)
    return out


def segment_of(store: Any, sid: str, boot: int, seq: int) -> int | None:
    """The id of the segment holding key (sid, boot, seq), None when none does."""
    row = store.db.execute(
        "SELECT seq_hi, segment_id FROM archive_ranges WHERE sid = ? AND boot = ? "
        "AND seq_lo <= ? ORDER BY seq_lo DESC LIMIT 1",
        (sid, boot, seq),
    ).fetchone()
    if row is None or int(row[0]) < seq:
        return None
    return int(row[1])


class SegmentSpan(NamedTuple):
    """A segment a reader must open, and the lowest key it wants from it."""

    first: tuple[int, int]
    segment: Segment


def spans_from(
    store: Any, sid: str, start: tuple[int, int], boot: int | None = None
) -> list[SegmentSpan]:
    """The segments that can hold a key of `sid` >= start (of `boot` only, when given),
    each with the lowest such key, in that key's order: the order a merging reader opens
    them in."""
    if not has_archive(store):
        return []
    b, q = start
    where = "sid = ? AND (boot > ? OR (boot = ? AND seq_hi >= ?))"
    args: list[Any] = [sid, b, b, q]
    if boot is not None:
        where += " AND boot = ?"
        args.append(boot)
    firsts: dict[int, tuple[int, int]] = {}
    for rb, lo, seg in store.db.execute(
        f"SELECT boot, seq_lo, segment_id FROM archive_ranges WHERE {where} ORDER BY boot, seq_lo",
        args,
    ):
        key = max((int(rb), int(lo)), start)
        if int(seg) not in firsts:
            firsts[int(seg)] = key
    by_id = segment_by_id(store, firsts)
    return sorted(SegmentSpan(k, by_id[i]) for i, k in firsts.items())
