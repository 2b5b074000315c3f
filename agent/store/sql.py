"""The agent's database: raw messages, quarantine, alarms, status, records and station keys.

Two engines run the same statements: SQLite in WAL mode, the embedded default
(`sqlite:///relative.db`, `sqlite:////abs.db` or a plain path; agent/store/sqlite.py), and
PostgreSQL (`postgresql://…`; agent/store/postgres.py, which translates the few spellings
that differ). The SQL is kept portable: only `INSERT … ON CONFLICT`, `SAVEPOINT`,
BIGINT/TEXT/BLOB columns and `?` placeholders. Nothing here depends on the order of rows in
a table: every read that matters has an ORDER BY.

The raw table is append-only and keyed by (sid, boot, seq). Each stored row holds the
exact payload bytes received (the signed record). A repeat of a key with the same bytes is a
duplicate (counted, nothing written); with other bytes it is a conflict: the first copy
stands, the later one goes to quarantine and an alarm is raised, in the same transaction.

A quarantined message that failed only for want of its key (`unknown_station`,
`unknown_kid`: a station that published a moment before the agent loaded its new key)
is re-verified when the key arrives (agent/service.py); one that now verifies is
ingested and its quarantine row kept, marked `resolved_ms` / `resolved_to` (stored,
duplicate or conflict), for the audit trail.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, NamedTuple, Self, cast

import msgspec

from agent.ledger.records import Record, make_record, record_id
from agent.store.sqlite import BUSY_TIMEOUT_MS, sqlite_path

log = logging.getLogger(__name__)

# 2: quarantine.resolved_ms, resolved_to (migrated in place); 3: ledger_state and
# ledger_checkpoint (new tables: stations without a state are metered from raw once);
# 4: the raw archive's manifest (agent/archive: archive_segments, _ranges, _stations);
# 5: the grid meter register (agent/meters.py: meters, meter_calibrations, meter_installs;
# new tables, made in place by `stationctl db upgrade`); 6: OCPP charge points
# (agent/ocpp/points.py: ocpp_points, a new table made in place)
SCHEMA_VERSION: Final = 6

# `checkpoint`: the WAL is started over once it holds this many pages (4 KB each); the
# RESTART that does it waits this long at most for the writer's commit or a reader
WAL_RESTART_PAGES: Final = 4096
RESTART_WAIT_MS: Final = 50

# The columns of a metering record (the records table, and locked_records beside it)
_RECORD_DDL: Final = """
        rid TEXT PRIMARY KEY,
        sid TEXT NOT NULL, kind TEXT NOT NULL, slot BIGINT NOT NULL,
        start_ms BIGINT NOT NULL, end_ms BIGINT NOT NULL,
        mwh BIGINT NOT NULL, held_mwh BIGINT NOT NULL, flags TEXT NOT NULL,
        from_boot BIGINT NOT NULL, from_seq BIGINT NOT NULL,
        to_boot BIGINT NOT NULL, to_seq BIGINT NOT NULL,
        e_from BIGINT NOT NULL, e_to BIGINT NOT NULL, version TEXT NOT NULL,
        extra TEXT NOT NULL"""

# Monitoring periods locked for MRV (CONTRACT §6.8; `stationctl period lock`): the locks,
# sequential and contiguous (n = 1, 2, …), and each locked window's interval and day records
# frozen as they stood at its lock (same columns as records, plus the lock's n).
PERIOD_DDL: Final = (
    """CREATE TABLE IF NOT EXISTS period_locks (
        n BIGINT PRIMARY KEY, from_ms BIGINT NOT NULL, to_ms BIGINT NOT NULL,
        locked_at_ms BIGINT NOT NULL, by_name TEXT NOT NULL, note TEXT NOT NULL)""",
    f"CREATE TABLE IF NOT EXISTS locked_records ({_RECORD_DDL}, lock_n BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS locked_records_sid ON locked_records (sid, kind, slot, start_ms)",
)

# OCPP charge points (CONTRACT §11; `stationctl ocpp`): each identity's password (an
# argon2 hash), its meter's OCMF public key (text as registered, or ''), and when it was
# revoked (NULL: in service).
OCPP_DDL: Final = (
    """CREATE TABLE IF NOT EXISTS ocpp_points (
        sid TEXT PRIMARY KEY, secret TEXT NOT NULL, public_key TEXT NOT NULL,
        created_ms BIGINT NOT NULL, revoked_ms BIGINT, note TEXT NOT NULL)""",
)

# The grid meter register (agent/meters.py; `stationctl meter`): each meter, its
# calibrations (history kept: the one in force at a time is the latest begun) and its
# installations at stations (to_ms NULL: still installed). Dates are UTC days, YYYY-MM-DD.
METER_DDL: Final = (
    """CREATE TABLE IF NOT EXISTS meters (
        serial TEXT PRIMARY KEY, model TEXT NOT NULL, accuracy_class TEXT NOT NULL,
        added_ms BIGINT NOT NULL, note TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS meter_calibrations (
        serial TEXT NOT NULL, calibrated_on TEXT NOT NULL, next_due TEXT NOT NULL,
        certificate TEXT NOT NULL, at_ms BIGINT NOT NULL,
        PRIMARY KEY (serial, calibrated_on))""",
    """CREATE TABLE IF NOT EXISTS meter_installs (
        serial TEXT NOT NULL, sid TEXT NOT NULL, from_ms BIGINT NOT NULL, to_ms BIGINT,
        by_name TEXT NOT NULL, at_ms BIGINT NOT NULL,
        PRIMARY KEY (serial, sid, from_ms))""",
    "CREATE INDEX IF NOT EXISTS meter_installs_sid ON meter_installs (sid, from_ms)",
)

# The raw archive's manifest (agent/archive/schema.py says what each table is for).
ARCHIVE_DDL: Final = (
    """CREATE TABLE IF NOT EXISTS archive_segments (
        id BIGINT PRIMARY KEY,
        sid TEXT NOT NULL, month TEXT NOT NULL, part BIGINT NOT NULL,
        file TEXT NOT NULL, sha256 TEXT NOT NULL, format TEXT NOT NULL,
        n_rows BIGINT NOT NULL, n_bytes BIGINT NOT NULL, raw_bytes BIGINT NOT NULL,
        first_boot BIGINT NOT NULL, first_seq BIGINT NOT NULL,
        last_boot BIGINT NOT NULL, last_seq BIGINT NOT NULL,
        sealed_ms BIGINT NOT NULL,
        UNIQUE (sid, month, part))""",
    """CREATE TABLE IF NOT EXISTS archive_ranges (
        sid TEXT NOT NULL, boot BIGINT NOT NULL, seq_lo BIGINT NOT NULL,
        seq_hi BIGINT NOT NULL, segment_id BIGINT NOT NULL,
        PRIMARY KEY (sid, boot, seq_lo))""",
    "CREATE INDEX IF NOT EXISTS archive_ranges_segment ON archive_ranges (segment_id)",
    """CREATE TABLE IF NOT EXISTS archive_stations (
        sid TEXT PRIMARY KEY, top_boot BIGINT NOT NULL, top_seq BIGINT NOT NULL)""",
)

# One statement per table; types chosen to map 1:1 onto PostgreSQL.
DDL: Final = (
    "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS raw (
        id INTEGER PRIMARY KEY,
        sid TEXT NOT NULL, boot BIGINT NOT NULL, seq BIGINT NOT NULL,
        kind TEXT NOT NULL, topic TEXT NOT NULL, recv_ms BIGINT NOT NULL, kid BIGINT NOT NULL,
        record BLOB NOT NULL,
        UNIQUE (sid, boot, seq))""",
    """CREATE TABLE IF NOT EXISTS quarantine (
        id INTEGER PRIMARY KEY,
        recv_ms BIGINT NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
        detail TEXT NOT NULL, sid TEXT, record BLOB NOT NULL,
        resolved_ms BIGINT, resolved_to TEXT)""",
    "CREATE INDEX IF NOT EXISTS quarantine_reason ON quarantine (reason, id)",
    "CREATE INDEX IF NOT EXISTS quarantine_sid ON quarantine (sid, reason, id)",
    """CREATE TABLE IF NOT EXISTS alarms (
        id INTEGER PRIMARY KEY,
        ts_ms BIGINT NOT NULL, sid TEXT, code TEXT NOT NULL, level TEXT NOT NULL,
        detail TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS status (
        sid TEXT PRIMARY KEY, recv_ms BIGINT NOT NULL, record BLOB NOT NULL)""",
    f"CREATE TABLE IF NOT EXISTS records ({_RECORD_DDL})",
    "CREATE INDEX IF NOT EXISTS records_sid ON records (sid, kind, slot, start_ms)",
    "CREATE INDEX IF NOT EXISTS records_time ON records (kind, start_ms)",
    # the metering engine's state per station and view (0 all messages, 1 a lock's), written
    # in the transaction of the raw rows and records it reflects (agent/ledger/engine.py)
    """CREATE TABLE IF NOT EXISTS ledger_state (
        sid TEXT NOT NULL, view BIGINT NOT NULL, version TEXT NOT NULL, blob BLOB NOT NULL,
        PRIMARY KEY (sid, view))""",
    # snapshots of it before (boot, seq), to recompute a span after a late message
    """CREATE TABLE IF NOT EXISTS ledger_checkpoint (
        sid TEXT NOT NULL, view BIGINT NOT NULL, boot BIGINT NOT NULL, seq BIGINT NOT NULL,
        blob BLOB NOT NULL, lows BLOB NOT NULL,
        PRIMARY KEY (sid, view, boot, seq))""",
    """CREATE TABLE IF NOT EXISTS keys (
        sid TEXT NOT NULL, kid BIGINT NOT NULL, key BLOB NOT NULL, state TEXT NOT NULL,
        created_ms BIGINT NOT NULL, retired_ms BIGINT, revoked_ms BIGINT,
        PRIMARY KEY (sid, kid))""",
    # the running agent's health (agent/health.py): one row (id 1), upserted every few s
    """CREATE TABLE IF NOT EXISTS agent_health (
        id BIGINT PRIMARY KEY, updated_ms BIGINT NOT NULL, state TEXT NOT NULL)""",
    *ARCHIVE_DDL,
    *METER_DDL,
    *OCPP_DDL,
    *PERIOD_DDL,
)


