"""The metering engine's state, per station: small and bounded, never the messages.

Per station: the key of the last message processed, the current boot's facts (clock,
restored values, message count and last seq for `gap`), the clock of the boot before it,
and per register stream the rule state (mark, last reading, held reading, serial), the
accumulators of its open intervals, the rule-8 totals and the register ranges credited in
its last two boots (the session cross-check); plus bounded session bookkeeping (recent
`session_start`s, sessions whose register check may still change).

`dump()` gives plain lists/dicts of ints and strings (msgpack-able), `Station.load()`
reads them back: that is what the state row and the checkpoints store.

Vocabulary:
- stream: one register of one station: slot 0 is the grid meter (`meter.e_wh` x 1000, in
  mWh), slots 1..16 the battery-side `slots[].e_mwh`.
- point: (key, register value) where key = (boot, seq); (boot, -1) is the value restored
  at the start of that boot (`b_mwh` / the boot event's `restored`), before any message.
- segment: one credit (or held amount, or nothing) between two points of a stream, with
  the time span it is spread over and the flags that shaped it; its shares go to
  UTC-aligned intervals, whose records are their sums (`Acc`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.ledger import reads, rules

Key = tuple[int, int]  # (boot, seq); seq -1: the value restored at the boot's start

MAX_RANGES = 64  # register ranges kept per stream and boot (session cross-check)
MAX_STARTS = 64  # session_start events remembered per station (matching)


class Acc:
    """One stream's sum in one interval: credited, held, flags, first from-point and last
    to-point (processing order); `dirty`: changed since its record was last written (not
    serialized: a loaded state's records are written; a re-apply marks its snapshot's)."""

    __slots__ = ("dirty", "flags", "from_key", "from_value", "held", "mwh", "to_key", "to_value")

    def __init__(
        self,
        mwh: int,
        held: int,
        flags: int,
        from_key: Key,
        from_value: int,
        to_key: Key,
        to_value: int,
    ) -> None:
        self.mwh = mwh
        self.held = held
        self.flags = flags
        self.from_key = from_key
        self.from_value = from_value
        self.to_key = to_key
        self.to_value = to_value
        self.dirty = True

    def dump(self) -> list[Any]:
        return [
            self.mwh,
            self.held,
            self.flags,
            *self.from_key,
            self.from_value,
            *self.to_key,
            self.to_value,
        ]

    @staticmethod
    def load(x: list[Any]) -> Acc:
        a = Acc(x[0], x[1], x[2], (x[3], x[4]), x[5], (x[6], x[7]), x[8])
        a.dirty = False
        return a


class DaySum:
    """The roll-up of a stream's closed interval records (k < floor) of day `d`, the day of
    its floor: with the open accumulators of that day it is the day record, made without
    reading the day's records back (the engine keeps it only when nothing is locked)."""

    __slots__ = ("d", "flags", "from_key", "from_value", "held", "mwh", "n", "to_key", "to_value")

    def __init__(self, d: int) -> None:
        self.d = d
        self.n = 0  # records rolled up
        self.mwh = 0
        self.held = 0
        self.flags = 0
        self.from_key: Key = (0, 0)  # of the first record (lowest interval)
        self.from_value = 0
        self.to_key: Key = (0, 0)  # of the last
        self.to_value = 0

    def add(self, a: Acc) -> None:
        """Roll up the record of a's interval, the next one in interval order."""
        if not self.n:
            self.from_key = a.from_key
            self.from_value = a.from_value
        self.n += 1
        self.mwh += a.mwh
        self.held += a.held
        self.flags |= a.flags
        self.to_key = a.to_key
        self.to_value = a.to_value

    def dump(self) -> list[int]:
        return [
            self.d,
            self.n,
            self.mwh,
            self.held,
            self.flags,
            *self.from_key,
            self.from_value,
            *self.to_key,
            self.to_value,
        ]

    @staticmethod
    def load(x: list[int]) -> DaySum:
        ds = DaySum(x[0])
        ds.n, ds.mwh, ds.held, ds.flags = x[1], x[2], x[3], x[4]
        ds.from_key = (x[5], x[6])
        ds.from_value = x[7]
        ds.to_key = (x[8], x[9])
        ds.to_value = x[10]
        return ds


