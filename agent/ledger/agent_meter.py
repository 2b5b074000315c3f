"""The agent's metering: the ledger's engines on the agent's store (agent/store/sqlite.py,
`LedgerTables`), for the database thread only.

`add()` runs inside a write transaction of the agent: the records and each station's
state row commit with the raw rows up to the state's key (the agent holds a station's
newest rows back for a moment: agent/service.py `_plan`). A restart loads the states
(lazily, station by station) and reads no raw row the states have seen (only those above
their keys: what the agent held when it stopped); a station without a state (a
database from before schema 3, or one whose processing version or parameters changed) is
metered from its raw rows once, streamed in key order (`start`).
"""

from __future__ import annotations

import hashlib
import logging
import operator
from collections.abc import Callable, Iterable

from agent import wire
from agent.ledger.engine import FULL, LOCKED, dump_station, load_station
from agent.ledger.inputs import MeterParams, RawMsg, raw_msg
from agent.ledger.meter import Ledger
from agent.ledger.records import PROCESSING_VERSION
from agent.ledger.state import Station
from agent.ocpp import frames
from agent.store import RawRow, Store
from agent.store.sql import LedgerTables

log = logging.getLogger(__name__)

PAGE = 1000  # raw rows per page when catching a station up
_KEY = operator.attrgetter("boot", "seq")  # a message's key: (boot, seq)


def decode_row(r: RawRow) -> RawMsg:
    """A stored raw row as metering input (the same function at ingest, restart, verify):
    a signed message's body, or an OCPP frame's (CONTRACT §11)."""
    if r.kind == frames.KIND:
        proto = frames.proto_of(r.topic)
        body = frames.body_of(
            proto, r.record, r.recv_ms, r.sid, r.boot, r.seq, checked=r.kid == frames.SIGNED_KID
        )
        return raw_msg(r.sid, r.boot, r.seq, r.recv_ms, body, cleaned=frames.cleaned(body))
    return raw_msg(r.sid, r.boot, r.seq, r.recv_ms, wire.decode_record(r.record))


def metered_keys(store: Store) -> dict[str, tuple[int, int]]:
    """Each station's key its records are metered to (its state row): its raw rows at or
    below it are in its records, none above it is. The agent meters a station's messages
    a moment after they are committed (agent/service.py `_plan`: about
    records_interval_ms; a crash leaves them to the restart), so a reader beside it (in
    one snapshot) recomputes the records from the rows up to that key."""
    out = {}
    for sid, (_version, blob) in LedgerTables(store, decode_row).state_sids().items():
        key = load_station(blob).key
        if key is not None:
            out[sid] = key
    return out


def state_version(params: MeterParams) -> str:
    """What a stored state was made with: the processing version and the parameters (a
    state made under others is not resumed: the station is metered again from raw)."""
    h = hashlib.sha256(repr(params).encode()).hexdigest()[:12]
    return f"{PROCESSING_VERSION}:{h}"


def _digest(blob: bytes) -> bytes:
    return hashlib.blake2b(blob, digest_size=16).digest()


class StoreMeter:
    def __init__(self, params: MeterParams, store: Store, *, ckpt_every: int | None = None) -> None:
        self.params = params
        self.store = store
        self.tables = LedgerTables(store, decode_row)
        self.version = state_version(params)
        self.ledger = Ledger(params, self.tables, ckpt_every=ckpt_every, loader=self._load)
        self.conflicts = 0
        # (sid, view) -> digest of the state row as this meter last read or wrote it: an
        # unchanged state (a lock's view that got no message) is not written again
        self._saved: dict[tuple[str, int], bytes] = {}

    def _load(self, sid: str, view: int) -> Station | None:
        x = self.tables.load_state(sid, view)
        if x is None or x[0] != self.version:
            return None
        self._saved[(sid, view)] = _digest(x[1])
        return load_station(x[1])

    @property
    def rows_read(self) -> int:
        return self.ledger.rows_read

    def add(self, msgs: Iterable[RawMsg]) -> set[str]:
        """Meter messages just stored (in the caller's transaction); returns their sids."""
        by_sid: dict[str, list[RawMsg]] = {}
        for m in msgs:
            by_sid.setdefault(m.sid, []).append(m)
        for sid, lst in by_sid.items():
            lst.sort(key=_KEY)
            try:
                self.ledger.process(sid, lst)
                self.save(sid)
            except BaseException:
                self.tables.discard()  # the caller rolls this step back
                raise
        return set(by_sid)

    def save(self, sid: str) -> None:
        """The station's records put by this step, then its state rows (when changed)."""
        self.tables.flush()
        for e in self.ledger.engines():
            st = e.stations.get(sid)
            if st is not None:
                blob = dump_station(st)
                d = _digest(blob)
                if self._saved.get((sid, e.view)) != d:
                    self.tables.put_state(sid, e.view, self.version, blob)
                    self._saved[(sid, e.view)] = d

    def key_of(self, sid: str) -> tuple[int, int] | None:
        """The key of the last message the station is metered to (its state, loaded when
        not in memory), None when it has none: not metered yet."""
        return self.ledger.full.station(sid).key

    def forget(self, sid: str) -> None:
        """Drop a station's in-memory state (it is loaded again from its state row; call
        it whenever the row may differ from what this meter wrote: a rollback)."""
        self.tables.discard()
        self.ledger.forget(sid)
        for view in (FULL, LOCKED):
            self._saved.pop((sid, view), None)

    def rebuild(self, sid: str) -> None:
        """Meter a station from its raw rows alone (in the caller's transaction)."""
        self.forget(sid)
        self.tables.forget_station(sid)
        for e in self.ledger.engines():
            e.rebuild(sid)
        self.ledger.finish(sid)
        self.save(sid)

    def catch_up(self, sid: str) -> None:
        """Meter the raw rows a station's state has not seen (above its key)."""
        st = self.ledger.full.station(sid)
        key = st.key if st.key is not None else (-1, -1)
        if not self.store.raw_after(sid, key):
            return
        page: list[RawMsg] = []
        for r in self.store.iter_raw_keys(sid, (key[0], key[1] + 1), page=PAGE):
            page.append(decode_row(r))
            if len(page) >= PAGE:
                self.ledger.process(sid, page)
                page = []
        if page:
            self.ledger.process(sid, page)
        self.save(sid)

    def start(
        self, sids: Iterable[str], *, only: Callable[[str], bool] | None = None
    ) -> tuple[int, int]:
        """At start: every station of `sids` without a usable state is metered from raw, one
        with a state catches up on rows above its key; `only`: the stations this agent
        writes (its shards, agent/cluster.py), None for all. Returns (stations rebuilt,
        raw rows read)."""
        n0 = self.store.raw_rows_read
        states = self.tables.state_sids()
        rebuilt = 0
        for sid in sorted(set(sids) | set(states)):
            if only is not None and not only(sid):
                continue
            s = states.get(sid)
            if s is None or s[0] != self.version:
                if s is None and not self.store.raw_after(sid, (-1, -1)):
                    continue
                log.info("metering %s from its raw messages (no usable state)", sid)
                with self.store.transaction():
                    self.rebuild(sid)
                rebuilt += 1
                continue
            st = load_station(s[1])
            key = st.key if st.key is not None else (-1, -1)
            if self.store.raw_after(sid, key):  # a transaction only when there is work
                with self.store.transaction():
                    self.catch_up(sid)
        return rebuilt, self.store.raw_rows_read - n0
