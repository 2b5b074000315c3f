"""`IncrementalMeter`: records kept up to date as messages arrive, equal to compute() over
all of them (rule 7).

It drives one engine (agent/ledger/engine.py) over every message and, with a lock (rule
8), a second one over the messages received by the lock, both on one backend
(agent/ledger/backend.py: in memory by default; the agent's store in the service); then
it makes what depends on both or on many interval records: rule-8 adjustment records and
day roll-ups, and reports the records created, changed or gone since the last call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from agent.ledger.backend import Backend, MemoryBackend
from agent.ledger.engine import FULL, LOCKED, Engine, adjustment_record, usable
from agent.ledger.inputs import DEFAULT_PARAMS, MeterParams, RawMsg
from agent.ledger.records import DAY_MS, Record, make_record_id, record_sort_key
from agent.ledger.state import Station

log = logging.getLogger(__name__)


class Ledger:
    """The engines of one backend, and what they make together (adjustments, days)."""

    def __init__(
        self,
        params: MeterParams,
        backend: Backend,
        *,
        ckpt_every: int | None = None,
        loader: Callable[[str, int], Station | None] | None = None,
    ) -> None:
        self.params = params
        self.backend = backend
        self.full = Engine(params, backend, FULL, ckpt_every=ckpt_every, loader=loader)
        self.locked: Engine | None = None
        self.locked_at = 0
        if params.locked_until_ms is not None:
            self.locked = Engine(params, backend, LOCKED, ckpt_every=ckpt_every, loader=loader)
            self.locked_at = (
                params.locked_at_ms if params.locked_at_ms is not None else params.locked_until_ms
            )
        self.days_due: dict[str, set[tuple[int, int]]] = {}

    @property
    def rows_read(self) -> int:
        return self.full.rows_read + (self.locked.rows_read if self.locked else 0)

    def engines(self) -> list[Engine]:
        return [self.full] if self.locked is None else [self.full, self.locked]

    def process(
        self,
        sid: str,
        new: list[RawMsg],
        boot_start: int | None = None,
        newly_early: Iterable[RawMsg] = (),
    ) -> None:
        """New messages of one station (in the backend already), sorted by key."""
        self.full.process(sid, new, boot_start)
        if self.locked is not None:
            la = self.locked_at
            early = sorted(
                [m for m in new if m.recv_ms <= la] + list(newly_early),
                key=lambda m: (m.boot, m.seq),
            )
            if early or boot_start is not None:
                self.locked.process(sid, early, boot_start)
        self.finish(sid)

    def finish(self, sid: str, days: bool = True) -> None:
        """Write what the station's processing changed: intervals, sessions, adjustments,
        and (days=True) the day roll-ups."""
        due = self.days_due.setdefault(sid, set())
        for e in self.engines():
            e.flush(sid)
            due |= e.days.pop(sid, set())
        if self.locked is not None:
            self._adjustments(sid, due)
        if days:
            self.roll_days(sid)

    def roll_days(self, sid: str) -> None:
        be = self.backend
        for n, d in sorted(self.days_due.pop(sid, set())):
            # the full engine's state knows the day of each stream's open interval (no
            # records read back; with a lock, a day after the first open interval's); an
            # older day, or a locked one, the backend rolls up
            known, r = self.full.day_record(sid, n, d)
            if not known:
                r = be.day_roll(sid, n, d)
            if r is None:
                be.delete_record(make_record_id("day", sid, n, start_ms=d * DAY_MS))
            else:
                be.put_record(r)

    def _adjustments(self, sid: str, due: set[tuple[int, int]]) -> None:
        assert self.locked is not None
        # (loaded from the backend if this batch did not need it: its totals count)
        fst = self.full.station(sid)
        lst = self.locked.station(sid)
        slots = set(fst.streams) | set(lst.streams)
        iv = self.params.interval_ms
        fo = self.full.first_open
        assert fo is not None
        for n in sorted(slots):
            r = adjustment_record(
                self.params,
                sid,
                n,
                fst.streams.get(n),
                lst.streams.get(n),
            )
            rid = make_record_id("interval", sid, n, start_ms=fo * iv, adjustment=True)
            old = self.backend.get_record(rid)
            if r is None:
                if old is not None:
                    self.backend.delete_record(rid)
                    due.add((n, fo * iv // DAY_MS))
            elif old != r:
                self.backend.put_record(r)
                due.add((n, fo * iv // DAY_MS))

    def forget(self, sid: str) -> None:
        for e in self.engines():
            e.stations.pop(sid, None)
            e.days.pop(sid, None)
        self.days_due.pop(sid, None)


class IncrementalMeter:
    """Records kept up to date as messages arrive; equal to compute() over all of them.
    Keeps the raw messages (its backend's) and records in memory: for compute(), tests and
    tools; the agent runs the same Ledger on its store (agent/store/sqlite.py)."""

    def __init__(
        self, params: MeterParams = DEFAULT_PARAMS, *, ckpt_every: int | None = None
    ) -> None:
        self.params = params
        self.backend = MemoryBackend()
        self.ledger = Ledger(params, self.backend, ckpt_every=ckpt_every)
        self.conflicts = 0
        self._la = self.ledger.locked_at if self.ledger.locked is not None else None

    def sids(self) -> list[str]:
        return sorted(self.backend.raw)

    def add(self, msgs: Iterable[RawMsg]) -> set[str]:
        """Add messages; returns the sids that received at least one new message."""
        by_sid: dict[str, list[RawMsg]] = {}
        for m in msgs:
            by_sid.setdefault(m.sid, []).append(m)
        changed: set[str] = set()
        be = self.backend
        for sid, lst in by_sid.items():
            lst.sort(key=lambda m: (m.boot, m.seq))
            new: list[RawMsg] = []
            boot_start: int | None = None
            newly_early: list[RawMsg] = []
            for m in lst:
                if not usable(m):
                    log.warning(
                        "metering: %s/%s/%s without a usable up/seq ignored", sid, m.boot, m.seq
                    )
                    continue
                old = be.store_raw(m)
                if old is None:
                    new.append(m)
                    continue
                if old.body != m.body:
                    self.conflicts += 1
                    log.warning(
                        "metering: conflicting copies of %s/%d/%d, keeping the first",
                        sid,
                        m.boot,
                        m.seq,
                    )
                    continue
                if m.recv_ms < old.recv_ms:
                    # of identical copies the earliest receive time counts (rule 5 time_est)
                    be.replace_raw(m)
                    if boot_start is None or m.boot < boot_start:
                        boot_start = m.boot
                    la = self._la
                    if la is not None and m.recv_ms <= la < old.recv_ms:
                        newly_early.append(m)
            if not new and boot_start is None:
                continue
            changed.add(sid)
            self.ledger.process(sid, new, boot_start, newly_early)
        return changed

    def evict(self, sid: str) -> None:
        """Forget a station (its messages, rule state and records). Adding its messages
        again rebuilds it exactly."""
        self.ledger.forget(sid)
        self.backend.forget(sid)

    def records(self, sid: str) -> list[Record]:
        """All records of one station, sorted as compute() sorts them."""
        self.changes(sid)
        return sorted(self.backend.records.get(sid, {}).values(), key=record_sort_key)

    def changes(self, sid: str, *, days: bool = True) -> tuple[list[Record], list[str]]:
        """Records of sid created or changed since the last call for sid, and the ids of
        records that no longer exist. days=False leaves the day roll-ups pending."""
        if days:
            self.ledger.roll_days(sid)
        t = self.backend.touched.pop(sid, {})
        ups = [r for r in t.values() if r is not None]
        gone = [rid for rid, r in t.items() if r is None]
        return ups, gone