class RecordRow(NamedTuple):
    """A `Record` as a row of the records table, its fields in column order; made and read
    back only by record_to_row / row_to_record below."""

    rid: str  # agent.ledger.records.record_id
    sid: str
    kind: str
    slot: int
    start_ms: int
    end_ms: int
    mwh: int
    held_mwh: int
    flags: str  # "|"-joined, sorted
    from_boot: int
    from_seq: int
    to_boot: int
    to_seq: int
    e_from: int
    e_to: int
    version: str
    extra: str  # JSON text, keys sorted


RECORD_COLUMNS: Final = ", ".join(RecordRow._fields)
_INSERT_RECORD: Final = (
    f"INSERT INTO records ({RECORD_COLUMNS}) VALUES ({', '.join('?' * len(RecordRow._fields))})"
)
_UPSERT_RECORD: Final = (
    _INSERT_RECORD
    + " ON CONFLICT (rid) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in RECORD_COLUMNS.split(", ")[1:])
)
# An interval's or a day's id names its sid, kind, slot and start (make_record_id): an
# update leaves those, the indexed columns, as they are. Assigning them anyway makes SQLite
# rewrite both index entries of every row: twice the cost of the upserts the agent makes at
# each station's step (measured ~38 against ~16 µs a row). A session's start can change.
_UPDATE_FIXED: Final = ("sid", "kind", "slot", "start_ms")
_UPSERT_OPEN_RECORD: Final = (
    _INSERT_RECORD
    + " ON CONFLICT (rid) DO UPDATE SET "
    + ", ".join(
        f"{c} = excluded.{c}" for c in RECORD_COLUMNS.split(", ")[1:] if c not in _UPDATE_FIXED
    )
)


