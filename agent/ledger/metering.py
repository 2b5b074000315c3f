"""Metering (CONTRACT §6): verified raw messages in, kWh records out.

Pure and deterministic: the same set of messages gives the same records whatever the
order of arrival or the duplication (rule 7). `compute()` is the whole function;
`IncrementalMeter` gives the same records while messages trickle in, cheaply for in-order
arrival (one rule step per register stream) and exactly for out-of-order arrival (the
station's streams are re-run from the earliest boot the late message can affect).

Vocabulary used below:
- stream: one register of one station: slot 0 is the grid meter (`meter.e_wh` x 1000, in
  mWh), slots 1..16 the battery-side `slots[].e_mwh`.
- point: (key, register value) where key = (boot, seq); (boot, -1) is the value restored
  at the start of that boot (`b_mwh` / the boot event's `restored`), before any message.
- segment: one credit (or held amount, or nothing) between two points of a stream, with
  the time span it is spread over and the flags that shaped it. Segments are attributed
  to UTC-aligned intervals; an interval record is the sum of its segments' shares.

docs/metering.md explains each rule and every decision taken where the contract is silent.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

PROCESSING_VERSION = "m1"

DAY_MS = 86_400_000

# Flags as bits internally (cheap to OR in the per-reading path), names on the records.
F_BASELINE = 1
F_ANOMALY_DOWN = 2
F_REBOOT = 4
F_NO_RESTORE = 8
F_METER_RESET = 16
F_HELD = 32
F_TIME_EST = 64
F_GAP = 128
F_HIST = 256
F_ADJUSTMENT = 512  # not in §6's list: marks rule-8 adjustment records (see docs)

_FLAG_BITS = (
    (F_BASELINE, "baseline"),
    (F_ANOMALY_DOWN, "anomaly_down"),
    (F_REBOOT, "reboot"),
    (F_NO_RESTORE, "no_restore"),
    (F_METER_RESET, "meter_reset"),
    (F_HELD, "held"),
    (F_TIME_EST, "time_est"),
    (F_GAP, "gap"),
    (F_HIST, "hist"),
    (F_ADJUSTMENT, "adjustment"),
)
FLAG_NAMES: tuple[str, ...] = tuple(sorted(name for _, name in _FLAG_BITS))
_flag_cache: dict[int, tuple[str, ...]] = {}


def flag_names(bits: int) -> tuple[str, ...]:
    """The sorted flag names of a bit set."""
    t = _flag_cache.get(bits)
    if t is None:
        t = tuple(sorted(name for bit, name in _FLAG_BITS if bits & bit))
        _flag_cache[bits] = t
    return t


def flag_bits(names: Iterable[str]) -> int:
    by_name = {name: bit for bit, name in _FLAG_BITS}
    bits = 0
    for n in names:
        bits |= by_name[n]
    return bits


@dataclass(frozen=True, kw_only=True)
class RawMsg:
    """One verified raw message, decoded from its signed bytes."""

    sid: str
    boot: int
    seq: int
    recv_ms: int  # agent receive time (Unix ms)
    body: Mapping[str, Any]  # telemetry, or an event when "ev" in body


@dataclass(frozen=True, kw_only=True)
class MeterParams:
    interval_ms: int = 900_000
    max_power_w_slot: int = 3000
    max_power_w_meter: int = 50_000
    # Rule 8: interval records ending at or before this are locked.
    locked_until_ms: int | None = None
    # The moment the lock was taken: messages received (recv_ms) after it are "late" for the
    # locked period and only show as adjustment records. None = locked_until_ms.
    locked_at_ms: int | None = None

    def __post_init__(self) -> None:
        if self.interval_ms <= 0 or DAY_MS % self.interval_ms:
            raise ValueError(f"interval_ms must divide a day, got {self.interval_ms}")
        if self.max_power_w_slot <= 0 or self.max_power_w_meter <= 0:
            raise ValueError("max power must be positive")


@dataclass(frozen=True, kw_only=True)
class Record:
    kind: str  # "interval" | "session" | "day"
    sid: str
    slot: int  # 0 = grid meter (its Wh x 1000 as mWh)
    start_ms: int
    end_ms: int
    mwh: int
    held_mwh: int
    flags: tuple[str, ...]  # sorted
    from_key: tuple[int, int]  # (boot, seq); seq -1 = value restored at that boot's start
    to_key: tuple[int, int]
    e_from: int  # register values at both ends (mWh)
    e_to: int
    version: str
    extra: Mapping[str, Any] = field(default_factory=dict)


_new = object.__new__


def _record(
    kind: str,
    sid: str,
    slot: int,
    start_ms: int,
    end_ms: int,
    mwh: int,
    held_mwh: int,
    flags: tuple[str, ...],
    from_key: tuple[int, int],
    to_key: tuple[int, int],
    e_from: int,
    e_to: int,
) -> Record:
    """Record(...) without the frozen dataclass __init__ (field by field object.__setattr__):
    2.5x cheaper, and materializing records is most of the per-message cost."""
    r: Record = _new(Record)
    r.__dict__.update(
        kind=kind,
        sid=sid,
        slot=slot,
        start_ms=start_ms,
        end_ms=end_ms,
        mwh=mwh,
        held_mwh=held_mwh,
        flags=flags,
        from_key=from_key,
        to_key=to_key,
        e_from=e_from,
        e_to=e_to,
        version=PROCESSING_VERSION,
        extra={},
    )
    return r


def record_sort_key(r: Record) -> tuple[Any, ...]:
    return (r.kind, r.sid, r.slot, r.start_ms, r.end_ms, r.from_key, r.to_key, r.flags)


def record_id(r: Record) -> str:
    """A stable identity for upserts: one id per record whatever its contents."""
    if r.kind == "session":
        return f"session/{r.sid}/{r.slot}/{r.to_key[0]}:{r.to_key[1]}"
    adj = "/adj" if "adjustment" in r.flags else ""
    return f"{r.kind}/{r.sid}/{r.slot}/{r.start_ms}{adj}"


# ---------------------------------------------------------------------------------------
# Engine internals


def _spread(c: int, t0: int, t1: int, iv: int) -> list[list[int]]:
    """Split credit c over the intervals overlapping [t0, t1] (t1 > t0), in proportion to
    the overlap: integer shares by largest remainder, ties to the earlier interval."""
    k0 = t0 // iv
    k1 = (t1 - 1) // iv
    d = t1 - t0
    out: list[list[int]] = []
    rems: list[tuple[int, int]] = []
    tot = 0
    for j, k in enumerate(range(k0, k1 + 1)):
        lo = k * iv
        hi = lo + iv
        ov = (min(hi, t1)) - (max(lo, t0))
        q, r = divmod(c * ov, d)
        out.append([k, q])
        rems.append((-r, j))
        tot += q
    left = c - tot
    if left:
        rems.sort()
        for _, j in rems[:left]:
            out[j][1] += 1
    return out


class _Acc:
    """One stream's contributions to one interval from one part's processing."""

    __slots__ = ("fkey", "flags", "fval", "held", "mwh", "part", "tkey", "tval")

    def __init__(
        self,
        part: int,
        mwh: int,
        held: int,
        flags: int,
        fkey: tuple[int, int],
        fval: int,
        tkey: tuple[int, int],
        tval: int,
    ) -> None:
        self.part = part
        self.mwh = mwh
        self.held = held
        self.flags = flags
        self.fkey = fkey
        self.fval = fval
        self.tkey = tkey
        self.tval = tval


_Snap = tuple[Any, ...]


class _Stream:
    """Rule state of one register stream, plus its interval contributions."""

    __slots__ = (
        "boot",
        "dirty",
        "hup",
        "hv",
        "iv",
        "lheld",
        "lkey",
        "lpos",
        "lsum",
        "lt",
        "lval",
        "mark",
        "mark_up",
        "n",
        "sn",
    )

    def __init__(self, n: int) -> None:
        self.n = n
        self.iv: dict[int, list[_Acc]] = {}  # interval index -> contributions, part order
        self.dirty: set[int] = set()  # intervals changed since the last materialization
        self.lsum = 0  # credited / held in locked intervals (rule 8 adjustments)
        self.lheld = 0
        self.reset()

    def reset(self) -> None:
        self.boot: int | None = None  # boot of the last point (None: no baseline yet)
        self.mark = 0  # highest value credited so far in this boot (rule 2)
        self.mark_up = 0  # uptime of the reading that set the mark (rule 6)
        self.lt = 0  # last point: time, key, value, position in its boot's seq list
        self.lkey: tuple[int, int] = (0, 0)
        self.lval = 0
        self.lpos = 0
        self.hv: int | None = None  # pending held reading (rule 6): value and uptime
        self.hup = 0
        self.sn: Any = None  # meter serial number last seen

    def snap(self) -> _Snap:
        return (
            self.boot,
            self.mark,
            self.mark_up,
            self.lt,
            self.lkey,
            self.lval,
            self.lpos,
            self.hv,
            self.hup,
            self.sn,
        )

    def restore(self, s: _Snap) -> None:
        (
            self.boot,
            self.mark,
            self.mark_up,
            self.lt,
            self.lkey,
            self.lval,
            self.lpos,
            self.hv,
            self.hup,
            self.sn,
        ) = s


PART_MSGS = 256  # messages per checkpoint: a late message re-runs at most this many + later


class _Part:
    """A run of at most PART_MSGS consecutive messages of one boot, processed together:
    the stream states before it (to go back to) and what it contributed (to take back)."""

    __slots__ = ("acc", "boot", "id", "rsnap", "snap", "start")

    def __init__(
        self,
        pid: int,
        boot: int,
        start: int,
        snap: dict[int, _Snap],
        rsnap: dict[int, tuple[int, int]],
    ) -> None:
        self.id = pid  # increasing in processing order within a station
        self.boot = boot
        self.start = start  # position of its first message in the boot
        self.snap = snap
        self.rsnap = rsnap  # boot.ranges before it: slot -> (len, hi of the last range)
        self.acc: dict[int, dict[int, _Acc]] = {}  # stream -> interval -> contribution


class _Boot:
    """One boot of one station: its messages in seq order and what the rules need of it."""

    __slots__ = (
        "bm",
        "done",
        "est_off",
        "ev_seq",
        "msgs",
        "no",
        "parts",
        "r_used",
        "ranges",
        "restored",
        "seen",
        "seqs",
        "sync_off",
        "sync_seq",
    )

    def __init__(self, no: int) -> None:
        self.no = no
        self.seqs: list[int] = []
        self.msgs: list[RawMsg] = []
        self.sync_seq: int | None = None  # lowest seq carrying ts
        self.sync_off = 0  # its ts - up
        self.est_off: int | None = None  # min(recv_ms - up) over the boot's messages
        self.ev_seq: int | None = None  # lowest seq of a boot event
        self.restored: dict[int, int] | None = None  # its `restored`
        self.bm: dict[int, tuple[int, int]] = {}  # slot -> (seq, b_mwh) lowest seq
        self.r_used: set[int] = set()  # slots whose r(b) the processing consulted
        self.done = 0  # messages processed (a prefix of msgs)
        self.parts: list[_Part] = []
        # slot -> register ranges [lo, hi] credited while processing this boot, ascending
        # and disjoint (the mark only rises within a boot): the session cross-check
        self.ranges: dict[int, list[list[int]]] = {}
        self.seen: set[int] = set()  # streams with readings in this boot

    def offset(self) -> tuple[int, bool]:
        """(offset, estimated) per rule 5."""
        if self.sync_seq is not None:
            return self.sync_off, False
        return (self.est_off or 0), True

    def r(self, n: int) -> int | None:
        if self.restored is not None:
            v = self.restored.get(n)
            if v is not None:
                return v
        x = self.bm.get(n)
        return x[1] if x is not None else None


class _Station:
    __slots__ = (
        "boots",
        "end_keys",
        "ends",
        "ends_by_sig",
        "lb",
        "order",
        "pid",
        "sess_new",
        "sess_pending",
        "sess_rerun",
        "sid",
        "starts",
        "streams",
    )

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.boots: dict[int, _Boot] = {}
        self.order: list[int] = []  # boot numbers, ascending
        self.streams: dict[int, _Stream] = {}
        self.lb: int | None = None  # last boot processed (all boots before it are done)
        self.pid = 0  # next part id
        self.ends: dict[tuple[int, int], RawMsg] = {}  # session_end events by key
        self.end_keys: list[tuple[int, int]] = []  # sorted
        self.starts: dict[_Sig, list[tuple[int, int]]] = {}  # session_start keys, sorted
        self.ends_by_sig: dict[_Sig, list[tuple[int, int]]] = {}
        # session records to make again: those whose end event was just processed (or
        # whose start event arrived), those a re-run may have changed (sess_rerun: from
        # this boot on; in the boot itself only above these marks, None: all), and those
        # whose check was not "ok" yet (more readings may still make it "ok")
        self.sess_new: set[tuple[int, int]] = set()
        self.sess_rerun: tuple[int, dict[int, int] | None] | None = None
        self.sess_pending: set[tuple[int, int]] = set()


_Sig = tuple[Any, Any, Any]  # (slot, bat, register at the start) of a session
_CONTINUE = (-1, -1)  # _insert: processing can simply go on


def _int(x: Any) -> int | None:
    return x if type(x) is int else None


class _Engine:
    """The rules over a growing set of messages; one per view (full, locked)."""

    def __init__(self, params: MeterParams) -> None:
        self.p = params
        self.iv = params.interval_ms
        self.maxp = (params.max_power_w_meter, params.max_power_w_slot)
        lu = params.locked_until_ms
        # intervals k < klock are locked (they end at or before locked_until_ms)
        self.klock = lu // self.iv if lu is not None else None
        self.stations: dict[str, _Station] = {}
        self.conflicts = 0

    # ---- insertion ------------------------------------------------------------------

    def add(self, msgs: Iterable[RawMsg]) -> set[str]:
        by_sid: dict[str, list[RawMsg]] = {}
        for m in msgs:
            by_sid.setdefault(m.sid, []).append(m)
        changed: set[str] = set()
        for sid, lst in by_sid.items():
            st = self.stations.get(sid)
            if st is None:
                st = self.stations[sid] = _Station(sid)
            if len(lst) > 1:
                lst.sort(key=lambda m: (m.boot, m.seq))
            rerun: tuple[int, int] | None = None
            new = False
            for m in lst:
                res = self._insert(st, m)
                if res is None:
                    continue
                new = True
                if res is not _CONTINUE and (rerun is None or res < rerun):
                    rerun = res
            if not new:
                continue
            changed.add(sid)
            if rerun is not None:
                self._rerun(st, rerun[0], rerun[1])
            else:
                self._run(st, 0 if st.lb is None else bisect.bisect_left(st.order, st.lb))
        return changed

    def _insert(self, st: _Station, m: RawMsg) -> tuple[int, int] | None:
        """Store m. None: nothing new. Else _CONTINUE when the message only extends the
        processed data, or the (boot, position) processing must go back to."""
        bno = m.boot
        seq = m.seq
        body = m.body
        up = body.get("up")
        if type(up) is not int or type(seq) is not int or seq < 0:
            log.warning("metering: %s/%s/%s without a usable up/seq ignored", m.sid, bno, seq)
            return None
        b = st.boots.get(bno)
        if b is None:
            b = st.boots[bno] = _Boot(bno)
            if not st.order or bno > st.order[-1]:
                st.order.append(bno)
            else:
                bisect.insort(st.order, bno)
        seqs = b.seqs
        tail = not seqs or seq > seqs[-1]
        if tail:
            pos = len(seqs)
            seqs.append(seq)
            b.msgs.append(m)
        else:
            pos = bisect.bisect_left(seqs, seq)
            if pos < len(seqs) and seqs[pos] == seq:
                return self._duplicate(b, pos, m)
            seqs.insert(pos, seq)
            b.msgs.insert(pos, m)
        old = b.offset()
        rchg = False
        ts = body.get("ts")
        if type(ts) is int and (b.sync_seq is None or seq < b.sync_seq):
            b.sync_seq = seq
            b.sync_off = ts - up
        e = m.recv_ms - up
        if b.est_off is None or e < b.est_off:
            b.est_off = e
        ev = body.get("ev")
        if ev is None:
            slots = body.get("slots")
            # a tail message cannot change a lowest-seq b_mwh once every slot has one
            if slots and (not tail or len(b.bm) < len(slots)):
                bm = b.bm
                for sl in slots:
                    v = sl.get("b_mwh")
                    if type(v) is int:
                        n = sl.get("n")
                        cur = bm.get(n)
                        if cur is None or seq < cur[0]:
                            before = b.r(n)
                            bm[n] = (seq, v)
                            if n in b.r_used and b.r(n) != before:
                                rchg = True
        elif ev == "boot":
            if b.ev_seq is None or seq < b.ev_seq:
                b.ev_seq = seq
                before_r = {n: b.r(n) for n in b.r_used}
                rest: dict[int, int] = {}
                raw = body.get("restored")
                if isinstance(raw, Mapping):
                    for k, v in raw.items():
                        try:
                            n = int(k)
                        except (TypeError, ValueError):
                            continue
                        if type(v) is int:
                            rest[n] = v
                b.restored = rest
                rchg = any(b.r(n) != r for n, r in before_r.items())
        elif ev == "session_end":
            key = (bno, seq)
            st.ends[key] = m
            bisect.insort(st.end_keys, key)
            sig = (body.get("slot"), body.get("bat"), body.get("e0_mwh"))
            bisect.insort(st.ends_by_sig.setdefault(sig, []), key)
        elif ev == "session_start":
            key = (bno, seq)
            sig = (body.get("slot"), body.get("bat"), body.get("e_mwh"))
            bisect.insort(st.starts.setdefault(sig, []), key)
            for k in st.ends_by_sig.get(sig, ()):
                if k > key:
                    st.sess_new.add(k)  # may now match this start
        if st.lb is None:
            return _CONTINUE
        if b.done and (rchg or b.offset() != old):
            return (bno, 0)  # boot-level facts the processed readings used have changed
        if bno < st.lb or pos < b.done:
            return (bno, pos)  # before data already processed
        return _CONTINUE

    def _duplicate(self, b: _Boot, pos: int, m: RawMsg) -> tuple[int, int] | None:
        old = b.msgs[pos]
        if old.body != m.body:
            self.conflicts += 1
            log.warning(
                "metering: conflicting copies of %s/%d/%d, keeping the first", m.sid, m.boot, m.seq
            )
            return None
        if m.recv_ms >= old.recv_ms:
            return None
        # the same message received earlier: keep the earliest receive time (order-free)
        b.msgs[pos] = m
        before = b.offset()
        e = m.recv_ms - m.body["up"]
        if b.est_off is None or e < b.est_off:
            b.est_off = e
        if b.done and b.offset() != before:
            return (b.no, 0)
        return _CONTINUE

    # ---- processing -------------------------------------------------------------------

    def _rerun(self, st: _Station, bno: int, pos: int) -> None:
        """Take back everything produced from (boot bno, position pos) on and process
        again from the last checkpoint before it."""
        order = st.order
        i = bisect.bisect_left(order, bno)
        b = st.boots[bno]
        target = None
        if b.parts:
            for p in reversed(b.parts):
                if p.start <= pos:
                    target = p
                    break
        else:  # a boot not processed yet, before processed ones
            for b_no in order[i + 1 :]:
                if st.boots[b_no].parts:
                    target = st.boots[b_no].parts[0]
                    break
        marks: dict[int, int] | None = None
        if target is not None:
            tb = st.boots[target.boot]
            for b_no in reversed(order[bisect.bisect_left(order, tb.no) :]):
                bb = st.boots[b_no]
                parts = bb.parts
                while parts and parts[-1].id >= target.id:
                    self._drop(st, parts.pop())
                if bb is not tb:
                    bb.done = 0
                    bb.ranges = {}
                    bb.r_used = set()
            tb.done = target.start
            if target.start == 0:
                tb.ranges = {}
                tb.r_used = set()
            else:
                for n in list(tb.ranges):
                    x = target.rsnap.get(n)
                    if x is None:
                        del tb.ranges[n]
                    else:
                        rs = tb.ranges[n]
                        del rs[x[0] :]
                        rs[-1][1] = x[1]
                if tb is b:
                    # sessions of this boot can only change above the marks of then
                    marks = {n: x[1] for n, x in target.snap.items() if x[0] == tb.no}
            for s in st.streams.values():
                x = target.snap.get(s.n)
                if x is None:
                    s.reset()
                else:
                    s.restore(x)
        self._sess_rerun(st, bno, marks)
        st.lb = order[i - 1] if i else None
        self._run(st, i)

    @staticmethod
    def _sess_rerun(st: _Station, bno: int, marks: dict[int, int] | None) -> None:
        cur = st.sess_rerun
        if cur is None or bno < cur[0]:
            st.sess_rerun = (bno, marks)
        elif bno == cur[0]:
            old = cur[1]
            if old is None or marks is None:
                st.sess_rerun = (bno, None)
            else:
                st.sess_rerun = (bno, {n: min(old[n], marks[n]) for n in old.keys() & marks})

    def _drop(self, st: _Station, part: _Part) -> None:
        klock = self.klock
        for n, acc_by_k in part.acc.items():
            s = st.streams[n]
            for k, acc in acc_by_k.items():
                lst = s.iv[k]
                for j in range(len(lst) - 1, -1, -1):
                    if lst[j] is acc:
                        del lst[j]
                        break
                if not lst:
                    del s.iv[k]
                s.dirty.add(k)
                if klock is not None and k < klock:
                    s.lsum -= acc.mwh
                    s.lheld -= acc.held

    def _run(self, st: _Station, i: int) -> None:
        """Process every message not processed yet, in (boot, seq) order, from st.order[i]."""
        for b_no in st.order[i:]:
            b = st.boots[b_no]
            msgs = b.msgs
            n = len(msgs)
            if b.done == n:
                continue
            part = b.parts[-1] if b.done and b.parts else None
            for j in range(b.done, n):
                if part is None or j - part.start >= PART_MSGS:
                    part = _Part(
                        st.pid,
                        b_no,
                        j,
                        {s.n: s.snap() for s in st.streams.values()},
                        {k: (len(rs), rs[-1][1]) for k, rs in b.ranges.items()},
                    )
                    st.pid += 1
                    b.parts.append(part)
                self._apply(st, b, part, j, msgs[j])
            b.done = n
            st.lb = b_no

    def _apply(self, st: _Station, b: _Boot, part: _Part, i: int, m: RawMsg) -> None:
        body = m.body
        ev = body.get("ev")
        if ev is not None and ev != "meter_reset":
            if ev == "session_end":
                st.sess_new.add((b.no, m.seq))
            return
        off, est = b.offset()
        base = F_TIME_EST if est else 0
        if body.get("hist") == 1:
            base |= F_HIST
        up: int = body["up"]
        t = off + up
        key = (b.no, m.seq)
        if ev is not None:
            self._reset(st, b, part, i, key, body, up, t, base)
            return
        meter = body.get("meter")
        if meter:
            e = meter.get("e_wh")
            if type(e) is int:
                self._reading(st, b, part, i, key, 0, e * 1000, up, t, base, meter.get("sn"))
        slots = body.get("slots")
        if slots:
            for sl in slots:
                n = sl.get("n")
                e = sl.get("e_mwh")
                if type(e) is int and type(n) is int and n > 0:
                    self._reading(st, b, part, i, key, n, e, up, t, base, None)

    def _cross_flags(self, st: _Station, s: _Stream, b: _Boot, i: int) -> int:
        """Flags of a segment from the last point of an earlier boot to position i of b."""
        assert s.boot is not None
        pb = st.boots[s.boot]
        fl = F_REBOOT
        ps = pb.seqs
        # a hole after the last point in its boot, or before position i in this boot
        if ps[-1] - ps[s.lpos] != len(ps) - 1 - s.lpos or b.seqs[i] != i:
            fl |= F_GAP
        if pb.sync_seq is None:
            fl |= F_TIME_EST
        return fl

    def _reading(
        self,
        st: _Station,
        b: _Boot,
        part: _Part,
        i: int,
        key: tuple[int, int],
        n: int,
        v: int,
        up: int,
        t: int,
        base: int,
        sn: Any,
    ) -> None:
        s = st.streams.get(n)
        if s is None:
            s = st.streams[n] = _Stream(n)
        sboot = s.boot
        if sboot == b.no:
            if s.lkey == key:
                return  # the same slot twice in one message: the first stands
            # ---- rules 2 and 6: within a boot
            seqs = b.seqs
            fl = base
            if seqs[i] - seqs[s.lpos] != i - s.lpos:
                fl |= F_GAP
            if n == 0 and sn is not None and s.sn is not None and sn != s.sn:
                # rule 4: serial changed without a meter_reset event
                self._emit(s, part, 0, 0, fl | F_METER_RESET, s.lt, t, s.lkey, s.lval, key, v)
                s.mark = v
                s.mark_up = up
                s.hv = None
            else:
                maxp = self.maxp[1 if n else 0]
                hv = s.hv
                if hv is not None:
                    s.hv = None
                    e_mark = up - s.mark_up
                    e_held = up - s.hup
                    if (
                        v - s.mark > maxp * (e_mark if e_mark > 0 else 0) // 3600
                        and v - hv <= maxp * (e_held if e_held > 0 else 0) // 3600
                    ):
                        # the level shift is confirmed: the mark moves to the held
                        # reading (whose amount stays held) and crediting goes on from there
                        s.mark = hv
                        s.mark_up = s.hup
                        fl |= F_HELD
                d = v - s.mark
                if d > 0:
                    el = up - s.mark_up
                    if d > maxp * (el if el > 0 else 0) // 3600:
                        s.hv = v
                        s.hup = up
                        self._emit(s, part, 0, d, fl | F_HELD, s.lt, t, s.lkey, s.lval, key, v)
                    else:
                        self._emit(s, part, d, 0, fl, s.lt, t, s.lkey, s.lval, key, v)
                        if n:
                            rs = b.ranges.get(n)
                            if rs is not None and rs[-1][1] == s.mark:
                                rs[-1][1] = v
                            else:
                                self._range(b, n, s.mark, v)
                        s.mark = v
                        s.mark_up = up
                elif d == 0:
                    self._emit(s, part, 0, 0, fl, s.lt, t, s.lkey, s.lval, key, v)
                    s.mark_up = up
                else:
                    self._emit(s, part, 0, 0, fl | F_ANOMALY_DOWN, s.lt, t, s.lkey, s.lval, key, v)
        elif sboot is None:
            # ---- rule 0: baseline
            b.seen.add(n)
            r = None
            if n:
                b.r_used.add(n)
                r = b.r(n)
            if r is not None:
                c = v - r
                fl = base | F_BASELINE
                if c < 0:
                    c = 0
                    fl |= F_ANOMALY_DOWN
                self._emit(s, part, c, 0, fl, t - up, t, (b.no, -1), r, key, v)
                if c:
                    self._range(b, n, r, v)
            else:
                self._emit(s, part, 0, 0, base | F_BASELINE, t, t, key, v, key, v)
            s.mark = v
            s.mark_up = up
            s.hv = None
        else:
            # ---- rule 3: the first reading of a later boot
            b.seen.add(n)
            cross = self._cross_flags(st, s, b, i)
            fl = base | cross
            if n == 0 and sn is not None and s.sn is not None and sn != s.sn:
                # a swap: nothing credited across, a point at this reading
                self._emit(
                    s,
                    part,
                    0,
                    0,
                    base | (cross & ~F_TIME_EST) | F_METER_RESET,
                    s.lt,
                    t,
                    s.lkey,
                    s.lval,
                    key,
                    v,
                )
            else:
                r = None
                if n:
                    b.r_used.add(n)
                    r = b.r(n)
                if r is not None:
                    p1 = r - s.mark
                    if p1 > 0:
                        # persisted before the restart, not yet sent: the interval holding
                        # the last reading of the earlier boot, flagged with its time
                        self._emit(s, part, p1, 0, cross, s.lt, s.lt, s.lkey, s.lval, (b.no, -1), r)
                        self._range(b, n, s.mark, r)
                    p2 = v - r
                    fl2 = base | F_REBOOT | (cross & F_GAP)
                    if p2 < 0:
                        p2 = 0
                        fl2 |= F_ANOMALY_DOWN
                    self._emit(s, part, p2, 0, fl2, t - up, t, (b.no, -1), r, key, v)
                    if p2:
                        self._range(b, n, r, v)
                else:
                    c = v - s.mark
                    if n:
                        fl |= F_NO_RESTORE
                    if c < 0:
                        c = 0
                        fl |= F_ANOMALY_DOWN
                    self._emit(s, part, c, 0, fl, s.lt, t, s.lkey, s.lval, key, v)
                    if c:
                        self._range(b, n, s.mark, v)
            s.mark = v
            s.mark_up = up
            s.hv = None
        if sn is not None:
            s.sn = sn
        s.boot = b.no
        s.lt = t
        s.lkey = key
        s.lval = v
        s.lpos = i

    def _reset(
        self,
        st: _Station,
        b: _Boot,
        part: _Part,
        i: int,
        key: tuple[int, int],
        body: Mapping[str, Any],
        up: int,
        t: int,
        base: int,
    ) -> None:
        """Rule 4: a meter_reset event credits max(0, from - mark), then a new baseline."""
        fw = _int(body.get("from_wh"))
        tw = _int(body.get("to_wh"))
        if fw is None or tw is None:
            log.warning(
                "metering: meter_reset %s/%d/%d without from_wh/to_wh ignored",
                st.sid,
                key[0],
                key[1],
            )
            return
        fv = fw * 1000
        tv = tw * 1000
        s = st.streams.get(0)
        if s is None:
            s = st.streams[0] = _Stream(0)
        if s.boot is None:
            self._emit(s, part, 0, 0, base | F_BASELINE | F_METER_RESET, t, t, key, tv, key, tv)
        else:
            if s.boot == b.no:
                fl = base | F_METER_RESET
                if b.seqs[i] - b.seqs[s.lpos] != i - s.lpos:
                    fl |= F_GAP
            else:
                fl = base | F_METER_RESET | self._cross_flags(st, s, b, i)
            c = fv - s.mark
            self._emit(s, part, c if c > 0 else 0, 0, fl, s.lt, t, s.lkey, s.lval, key, fv)
        s.mark = tv
        s.mark_up = up
        s.hv = None
        s.sn = body.get("sn")
        s.boot = b.no
        s.lt = t
        s.lkey = key
        s.lval = tv
        s.lpos = i

    @staticmethod
    def _range(b: _Boot, n: int, lo: int, hi: int) -> None:
        """Remember that register range [lo, hi] of slot n was credited in this boot."""
        if not n:
            return
        rs = b.ranges.get(n)
        if rs is None:
            b.ranges[n] = [[lo, hi]]
        elif rs[-1][1] == lo:
            rs[-1][1] = hi
        else:
            rs.append([lo, hi])

    def _emit(
        self,
        s: _Stream,
        part: _Part,
        c: int,
        h: int,
        fl: int,
        t0: int,
        t1: int,
        fkey: tuple[int, int],
        fval: int,
        tkey: tuple[int, int],
        tval: int,
    ) -> None:
        """Attribute one segment: credit c spread over [t0, t1]; the held amount h and the
        segment's end point go to its home interval (the last one it overlaps)."""
        iv = self.iv
        accs = part.acc.get(s.n)
        if accs is None:
            accs = part.acc[s.n] = {}
        if t1 > t0:
            home = (t1 - 1) // iv
            if c and t0 // iv != home:
                for k, share in _spread(c, t0, t1, iv):
                    if k == home:
                        c = share
                    elif share:
                        self._add(s, accs, part.id, k, share, 0, fl, fkey, fval, tkey, tval)
        else:
            home = t1 // iv
        # _add inlined: this is the per-reading path
        acc = accs.get(home)
        if acc is None:
            acc = accs[home] = _Acc(part.id, c, h, fl, fkey, fval, tkey, tval)
            lst = s.iv.get(home)
            if lst is None:
                s.iv[home] = [acc]
            else:
                lst.append(acc)
        else:
            acc.mwh += c
            acc.held += h
            acc.flags |= fl
            acc.tkey = tkey
            acc.tval = tval
        s.dirty.add(home)
        if self.klock is not None and home < self.klock:
            s.lsum += c
            s.lheld += h

    def _add(
        self,
        s: _Stream,
        accs: dict[int, _Acc],
        pid: int,
        k: int,
        c: int,
        h: int,
        fl: int,
        fkey: tuple[int, int],
        fval: int,
        tkey: tuple[int, int],
        tval: int,
    ) -> None:
        acc = accs.get(k)
        if acc is None:
            acc = accs[k] = _Acc(pid, c, h, fl, fkey, fval, tkey, tval)
            lst = s.iv.get(k)
            if lst is None:
                s.iv[k] = [acc]
            else:
                lst.append(acc)
        else:
            acc.mwh += c
            acc.held += h
            acc.flags |= fl
            acc.tkey = tkey
            acc.tval = tval
        s.dirty.add(k)
        if self.klock is not None and k < self.klock:
            s.lsum += c
            s.lheld += h

    # ---- sessions ---------------------------------------------------------------------

    def session_record(self, st: _Station, key: tuple[int, int]) -> tuple[Record, bool]:
        """The session record of a session_end event; bool: its register check is "ok"."""
        m = st.ends[key]
        body = m.body
        n = _int(body.get("slot")) or 0
        bat = body.get("bat")
        e0 = _int(body.get("e0_mwh")) or 0
        e1 = _int(body.get("e1_mwh")) or 0
        why = body.get("why")
        eb = st.boots[key[0]]
        # the matching session_start: same slot, battery and start register, latest before
        skey = None
        cand = st.starts.get((body.get("slot"), bat, body.get("e0_mwh")))
        if cand:
            j = bisect.bisect_left(cand, key)
            if j:
                skey = cand[j - 1]
        # boot whose uptime up0/up1 count in (a session closed "reboot" began before)
        if skey is not None:
            sb = st.boots[skey[0]]
        elif why == "reboot":
            j = bisect.bisect_left(st.order, key[0])
            sb = st.boots[st.order[j - 1]] if j else eb
        else:
            sb = eb
        ub = sb if why == "reboot" else eb  # boot of up1
        fl = 0
        t0 = _int(body.get("t0"))
        if t0 is None:
            off, est = sb.offset()
            t0 = off + (_int(body.get("up0")) or 0)
            if est or (skey is None and why == "reboot"):
                fl |= F_TIME_EST
        t1 = _int(body.get("t1"))
        if t1 is None:
            off, est = ub.offset()
            t1 = off + (_int(body.get("up1")) or 0)
            if est:
                fl |= F_TIME_EST
        t1 = max(t1, t0)
        if why == "reboot":
            fl |= F_REBOOT
        if body.get("hist") == 1:
            fl |= F_HIST
        mwh = e1 - e0
        if mwh < 0:
            mwh = 0
            fl |= F_ANOMALY_DOWN
        # cross-check: the register ranges of the slot credited in the session's boots
        reg = 0
        seen = False
        lo_i = bisect.bisect_left(st.order, sb.no)
        hi_i = bisect.bisect_right(st.order, eb.no)
        for b_no in st.order[lo_i:hi_i]:
            bb = st.boots[b_no]
            if n in bb.seen:
                seen = True
            rs = bb.ranges.get(n)
            if rs:
                j = bisect.bisect_right(rs, e0, key=_hi)  # the first range above e0
                while j < len(rs) and rs[j][0] < e1:
                    lo, hi = rs[j]
                    reg += (hi if hi < e1 else e1) - (lo if lo > e0 else e0)
                    j += 1
        check = "ok" if reg == e1 - e0 else ("mismatch" if seen else "no_readings")
        rec = Record(
            kind="session",
            sid=st.sid,
            slot=n,
            start_ms=t0,
            end_ms=t1,
            mwh=mwh,
            held_mwh=0,
            flags=flag_names(fl),
            from_key=skey if skey is not None else key,
            to_key=key,
            e_from=e0,
            e_to=e1,
            version=PROCESSING_VERSION,
            extra={
                "bat": bat,
                "soc0": body.get("soc0"),
                "soc1": body.get("soc1"),
                "why": why,
                "reg_mwh": reg,
                "reg_check": check,
            },
        )
        return rec, check == "ok"


