"""Read-only access to the agent's store for the dashboard (agent/store/ schema).

One read-only connection, SQLite (WAL lets it read beside the agent's writer) or
PostgreSQL. Every query is a short autocommit read, so the dashboard never holds a snapshot
that would keep the writer's WAL from being checkpointed. What it reads, and why it stays
cheap:

- raw rows newer than the last id seen (the primary key), once a second;
- at start: each station's newest telemetry by the (sid, boot, seq) index, and the rows of
  the last `history_s` (found by bisecting ids on recv_ms; no index on time needed);
- status (one row per station), quarantine and alarms rows newer than the last id;
- records of the last days and hours, through the (kind, start_ms) index, every few seconds.

Tailing by id is exact on SQLite: one writer at a time, so ids become visible in order.
On PostgreSQL a transaction takes its ids when it inserts and shows them when it commits,
so a row can appear below an id already read (two writers, or a slow commit). There the
reader re-reads the ids above a "settled" mark and hands over the rows it had not seen
(see `_Tail`).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import deque
from typing import Any, Final, NamedTuple

import psycopg

from agent.ledger import Record
from agent.store import RECORD_COLUMNS, Store, row_to_record
from agent.store.sql import describe

log = logging.getLogger(__name__)

_RAW_COLS: Final = "id, sid, boot, seq, kind, recv_ms, record, topic, kid"

# what a database that is not (yet) readable raises, on either engine
DB_ERRORS: Final = (sqlite3.Error, psycopg.Error)
# a table or column a database of an older schema lacks
_MISSING: Final = (
    sqlite3.OperationalError,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedColumn,
)

SETTLE_GRACE_S: Final = 2.0  # an insert takes its id a moment before its transaction id
SETTLE_MAX_S: Final = 60.0  # a transaction open for longer: its rows are not shown live


def one_line(e: BaseException) -> str:
    """An exception's message on one line (libpq's run over several)."""
    return " ".join(str(e).split()) or type(e).__name__


class Raw(NamedTuple):
    id: int
    sid: str
    boot: int
    seq: int
    kind: str
    recv_ms: int
    record: bytes
    topic: str = ""  # an OCPP row's `ocpp/<proto>/<sid>` (CONTRACT §11)
    kid: int = 0  # an OCPP row's: 1 when its signed meter values were checked


def _raw(r: Any) -> Raw:
    return Raw(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), str(r[7]), int(r[8]))


class _Tail:
    """A table read by id on PostgreSQL. Rows can become visible below the highest id read,
    but only rows of transactions that were running when it was read: once every such
    transaction has ended (the snapshot's xmin has passed the xmax noted after the read),
    the ids up to it are settled. Until then they are read again (ids only) and the rows
    not seen yet are handed over. A transaction open for more than SETTLE_MAX_S does not
    hold the mark up: its rows, if any, are not shown live (they are in the database)."""

    def __init__(self, floor: int) -> None:
        self.floor = floor  # every id up to here was handed over or will never be
        self.seen: set[int] = set()  # ids above floor handed over
        self.marks: deque[tuple[int, int, float]] = deque()  # (top id, xmax, monotonic)


class Reader:
    """`Reader(url)`; `open()` is retried by the caller until the database exists."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.store: Store | None = None
        self.error: str | None = None  # why the last open() failed (one line)
        self._tails: dict[str, _Tail] = {}

    @property
    def name(self) -> str:
        """The database as messages name it (no password)."""
        try:
            return describe(self.url)
        except ValueError:
            return self.url

    def open(self) -> bool:
        if self.store is not None:
            return True
        try:
            store = Store(self.url, readonly=True, app="dashboard")
        except (FileNotFoundError, ValueError, *DB_ERRORS) as e:
            self.error = one_line(e)
            log.debug("database %s not readable yet: %s", self.name, self.error)
            return False
        try:
            store.db.execute("SELECT 1 FROM raw LIMIT 1").fetchall()  # the schema is there
        except DB_ERRORS as e:
            store.close()
            self.error = one_line(e)
            log.debug("database %s not readable yet: %s", self.name, self.error)
            return False
        self.store = store
        self.error = None
        return True

    def close(self) -> None:
        self._tails.clear()
        if self.store is not None:
            self.store.close()
            self.store = None

    @property
    def db(self) -> Any:
        if self.store is None:
            raise RuntimeError("reader not open")
        return self.store.db

    def _after(self, table: str, cols: str, last_id: int, limit: int) -> list[Any]:
        """Rows of `table` (`cols`, the id first) with an id above last_id, in id order, at
        most `limit`; on PostgreSQL also the rows that became visible below it since (see
        _Tail), before those."""
        q = f"SELECT {cols} FROM {table} WHERE id > ? ORDER BY id LIMIT ?"
        if self.store is None or self.store.engine != "postgresql":
            return list(self.db.execute(q, (last_id, limit)).fetchall())
        t = self._tails.get(table)
        if t is None or last_id < t.floor:
            t = self._tails[table] = _Tail(last_id)
        now = time.monotonic()
        xmin = int(self.db.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())").fetchone()[0])
        floor = t.floor  # settled before this read: what this read sees of them is final
        while t.marks and (
            (t.marks[0][1] <= xmin and now - t.marks[0][2] >= SETTLE_GRACE_S)
            or now - t.marks[0][2] >= SETTLE_MAX_S
        ):
            floor = max(floor, t.marks.popleft()[0])
        late: list[Any] = []
        if last_id > t.floor:
            ids = self.db.execute(
                f"SELECT id FROM {table} WHERE id > ? AND id <= ?", (t.floor, last_id)
            ).fetchall()
            new = [int(r[0]) for r in ids if int(r[0]) not in t.seen]
            if new:
                late = self.db.execute(
                    f"SELECT {cols} FROM {table} WHERE id = ANY(?) ORDER BY id", (new,)
                ).fetchall()
        rows = [r for r in self.db.execute(q, (last_id, limit)).fetchall() if r[0] not in t.seen]
        xmax = int(self.db.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())").fetchone()[0])
        t.seen.update(int(r[0]) for r in late)
        t.seen.update(int(r[0]) for r in rows)
        top = max(last_id, int(rows[-1][0])) if rows else last_id
        if not t.marks or t.marks[-1][0] < top or t.marks[-1][1] < xmax:
            t.marks.append((top, xmax, now))
        if floor > t.floor:
            t.floor = floor
            t.seen = {i for i in t.seen if i > floor}
        if late:
            log.debug("%s: %d rows committed below id %d", table, len(late), last_id)
        return [*late, *rows]

    # ---- raw ------------------------------------------------------------------------------

    def max_id(self, table: str) -> int:
        row = self.db.execute(f"SELECT MAX(id) FROM {table}").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def first_id_since(self, table: str, time_col: str, since_ms: int) -> int:
        """The smallest id whose time is >= since_ms, assuming times grow with ids (arrival
        order; a little disorder only moves the start by a few rows). Bisects rowids."""
        lo, hi = 0, self.max_id(table)
        q = f"SELECT id, {time_col} FROM {table} WHERE id >= ? ORDER BY id LIMIT 1"
        while lo < hi:
            mid = (lo + hi) // 2
            row = self.db.execute(q, (mid,)).fetchone()
            if row is None:
                return hi + 1
            if row[1] >= since_ms:
                hi = mid
            else:
                lo = int(row[0]) + 1
        return lo

    def raw_after(self, last_id: int, limit: int) -> list[Raw]:
        """Raw rows above last_id in id order (on PostgreSQL preceded by rows committed late
        below it: see _after)."""
        return [_raw(r) for r in self._after("raw", _RAW_COLS, last_id, limit)]

    def sids(self) -> list[str]:
        """Every station id in raw (a skip-scan over the unique index: one probe per
        station, not a table scan) and in status."""
        rows = self.db.execute(
            "WITH RECURSIVE s(sid) AS (SELECT MIN(sid) FROM raw UNION ALL "
            "SELECT (SELECT MIN(sid) FROM raw WHERE sid > s.sid) FROM s WHERE s.sid IS NOT NULL) "
            "SELECT sid FROM s WHERE sid IS NOT NULL UNION SELECT sid FROM status"
        ).fetchall()
        return sorted(str(r[0]) for r in rows)

    def latest_telemetry(self, sid: str) -> Raw | None:
        row = self.db.execute(
            f"SELECT {_RAW_COLS} FROM raw WHERE sid = ? AND kind = 'telemetry' "
            "ORDER BY boot DESC, seq DESC LIMIT 1",
            (sid,),
        ).fetchone()
        return _raw(row) if row else None

    def ocpp_tail(self, sid: str, limit: int) -> list[Raw]:
        """An OCPP station's newest `limit` frames and its newest BootNotification (seq 0
        of its newest boot: the agent counts a boot at each BootNotification), in key
        order; [] when the station's newest raw row is not an OCPP frame. Through the
        (sid, boot, seq) index: what a charger idle for longer than the dashboard's
        window last said of its connectors and its firmware."""
        rows = [
            _raw(r)
            for r in self.db.execute(
                f"SELECT {_RAW_COLS} FROM raw WHERE sid = ? ORDER BY boot DESC, seq DESC LIMIT ?",
                (sid, limit),
            ).fetchall()
        ]
        if not rows or rows[0].kind != "ocpp":
            return []
        boot = rows[0].boot
        if boot > 0 and not any(r.boot == boot and r.seq == 0 for r in rows):
            first = self.db.execute(
                f"SELECT {_RAW_COLS} FROM raw WHERE sid = ? AND boot = ? AND seq = 0", (sid, boot)
            ).fetchone()
            if first is not None:
                rows.append(_raw(first))
        return sorted((r for r in rows if r.kind == "ocpp"), key=lambda r: (r.boot, r.seq))

    def ocpp_points(self) -> list[tuple[str, int | None]]:
        """(sid, revoked_ms) of the registered OCPP charge points (schema 6; [] before it).
        Never their secrets."""
        try:
            return [
                (str(r[0]), None if r[1] is None else int(r[1]))
                for r in self.db.execute("SELECT sid, revoked_ms FROM ocpp_points").fetchall()
            ]
        except _MISSING:
            return []

    # ---- the rest -------------------------------------------------------------------------

    def agent_health(self) -> tuple[int, str] | None:
        """The agent's health row (agent/health.py): (updated_ms, state JSON), or None (no
        agent wrote one, or a database from before the table)."""
        try:
            row = self.db.execute(
                "SELECT updated_ms, state FROM agent_health WHERE id = 1"
            ).fetchone()
        except _MISSING:
            return None
        return None if row is None else (int(row[0]), str(row[1]))

    def status(self) -> list[tuple[str, int, bytes]]:
        return [
            (str(r[0]), int(r[1]), bytes(r[2]))
            for r in self.db.execute("SELECT sid, recv_ms, record FROM status").fetchall()
        ]

    def quarantine_after(
        self, last_id: int, limit: int = 10_000
    ) -> list[tuple[int, int, str, str, str, str | None, str | None]]:
        """(id, recv_ms, topic, reason, detail, sid, resolved_to) rows; the record bytes are
        not read. `resolved_to` (schema 2): the agent ingested the message after all (its
        key arrived late), else None."""
        try:
            rows = self._after(
                "quarantine", "id, recv_ms, topic, reason, detail, sid, resolved_to", last_id, limit
            )
        except _MISSING:  # schema 1 (SQLite only): nothing is ever resolved
            rows = [
                (*r, None)
                for r in self._after(
                    "quarantine", "id, recv_ms, topic, reason, detail, sid", last_id, limit
                )
            ]
        return [tuple(r) for r in rows]

    def resolved_from(self, first_id: int) -> list[tuple[int, str]]:
        """(id, resolved_to) of quarantine rows from first_id on that were resolved (a range
        of the primary key: the dashboard asks only about its recent window)."""
        try:
            return [
                (int(r[0]), str(r[1]))
                for r in self.db.execute(
                    "SELECT id, resolved_to FROM quarantine WHERE id >= ? "
                    "AND resolved_ms IS NOT NULL",
                    (first_id,),
                ).fetchall()
            ]
        except _MISSING:
            return []

    def alarms_after(
        self, last_id: int, limit: int = 10_000
    ) -> list[tuple[int, int, str | None, str, str, str]]:
        """(id, ts_ms, sid, code, level, detail) rows of the agent's alarms table."""
        return [
            tuple(r)
            for r in self._after("alarms", "id, ts_ms, sid, code, level, detail", last_id, limit)
        ]

    def records(self, kind: str, since_ms: int) -> list[tuple[str, int, int, int]]:
        """(sid, slot, start_ms, mwh) of records of `kind` starting at or after since_ms."""
        return [
            (str(r[0]), int(r[1]), int(r[2]), int(r[3]))
            for r in self.db.execute(
                "SELECT sid, slot, start_ms, mwh FROM records WHERE kind = ? AND start_ms >= ?",
                (kind, since_ms),
            ).fetchall()
        ]

    def day_records(self, since_ms: int) -> list[Record]:
        """Day records from since_ms on, in full (what agent.ledger.carbon needs)."""
        return [
            row_to_record(r)
            for r in self.db.execute(
                f"SELECT {RECORD_COLUMNS} FROM records WHERE kind = 'day' AND start_ms >= ?",
                (since_ms,),
            ).fetchall()
        ]

    # ---- history pages (sessions, energy per day, alarm history): read on request --------

    def session_records(
        self, from_ms: int, to_ms: int, sid: str | None, limit: int, offset: int
    ) -> tuple[int, list[Record]]:
        """(how many, a page of them): session records starting in [from_ms, to_ms), newest
        first (start, then end), optionally of one station."""
        where = "kind = 'session' AND start_ms >= ? AND start_ms < ?"
        args: tuple[Any, ...] = (from_ms, to_ms)
        if sid is not None:
            where += " AND sid = ?"
            args += (sid,)
        total = int(
            self.db.execute(f"SELECT COUNT(*) FROM records WHERE {where}", args).fetchone()[0]
        )
        rows = self.db.execute(
            f"SELECT {RECORD_COLUMNS} FROM records WHERE {where} "
            "ORDER BY start_ms DESC, end_ms DESC, sid, slot LIMIT ? OFFSET ?",
            (*args, limit, offset),
        ).fetchall()
        return total, [row_to_record(r) for r in rows]

    def day_records_between(self, from_ms: int, to_ms: int, sid: str | None) -> list[Record]:
        """Day records starting in [from_ms, to_ms), in full."""
        q = f"SELECT {RECORD_COLUMNS} FROM records WHERE kind = 'day' AND start_ms >= ? AND start_ms < ?"
        args: tuple[Any, ...] = (from_ms, to_ms)
        if sid is not None:
            q += " AND sid = ?"
            args += (sid,)
        return [row_to_record(r) for r in self.db.execute(q, args).fetchall()]

    def interval_coverage(
        self, from_ms: int, to_ms: int, sid: str | None
    ) -> list[tuple[str, int, int, bool]]:
        """(sid, interval start, interval length, any record of it flagged `gap`) per
        station and interval with interval records in [from_ms, to_ms); adjustment records
        (rule 8, booked into an open interval) are not data of their interval."""
        q = (
            "SELECT sid, start_ms, end_ms - start_ms, "
            "MAX(CASE WHEN '|' || flags || '|' LIKE '%|gap|%' THEN 1 ELSE 0 END) "
            "FROM records WHERE kind = 'interval' AND start_ms >= ? AND start_ms < ? "
            "AND '|' || flags || '|' NOT LIKE '%|adjustment|%'"
        )
        args: tuple[Any, ...] = (from_ms, to_ms)
        if sid is not None:
            q += " AND sid = ?"
            args += (sid,)
        q += " GROUP BY sid, start_ms, end_ms - start_ms"
        return [
            (str(r[0]), int(r[1]), int(r[2]), bool(r[3]))
            for r in self.db.execute(q, args).fetchall()
        ]

    def alarms_between(
        self, from_ms: int, to_ms: int, sid: str | None
    ) -> list[tuple[int, int, str | None, str, str, str]]:
        """(id, ts_ms, sid, code, level, detail) of the agent's alarms in [from_ms, to_ms)
        (no index on time: the table holds conflicts, a handful of rows)."""
        q = "SELECT id, ts_ms, sid, code, level, detail FROM alarms WHERE ts_ms >= ? AND ts_ms < ?"
        args: tuple[Any, ...] = (from_ms, to_ms)
        if sid is not None:
            q += " AND sid = ?"
            args += (sid,)
        return [
            (int(r[0]), int(r[1]), r[2], str(r[3]), str(r[4]), str(r[5]))
            for r in self.db.execute(q + " ORDER BY ts_ms DESC, id DESC", args).fetchall()
        ]
