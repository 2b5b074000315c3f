"""The SQLite engine: the embedded default (one site, the demo, the tests).

A file in WAL mode opened through the standard library's sqlite3 in autocommit mode (the
store's transactions are explicit BEGIN IMMEDIATE … COMMIT). The store's SQL itself is in
agent/store/sql.py, shared with the PostgreSQL engine.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse

BUSY_TIMEOUT_MS = 10_000  # how long a statement waits for another connection's lock

# sqlite3 binds int, float, str and bytearray as they are, but asks its adapter registry,
# then the type's `__adapt__` and the value's `__conform__` about bytes (the raw record,
# every message): the failed lookups raise and format an AttributeError each time, ~2.7k
# instructions a value. A registered identity adapter answers at the first step (bytes'
# own __bytes__: a C method that returns the object itself, ~1k instructions less than
# calling the type).
sqlite3.register_adapter(bytes, bytes.__bytes__)

# errors of the database's environment (disk full, locked, I/O): retried, never a row's
# fault; plain sqlite3.DatabaseError too ("file is not a database", corruption)
ENV_ERRORS: tuple[type[BaseException], ...] = (sqlite3.OperationalError, sqlite3.InternalError)


def is_env_error(e: BaseException) -> bool:
    return isinstance(e, ENV_ERRORS) or type(e) is sqlite3.DatabaseError


def sqlite_path(url: str) -> str:
    """`sqlite:///rel/path`, `sqlite:////abs/path` or a plain path → a filesystem path."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
    elif "://" in url:
        scheme = url.split("://", 1)[0]
        raise ValueError(
            f"unsupported database URL scheme {scheme!r}: use sqlite:///PATH or postgresql://…"
        )
    else:
        path = url
    if not path:
        raise ValueError("empty database path")
    return path


def connect(
    path: str,
    *,
    synchronous: str = "full",
    create: bool = True,
    readonly: bool = False,
    autocheckpoint: int | None = None,
) -> sqlite3.Connection:
    if synchronous.lower() not in ("full", "normal", "off", "extra"):
        raise ValueError(f"synchronous must be full or normal, not {synchronous!r}")
    if create and not readonly and not os.path.exists(path):
        # it will hold every station's key: private from the first byte (SQLite gives its
        # -wal and -shm files the database's mode)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    # autocommit mode: transactions are explicit (BEGIN … COMMIT)
    if readonly:
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if create:
        db.execute("PRAGMA journal_mode = WAL")
    # FULL: a committed batch survives a power cut, not only a crash (ack follows commit)
    db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    if autocheckpoint is not None:
        # the agent checkpoints from another connection and thread (checkpoint()), so
        # that a commit never pays for copying the WAL; this is only a safety net
        db.execute(f"PRAGMA wal_autocheckpoint = {int(autocheckpoint)}")
    return db


def migrate_old(db: sqlite3.Connection) -> None:
    """Schema 1 → 2 on SQLite (the only engine that had those): the quarantine's
    resolved_ms / resolved_to columns (idempotent)."""
    have = {r[1] for r in db.execute("PRAGMA table_info(quarantine)").fetchall()}
    for col, typ in (("resolved_ms", "BIGINT"), ("resolved_to", "TEXT")):
        if col not in have:
            db.execute(f"ALTER TABLE quarantine ADD COLUMN {col} {typ}")


def others_can_read(path: str) -> int | None:
    """The mode of a database file that its group or others can read or write (None when
    only its owner can, or it is not there)."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return None
    return mode if mode & 0o077 else None
