"""Sealing: closed months of raw messages leave the live table for segment files.

For each station and each closed UTC month of `recv_ms` (a month is closed when it ended
more than `grace_days` ago), the station's rows of that month, in (boot, seq) order, are
streamed into a segment (agent/archive/segment.py): temp file, fsync, rename to its
hashed name, fsync of the directory. The file is then read back (hash, row count, and a
digest of every row as decoded against the digest of every row as written), and only
then, in one database transaction, the manifest rows are inserted and exactly the rows
the segment holds are deleted from `raw` (by its key ranges; the count must match, else
nothing is deleted). A crash at any point leaves either the live rows or a complete
segment and its manifest; a segment file without a manifest row (a crash between the
rename and the commit) is an orphan, found by the next seal: removed when every row it
holds is still stored (live or archived), else moved to `orphans/` and reported.

One seal at a time per archive directory (a lock file). Rows that reach a month after
it was sealed (a quarantined message resolved later keeps its first receive time) go
into the month's next part.
"""

from __future__ import annotations

import calendar
import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from agent.archive.index import archive_dir, archived_keys, segment_of, segments
from agent.archive.schema import ensure_schema
from agent.archive.segment import (
    DEFAULT_LEVEL,
    FORMAT,
    SUFFIX,
    TMP_SUFFIX,
    ArchiveError,
    Sealed,
    SegmentWriter,
    read_segment,
)
from agent.store import RawRow

log = logging.getLogger(__name__)

DAY_MS: Final = 86_400_000
DEFAULT_GRACE_DAYS: Final = 7
PAGE: Final = 2000
_MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


# ---- months ---------------------------------------------------------------------------------


def parse_month(text: str) -> tuple[int, int]:
    m = _MONTH.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a month (YYYY-MM)")
    return int(m.group(1)), int(m.group(2))


def month_start_ms(month: str) -> int:
    y, m = parse_month(month)
    return calendar.timegm((y, m, 1, 0, 0, 0)) * 1000


def next_month(month: str) -> str:
    y, m = parse_month(month)
    return f"{y + m // 12:04d}-{m % 12 + 1:02d}"


