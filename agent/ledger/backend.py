"""What the engine reads and writes besides its own state: the raw messages (to re-apply
a span after a late message), the checkpoints, and the records.

`Backend` is the interface; `MemoryBackend` keeps all of it in memory (compute(), the
tests, `stationctl verify` per station with the raw read from the store); the agent's
store implements the same methods on its tables (agent/store/sqlite.py, `LedgerTables`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import Protocol

from agent.ledger.inputs import RawMsg
from agent.ledger.records import DAY_MS, Record, day_record, make_record_id, record_id
from agent.ledger.state import Key


class Checkpoint:
    """A snapshot of a station's state taken just before the message at `key`, and the
    lowest interval each stream touched between the checkpoint before it and this one."""

    __slots__ = ("blob", "key", "lows")

    def __init__(self, key: Key, blob: bytes, lows: dict[int, int]) -> None:
        self.key = key
        self.blob = blob
        self.lows = lows


class Backend(Protocol):
    # raw messages of a station with key >= start, in (boot, seq) order
    def raw_from(self, sid: str, start: Key) -> Iterable[RawMsg]: ...

    # raw messages of one boot of a station, in seq order
    def raw_boot(self, sid: str, boot: int) -> Iterable[RawMsg]: ...

    # checkpoints of (sid, view)
    def checkpoint_before(self, sid: str, view: int, key: Key) -> Checkpoint | None: ...
    def checkpoint_prior(self, sid: str, view: int, key: Key) -> Checkpoint | None: ...
    def first_checkpoint_of_boot(self, sid: str, view: int, boot: int) -> Checkpoint | None: ...
    def checkpoints_after(self, sid: str, view: int, key: Key) -> Iterable[Checkpoint]: ...
    def put_checkpoint(self, sid: str, view: int, ck: Checkpoint) -> None: ...
    def drop_checkpoints_after(self, sid: str, view: int, key: Key) -> None: ...

    # records
    def get_record(self, rid: str) -> Record | None: ...
    def put_record(self, r: Record) -> None: ...
    def delete_record(self, rid: str) -> None: ...
    # interval records (not adjustments) of a stream with start >= start_ms, < end_ms
    # (returns the UTC day indexes they were in)
    def delete_intervals(
        self, sid: str, slot: int, start_ms: int, end_ms: int | None
    ) -> set[int]: ...
    # session records of a station whose end event is at or after key
    def delete_sessions_from(self, sid: str, key: Key) -> None: ...
    # the day record of a stream: its interval records (adjustments included) of one UTC
    # day rolled up (agent.ledger.records.day_record), None when it has none
    def day_roll(self, sid: str, slot: int, day: int) -> Record | None: ...


class MemoryBackend:
    """Everything in memory. With `keep_raw` False, raw messages come from `raw_source`
    (the store, for verify) instead of being kept."""

    def __init__(self) -> None:
        self.raw: dict[str, dict[Key, RawMsg]] = {}
        self._keys: dict[str, list[Key]] = {}
        self.ckpts: dict[tuple[str, int], list[Checkpoint]] = {}
        self.records: dict[str, dict[str, Record]] = {}
        self.touched: dict[str, dict[str, Record | None]] = {}  # rid -> record (None: gone)

    # ---- raw ---------------------------------------------------------------------------

    def store_raw(self, m: RawMsg) -> RawMsg | None:
        """Keep m; returns the copy already kept under its key, if any (it stays)."""
        d = self.raw.setdefault(m.sid, {})
        old = d.get((m.boot, m.seq))
        if old is not None:
            return old
        d[(m.boot, m.seq)] = m
        keys = self._keys.setdefault(m.sid, [])
        k = (m.boot, m.seq)
        if not keys or k > keys[-1]:
            keys.append(k)
        else:
            bisect.insort(keys, k)
        return None

    def replace_raw(self, m: RawMsg) -> None:
        self.raw[m.sid][(m.boot, m.seq)] = m

    def raw_from(self, sid: str, start: Key) -> Iterator[RawMsg]:
        keys = self._keys.get(sid, [])
        d = self.raw[sid]
        for k in keys[bisect.bisect_left(keys, start) :]:
            yield d[k]

    def raw_boot(self, sid: str, boot: int) -> Iterator[RawMsg]:
        keys = self._keys.get(sid, [])
        d = self.raw[sid]
        for k in keys[bisect.bisect_left(keys, (boot, -1)) :]:
            if k[0] != boot:
                return
            yield d[k]

    # ---- checkpoints -------------------------------------------------------------------

    def _ck(self, sid: str, view: int) -> list[Checkpoint]:
        return self.ckpts.setdefault((sid, view), [])

    def checkpoint_before(self, sid: str, view: int, key: Key) -> Checkpoint | None:
        lst = self._ck(sid, view)
        i = bisect.bisect_right(lst, key, key=_ckey)
        return lst[i - 1] if i else None

    def checkpoint_prior(self, sid: str, view: int, key: Key) -> Checkpoint | None:
        lst = self._ck(sid, view)
        i = bisect.bisect_left(lst, key, key=_ckey)
        return lst[i - 1] if i else None

    def first_checkpoint_of_boot(self, sid: str, view: int, boot: int) -> Checkpoint | None:
        lst = self._ck(sid, view)
        i = bisect.bisect_left(lst, (boot, -1), key=_ckey)
        return lst[i] if i < len(lst) and lst[i].key[0] == boot else None

    def checkpoints_after(self, sid: str, view: int, key: Key) -> list[Checkpoint]:
        lst = self._ck(sid, view)
        return lst[bisect.bisect_right(lst, key, key=_ckey) :]

    def put_checkpoint(self, sid: str, view: int, ck: Checkpoint) -> None:
        lst = self._ck(sid, view)
        i = bisect.bisect_left(lst, ck.key, key=_ckey)
        if i < len(lst) and lst[i].key == ck.key:
            lst[i] = ck
        else:
            lst.insert(i, ck)

    def drop_checkpoints_after(self, sid: str, view: int, key: Key) -> None:
        lst = self._ck(sid, view)
        del lst[bisect.bisect_right(lst, key, key=_ckey) :]

    # ---- records -----------------------------------------------------------------------

    def get_record(self, rid: str) -> Record | None:
        return self.records.get(rid.split("/", 2)[1], {}).get(rid)

    def put_record(self, r: Record) -> None:
        rid = record_id(r)
        self.records.setdefault(r.sid, {})[rid] = r
        self.touched.setdefault(r.sid, {})[rid] = r

    def delete_record(self, rid: str) -> None:
        sid = rid.split("/", 2)[1]
        if self.records.get(sid, {}).pop(rid, None) is not None:
            self.touched.setdefault(sid, {})[rid] = None

    def delete_intervals(self, sid: str, slot: int, start_ms: int, end_ms: int | None) -> set[int]:
        recs = self.records.get(sid)
        days: set[int] = set()
        if not recs:
            return days
        for rid, r in list(recs.items()):
            if (
                r.kind == "interval"
                and r.slot == slot
                and "adjustment" not in r.flags
                and r.start_ms >= start_ms
                and (end_ms is None or r.start_ms < end_ms)
            ):
                self.delete_record(rid)
                days.add(r.start_ms // DAY_MS)
        return days

    def delete_sessions_from(self, sid: str, key: Key) -> None:
        recs = self.records.get(sid)
        if not recs:
            return
        for rid, r in list(recs.items()):
            if r.kind == "session" and r.to_key >= key:
                self.delete_record(rid)

    def day_roll(self, sid: str, slot: int, day: int) -> Record | None:
        lo = day * DAY_MS
        return day_record(
            sid,
            slot,
            day,
            [
                r
                for r in self.records.get(sid, {}).values()
                if r.kind == "interval" and r.slot == slot and lo <= r.start_ms < lo + DAY_MS
            ],
        )

    def forget(self, sid: str) -> None:
        self.raw.pop(sid, None)
        self._keys.pop(sid, None)
        for k in [k for k in self.ckpts if k[0] == sid]:
            del self.ckpts[k]
        self.records.pop(sid, None)
        self.touched.pop(sid, None)


def _ckey(c: Checkpoint) -> Key:
    return c.key


def interval_rid(sid: str, slot: int, start_ms: int) -> str:
    return make_record_id("interval", sid, slot, start_ms=start_ms)
