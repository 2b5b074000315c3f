"""The agent's store: append-only raw messages, quarantine, records, keys, statuses.

The SQLite engine (agent/store/sqlite.py) is the embedded default; the names below are the
interface every caller uses.
"""

from agent.store.sql import (
    CONFLICT,
    DUPLICATE,
    RECORD_COLUMNS,
    SCHEMA_VERSION,
    STORED,
    BatchResult,
    QuarantineEntry,
    QuarantineRow,
    RawRow,
    RecordRow,
    Store,
    now_ms,
    record_to_row,
    row_to_record,
)
from agent.store.sqlite import sqlite_path

__all__ = [
    "CONFLICT",
    "DUPLICATE",
    "RECORD_COLUMNS",
    "SCHEMA_VERSION",
    "STORED",
    "BatchResult",
    "QuarantineEntry",
    "QuarantineRow",
    "RawRow",
    "RecordRow",
    "Store",
    "now_ms",
    "record_to_row",
    "row_to_record",
    "sqlite_path",
]
