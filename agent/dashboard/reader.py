"""Read-only access to the agent's store for the dashboard (agent/store/ schema).

One read-only SQLite connection (WAL lets it read beside the agent's writer). Every query
is a short autocommit read, so the dashboard never holds a snapshot that would keep the
writer's WAL from being checkpointed. What it reads, and why it stays cheap:

- raw rows newer than the last rowid seen (the primary key), once a second;
- at start: each station's newest telemetry by the (sid, boot, seq) index, and the rows of
  the last `history_s` (found by bisecting rowids on recv_ms; no index on time needed);
- status (one row per station), quarantine and alarms rows newer than the last id;
- records of the last days and hours, through the (kind, start_ms) index, every few seconds.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any, Final, NamedTuple

from agent.ledger import Record
from agent.store import RECORD_COLUMNS, Store, row_to_record

log = logging.getLogger(__name__)

_RAW_COLS: Final = "id, sid, boot, seq, kind, recv_ms, record"


class Raw(NamedTuple):
    id: int
    sid: str
    boot: int
    seq: int
    kind: str
    recv_ms: int
    record: bytes


def _raw(r: Any) -> Raw:
    return Raw(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]))


class Reader:
    """`Reader(url)`; `open()` is retried by the caller until the database exists."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.store: Store | None = None

    def open(self) -> bool:
        if self.store is not None:
            return True
        try:
            store = Store(self.url, readonly=True)
            store.db.execute("SELECT 1 FROM raw LIMIT 1").fetchall()  # the schema is there
        except (FileNotFoundError, sqlite3.Error) as e:
            log.debug("database %s not readable yet: %s", self.url, e)
            return False
        self.store = store
        return True

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    @property
    def db(self) -> sqlite3.Connection:
        if self.store is None:
            raise RuntimeError("reader not open")
        return self.store.db

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
        rows = self.db.execute(
            f"SELECT {_RAW_COLS} FROM raw WHERE id > ? ORDER BY id LIMIT ?", (last_id, limit)
        ).fetchall()
        return [_raw(r) for r in rows]

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

    # ---- the rest -------------------------------------------------------------------------

    def agent_health(self) -> tuple[int, str] | None:
        """The agent's health row (agent/health.py): (updated_ms, state JSON), or None (no
        agent wrote one, or a database from before the table)."""
        try:
            row = self.db.execute(
                "SELECT updated_ms, state FROM agent_health WHERE id = 1"
            ).fetchone()
        except sqlite3.OperationalError:
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
            rows = self.db.execute(
                "SELECT id, recv_ms, topic, reason, detail, sid, resolved_to FROM quarantine "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (last_id, limit),
            ).fetchall()
        except sqlite3.OperationalError:  # schema 1: nothing is ever resolved
            rows = [
                (*r, None)
                for r in self.db.execute(
                    "SELECT id, recv_ms, topic, reason, detail, sid FROM quarantine "
                    "WHERE id > ? ORDER BY id LIMIT ?",
                    (last_id, limit),
                ).fetchall()
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
        except sqlite3.OperationalError:
            return []

    def alarms_after(
        self, last_id: int, limit: int = 10_000
    ) -> list[tuple[int, int, str | None, str, str, str]]:
        """(id, ts_ms, sid, code, level, detail) rows of the agent's alarms table."""
        return [
            tuple(r)
            for r in self.db.execute(
                "SELECT id, ts_ms, sid, code, level, detail FROM alarms WHERE id > ? "
                "ORDER BY id LIMIT ?",
                (last_id, limit),
            ).fetchall()
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