class Stream:
    """Rule state of one register stream and its open intervals."""

    __slots__ = (
        "accs",
        "boot",
        "day",
        "floor",
        "held_up",
        "held_value",
        "last_key",
        "last_pos",
        "last_t",
        "last_value",
        "lk_hi",
        "lk_lo",
        "locked_held",
        "locked_mwh",
        "low",
        "mark",
        "mark_up",
        "rhist",
        "serial",
        "slot",
        "tail",
    )

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.boot: int | None = None  # boot of the last point (None: no baseline yet)
        self.mark = 0  # highest value credited so far in this boot (rule 2)
        self.mark_up = 0  # uptime of the reading that set the mark (rule 6)
        self.last_t = 0  # last point: time, key, value, position in its boot
        self.last_key: Key = (0, 0)
        self.last_value = 0
        self.last_pos = 0
        self.held_value: int | None = None  # pending held reading (rule 6): value, uptime
        self.held_up = 0
        self.serial: Any = None  # meter serial number last seen (rule 4)
        # (last seq, message count, unsynced) of the stream's boot once that boot ended
        self.tail: tuple[int, int, bool] | None = None
        # every interval k >= floor the stream contributed to is in accs (a few: the
        # current one, and any later one a clock running backwards left open)
        self.floor: int | None = None
        self.accs: dict[int, Acc] = {}
        # the closed records of the floor's day rolled up (None: not known, e.g. an
        # interval below the floor was reopened, or a state from before this field)
        self.day: DaySum | None = None
        self.low: int | None = None  # lowest interval touched since the last checkpoint
        # rule 8: credited / held in locked intervals; (k, key, value) of the first
        # contribution to the lowest locked interval and of the last to the highest
        self.locked_mwh = 0
        self.locked_held = 0
        self.lk_lo: tuple[int, Key, int] | None = None
        self.lk_hi: tuple[int, Key, int] | None = None
        # register ranges [lo, hi] credited, per boot with readings (the last two)
        self.rhist: list[tuple[int, list[list[int]]]] = []

    def dump(self) -> list[Any]:
        return [
            self.slot,
            self.boot,
            self.mark,
            self.mark_up,
            self.last_t,
            list(self.last_key),
            self.last_value,
            self.last_pos,
            self.held_value,
            self.held_up,
            self.serial,
            list(self.tail) if self.tail is not None else None,
            self.floor,
            {k: a.dump() for k, a in self.accs.items()},
            self.locked_mwh,
            self.locked_held,
            _dump_lk(self.lk_lo),
            _dump_lk(self.lk_hi),
            [[b, [list(r) for r in rs]] for b, rs in self.rhist],
            self.day.dump() if self.day is not None else None,
        ]

    @staticmethod
    def load(x: list[Any]) -> Stream:
        s = Stream(x[0])
        s.boot = x[1]
        s.mark = x[2]
        s.mark_up = x[3]
        s.last_t = x[4]
        s.last_key = (x[5][0], x[5][1])
        s.last_value = x[6]
        s.last_pos = x[7]
        s.held_value = x[8]
        s.held_up = x[9]
        s.serial = x[10]
        s.tail = (x[11][0], x[11][1], bool(x[11][2])) if x[11] is not None else None
        s.floor = x[12]
        s.accs = {int(k): Acc.load(a) for k, a in x[13].items()}
        s.locked_mwh = x[14]
        s.locked_held = x[15]
        s.lk_lo = _load_lk(x[16])
        s.lk_hi = _load_lk(x[17])
        s.rhist = [(b, [[lo, hi] for lo, hi in rs]) for b, rs in x[18]]
        # (a state dumped before `day` existed has 19 fields: its day is not known)
        s.day = DaySum.load(x[19]) if len(x) > 19 and x[19] is not None else None
        return s

    def ranges(self, boot: int) -> list[list[int]]:
        """The register ranges credited in `boot` (the current one), made when needed."""
        if self.rhist and self.rhist[-1][0] == boot:
            return self.rhist[-1][1]
        rs: list[list[int]] = []
        self.rhist.append((boot, rs))
        if len(self.rhist) > 2:
            del self.rhist[0]
        return rs


