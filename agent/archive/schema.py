"""The raw archive's manifest: three tables in the agent database.

`archive_segments`: one row per sealed segment file (one station, one UTC month of
`recv_ms`, one part: a month's rows that reach `raw` after it was sealed, e.g. a
quarantined message resolved later with its first receive time, go into part 2, 3, …).
`archive_ranges`: the (boot, seq) runs a segment holds, split at every gap, so that a
late copy of an archived message is recognised (agent/archive/index.py) and so that a
reader opens only the segments that can hold the keys it wants.
`archive_stations`: each station's highest archived key, so that the ingest path asks
`archive_ranges` only about a row at or below it (the usual live row is above it: one
query per batch).

Portable SQL only (BIGINT/TEXT columns, `CREATE … IF NOT EXISTS`, ids assigned by the
sealer, not by an SQLite rowid), so the PostgreSQL engine runs the same statements.
"""

from __future__ import annotations

from typing import Any, Final

# the DDL is the store's (agent/store/sql.py, schema 4 on): made with the rest of the schema
from agent.store.sql import ARCHIVE_DDL

TABLES: Final = ("archive_segments", "archive_ranges", "archive_stations")


def ensure_schema(store: Any) -> None:
    """Create the archive tables if they are missing (idempotent; one transaction)."""
    with store.transaction() as db:
        for stmt in ARCHIVE_DDL:
            db.execute(stmt)


def has_archive(store: Any) -> bool:
    """Do the archive tables exist? (A database that never sealed has none: an empty
    archive.) Asked of the catalogue, never by a failing query, which would abort a
    PostgreSQL transaction. Once found they stay (tables are never dropped): remembered on
    the store, so that each raw read does not ask the catalogue again."""
    if getattr(store, "_archive_tables", False):
        return True
    if getattr(store, "engine", "sqlite") == "sqlite":
        q = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN (?, ?, ?)"
    else:  # PostgreSQL: the catalogue of the connection's schema
        q = (
            "SELECT COUNT(*) FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_name IN (?, ?, ?)"
        )
    found = int(store.db.execute(q, TABLES).fetchone()[0]) == len(TABLES)
    if found:
        try:
            store._archive_tables = True
        except AttributeError:  # a store-like object without room for it: asked each time
            pass
    return found