def month_of(ms: int) -> str:
    t = time.gmtime(ms // 1000)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}"


def first_open_month(now_ms: int, grace_days: int = DEFAULT_GRACE_DAYS) -> str:
    """The earliest month that is not closed at `now_ms`: every month before it ended more
    than `grace_days` ago."""
    grace = grace_days * DAY_MS
    month = month_of(now_ms - grace)  # ends after now - grace: open
    # the month before it ended at its start: closed only if that is more than grace ago
    return month if month_start_ms(month) + grace < now_ms else _prev_month(month)


def _prev_month(month: str) -> str:
    y, m = parse_month(month)
    return f"{y - (m == 1):04d}-{(m - 2) % 12 + 1:02d}"


# ---- the report -----------------------------------------------------------------------------


@dataclass
class SealReport:
    cutoff: str  # months before this one were due
    sealed: list[tuple[str, str, int, Sealed]] = field(default_factory=list)  # sid, month, part
    skipped_archived: int = 0  # live rows whose key the archive already holds: left in raw
    orphans_removed: list[str] = field(default_factory=list)
    orphans_kept: list[str] = field(default_factory=list)  # moved to orphans/: look at them

    @property
    def rows(self) -> int:
        return sum(s.n_rows for _, _, _, s in self.sealed)


# ---- sealing --------------------------------------------------------------------------------


@contextmanager
def _lock(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".seal.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArchiveError(f"another seal is running on {directory}") from None
        yield
    finally:
        os.close(fd)


def seal(
    store: Any,
    directory: str | Path | None = None,
    *,
    before: str | None = None,
    grace_days: int = DEFAULT_GRACE_DAYS,
    now_ms: int | None = None,
    level: int = DEFAULT_LEVEL,
    sids: list[str] | None = None,
    before_commit: Callable[[Sealed], None] | None = None,
) -> SealReport:
    """Seal every closed month (before `before`, when given) of every station (of `sids`).
    `before_commit(sealed)` runs between the segment's read-back and the transaction (a
    test's simulated crash)."""
    if grace_days < 0:
        raise ValueError("grace_days must not be negative")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = first_open_month(now, grace_days)
    if before is not None:
        parse_month(before)
        cutoff = min(cutoff, before)
    d = archive_dir(store, directory)
    ensure_schema(store)
    report = SealReport(cutoff)
    with _lock(d):
        _orphans(store, d, report)
        hi = month_start_ms(cutoff)
        q = "SELECT sid, MIN(recv_ms) FROM raw WHERE recv_ms < ? GROUP BY sid ORDER BY sid"
        due = [(s, int(t)) for s, t in store.db.execute(q, (hi,)).fetchall()]
        for sid, first in due:
            if sids is not None and sid not in sids:
                continue
            month: str | None = month_of(first)
            while month is not None and month < cutoff:
                got = _seal_month(store, d, sid, month, level, report, before_commit)
                if got is not None:
                    report.sealed.append(got)
                lo = month_start_ms(next_month(month))
                row = store.db.execute(
                    "SELECT MIN(recv_ms) FROM raw WHERE sid = ? AND recv_ms >= ? AND recv_ms < ?",
                    (sid, lo, hi),
                ).fetchone()
                month = None if row is None or row[0] is None else month_of(int(row[0]))
    return report


def _month_rows(store: Any, sid: str, month: str) -> Iterator[list[RawRow]]:
    """A station's live rows received in `month`, in key order, in pages."""
    lo, hi = month_start_ms(month), month_start_ms(next_month(month))
    b, q = -1, -1
    while True:
        got = store.db.execute(
            "SELECT boot, seq, kind, topic, recv_ms, kid, record FROM raw "
            "WHERE sid = ? AND recv_ms >= ? AND recv_ms < ? "
            "AND (boot > ? OR (boot = ? AND seq > ?)) ORDER BY boot, seq LIMIT ?",
            (sid, lo, hi, b, b, q, PAGE),
        ).fetchall()
        if got:
            yield [RawRow(sid, r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6])) for r in got]
        if len(got) < PAGE:
            return
        b, q = got[-1][0], got[-1][1]


def _row_digest(h: Any, row: RawRow) -> None:
    b = msgspec.msgpack.encode(tuple(row))
    h.update(len(b).to_bytes(4, "big"))
    h.update(b)


