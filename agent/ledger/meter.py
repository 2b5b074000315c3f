"""`IncrementalMeter`: records kept up to date as messages arrive, equal to compute() over
all of them (rule 7).

It drives one engine over every message and, with a lock (rule 8), a second one over the
messages received by the lock; then it materializes what changed: interval records (the
sum of a stream's contributions to one interval), rule-8 adjustment records, day
roll-ups and session records, and reports them with the ids of records that are gone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agent.ledger.engine import Engine
from agent.ledger.inputs import DEFAULT_PARAMS, MeterParams, RawMsg
from agent.ledger.records import (
    DAY_MS,
    F_ADJUSTMENT,
    PROCESSING_VERSION,
    Record,
    flag_names,
    make_record,
    make_record_id,
    record_sort_key,
)
from agent.ledger.sessions import session_record, sessions_to_remake
from agent.ledger.state import Station, Stream

# a materialized record in a view: ("interval", slot, k, adj), ("day", slot, day) or
# ("session", slot, end key)
_CacheKey = tuple[Any, ...]


def _interval_record(s: Stream, k: int, iv: int, sid: str) -> Record | None:
    """The interval record of stream s in interval k: the sum of its contributions there,
    flags united, from the first contribution's from-point to the last's to-point."""
    lst = s.by_interval.get(k)
    if not lst:
        return None
    a0 = lst[0]
    if len(lst) == 1:
        mwh, held, fl = a0.mwh, a0.held, a0.flags
        z = a0
    else:
        mwh = held = fl = 0
        for a in lst:
            mwh += a.mwh
            held += a.held
            fl |= a.flags
        z = lst[-1]
    return make_record(
        "interval",
        sid,
        s.slot,
        k * iv,
        k * iv + iv,
        mwh,
        held,
        flag_names(fl),
        a0.from_key,
        z.to_key,
        a0.from_value,
        z.to_value,
    )


class _DayAcc:
    """Running roll-up of one stream's interval records within one UTC day."""

    __slots__ = ("flag_counts", "held", "hi", "lo", "mwh", "pos")

    def __init__(self) -> None:
        self.mwh = 0
        self.held = 0
        self.flag_counts: dict[str, int] = {}  # flag -> number of interval records with it
        self.pos: set[int] = set()  # 2k + adj of the records in the day
        self.lo = 0
        self.hi = -1


class _View:
    """Materialized records of one station (rule 8 combines two engines here)."""

    def __init__(self) -> None:
        self.cache: dict[_CacheKey, Record] = {}
        self.days: dict[tuple[int, int], _DayAcc] = {}
        self.ddays: set[tuple[int, int]] = set()  # (slot, day) whose record is out of date