def _dump_lk(x: tuple[int, Key, int] | None) -> list[int] | None:
    return None if x is None else [x[0], x[1][0], x[1][1], x[2]]


def _load_lk(x: list[int] | None) -> tuple[int, Key, int] | None:
    return None if x is None else (x[0], (x[1], x[2]), x[3])


class Boot:
    """The facts rules 3 and 5 need of one boot, and its message count (gaps)."""

    __slots__ = (
        "b_mwh",
        "boot_event_seq",
        "clock",
        "count",
        "est_off",
        "last_seq",
        "no",
        "r_used",
        "restored",
        "sync_off",
        "sync_seq",
    )

    def __init__(self, no: int) -> None:
        self.no = no
        self.count = 0  # messages of this boot processed
        self.last_seq = -1
        self.sync_seq: int | None = None  # lowest seq carrying ts
        self.sync_off = 0  # its ts - up
        self.est_off: int | None = None  # min(recv_ms - up) over the boot's messages
        self.clock: tuple[int, bool] = rules.boot_offset(None, None)
        self.boot_event_seq: int | None = None  # lowest seq of a boot event
        self.restored: dict[int, int] | None = None  # its `restored`
        self.b_mwh: dict[int, tuple[int, int]] = {}  # slot -> (seq, b_mwh) lowest seq
        self.r_used: set[int] = set()  # slots whose r(b) a reading consulted

    def dump(self) -> list[Any]:
        return [
            self.no,
            self.count,
            self.last_seq,
            self.sync_seq,
            self.sync_off,
            self.est_off,
            self.boot_event_seq,
            self.restored,
            {n: list(x) for n, x in self.b_mwh.items()},
            sorted(self.r_used),
        ]

    @staticmethod
    def load(x: list[Any]) -> Boot:
        b = Boot(x[0])
        b.count = x[1]
        b.last_seq = x[2]
        b.sync_seq = x[3]
        b.sync_off = x[4]
        b.est_off = x[5]
        b.boot_event_seq = x[6]
        b.restored = {int(k): v for k, v in x[7].items()} if x[7] is not None else None
        b.b_mwh = {int(n): (v[0], v[1]) for n, v in x[8].items()}
        b.r_used = set(x[9])
        b.update_clock()
        return b

    def facts(self) -> Boot:
        """A new Boot of the same number with this one's facts (clock, restored values) and
        no message counted."""
        b = Boot(self.no)
        b.sync_seq = self.sync_seq
        b.sync_off = self.sync_off
        b.est_off = self.est_off
        b.boot_event_seq = self.boot_event_seq
        b.restored = dict(self.restored) if self.restored is not None else None
        b.b_mwh = dict(self.b_mwh)
        b.update_clock()
        return b

    def update_clock(self) -> None:
        self.clock = rules.boot_offset(
            self.sync_off if self.sync_seq is not None else None, self.est_off
        )

    def r(self, slot: int) -> int | None:
        """r(b) of a slot: its restored value for this boot, if known."""
        x = self.b_mwh.get(slot)
        return rules.restored_value(
            self.restored.get(slot) if self.restored is not None else None,
            x[1] if x is not None else None,
        )

    def merge(self, seq: int, recv_ms: int, body: Any) -> bool:
        """Take in a message's boot-level facts (rule 5's clock, §6's r(b)); True when the
        clock or an r(b) a processed reading used has changed. `body` as inputs.RawMsg's:
        a Mapping, or a telemetry's packed reads (agent/ledger/reads.py)."""
        if type(body) is bytes:
            return self.merge_reads(seq, recv_ms, reads.unpack(body))
        changed = self._clock(seq, recv_ms, body["up"], body.get("ts"))
        ev = body.get("ev")
        if ev is None:
            slots = body.get("slots")
            if slots:
                for sl in slots:
                    if self._take_b(seq, sl.get("n"), sl.get("b_mwh")):
                        changed = True
        elif ev == "boot":
            if self.boot_event_seq is None or seq < self.boot_event_seq:
                self.boot_event_seq = seq
                before_r = {n: self.r(n) for n in self.r_used}
                restored: dict[int, int] = {}
                raw = body.get("restored")
                if isinstance(raw, Mapping):
                    for k, v in raw.items():
                        try:
                            n = int(k)
                        except (TypeError, ValueError):
                            continue
                        if type(v) is int:
                            restored[n] = v
                self.restored = restored
                if any(self.r(n) != r for n, r in before_r.items()):
                    changed = True
        return changed

    def merge_reads(self, seq: int, recv_ms: int, v: tuple[int, ...]) -> bool:
        """`merge` of a telemetry's reads, unpacked (reads.unpack)."""
        ts = v[reads.TS]
        changed = self._clock(seq, recv_ms, v[reads.UP], ts if ts >= 0 else None)
        for i in range(reads.SLOTS, len(v), 3):
            b = v[i + 2]
            if b >= 0 and self._take_b(seq, v[i], b):
                changed = True
        return changed

    def _clock(self, seq: int, recv_ms: int, up: int, ts: Any) -> bool:
        """Rule 5's clock from a message's `up`, `ts` and receive time: True when it
        changed."""
        old_clock = self.clock
        moved = False
        if type(ts) is int and (self.sync_seq is None or seq < self.sync_seq):
            self.sync_seq = seq
            self.sync_off = ts - up
            moved = True
        e = recv_ms - up
        if self.est_off is None or e < self.est_off:
            self.est_off = e
            moved = True
        if moved:
            self.update_clock()
        return self.clock != old_clock

    def _take_b(self, seq: int, n: Any, v: Any) -> bool:
        """Slot n's b_mwh `v` of message `seq`: the lowest seq's stands. True when it
        changed an r(b) that a processed reading used."""
        cur = self.b_mwh.get(n)
        if (cur is not None and cur[0] <= seq) or type(v) is not int:
            return False  # (the usual case: the slot's b_mwh of a lower seq stands)
        before = self.r(n)
        self.b_mwh[n] = (seq, v)
        return n in self.r_used and self.r(n) != before