def _seal_month(
    store: Any,
    d: Path,
    sid: str,
    month: str,
    level: int,
    report: SealReport,
    before_commit: Callable[[Sealed], None] | None,
) -> tuple[str, str, int, Sealed] | None:
    row = store.db.execute(
        "SELECT COALESCE(MAX(part), 0) FROM archive_segments WHERE sid = ? AND month = ?",
        (sid, month),
    ).fetchone()
    part = int(row[0]) + 1
    writer = SegmentWriter(d, sid, month, part, level)
    digest = hashlib.sha256()
    try:
        for page in _month_rows(store, sid, month):
            dup = archived_keys(store, page, checked=True)
            if dup:
                report.skipped_archived += len(dup)
                log.warning(
                    "%s %s: %d live rows whose key is archived already: left in raw",
                    sid,
                    month,
                    len(dup),
                )
            for i, r in enumerate(page):
                if i not in dup:
                    writer.add(r)
                    _row_digest(digest, r)
        if writer.n_rows == 0:
            writer.abort()
            return None
        sealed = writer.finish()
    except BaseException:
        writer.abort()
        raise
    # read it back from the disk: hash, count, every row
    again = hashlib.sha256()
    for r in read_segment(sealed.path, sha256=sealed.sha256, n_rows=sealed.n_rows, sid=sid):
        _row_digest(again, r)
    if again.digest() != digest.digest():
        raise ArchiveError(f"segment {sealed.path}: read back other rows than were written")
    if before_commit is not None:
        before_commit(sealed)
    with store.transaction() as db:
        seg_id = int(
            db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM archive_segments").fetchone()[0]
        )
        first, last = sealed.ranges[0], sealed.ranges[-1]
        db.execute(
            "INSERT INTO archive_segments (id, sid, month, part, file, sha256, format, n_rows, "
            "n_bytes, raw_bytes, first_boot, first_seq, last_boot, last_seq, sealed_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                seg_id,
                sid,
                month,
                part,
                sealed.rel,
                sealed.sha256,
                FORMAT,
                sealed.n_rows,
                sealed.n_bytes,
                sealed.raw_bytes,
                first.boot,
                first.seq_lo,
                last.boot,
                last.seq_hi,
                int(time.time() * 1000),
            ),
        )
        db.executemany(
            "INSERT INTO archive_ranges (sid, boot, seq_lo, seq_hi, segment_id) "
            "VALUES (?, ?, ?, ?, ?)",
            [(sid, rg.boot, rg.seq_lo, rg.seq_hi, seg_id) for rg in sealed.ranges],
        )
        top = db.execute(
            "SELECT top_boot, top_seq FROM archive_stations WHERE sid = ?", (sid,)
        ).fetchone()
        new_top = max((last.boot, last.seq_hi), (-1, -1) if top is None else (top[0], top[1]))
        db.execute(
            "INSERT INTO archive_stations (sid, top_boot, top_seq) VALUES (?, ?, ?) "
            "ON CONFLICT (sid) DO UPDATE SET top_boot = excluded.top_boot, "
            "top_seq = excluded.top_seq",
            (sid, new_top[0], new_top[1]),
        )
        gone = 0
        for rg in sealed.ranges:
            gone += db.execute(
                "DELETE FROM raw WHERE sid = ? AND boot = ? AND seq >= ? AND seq <= ?",
                (sid, rg.boot, rg.seq_lo, rg.seq_hi),
            ).rowcount
        if gone != sealed.n_rows:  # rolls back: the rows stay, the file is an orphan
            raise ArchiveError(
                f"segment {sealed.path}: {gone} live rows to delete, not {sealed.n_rows}"
            )
    log.info(
        "sealed %s %s part %d: %d rows, %d bytes", sid, month, part, sealed.n_rows, sealed.n_bytes
    )
    return sid, month, part, sealed


def _orphans(store: Any, d: Path, report: SealReport) -> None:
    """Temp files of an interrupted seal are removed; a segment file the manifest does not
    know is removed when all its rows are still stored, else moved to orphans/."""
    known = {s.file for s in segments(store)}
    for tmp in d.glob(f"*/.*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        report.orphans_removed.append(tmp.relative_to(d).as_posix())
    for path in sorted(d.glob(f"*/*{SUFFIX}")):
        rel = path.relative_to(d).as_posix()
        if rel in known:
            continue
        try:
            redundant = all(_stored(store, r) for r in read_segment(path))
        except ArchiveError as e:
            log.warning("orphan %s: %s", rel, e)
            redundant = False
        if redundant:
            path.unlink()
            report.orphans_removed.append(rel)
        else:
            aside = d / "orphans" / path.name
            aside.parent.mkdir(exist_ok=True)
            os.replace(path, aside)
            report.orphans_kept.append(f"orphans/{path.name}")
            log.warning("orphan segment %s holds rows stored nowhere else: kept as %s", rel, aside)


def _stored(store: Any, r: RawRow) -> bool:
    row = store.db.execute(
        "SELECT record FROM raw WHERE sid = ? AND boot = ? AND seq = ?", (r.sid, r.boot, r.seq)
    ).fetchone()
    if row is not None:
        return bytes(row[0]) == r.record
    return segment_of(store, r.sid, r.boot, r.seq) is not None
