"""The incremental metering engine: the §6 rules (agent/ledger/rules.py) over a growing set
of messages, station by station.

A message is inserted into its station's boot (rule 1: keys, duplicates, conflicts; and
the boot-level facts rules 3 and 5 use: the clock offset, the restored values). Then every
message not processed yet is processed in (boot, seq) order, in parts of at most PART_MSGS
messages; each reading of a register stream is one rule step, which produces a segment
that `_emit` attributes to intervals as the stream's contributions. A message that lands
before processed data (or changes a boot-level fact processed readings used) takes back
the parts from there and processes them again (`_rerun`): cheap for in-order arrival,
exact for any order (rule 7).

The records themselves are made from the contributions by agent/ledger/meter.py.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from agent.ledger import rules
from agent.ledger.inputs import MeterParams, RawMsg
from agent.ledger.records import (
    F_ANOMALY_DOWN,
    F_BASELINE,
    F_GAP,
    F_HELD,
    F_HIST,
    F_METER_RESET,
    F_NO_RESTORE,
    F_REBOOT,
    F_TIME_EST,
)
from agent.ledger.sessions import note_rerun
from agent.ledger.state import Boot, Contribution, Key, Part, Station, Stream

log = logging.getLogger(__name__)

PART_MSGS = 256  # messages per checkpoint: a late message re-runs at most this many + later

_CONTINUE = (-1, -1)  # _insert: processing can simply go on


def _int(x: Any) -> int | None:
    return x if type(x) is int else None


class Engine:
    """The rules over a growing set of messages; one per view (full, locked)."""

    def __init__(self, params: MeterParams) -> None:
        self.params = params
        self.interval_ms = params.interval_ms
        self.max_power = (params.max_power_w_meter, params.max_power_w_slot)  # [slot > 0]
        # intervals k < first_open are locked (they end at or before locked_until_ms)
        self.first_open = rules.first_open_interval(params.locked_until_ms, self.interval_ms)
        self.stations: dict[str, Station] = {}
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
                st = self.stations[sid] = Station(sid)
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
                last = st.last_boot
                self._run(st, 0 if last is None else bisect.bisect_left(st.order, last))
        return changed

    def _insert(self, st: Station, m: RawMsg) -> tuple[int, int] | None:
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
            b = st.boots[bno] = Boot(bno)
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
        old = b.clock
        r_changed = False
        # rule 5: the boot's clock, from its lowest-seq synced message or the arrivals
        ts = body.get("ts")
        clock_changed = False
        if type(ts) is int and (b.sync_seq is None or seq < b.sync_seq):
            b.sync_seq = seq
            b.sync_off = ts - up
            clock_changed = True
        e = m.recv_ms - up
        if b.est_off is None or e < b.est_off:
            b.est_off = e
            clock_changed = True
        if clock_changed:
            b.update_clock()
        ev = body.get("ev")
        if ev is None:
            # r(b) from b_mwh; a tail message cannot change a lowest-seq b_mwh once every
            # slot has one
            slots = body.get("slots")
            if slots and (not tail or len(b.b_mwh) < len(slots)):
                b_mwh = b.b_mwh
                for sl in slots:
                    v = sl.get("b_mwh")
                    if type(v) is int:
                        n = sl.get("n")
                        cur = b_mwh.get(n)
                        if cur is None or seq < cur[0]:
                            before = b.r(n)
                            b_mwh[n] = (seq, v)
                            if n in b.r_used and b.r(n) != before:
                                r_changed = True
        elif ev == "boot":
            # r(b) from the boot event's restored values
            if b.boot_event_seq is None or seq < b.boot_event_seq:
                b.boot_event_seq = seq
                before_r = {n: b.r(n) for n in b.r_used}
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
                b.restored = restored
                r_changed = any(b.r(n) != r for n, r in before_r.items())
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
        if st.last_boot is None:
            return _CONTINUE
        if b.done and (r_changed or b.clock != old):
            return (bno, 0)  # boot-level facts the processed readings used have changed
        if bno < st.last_boot or pos < b.done:
            return (bno, pos)  # before data already processed
        return _CONTINUE

    def _duplicate(self, b: Boot, pos: int, m: RawMsg) -> tuple[int, int] | None:
        """Rule 1: a repeat of a key. Other contents: a conflict, the first copy stands.
        The same contents received earlier: keep the earliest receive time (order-free)."""
        old = b.msgs[pos]
        if old.body != m.body:
            self.conflicts += 1
            log.warning(
                "metering: conflicting copies of %s/%d/%d, keeping the first", m.sid, m.boot, m.seq
            )
            return None
        if m.recv_ms >= old.recv_ms:
            return None
        b.msgs[pos] = m
        before = b.clock
        e = m.recv_ms - m.body["up"]
        if b.est_off is None or e < b.est_off:
            b.est_off = e
            b.update_clock()
        if b.done and b.clock != before:
            return (b.no, 0)
        return _CONTINUE

    # ---- processing -------------------------------------------------------------------

    def _rerun(self, st: Station, bno: int, pos: int) -> None:
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
                    x = target.ranges_before.get(n)
                    if x is None:
                        del tb.ranges[n]
                    else:
                        rs = tb.ranges[n]
                        del rs[x[0] :]
                        rs[-1][1] = x[1]
                if tb is b:
                    # sessions of this boot can only change above the marks of then
                    marks = {n: x[1] for n, x in target.streams_before.items() if x[0] == tb.no}
            for s in st.streams.values():
                x = target.streams_before.get(s.slot)
                if x is None:
                    s.reset()
                else:
                    s.restore(x)
        note_rerun(st, bno, marks)
        st.last_boot = order[i - 1] if i else None
        self._run(st, i)

    def _drop(self, st: Station, part: Part) -> None:
        """Take back a part's contributions."""
        first_open = self.first_open
        for n, by_k in part.contribs.items():
            s = st.streams[n]
            for k, acc in by_k.items():
                lst = s.by_interval[k]
                for j in range(len(lst) - 1, -1, -1):
                    if lst[j] is acc:
                        del lst[j]
                        break
                if not lst:
                    del s.by_interval[k]
                s.dirty.add(k)
                if first_open is not None and k < first_open:
                    s.locked_mwh -= acc.mwh
                    s.locked_held -= acc.held

    def _run(self, st: Station, i: int) -> None:
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
                    part = Part(
                        st.next_part_id,
                        b_no,
                        j,
                        {s.slot: s.snap() for s in st.streams.values()},
                        {k: (len(rs), rs[-1][1]) for k, rs in b.ranges.items()},
                    )
                    st.next_part_id += 1
                    b.parts.append(part)
                self._apply(st, b, part, j, msgs[j])
            b.done = n
            st.last_boot = b_no

    def _apply(self, st: Station, b: Boot, part: Part, i: int, m: RawMsg) -> None:
        """One message at position i of its boot: each of its readings is a rule step."""
        body = m.body
        ev = body.get("ev")
        if ev is not None and ev != "meter_reset":
            if ev == "session_end":
                st.sess_new.add((b.no, m.seq))
            return
        off, est = b.clock
        base = F_TIME_EST if est else 0
        if body.get("hist") == 1:
            base |= F_HIST
        up: int = body["up"]
        t = rules.reading_time(up, off)
        key = (b.no, m.seq)
        if ev is not None:
            self._meter_reset(st, b, part, i, key, body, up, t, base)
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

    # ---- one reading: the rule steps --------------------------------------------------

    def _reading(
        self,
        st: Station,
        b: Boot,
        part: Part,
        i: int,
        key: Key,
        n: int,
        v: int,
        up: int,
        t: int,
        fl: int,
        serial: Any,
    ) -> None:
        """Reading v (uptime up, time t) of stream n at position i of boot b.

        The first reading of a stream (rule 0) or of a later boot (rule 3) has its own
        step; the common case, a reading after another of its boot (rules 2 and 6, and
        rule 4's serial swap), is done here, not in a method of its own: a call per
        reading is ~5 % of the instructions of an in-order add() (bench/bench_metering.py)."""
        s = st.streams.get(n)
        if s is None:
            s = st.streams[n] = Stream(n)
        if s.boot == b.no:
            if s.last_key == key:
                return  # the same slot twice in one message: the first stands
            # rules.seq_gap inlined: a call here is ~3.5 % of the instructions of an
            # in-order add() (bench/bench_metering.py)
            seqs = b.seqs
            lp = s.last_pos
            if seqs[i] - seqs[lp] != i - lp:
                fl |= F_GAP
            held_mwh = 0
            if n == 0 and rules.serial_swapped(s.serial, serial):
                # rule 4: a new baseline at this reading, nothing credited across it
                credit = 0
                fl |= F_METER_RESET
                s.mark = v
                s.mark_up = up
                s.held_value = None
            else:
                max_power = self.max_power[1 if n else 0]
                held = s.held_value
                if held is not None:
                    s.held_value = None
                    if rules.level_shift_confirmed(
                        v, up, s.mark, s.mark_up, held, s.held_up, max_power
                    ):
                        # the mark moves to the held reading (whose amount stays held)
                        s.mark = held
                        s.mark_up = s.held_up
                        fl |= F_HELD
                credit, below = rules.against_mark(v, s.mark)
                if below:
                    fl |= F_ANOMALY_DOWN
                elif not credit:
                    # at the mark: the limit counts from the last time the register was there
                    s.mark_up = up
                elif rules.implausible(credit, max_power, up - s.mark_up):
                    # held: not credited, the mark does not move
                    s.held_value = v
                    s.held_up = up
                    held_mwh = credit
                    credit = 0
                    fl |= F_HELD
                else:
                    if n:
                        # _range inlined (the register range [mark, v] credited here)
                        rs = b.ranges.get(n)
                        if rs is not None and rs[-1][1] == s.mark:
                            rs[-1][1] = v
                        else:
                            self._range(b, n, s.mark, v)
                    s.mark = v
                    s.mark_up = up
            self._emit(s, part, credit, held_mwh, fl, s.last_t, t, s.last_key, s.last_value, key, v)
        elif s.boot is None:
            self._first_of_stream(b, part, s, key, v, up, t, fl)
        else:
            self._first_of_boot(st, b, part, s, i, key, v, up, t, fl, serial)
        if serial is not None:
            s.serial = serial
        s.boot = b.no
        s.last_t = t
        s.last_key = key
        s.last_value = v
        s.last_pos = i

    def _first_of_stream(
        self, b: Boot, part: Part, s: Stream, key: Key, v: int, up: int, t: int, base: int
    ) -> None:
        """Rule 0: the stream's first reading is its baseline."""
        n = s.slot
        b.seen.add(n)
        r = None
        if n:
            b.r_used.add(n)
            r = b.r(n)
        if r is not None:
            credit, below = rules.baseline(v, r)
            fl = base | F_BASELINE | (F_ANOMALY_DOWN if below else 0)
            # energy since the boot started: spread over [offset(b), t]
            self._emit(s, part, credit, 0, fl, t - up, t, (b.no, -1), r, key, v)
            if credit:
                self._range(b, n, r, v)
        else:
            self._emit(s, part, 0, 0, base | F_BASELINE, t, t, key, v, key, v)
        s.mark = v
        s.mark_up = up
        s.held_value = None

    def _first_of_boot(
        self,
        st: Station,
        b: Boot,
        part: Part,
        s: Stream,
        i: int,
        key: Key,
        v: int,
        up: int,
        t: int,
        base: int,
        serial: Any,
    ) -> None:
        """Rule 3 (and 4's serial swap): the first reading of a later boot of the stream."""
        n = s.slot
        b.seen.add(n)
        cross = self._cross_flags(st, s, b, i)
        mark = s.mark
        if n == 0 and rules.serial_swapped(s.serial, serial):
            # a swap: nothing credited across, a point at this reading
            fl = base | (cross & ~F_TIME_EST) | F_METER_RESET
            self._emit(s, part, 0, 0, fl, s.last_t, t, s.last_key, s.last_value, key, v)
        else:
            r = None
            if n:
                b.r_used.add(n)
                r = b.r(n)
            x = rules.across_boots(mark, v, r)
            if r is not None:
                if x.persisted:
                    # persisted before the restart, not yet sent: the interval holding
                    # the last reading of the earlier boot, flagged with its time
                    self._emit(
                        s,
                        part,
                        x.persisted,
                        0,
                        cross,
                        s.last_t,
                        s.last_t,
                        s.last_key,
                        s.last_value,
                        (b.no, -1),
                        r,
                    )
                    self._range(b, n, mark, r)
                # the gain since the restore: spread over [offset(b'), t]
                fl = base | F_REBOOT | (cross & F_GAP) | (F_ANOMALY_DOWN if x.below else 0)
                self._emit(s, part, x.credit, 0, fl, t - up, t, (b.no, -1), r, key, v)
                if x.credit:
                    self._range(b, n, r, v)
            else:
                # no restored value: over the whole gap [t_last(b), t]
                fl = base | cross | (F_NO_RESTORE if n else 0)
                if x.below:
                    fl |= F_ANOMALY_DOWN
                self._emit(s, part, x.credit, 0, fl, s.last_t, t, s.last_key, s.last_value, key, v)
                if x.credit:
                    self._range(b, n, mark, v)
        s.mark = v
        s.mark_up = up
        s.held_value = None

    def _cross_flags(self, st: Station, s: Stream, b: Boot, i: int) -> int:
        """Flags of a segment from the last point of an earlier boot to position i of b."""
        assert s.boot is not None
        pb = st.boots[s.boot]
        fl = F_REBOOT
        ps = pb.seqs
        # a hole after the last point in its boot, or before position i in this boot
        if rules.seq_gap(ps[s.last_pos], s.last_pos, ps[-1], len(ps) - 1) or rules.seq_gap(
            0, 0, b.seqs[i], i
        ):
            fl |= F_GAP
        if pb.sync_seq is None:
            fl |= F_TIME_EST
        return fl

    def _meter_reset(
        self,
        st: Station,
        b: Boot,
        part: Part,
        i: int,
        key: Key,
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
            s = st.streams[0] = Stream(0)
        if s.boot is None:
            self._emit(s, part, 0, 0, base | F_BASELINE | F_METER_RESET, t, t, key, tv, key, tv)
        else:
            if s.boot == b.no:
                fl = base | F_METER_RESET
                if rules.seq_gap(b.seqs[s.last_pos], s.last_pos, b.seqs[i], i):
                    fl |= F_GAP
            else:
                fl = base | F_METER_RESET | self._cross_flags(st, s, b, i)
            c = rules.meter_reset_credit(fv, s.mark)
            self._emit(s, part, c, 0, fl, s.last_t, t, s.last_key, s.last_value, key, fv)
        s.mark = tv
        s.mark_up = up
        s.held_value = None
        s.serial = body.get("sn")
        s.boot = b.no
        s.last_t = t
        s.last_key = key
        s.last_value = tv
        s.last_pos = i

    # ---- attribution ------------------------------------------------------------------

    @staticmethod
    def _range(b: Boot, n: int, lo: int, hi: int) -> None:
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
        s: Stream,
        part: Part,
        c: int,
        h: int,
        fl: int,
        t0: int,
        t1: int,
        from_key: Key,
        from_value: int,
        to_key: Key,
        to_value: int,
    ) -> None:
        """Attribute one segment: credit c spread over [t0, t1] (rule 5); the held amount h
        and the segment's end point go to its home interval."""
        iv = self.interval_ms
        contribs = part.contribs.get(s.slot)
        if contribs is None:
            contribs = part.contribs[s.slot] = {}
        # rules.home_interval inlined (with the test whether to spread): a call here is
        # ~5 % of the instructions of an in-order add() (bench/bench_metering.py)
        if t1 > t0:
            home = (t1 - 1) // iv
            if c and t0 // iv != home:
                for k, share in rules.spread(c, t0, t1, iv):
                    if k == home:
                        c = share
                    elif share:
                        self._add(
                            s,
                            contribs,
                            part.id,
                            k,
                            share,
                            0,
                            fl,
                            from_key,
                            from_value,
                            to_key,
                            to_value,
                        )
        else:
            home = t1 // iv
        # _add inlined for the home interval: a call here is ~6 % of the instructions of an
        # in-order add() (bench/bench_metering.py)
        acc = contribs.get(home)
        if acc is None:
            acc = contribs[home] = Contribution(
                part.id, c, h, fl, from_key, from_value, to_key, to_value
            )
            lst = s.by_interval.get(home)
            if lst is None:
                s.by_interval[home] = [acc]
            else:
                lst.append(acc)
        else:
            acc.mwh += c
            acc.held += h
            acc.flags |= fl
            acc.to_key = to_key
            acc.to_value = to_value
        s.dirty.add(home)
        if self.first_open is not None and home < self.first_open:
            s.locked_mwh += c
            s.locked_held += h

    def _add(
        self,
        s: Stream,
        contribs: dict[int, Contribution],
        pid: int,
        k: int,
        c: int,
        h: int,
        fl: int,
        from_key: Key,
        from_value: int,
        to_key: Key,
        to_value: int,
    ) -> None:
        """Add a share (and held amount) to stream s's contribution to interval k."""
        acc = contribs.get(k)
        if acc is None:
            acc = contribs[k] = Contribution(pid, c, h, fl, from_key, from_value, to_key, to_value)
            lst = s.by_interval.get(k)
            if lst is None:
                s.by_interval[k] = [acc]
            else:
                lst.append(acc)
        else:
            acc.mwh += c
            acc.held += h
            acc.flags |= fl
            acc.to_key = to_key
            acc.to_value = to_value
        s.dirty.add(k)
        if self.first_open is not None and k < self.first_open:
            s.locked_mwh += c
            s.locked_held += h
