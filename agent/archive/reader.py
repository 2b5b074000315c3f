"""The archive and the live `raw` table read as one.

`ArchiveReader(store).iter_raw_keys(sid, start, boot=…, page=…)` has the signature of
`Store.iter_raw_keys` and yields the same rows that method yielded before anything was
sealed: a station's rows from key `start` on, in (boot, seq) order. It merges the live
rows (paged) with the segments that can hold keys >= start (found via archive_ranges),
opening a segment only when the merge reaches its first wanted key and streaming it, so
memory holds a page of live rows and one decompression buffer per segment whose keys
interleave (usually one). Each segment is hashed before its first row is used; a
mismatch raises ArchiveError naming the file.

A key present twice (an archived message replayed into `raw` before the ingest path asked
`archived_keys`) is yielded once: the copy sealed first stands, as in `raw` itself.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from agent.archive.index import (
    Segment,
    archive_dir,
    archived_count,
    archived_sids,
    archived_top,
    segment_by_id,
    segment_of,
    spans_from,
)
from agent.archive.segment import ArchiveError, file_sha256, read_segment
from agent.store import RawRow

log = logging.getLogger(__name__)

_LIVE = 1 << 62  # the live table's place among sources: after every segment (ids)


class ArchiveReader:
    """Reads a store's raw messages, archived and live, as one table. `directory`: the
    archive directory when it is not the default beside an SQLite database."""

    def __init__(self, store: Any, directory: str | Path | None = None) -> None:
        self.store = store
        self._directory = directory
        self._dir: Path | None = None
        self._hashed: dict[int, tuple[int, int]] = {}  # segment id -> (size, mtime_ns) checked
        self.segments_opened = 0

    @property
    def directory(self) -> Path:
        if self._dir is None:
            self._dir = archive_dir(self.store, self._directory)
        return self._dir

    # ---- one station ----------------------------------------------------------------------

    def iter_raw_keys(
        self,
        sid: str,
        start: tuple[int, int] = (-1, -1),
        *,
        boot: int | None = None,
        page: int = 1000,
    ) -> Iterator[RawRow]:
        """A station's raw rows with (boot, seq) >= start in key order (only `boot`'s, when
        given), archived and live merged: Store.iter_raw_keys over both."""
        if boot is not None and start < (boot, -1):
            start = (boot, -1)
        live = self.store.iter_live_keys(sid, start, boot=boot, page=page)
        spans = spans_from(self.store, sid, start, boot)
        if not spans:
            yield from live
            return
        heap: list[tuple[tuple[int, int], int, RawRow, Iterator[RawRow]]] = []

        def push(it: Iterator[RawRow], order: int) -> None:
            row = next(it, None)
            if row is not None:
                heapq.heappush(heap, ((row.boot, row.seq), order, row, it))

        push(live, _LIVE)
        i = 0
        last: tuple[tuple[int, int], int, bytes] | None = None
        while True:
            while i < len(spans) and (not heap or spans[i].first <= heap[0][0]):
                seg = spans[i].segment
                push(self._rows(seg, start, boot), seg.id)
                i += 1
            if not heap:
                return
            key, order, row, it = heapq.heappop(heap)
            if last is not None and key == last[0]:
                if row.record != last[2]:
                    log.warning(
                        "%s %s: a second copy with other bytes (source %s); the first stands",
                        sid,
                        key,
                        "raw" if order == _LIVE else f"segment {order}",
                    )
            else:
                last = (key, order, row.record)
                yield row
            push(it, order)

    def _rows(self, seg: Segment, start: tuple[int, int], boot: int | None) -> Iterator[RawRow]:
        """A segment's rows >= start (of `boot` only), hashed before the first."""
        path = self.directory / seg.file
        self.check(seg, path)
        self.segments_opened += 1
        for row in read_segment(path, n_rows=seg.n_rows, sid=seg.sid, check_hash=False):
            if (row.boot, row.seq) < start:
                continue
            if boot is not None and row.boot != boot:
                if row.boot > boot:
                    return
                continue
            yield row

    def archived_record(self, sid: str, boot: int, seq: int) -> bytes | None:
        """The stored bytes of an archived key (None when the archive does not hold it):
        what the ingest path compares a replayed archived key with (duplicate or
        conflict). Reads the one segment that holds it, up to the key."""
        seg_id = segment_of(self.store, sid, boot, seq)
        if seg_id is None:
            return None
        seg = segment_by_id(self.store, [seg_id])[seg_id]
        for row in self._rows(seg, (boot, seq), boot):
            if (row.boot, row.seq) == (boot, seq):
                return row.record
            break
        raise ArchiveError(
            f"segment {self.directory / seg.file}: lacks {sid} {boot}:{seq}, which its "
            "manifest says it holds"
        )

    def check(self, seg: Segment, path: Path | None = None) -> None:
        """Hash a segment's file against the manifest (once per reader, unless the file
        changed since); ArchiveError naming the file when it is missing or differs."""
        path = path or self.directory / seg.file
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ArchiveError(f"segment {path}: missing") from None
        stamp = (st.st_size, st.st_mtime_ns)
        if self._hashed.get(seg.id) == stamp:
            return
        got = file_sha256(path)
        if got != seg.sha256:
            raise ArchiveError(f"segment {path}: sha256 {got} is not the sealed {seg.sha256}")
        self._hashed[seg.id] = stamp

    # ---- the whole store ------------------------------------------------------------------

    def sids(self) -> list[str]:
        """Stations with raw messages, live or archived."""
        return sorted(set(self.store.raw_sids()) | set(archived_sids(self.store)))

    def iter_all(self, sid: str | None = None) -> Iterator[RawRow]:
        """Every raw message (of one station), station by station in key order."""
        for s in [sid] if sid is not None else self.sids():
            yield from self.iter_raw_keys(s)

    def count(self, sid: str | None = None) -> int:
        """Raw messages, live and archived (from the manifest: reads no segment)."""
        if sid is None:
            live = int(self.store.raw_count())
        else:
            row = self.store.db.execute("SELECT COUNT(*) FROM raw WHERE sid = ?", (sid,))
            live = int(row.fetchone()[0])
        return live + archived_count(self.store, sid)

    def raw_after(self, sid: str, key: tuple[int, int]) -> bool:
        """Store.raw_after over both: a raw row with (boot, seq) above key?"""
        if self.store.live_after(sid, key):
            return True
        top = archived_top(self.store, sid)
        if top is None or top <= key:
            return False
        return bool(spans_from(self.store, sid, (key[0], key[1] + 1)))

    def max_boot(self, sid: str) -> int | None:
        """Store.max_boot over both (a reflashed station's boot_base must pass both)."""
        got = self.store.live_max_boot(sid)
        live = None if got is None else int(got)
        top = archived_top(self.store, sid)
        if top is None:
            return live
        return top[0] if live is None else max(live, top[0])


@contextmanager
def snapshot(store: Any) -> Iterator[None]:
    """One read-only snapshot for a whole read (the manifest and the live rows agree even
    while a seal commits beside it): a read transaction, rolled back at the end. On
    SQLite it holds the WAL from being checkpointed past it while it lasts."""
    if getattr(store, "engine", "sqlite") == "sqlite":
        store.db.execute("BEGIN")
    else:
        store.db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        yield
    finally:
        # nothing was written: a rollback that fails (the connection went) loses nothing
        with suppress(Exception):
            store.db.execute("ROLLBACK")


def iter_raw_keys(
    store: Any,
    sid: str,
    start: tuple[int, int] = (-1, -1),
    *,
    boot: int | None = None,
    page: int = 1000,
    directory: str | Path | None = None,
) -> Iterator[RawRow]:
    """`ArchiveReader(store, directory).iter_raw_keys(…)` in one call."""
    return ArchiveReader(store, directory).iter_raw_keys(sid, start, boot=boot, page=page)