def _plain(rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """NamedTuple rows as plain tuples, for executemany: sqlite3 reads a tuple subclass's
    items one by one through Python's generic __getitem__ slot, ~0.8k instructions each (an
    8-column raw row: ~6k, a record: ~13k), against ~0.8k to copy a row into a tuple."""
    return map(tuple, rows)


def upsert_records(db: Any, rows: Sequence[RecordRow]) -> None:
    """Insert or update records by id (interval and day rows without touching the indexes)."""
    sessions = [r for r in rows if r.kind == "session"]
    if sessions:
        db.executemany(_UPSERT_RECORD, _plain(sessions))
        rows = [r for r in rows if r.kind != "session"]
    if rows:
        db.executemany(_UPSERT_OPEN_RECORD, _plain(rows))


_INSERT_RAW: Final = (
    "INSERT INTO raw (sid, boot, seq, kind, topic, recv_ms, kid, record) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sid, boot, seq) DO NOTHING"
)
_INSERT_Q: Final = (
    "INSERT INTO quarantine (recv_ms, topic, reason, detail, sid, record) VALUES (?, ?, ?, ?, ?, ?)"
)
_UPSERT_STATUS: Final = (
    "INSERT INTO status (sid, recv_ms, record) VALUES (?, ?, ?) ON CONFLICT (sid) "
    "DO UPDATE SET recv_ms = excluded.recv_ms, record = excluded.record"
)
_INSERT_ALARM: Final = "INSERT INTO alarms (ts_ms, sid, code, level, detail) VALUES (?, ?, ?, ?, ?)"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class RawRow(NamedTuple):
    sid: str
    boot: int
    seq: int
    kind: str
    topic: str
    recv_ms: int
    kid: int
    record: bytes


class QuarantineRow(NamedTuple):
    recv_ms: int
    topic: str
    reason: str
    detail: str
    sid: str | None
    record: bytes


class QuarantineEntry(NamedTuple):
    """A stored quarantine row with its id (what re-verification reads)."""

    id: int
    recv_ms: int
    topic: str
    reason: str
    detail: str
    sid: str | None
    record: bytes


# a raw row's outcome in a batch (also a resolved quarantine row's `resolved_to`)
STORED: Final = "stored"
DUPLICATE: Final = "duplicate"
CONFLICT: Final = "conflict"


class BatchResult(NamedTuple):
    new: list[int]  # indexes into the batch's raw rows that were stored now
    duplicates: int  # same key, same bytes as a stored row (or an earlier row of the batch)
    conflicts: int  # same key, other bytes: quarantined and alarmed


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def describe(url: str) -> str:
    """A database URL as messages name it (a PostgreSQL password left out)."""
    if is_postgres(url):
        from agent.store.postgres import redact

        return redact(url)
    return sqlite_path(url)


class SchemaError(ValueError):
    """The database's schema is not the one this program uses (the message says which and
    what to run)."""


class Store:
    """One connection to the agent database. Not shared between threads."""

    def __init__(
        self,
        url: str,
        *,
        synchronous: str = "full",
        create: bool = True,
        readonly: bool = False,
        autocheckpoint: int | None = None,
        upgrade: bool = False,
        app: str = "stationctl",
    ) -> None:
        """Open the database at `url` (a path, sqlite:///PATH or postgresql://…). `create`:
        make the schema in a new (empty) database; a read-only store never creates
        anything (no file, no table). An existing database of another schema version is
        refused (SchemaError naming both) unless `upgrade` (`stationctl db upgrade`)."""
        self.url = url
        # where sealed segments are (agent/archive); None: beside a SQLite file
        self.archive_dir: str | None = None
        self._archive: Any = None
        self._archive_tables = False  # agent/archive/schema.has_archive, once found
        self.raw_rows_read = 0  # raw rows read by iter_raw / iter_raw_keys (restart figures)
        create = create and not readonly
        self.db: Any
        self.path: str | None
        if is_postgres(url):
            from agent.store import postgres

            self.engine = "postgresql"
            self.path = None
            self.db = postgres.PgConnection(url, readonly=readonly, app=app)
        else:
            from agent.store import sqlite

            self.engine = "sqlite"
            self.path = sqlite_path(url)
            if not create and not os.path.exists(self.path):
                raise FileNotFoundError(f"no database at {self.path}")
            self.db = sqlite.connect(
                self.path,
                synchronous=synchronous,
                create=create,
                readonly=readonly,
                autocheckpoint=autocheckpoint,
            )
        try:
            have = self.schema_version()
            if have is None and not (create or upgrade):
                raise FileNotFoundError(f"no agent database at {describe(url)} (no tables)")
            if create or upgrade or (have is not None and have > SCHEMA_VERSION):
                self._create(have, upgrade)
        except BaseException:
            self.db.close()
            raise

    def is_env_error(self, e: BaseException) -> bool:
        """An error of the database's environment (retry later), not of the data."""
        if self.engine == "sqlite":
            from agent.store.sqlite import is_env_error

            return is_env_error(e)
        from agent.store.postgres import ENV_ERRORS

        return isinstance(e, ENV_ERRORS)

    def schema_version(self) -> int | None:
        """The database's schema version; None when it has no tables yet."""
        try:
            row = self.db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
        except Exception as e:
            text = str(e)
            if "no such table" in text or ('"meta" does not exist' in text):
                return None
            raise
        if row is None:
            return None
        v = str(row[0])
        if not v.isdigit():
            raise SchemaError(f"database schema {v!r} is not a version this program knows")
        return int(v)

    def _create(self, have: int | None, upgrade: bool) -> None:
        """A new database gets the current schema; an older one is upgraded only when asked
        (`stationctl db upgrade`); a newer one is refused."""
        if have is not None and have > SCHEMA_VERSION:
            raise SchemaError(
                f"database schema {have} is newer than this program's {SCHEMA_VERSION} "
                "(a newer agent's?): upgrade this program"
            )
        if have is not None and have < SCHEMA_VERSION and not upgrade:
            raise SchemaError(
                f"database schema {have}, this program needs {SCHEMA_VERSION}: run "
                f"`stationctl db upgrade --db {describe(self.url)}` (after a backup)"
            )
        if have == SCHEMA_VERSION:
            return
        # one write transaction: two processes opening a database at once make it once
        with self.transaction() as db:
            if self.engine == "postgresql":
                db.execute("SELECT pg_advisory_xact_lock(7262001)")  # concurrent agents' DDL
            for stmt in DDL:
                db.execute(stmt)
            row = db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
            have = None if row is None else int(row[0])
            if have == SCHEMA_VERSION:
                return  # another process made it meanwhile
            if have is not None and self.engine == "sqlite":
                from agent.store.sqlite import migrate_old

                migrate_old(db)
            db.execute(
                "INSERT INTO meta (k, v) VALUES ('schema', ?) "
                "ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                (str(SCHEMA_VERSION),),
            )
            if have is not None:
                log.info("database schema upgraded from %s to %d", have, SCHEMA_VERSION)

    def close(self) -> None:
        self.db.close()

    def checkpoint(self, restart_pages: int = WAL_RESTART_PAGES) -> tuple[int, int, int]:
        """Copy committed WAL pages into the database without blocking writers (PASSIVE);
        returns (busy, WAL pages, pages checkpointed). Nothing to do on PostgreSQL.

        SQLite starts the WAL over only when a write begins after a checkpoint that copied
        every frame. A writer that commits every few milliseconds (5,000 msg/s is enough)
        always appends during the pass, so the WAL grew up to the writer's autocheckpoint
        (~400 MB), which then ran inside a commit and stalled it (docs/agent.md, Soak).
        From `restart_pages` on, a second pass copies what came meanwhile and a RESTART
        checkpoint then holds the writer off for the few frames left, so that the next
        write starts the WAL over. It waits at most RESTART_WAIT_MS for the writer's
        commit or a reader; if that is not enough it gives up, to try again next time."""
        if self.engine != "sqlite":
            return 0, 0, 0
        row = self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if restart_pages and int(row[0]) == 0 and int(row[1]) >= restart_pages:
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self.db.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS}")
            try:
                row = self.db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return int(row[0]), int(row[1]), int(row[2])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        # IMMEDIATE: take the write lock up front, so a busy database waits (busy_timeout)
        # instead of failing half-way through a batch
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- ingest ---------------------------------------------------------------------------

    def write_batch(
        self,
        rows: Sequence[RawRow],
        quarantine: Sequence[QuarantineRow] = (),
        *,
        status: Sequence[tuple[str, int, bytes]] = (),
        records: Sequence[RecordRow] = (),
        records_gone: Sequence[str] = (),
        then: Callable[[BatchResult], None] | None = None,
    ) -> BatchResult:
        """Store a batch in one transaction (one fsync): verified messages, rejected ones,
        station status, and the metering changes that are due; `then(result)` runs inside
        the transaction after the raw rows are in (the agent meters them there, so that
        records and metering state commit with the rows they come from, or with later
        ones: agent/service.py `_plan`)."""
        with self.transaction() as db:
            result = self._insert_raw(db, rows)
            if quarantine:
                db.executemany(_INSERT_Q, _plain(quarantine))
            if status:
                db.executemany(_UPSERT_STATUS, status)
            if records_gone:
                db.executemany("DELETE FROM records WHERE rid = ?", [(r,) for r in records_gone])
            if records:
                upsert_records(db, records)
            if then is not None:
                then(result)
        return result

    def _insert_raw(
        self, db: Any, rows: Sequence[RawRow], outcomes: list[str] | None = None
    ) -> BatchResult:
        """Insert raw rows under the duplicate/conflict rules; `outcomes`, when given, gets
        each row's STORED, DUPLICATE or CONFLICT in order."""
        if not rows:
            return BatchResult([], 0, 0)
        # a key sealed into the archive has left `raw`: its UNIQUE no longer catches a late
        # copy, the archive's ranges do (one query per batch in the usual case)
        from agent.archive.index import archived_keys

        sealed = archived_keys(self, rows, checked=True)
        db.execute("SAVEPOINT batch")
        cur = None if sealed else db.executemany(_INSERT_RAW, _plain(rows))
        if cur is not None and cur.rowcount == len(rows):  # the usual case: every key is new
            db.execute("RELEASE batch")
            if outcomes is not None:
                outcomes.extend([STORED] * len(rows))
            return BatchResult(list(range(len(rows))), 0, 0)
        # Some key repeats: redo row by row to tell new, duplicate and conflict apart.
        db.execute("ROLLBACK TO batch")
        new: list[int] = []
        dups = conflicts = 0
        out = outcomes if outcomes is not None else []
        for i, r in enumerate(rows):
            if i in sealed:
                was: bytes | None = self.archive().archived_record(r.sid, r.boot, r.seq)
            elif db.execute(_INSERT_RAW, tuple(r)).rowcount == 1:
                new.append(i)
                out.append(STORED)
                continue
            else:
                got = db.execute(
                    "SELECT record FROM raw WHERE sid = ? AND boot = ? AND seq = ?",
                    (r.sid, r.boot, r.seq),
                ).fetchone()
                was = None if got is None else bytes(got[0])
            if was == r.record:
                dups += 1
                out.append(DUPLICATE)
                continue
            conflicts += 1
            out.append(CONFLICT)
            detail = f"({r.sid}, {r.boot}, {r.seq}) already stored with other bytes"
            db.execute(_INSERT_Q, (r.recv_ms, r.topic, "conflict", detail, r.sid, r.record))
            db.execute(_INSERT_ALARM, (r.recv_ms, r.sid, "conflict", "crit", detail))
            log.warning("conflict: %s", detail)
        db.execute("RELEASE batch")
        return BatchResult(new, dups, conflicts)

    def resolve_quarantine(
        self,
        rows: Sequence[RawRow],
        qids: Sequence[int],
        rejected: Sequence[tuple[int, str, str]] = (),
        *,
        at_ms: int | None = None,
        then: Callable[[BatchResult], None] | None = None,
    ) -> tuple[BatchResult, list[str]]:
        """Ingest quarantined messages that now verify, in one transaction: `rows[i]` (the
        quarantine row `qids[i]`'s exact bytes) goes through the duplicate/conflict rules of
        `write_batch`, and its quarantine row is kept and marked resolved (`resolved_ms`,
        `resolved_to` = stored | duplicate | conflict; a conflict also gets its own
        quarantine row and alarm, as on arrival). `rejected` holds (qid, reason, detail) of
        rows that failed again for another reason (e.g. bad_sig): their reason and detail
        are updated; they stay in quarantine. `then(result)` runs inside the transaction
        (metering, as in `write_batch`). Returns the batch result and each row's outcome."""
        if len(rows) != len(qids):
            raise ValueError("one quarantine id per row")
        t = now_ms() if at_ms is None else at_ms
        outcomes: list[str] = []
        with self.transaction() as db:
            result = self._insert_raw(db, rows, outcomes)
            db.executemany(
                "UPDATE quarantine SET resolved_ms = ?, resolved_to = ? WHERE id = ?",
                [(t, o, q) for q, o in zip(qids, outcomes, strict=False)],
            )
            if rejected:
                db.executemany(
                    "UPDATE quarantine SET reason = ?, detail = ? WHERE id = ?",
                    [(reason, detail, q) for q, reason, detail in rejected],
                )
            if then is not None:
                then(result)
        return result, outcomes

    def put_status(self, items: Sequence[tuple[str, int, bytes]]) -> None:
        """Last status (birth / last will, unsigned, informational) per station."""
        with self.transaction() as db:
            db.executemany(_UPSERT_STATUS, items)

    def add_alarm(self, sid: str | None, code: str, level: str, detail: str) -> None:
        with self.transaction() as db:
            db.execute(_INSERT_ALARM, (now_ms(), sid, code, level, detail))

    def put_agent_health(self, updated_ms: int, state: str) -> None:
        """Upsert the agent's health row (agent/health.py; `state` is JSON text)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO agent_health (id, updated_ms, state) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET updated_ms = excluded.updated_ms, "
                "state = excluded.state",
                (updated_ms, state),
            )

    def agent_health(self) -> tuple[int, str] | None:
        """(updated_ms, state JSON) of the agent's health row, None when there is none."""
        try:
            row = self.db.execute(
                "SELECT updated_ms, state FROM agent_health WHERE id = 1"
            ).fetchone()
        except Exception as e:  # a database from before the table (read-only)
            if "agent_health" in str(e):
                return None
            raise
        return None if row is None else (int(row[0]), str(row[1]))

    # ---- reads ------------------------------------------------------------------------------

    def archive(self) -> Any:
        """The raw archive's reader on this store (agent/archive), made once."""
        if self._archive is None:
            from agent.archive.reader import ArchiveReader

            self._archive = ArchiveReader(self, self.archive_dir)
        return self._archive

    def iter_raw_keys(
        self,
        sid: str,
        start: tuple[int, int] = (-1, -1),
        *,
        boot: int | None = None,
        page: int = 1000,
    ) -> Iterator[RawRow]:
        """A station's raw rows with (boot, seq) >= start in key order (only `boot`'s, when
        given): the sealed archive's and the live table's as one (agent/archive); memory
        holds a page of live rows and a segment's read buffer."""
        return cast(
            Iterator[RawRow], self.archive().iter_raw_keys(sid, start, boot=boot, page=page)
        )

    def iter_live_keys(
        self,
        sid: str,
        start: tuple[int, int] = (-1, -1),
        *,
        boot: int | None = None,
        page: int = 1000,
    ) -> Iterator[RawRow]:
        """`iter_raw_keys` of the live table alone, in pages of `page` rows."""
        b, q = start
        if boot is not None and start < (boot, -1):
            b, q = boot, -1
        sel = "SELECT boot, seq, kind, topic, recv_ms, kid, record FROM raw WHERE sid = ? "
        while True:
            args: list[Any] = [sid, b, b, q]
            where = "AND (boot > ? OR (boot = ? AND seq >= ?)) "
            if boot is not None:
                where += "AND boot = ? "
                args.append(boot)
            got = self.db.execute(
                sel + where + "ORDER BY boot, seq LIMIT ?", (*args, page)
            ).fetchall()
            self.raw_rows_read += len(got)
            for r in got:
                yield RawRow(sid, r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]))
            if len(got) < page:
                return
            b, q = got[-1][0], got[-1][1] + 1

    def raw_after(self, sid: str, key: tuple[int, int]) -> bool:
        """Does the station have a raw row (archived or live) with (boot, seq) above key?"""
        return bool(self.archive().raw_after(sid, key))

    def live_after(self, sid: str, key: tuple[int, int]) -> bool:
        """`raw_after` in the live table alone."""
        row = self.db.execute(
            "SELECT 1 FROM raw WHERE sid = ? AND (boot > ? OR (boot = ? AND seq > ?)) LIMIT 1",
            (sid, key[0], key[0], key[1]),
        ).fetchone()
        return row is not None

    def raw_sids(self) -> list[str]:
        """Stations with raw rows (reads the key index: for audits, not the hot path)."""
        return [r[0] for r in self.db.execute("SELECT DISTINCT sid FROM raw ORDER BY sid")]

    def record_sids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT sid FROM records ORDER BY sid")]

    def key_sids(self) -> list[str]:
        """Stations with a key (every station whose messages can be in raw)."""
        return [r[0] for r in self.db.execute("SELECT DISTINCT sid FROM keys ORDER BY sid")]

    def iter_raw(self, sid: str | None = None, batch: int = 5000) -> Iterator[list[RawRow]]:
        """Every stored raw row in id order (arrival order), in lists of up to `batch`."""
        last = 0
        q = "SELECT id, sid, boot, seq, kind, topic, recv_ms, kid, record FROM raw WHERE id > ?"
        args: tuple[Any, ...] = ()
        if sid is not None:
            q += " AND sid = ?"
            args = (sid,)
        q += " ORDER BY id LIMIT ?"
        while True:
            got = self.db.execute(q, (last, *args, batch)).fetchall()
            if not got:
                return
            last = got[-1][0]
            self.raw_rows_read += len(got)
            yield [RawRow(r[1], r[2], r[3], r[4], r[5], r[6], r[7], bytes(r[8])) for r in got]

    def raw_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM raw").fetchone()[0])

    def quarantine_rows(self, *, include_resolved: bool = False) -> list[QuarantineRow]:
        """What is in quarantine, in arrival order; with `include_resolved`, also the rows
        that were re-ingested once their key was known (see `resolve_quarantine`)."""
        q = "SELECT recv_ms, topic, reason, detail, sid, record FROM quarantine"
        if not include_resolved:
            q += " WHERE resolved_ms IS NULL"
        rows = self.db.execute(q + " ORDER BY id").fetchall()
        return [QuarantineRow(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows]

    def quarantined_sids(self, reasons: Sequence[str]) -> list[str]:
        """Stations with unresolved quarantine rows of one of `reasons`."""
        marks = ", ".join("?" * len(reasons))
        rows = self.db.execute(
            f"SELECT DISTINCT sid FROM quarantine WHERE reason IN ({marks}) "
            "AND resolved_ms IS NULL AND sid IS NOT NULL ORDER BY sid",
            tuple(reasons),
        ).fetchall()
        return [r[0] for r in rows]

    def open_quarantine(
        self, sid: str, reasons: Sequence[str], after_id: int = 0, limit: int = 1000
    ) -> list[QuarantineEntry]:
        """Unresolved quarantine rows of `sid` with one of `reasons` and an id above
        `after_id`, in id order, at most `limit` (page on with the last id)."""
        marks = ", ".join("?" * len(reasons))
        rows = self.db.execute(
            "SELECT id, recv_ms, topic, reason, detail, sid, record FROM quarantine "
            f"WHERE sid = ? AND reason IN ({marks}) AND id > ? AND resolved_ms IS NULL "
            "ORDER BY id LIMIT ?",
            (sid, *reasons, after_id, limit),
        ).fetchall()
        return [QuarantineEntry(int(r[0]), r[1], r[2], r[3], r[4], r[5], bytes(r[6])) for r in rows]

    def alarms(self) -> list[tuple[int, str | None, str, str, str]]:
        return [
            (r[0], r[1], r[2], r[3], r[4])
            for r in self.db.execute(
                "SELECT ts_ms, sid, code, level, detail FROM alarms ORDER BY id"
            ).fetchall()
        ]

    def max_boot(self, sid: str) -> int | None:
        """The station's highest boot number stored, archived or live (a reflashed
        station's boot_base must pass it: CONTRACT §5.1)."""
        got = self.archive().max_boot(sid)
        return None if got is None else int(got)

    def top_key(self, sid: str) -> tuple[int, int] | None:
        """The station's highest (boot, seq) stored, live or archived (an OCPP charger's
        frames are numbered on from it: CONTRACT §11)."""
        from agent.archive.index import archived_top

        row = self.db.execute(
            "SELECT boot, seq FROM raw WHERE sid = ? ORDER BY boot DESC, seq DESC LIMIT 1", (sid,)
        ).fetchone()
        live = None if row is None else (int(row[0]), int(row[1]))
        old = archived_top(self, sid)
        return max((k for k in (live, old) if k is not None), default=None)

    def live_max_boot(self, sid: str) -> int | None:
        row = self.db.execute("SELECT MAX(boot) FROM raw WHERE sid = ?", (sid,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    # ---- records ----------------------------------------------------------------------------

    def replace_records(
        self, by_sid: dict[str, list[RecordRow]], *, everything: bool = False
    ) -> None:
        """Replace each station's records (or, with `everything`, the whole table) with the
        current metering output, atomically."""
        with self.transaction() as db:
            if everything:
                db.execute("DELETE FROM records")
            for sid, rows in by_sid.items():
                if not everything:
                    db.execute("DELETE FROM records WHERE sid = ?", (sid,))
                db.executemany(_INSERT_RECORD, _plain(rows))

    def apply_records(self, upserts: Sequence[RecordRow], deletes: Sequence[str]) -> None:
        """Metering changes: records created or changed (by rid) and rids that are gone."""
        self.write_batch((), records=upserts, records_gone=deletes)

    def record_rows(
        self,
        kind: str | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
        *,
        sid: str | None = None,
    ) -> list[RecordRow]:
        """Records (optionally of one kind, of one station, touching [start_ms, end_ms)) in a
        fixed order; a superset of what an export window needs (render() applies the exact
        bounds). Interval and day records of locked monitoring periods (CONTRACT §6.8) are
        the frozen ones (`locked_records`), the metering's own from the last lock's end."""
        until = self.locked_until()
        if until is None:
            return self._record_rows("records", kind, start_ms, end_ms, sid, None)
        live = self._record_rows("records", kind, start_ms, end_ms, sid, until)
        frozen = self._record_rows("locked_records", kind, start_ms, end_ms, sid, None)
        return sorted(live + frozen, key=lambda r: (r.sid, r.slot, r.start_ms, r.kind, r.rid))

    def locked_until(self) -> int | None:
        """The end of the last locked monitoring period (None: nothing locked, or a
        database from before schema 6)."""
        if (self.schema_version() or 0) < 6:
            return None
        row = self.db.execute("SELECT MAX(to_ms) FROM period_locks").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def _record_rows(
        self,
        table: str,
        kind: str | None,
        start_ms: int | None,
        end_ms: int | None,
        sid: str | None,
        open_from: int | None,
    ) -> list[RecordRow]:
        q = f"SELECT {RECORD_COLUMNS} FROM {table} WHERE 1 = 1"
        if open_from is not None:  # sessions are never locked; intervals and days from here
            q += f" AND (kind = 'session' OR start_ms >= {int(open_from)})"
        args: list[Any] = []
        if sid is not None:
            q += " AND sid = ?"
            args.append(sid)
        if kind is not None:
            q += " AND kind = ?"
            args.append(kind)
        if start_ms is not None:
            q += " AND end_ms >= ?"
            args.append(start_ms)
        if end_ms is not None:
            q += " AND start_ms < ?"
            args.append(end_ms)
        q += " ORDER BY sid, slot, start_ms, kind, rid"
        return [RecordRow._make(r) for r in self.db.execute(q, args).fetchall()]


# ---- the metering engine's tables ------------------------------------------------------------


class LedgerTables:
    """The ledger's backend (agent.ledger.backend.Backend) on a Store's connection: raw
    rows read back in key order (pages), checkpoints, records, and the state rows. Every
    method runs in the caller's transaction (the agent's batch: raw rows, records and
    states commit together)."""

    def __init__(self, store: Store, decode: Any) -> None:
        self.store = store
        self.db = store.db
        self._decode = decode  # RawRow -> RawMsg (agent.ledger.inputs.raw_msg on its body)
        self._pending: dict[str, RecordRow] = {}  # put, not yet written (rid -> row)

    # raw
    def raw_from(self, sid: str, start: tuple[int, int]) -> Iterator[Any]:
        for r in self.store.iter_raw_keys(sid, start):
            yield self._decode(r)

    def raw_boot(self, sid: str, boot: int) -> Iterator[Any]:
        for r in self.store.iter_raw_keys(sid, boot=boot):
            yield self._decode(r)

    # checkpoints
    def _ck(self, row: Any) -> Any:
        from agent.ledger.backend import Checkpoint

        return Checkpoint((row[0], row[1]), bytes(row[2]), msgspec.msgpack.decode(row[3]))

    def _one(self, where: str, args: tuple[Any, ...], order: str) -> Any:
        row = self.db.execute(
            "SELECT boot, seq, blob, lows FROM ledger_checkpoint WHERE sid = ? AND view = ? "
            f"AND {where} ORDER BY {order} LIMIT 1",
            args,
        ).fetchone()
        return None if row is None else self._ck(row)

    def checkpoint_before(self, sid: str, view: int, key: tuple[int, int]) -> Any:
        b, q = key
        return self._one(
            "(boot < ? OR (boot = ? AND seq <= ?))", (sid, view, b, b, q), "boot DESC, seq DESC"
        )

    def checkpoint_prior(self, sid: str, view: int, key: tuple[int, int]) -> Any:
        b, q = key
        return self._one(
            "(boot < ? OR (boot = ? AND seq < ?))", (sid, view, b, b, q), "boot DESC, seq DESC"
        )

    def first_checkpoint_of_boot(self, sid: str, view: int, boot: int) -> Any:
        return self._one("boot = ?", (sid, view, boot), "seq")

    def checkpoints_after(self, sid: str, view: int, key: tuple[int, int]) -> Iterator[Any]:
        b, q = key
        while True:
            rows = self.db.execute(
                "SELECT boot, seq, x'', lows FROM ledger_checkpoint WHERE sid = ? AND view = ? "
                "AND (boot > ? OR (boot = ? AND seq > ?)) ORDER BY boot, seq LIMIT 1000",
                (sid, view, b, b, q),
            ).fetchall()
            for r in rows:
                yield self._ck(r)
            if len(rows) < 1000:
                return
            b, q = rows[-1][0], rows[-1][1]

    def put_checkpoint(self, sid: str, view: int, ck: Any) -> None:
        self.db.execute(
            "INSERT INTO ledger_checkpoint (sid, view, boot, seq, blob, lows) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sid, view, boot, seq) DO UPDATE SET "
            "blob = excluded.blob, lows = excluded.lows",
            (sid, view, ck.key[0], ck.key[1], ck.blob, msgspec.msgpack.encode(ck.lows)),
        )

    def drop_checkpoints_after(self, sid: str, view: int, key: tuple[int, int]) -> None:
        b, q = key
        self.db.execute(
            "DELETE FROM ledger_checkpoint WHERE sid = ? AND view = ? "
            "AND (boot > ? OR (boot = ? AND seq > ?))",
            (sid, view, b, b, q),
        )

    # records
    def get_record(self, rid: str) -> Record | None:
        if rid in self._pending:
            return row_to_record(self._pending[rid])
        row = self.db.execute(
            f"SELECT {RECORD_COLUMNS} FROM records WHERE rid = ?", (rid,)
        ).fetchone()
        return None if row is None else row_to_record(row)

    def put_record(self, r: Record) -> None:
        """Written with the others of its station's step (`flush`): one executemany per
        step instead of a statement (a round trip, on PostgreSQL) per record."""
        row = record_to_row(r)
        self._pending[row.rid] = row
        if len(self._pending) >= _PENDING_MAX:  # a station metered from years of raw
            self.flush()

    def flush(self) -> None:
        """Write the records put since the last flush (before any read of the records
        table, and at the end of each metering step, inside its transaction)."""
        if self._pending:
            rows = list(self._pending.values())
            self._pending.clear()
            upsert_records(self.db, rows)

    def discard(self) -> None:
        """Forget the records put and not written (their transaction is rolled back)."""
        self._pending.clear()

    def delete_record(self, rid: str) -> None:
        self.flush()
        self.db.execute("DELETE FROM records WHERE rid = ?", (rid,))

    def delete_intervals(self, sid: str, slot: int, start_ms: int, end_ms: int | None) -> set[int]:
        self.flush()
        q = (
            "FROM records WHERE sid = ? AND kind = 'interval' AND slot = ? AND start_ms >= ? "
            "AND rid NOT LIKE '%/adj'"
        )
        args: list[Any] = [sid, slot, start_ms]
        if end_ms is not None:
            q += " AND start_ms < ?"
            args.append(end_ms)
        days = {
            int(r[0]) // DAY_MS_STORE
            for r in self.db.execute("SELECT DISTINCT start_ms " + q, args).fetchall()
        }
        if days:
            self.db.execute("DELETE " + q, args)
        return days

    def delete_sessions_from(self, sid: str, key: tuple[int, int]) -> None:
        self.flush()
        self.db.execute(
            "DELETE FROM records WHERE sid = ? AND kind = 'session' "
            "AND (to_boot > ? OR (to_boot = ? AND to_seq >= ?))",
            (sid, key[0], key[0], key[1]),
        )

    def day_roll(self, sid: str, slot: int, day: int) -> Record | None:
        """The day record of a stream, rolled up in SQL (sums, flags, first and last
        interval record; an adjustment after the ordinary record of its start: its rid
        sorts after): three index lookups, no interval record read into Python."""
        self.flush()
        where = (
            "FROM records WHERE sid = ? AND kind = 'interval' AND slot = ? "
            "AND start_ms >= ? AND start_ms < ?"
        )
        lo = day * DAY_MS_STORE
        args = (sid, slot, lo, lo + DAY_MS_STORE)
        n, mwh, held, flags = self.db.execute(
            "SELECT COUNT(*), SUM(mwh), SUM(held_mwh), GROUP_CONCAT(DISTINCT flags) " + where,
            args,
        ).fetchone()
        if not n:
            return None
        first = self.db.execute(
            "SELECT from_boot, from_seq, e_from " + where + " ORDER BY start_ms, rid LIMIT 1",
            args,
        ).fetchone()
        last = self.db.execute(
            "SELECT to_boot, to_seq, e_to " + where + " ORDER BY start_ms DESC, rid DESC LIMIT 1",
            args,
        ).fetchone()
        names = sorted({f for part in (flags or "").split(",") for f in part.split("|") if f})
        return make_record(
            "day",
            sid,
            slot,
            lo,
            lo + DAY_MS_STORE,
            int(mwh),
            int(held),
            tuple(names),
            (first[0], first[1]),
            (last[0], last[1]),
            first[2],
            last[2],
        )

    # states
    def load_state(self, sid: str, view: int) -> tuple[str, bytes] | None:
        row = self.db.execute(
            "SELECT version, blob FROM ledger_state WHERE sid = ? AND view = ?", (sid, view)
        ).fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    def put_state(self, sid: str, view: int, version: str, blob: bytes) -> None:
        self.db.execute(
            "INSERT INTO ledger_state (sid, view, version, blob) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (sid, view) DO UPDATE SET version = excluded.version, blob = excluded.blob",
            (sid, view, version, blob),
        )

    def state_sids(self) -> dict[str, tuple[str, bytes]]:
        """Every station's full-view state (sid -> (version, blob))."""
        return {
            r[0]: (str(r[1]), bytes(r[2]))
            for r in self.db.execute("SELECT sid, version, blob FROM ledger_state WHERE view = 0")
        }

    def forget_station(self, sid: str) -> None:
        """Drop a station's metering output and state (before metering it from raw again)."""
        self.flush()
        for t in ("records", "ledger_checkpoint", "ledger_state"):
            self.db.execute(f"DELETE FROM {t} WHERE sid = ?", (sid,))


DAY_MS_STORE: Final = 86_400_000
_PENDING_MAX: Final = 2000  # records held before they are written


# ---- records <-> rows ----------------------------------------------------------------------


def record_to_row(r: Record) -> RecordRow:
    """The row a record is stored as."""
    return RecordRow(
        record_id(r),
        r.sid,
        r.kind,
        r.slot,
        r.start_ms,
        r.end_ms,
        r.mwh,
        r.held_mwh,
        "|".join(r.flags),
        r.from_key[0],
        r.from_key[1],
        r.to_key[0],
        r.to_key[1],
        r.e_from,
        r.e_to,
        r.version,
        _encode_sorted(dict(r.extra)).decode() if r.extra else "{}",
    )


def row_to_record(row: Sequence[Any]) -> Record:
    """The record a row of RECORD_COLUMNS (a RecordRow, or a plain row a query read) holds."""
    (
        _rid,
        sid,
        kind,
        slot,
        start_ms,
        end_ms,
        mwh,
        held,
        flags,
        fb,
        fs,
        tb,
        ts,
        e_from,
        e_to,
        version,
        extra,
    ) = row
    return Record(
        kind=kind,
        sid=sid,
        slot=slot,
        start_ms=start_ms,
        end_ms=end_ms,
        mwh=mwh,
        held_mwh=held,
        flags=tuple(flags.split("|")) if flags else (),
        from_key=(fb, fs),
        to_key=(tb, ts),
        e_from=e_from,
        e_to=e_to,
        version=version,
        extra=msgspec.json.decode(extra),
    )


def _encode_sorted(obj: Any) -> bytes:
    return msgspec.json.encode(obj, order="sorted")