class Station:
    """One station's whole metering state (one view: all messages, or those received by a
    rule-8 lock)."""

    __slots__ = (
        "boot",
        "key",
        "pending",
        "prev",
        "since",
        "sid",
        "starts",
        "streams",
        "tx",
    )

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.key: Key | None = None  # last message processed
        self.since = 0  # messages processed since the last checkpoint
        self.boot: Boot | None = None  # the boot of `key`
        self.prev: tuple[int, tuple[int, bool]] | None = None  # the boot before: no, clock
        self.streams: dict[int, Stream] = {}
        # session_start events: (slot, bat, e_mwh) -> (key, clock of its boot), the latest
        self.starts: dict[tuple[Any, Any, Any], tuple[Key, tuple[int, bool]]] = {}
        # sessions whose register check may still change (their end boot is current)
        self.pending: list[list[Any]] = []
        # OCPP transactions open (CONTRACT §11): id -> [connector, e0 mWh or None, t0,
        # [boot, seq] of the start, id tag, flags], at most MAX_STARTS
        self.tx: dict[str, list[Any]] = {}

    def dump(self) -> list[Any]:
        return [
            self.sid,
            list(self.key) if self.key is not None else None,
            self.since,
            self.boot.dump() if self.boot is not None else None,
            [self.prev[0], list(self.prev[1])] if self.prev is not None else None,
            [s.dump() for s in self.streams.values()],
            [[*sig, *k, *c] for sig, (k, c) in self.starts.items()],
            self.pending,
            [[k, *v] for k, v in self.tx.items()],
        ]

    @staticmethod
    def load(x: list[Any]) -> Station:
        st = Station(x[0])
        st.key = (x[1][0], x[1][1]) if x[1] is not None else None
        st.since = x[2]
        st.boot = Boot.load(x[3]) if x[3] is not None else None
        st.prev = (x[4][0], (x[4][1][0], bool(x[4][1][1]))) if x[4] is not None else None
        for sx in x[5]:
            s = Stream.load(sx)
            st.streams[s.slot] = s
        st.starts = {(a, b, c): ((d, e), (f, bool(g))) for a, b, c, d, e, f, g in x[6]}
        st.pending = x[7]
        if len(x) > 8:  # (a state from before OCPP sources has none)
            st.tx = {k: list(v) for k, *v in x[8]}
        return st