def _hi(r: list[int]) -> int:
    return r[1]


def _merge(s: _Stream, k: int, iv: int, sid: str) -> Record | None:
    lst = s.iv.get(k)
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
    return _record(
        "interval",
        sid,
        s.n,
        k * iv,
        k * iv + iv,
        mwh,
        held,
        flag_names(fl),
        a0.fkey,
        z.tkey,
        a0.fval,
        z.tval,
    )


_CacheKey = tuple[Any, ...]


class _DayAcc:
    """Running roll-up of one stream's interval records within one UTC day."""

    __slots__ = ("fl", "held", "hi", "lo", "mwh", "pos")

    def __init__(self) -> None:
        self.mwh = 0
        self.held = 0
        self.fl: dict[str, int] = {}  # flag -> number of interval records carrying it
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

    def __init__(self, params: MeterParams = MeterParams()) -> None:
        self.params = params
        self._full = _Engine(params)
        self._locked: _Engine | None = None
        self._locked_at = 0
        if params.locked_until_ms is not None:
            self._locked = _Engine(params)
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
        klock = self._full.klock
        adj: set[int] = set()
        put = self._put
        for n, s in st.streams.items():
            if s.dirty:
                for k in s.dirty:
                    if klock is not None and k < klock:
                        adj.add(n)  # locked intervals come from the locked view
                    else:
                        put(v, n, k, 0, _merge(s, k, iv, sid), up, gone)
                s.dirty.clear()
        if self._locked is not None and klock is not None:
            lst = self._locked.stations.get(sid)
            if lst is not None:
                for n, s in lst.streams.items():
                    if s.dirty:
                        for k in s.dirty:
                            if k < klock:
                                adj.add(n)
                                put(v, n, k, 0, _merge(s, k, iv, sid), up, gone)
                        s.dirty.clear()
            for n in adj:
                put(v, n, klock, 1, self._adjustment(sid, n), up, gone)
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
        return list(up.values()), [self._cid(sid, ck) for ck in gone]

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
        fl = da.fl
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
        da = v.days.get(dk)
        if da is None or not da.pos:
            v.days.pop(dk, None)
            return None
        n, d = dk
        a = v.cache[("interval", n, da.lo >> 1, da.lo & 1)]
        z = v.cache[("interval", n, da.hi >> 1, da.hi & 1)]
        return _record(
            "day",
            sid,
            n,
            d * DAY_MS,
            d * DAY_MS + DAY_MS,
            da.mwh,
            da.held,
            tuple(sorted(da.fl)) if da.fl else (),
            a.from_key,
            z.to_key,
            a.e_from,
            z.e_to,
        )

    def _sessions(self, st: _Station, v: _View, up: dict[_CacheKey, Record]) -> None:
        keys = set(st.sess_new)
        st.sess_new.clear()
        keys.update(st.sess_pending)  # few: sessions not (yet) matching their readings
        if st.sess_rerun is not None:
            bno, marks = st.sess_rerun
            st.sess_rerun = None
            j = bisect.bisect_left(st.end_keys, (bno, -1))
            for key in st.end_keys[j:]:
                if key[0] > bno or marks is None:
                    keys.add(key)
                    continue
                body = st.ends[key].body
                th = marks.get(body.get("slot"))  # type: ignore[arg-type]
                e1 = body.get("e1_mwh")
                if th is None or type(e1) is not int or e1 > th:
                    keys.add(key)
        for key in keys:
            r, ok = self._full.session_record(st, key)
            if ok:
                st.sess_pending.discard(key)
            else:
                st.sess_pending.add(key)
            ck = ("session", r.slot, key)
            if v.cache.get(ck) != r:
                v.cache[ck] = r
                up[ck] = r

    def _cid(self, sid: str, ck: _CacheKey) -> str:
        if ck[0] == "session":
            return f"session/{sid}/{ck[1]}/{ck[2][0]}:{ck[2][1]}"
        if ck[0] == "day":
            return f"day/{sid}/{ck[1]}/{ck[2] * DAY_MS}"
        return f"interval/{sid}/{ck[1]}/{ck[2] * self.params.interval_ms}" + (
            "/adj" if ck[3] else ""
        )

    def _adjustment(self, sid: str, n: int) -> Record | None:
        full = self._full
        lk = self._locked
        assert lk is not None and full.klock is not None
        klock = full.klock
        iv = self.params.interval_ms
        fs = full.stations[sid].streams.get(n)
        lst = lk.stations.get(sid)
        ls = lst.streams.get(n) if lst is not None else None
        f_sum, f_held = (fs.lsum, fs.lheld) if fs is not None else (0, 0)
        l_sum, l_held = (ls.lsum, ls.lheld) if ls is not None else (0, 0)
        if f_sum == l_sum and f_held == l_held:
            return None
        assert fs is not None
        ks = [k for k in fs.iv if k < klock]
        first = _merge(fs, min(ks), iv, sid) if ks else None
        last = _merge(fs, max(ks), iv, sid) if ks else None
        return Record(
            kind="interval",
            sid=sid,
            slot=n,
            start_ms=klock * iv,
            end_ms=klock * iv + iv,
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


def compute(msgs: Iterable[RawMsg], params: MeterParams = MeterParams()) -> list[Record]:
    """Every record of every station the messages name, sorted by record_sort_key."""
    m = IncrementalMeter(params)
    m.add(msgs)
    out: list[Record] = []
    for sid in m.sids():
        out.extend(m.records(sid))
    out.sort(key=record_sort_key)
    return out