class IncrementalMeter:
    """Records kept up to date as messages arrive; equal to compute() over all of them."""

    def __init__(self, params: MeterParams = DEFAULT_PARAMS) -> None:
        self.params = params
        self._full = Engine(params)
        self._locked: Engine | None = None
        self._locked_at = 0
        if params.locked_until_ms is not None:
            self._locked = Engine(params)
            self._locked_at = (
                params.locked_at_ms if params.locked_at_ms is not None else params.locked_until_ms
            )
        self._views: dict[str, _View] = {}
        self._per_day = DAY_MS // params.interval_ms

    @property
    def conflicts(self) -> int:
        """Messages ignored because another copy with other contents came first."""
        return self._full.conflicts

    def sids(self) -> list[str]:
        return sorted(self._full.stations)

    def add(self, msgs: Iterable[RawMsg]) -> set[str]:
        """Add messages; returns the sids that received at least one new message (a
        superset of those whose records changed: every new reading changes a record)."""
        lst = msgs if isinstance(msgs, list) else list(msgs)
        changed = self._full.add(lst)
        if self._locked is not None:
            la = self._locked_at
            early = [m for m in lst if m.recv_ms <= la]
            if early:
                changed |= self._locked.add(early)
        return changed

    def evict(self, sid: str) -> None:
        """Forget a station (its messages, rule state and records) to free memory. Adding
        its messages again (from the raw store) rebuilds it exactly."""
        self._full.stations.pop(sid, None)
        if self._locked is not None:
            self._locked.stations.pop(sid, None)
        self._views.pop(sid, None)

    def records(self, sid: str) -> list[Record]:
        """All records of one station, sorted as compute() sorts them."""
        if sid not in self._full.stations:
            return []
        self.changes(sid)
        return sorted(self._views[sid].cache.values(), key=record_sort_key)

    def changes(self, sid: str, *, days: bool = True) -> tuple[list[Record], list[str]]:
        """Records of sid created or changed since the last call for sid, and the
        record_id()s of records that no longer exist. Costs the changed records only.
        days=False leaves the day roll-ups pending until a call with days=True (a day
        record changes with every reading: deferring it halves the cost per message)."""
        st = self._full.stations.get(sid)
        if st is None:
            return [], []
        v = self._views.get(sid)
        if v is None:
            v = self._views[sid] = _View()
        iv = self.params.interval_ms
        up: dict[_CacheKey, Record] = {}
        gone: dict[_CacheKey, None] = {}
        ddays = v.ddays
        first_open = self._full.first_open
        adj: set[int] = set()
        put = self._put
        for n, s in st.streams.items():
            if s.dirty:
                for k in s.dirty:
                    if first_open is not None and k < first_open:
                        adj.add(n)  # locked intervals come from the locked view
                    else:
                        put(v, n, k, 0, _interval_record(s, k, iv, sid), up, gone)
                s.dirty.clear()
        if self._locked is not None and first_open is not None:
            lst = self._locked.stations.get(sid)
            if lst is not None:
                for n, s in lst.streams.items():
                    if s.dirty:
                        for k in s.dirty:
                            if k < first_open:
                                adj.add(n)
                                put(v, n, k, 0, _interval_record(s, k, iv, sid), up, gone)
                        s.dirty.clear()
            for n in adj:
                put(v, n, first_open, 1, self._adjustment(sid, n), up, gone)
        if days and ddays:
            cache = v.cache
            for dk in ddays:
                ck = ("day", *dk)
                r = self._day(v, sid, dk)
                if r is None:
                    if cache.pop(ck, None) is not None:
                        gone[ck] = None
                else:
                    cache[ck] = r
                    up[ck] = r
            ddays.clear()
        self._sessions(st, v, up)
        return list(up.values()), [self._record_id(sid, ck) for ck in gone]

    def _put(
        self,
        v: _View,
        n: int,
        k: int,
        adj: int,
        r: Record | None,
        up: dict[_CacheKey, Record],
        gone: dict[_CacheKey, None],
    ) -> None:
        """Set (or, r None, remove) the interval record (n, k, adj) and keep its day's
        roll-up current."""
        ck = ("interval", n, k, adj)
        cache = v.cache
        old = cache.get(ck)
        if old is None and r is None:
            return
        dk = (n, k // self._per_day)
        v.ddays.add(dk)
        da = v.days.get(dk)
        if da is None:
            da = v.days[dk] = _DayAcc()
        fl = da.flag_counts
        pos = 2 * k + adj
        if old is not None:
            da.mwh -= old.mwh
            da.held -= old.held_mwh
            for f in old.flags:
                c = fl[f] - 1
                if c:
                    fl[f] = c
                else:
                    del fl[f]
        if r is None:
            del cache[ck]
            up.pop(ck, None)
            gone[ck] = None
            da.pos.discard(pos)
            if da.pos and (pos == da.lo or pos == da.hi):
                da.lo = min(da.pos)
                da.hi = max(da.pos)
        else:
            cache[ck] = r
            up[ck] = r
            if gone:
                gone.pop(ck, None)
            da.mwh += r.mwh
            da.held += r.held_mwh
            for f in r.flags:
                fl[f] = fl.get(f, 0) + 1
            if old is None:
                if not da.pos:
                    da.lo = da.hi = pos
                elif pos < da.lo:
                    da.lo = pos
                elif pos > da.hi:
                    da.hi = pos
                da.pos.add(pos)

    def _day(self, v: _View, sid: str, dk: tuple[int, int]) -> Record | None:
        """The day record of (slot, day): its interval records rolled up."""
        da = v.days.get(dk)
        if da is None or not da.pos:
            v.days.pop(dk, None)
            return None
        n, d = dk
        a = v.cache[("interval", n, da.lo >> 1, da.lo & 1)]
        z = v.cache[("interval", n, da.hi >> 1, da.hi & 1)]
        return make_record(
            "day",
            sid,
            n,
            d * DAY_MS,
            d * DAY_MS + DAY_MS,
            da.mwh,
            da.held,
            tuple(sorted(da.flag_counts)) if da.flag_counts else (),
            a.from_key,
            z.to_key,
            a.e_from,
            z.e_to,
        )

    def _sessions(self, st: Station, v: _View, up: dict[_CacheKey, Record]) -> None:
        for key in sessions_to_remake(st):
            r, ok = session_record(st, key)
            if ok:
                st.sess_pending.discard(key)
            else:
                st.sess_pending.add(key)
            ck = ("session", r.slot, key)
            if v.cache.get(ck) != r:
                v.cache[ck] = r
                up[ck] = r

    def _record_id(self, sid: str, ck: _CacheKey) -> str:
        """record_id() of the record a view's cache key names."""
        if ck[0] == "session":
            return make_record_id("session", sid, ck[1], end_key=ck[2])
        if ck[0] == "day":
            # NB: a day record whose flags include "adjustment" (a rule-8 adjustment in
            # that day) has record_id() ".../adj": this name and the stored one differ
            return make_record_id("day", sid, ck[1], start_ms=ck[2] * DAY_MS)
        return make_record_id(
            "interval", sid, ck[1], start_ms=ck[2] * self.params.interval_ms, adjustment=bool(ck[3])
        )

    def _adjustment(self, sid: str, n: int) -> Record | None:
        """Rule 8: stream n's adjustment record: revised − locked totals of the locked
        intervals, in the first open interval (None when they agree)."""
        full = self._full
        lk = self._locked
        assert lk is not None and full.first_open is not None
        first_open = full.first_open
        iv = self.params.interval_ms
        fs = full.stations[sid].streams.get(n)
        lst = lk.stations.get(sid)
        ls = lst.streams.get(n) if lst is not None else None
        f_sum, f_held = (fs.locked_mwh, fs.locked_held) if fs is not None else (0, 0)
        l_sum, l_held = (ls.locked_mwh, ls.locked_held) if ls is not None else (0, 0)
        if f_sum == l_sum and f_held == l_held:
            return None
        assert fs is not None
        ks = [k for k in fs.by_interval if k < first_open]
        first = _interval_record(fs, min(ks), iv, sid) if ks else None
        last = _interval_record(fs, max(ks), iv, sid) if ks else None
        return Record(
            kind="interval",
            sid=sid,
            slot=n,
            start_ms=first_open * iv,
            end_ms=first_open * iv + iv,
            mwh=f_sum - l_sum,
            held_mwh=f_held - l_held,
            flags=flag_names(F_ADJUSTMENT),
            from_key=first.from_key if first else (0, 0),
            to_key=last.to_key if last else (0, 0),
            e_from=first.e_from if first else 0,
            e_to=last.e_to if last else 0,
            version=PROCESSING_VERSION,
            extra={
                "locked_until_ms": self.params.locked_until_ms,
                "locked_mwh": l_sum,
                "revised_mwh": f_sum,
                "locked_held_mwh": l_held,
                "revised_held_mwh": f_held,
            },
        )
