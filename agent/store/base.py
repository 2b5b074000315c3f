"""The store's interface: what the service, the ledger and the commands ask of a database.

One engine today (agent/store/sqlite.py, the embedded default); a PostgreSQL engine will
implement the same methods. `agent/store/__init__.py` has mypy check that the SQLite
engine satisfies this protocol, and tests/test_store_interface.py checks it at run time.
What is not here (the dashboard's read-only queries in agent/dashboard/reader.py, the key
table in agent/keys.py) still speaks SQL to the connection and moves behind this interface
with the second engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from agent.store.sql import (
    BatchResult,
    QuarantineEntry,
    QuarantineRow,
    RawRow,
    RecordRow,
    Store,
)


class LedgerStore(Protocol):
    """One connection to the agent's database; not shared between threads."""

    url: str

    def close(self) -> None: ...

    def transaction(self) -> AbstractContextManager[Any]:
        """One write transaction: everything in it commits together or not at all."""
        ...

    # ---- raw messages (append-only) and quarantine --------------------------------------

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
        """Store a batch in one transaction: raw rows under the (sid, boot, seq) rules
        (duplicate, conflict), quarantine, statuses, record changes; `then` runs inside
        the transaction (the ledger's records and states ride along)."""
        ...

    def iter_raw(self, sid: str | None = None, batch: int = 5000) -> Iterator[list[RawRow]]: ...

    def iter_raw_keys(
        self,
        sid: str,
        start: tuple[int, int] = (-1, -1),
        *,
        boot: int | None = None,
        page: int = 1000,
    ) -> Iterator[RawRow]:
        """A station's raw rows from key `start` on, in (boot, seq) order, paged."""
        ...

    def raw_after(self, sid: str, key: tuple[int, int]) -> bool: ...

    def raw_count(self) -> int: ...

    def raw_sids(self) -> list[str]: ...

    def max_boot(self, sid: str) -> int | None: ...

    def quarantine_rows(self, *, include_resolved: bool = False) -> list[QuarantineRow]: ...

    def quarantined_sids(self, reasons: Sequence[str]) -> list[str]: ...

    def open_quarantine(
        self, sid: str, reasons: Sequence[str], after_id: int = 0, limit: int = 1000
    ) -> list[QuarantineEntry]: ...

    def resolve_quarantine(
        self,
        rows: Sequence[RawRow],
        qids: Sequence[int],
        rejected: Sequence[tuple[int, str, str]] = (),
        *,
        at_ms: int | None = None,
        then: Callable[[BatchResult], None] | None = None,
    ) -> tuple[BatchResult, list[str]]:
        """Ingest quarantined rows that now verify (duplicate/conflict rules as a batch) and
        mark them resolved, in one transaction; `then` runs inside it (their metering)."""
        ...

    # ---- statuses, alarms, the agent's health -------------------------------------------

    def put_status(self, items: Sequence[tuple[str, int, bytes]]) -> None: ...

    def add_alarm(self, sid: str | None, code: str, level: str, detail: str) -> None: ...

    def alarms(self) -> list[tuple[int, str | None, str, str, str]]: ...

    def put_agent_health(self, updated_ms: int, state: str) -> None: ...

    def agent_health(self) -> tuple[int, str] | None: ...

    # ---- records -----------------------------------------------------------------------

    def record_rows(
        self,
        kind: str | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
        *,
        sid: str | None = None,
    ) -> list[RecordRow]: ...

    def record_sids(self) -> list[str]: ...

    def apply_records(self, upserts: Sequence[RecordRow], deletes: Sequence[str]) -> None: ...

    def replace_records(
        self, by_sid: dict[str, list[RecordRow]], *, everything: bool = False
    ) -> None: ...


def _sqlite_conforms(store: Store) -> LedgerStore:
    """Never called: mypy fails here if the SQLite engine lacks part of the interface."""
    return store
