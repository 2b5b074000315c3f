"""The metering engine: the §6 rules (agent/ledger/rules.py) over each station's messages
in (boot, seq) order, with bounded state (agent/ledger/state.py).

An in-order message (key above the station's last processed key) is one rule step per
reading, its segments attributed to the stream's open interval accumulators. The engine
keeps no message and no closed interval: records go to the backend (agent/ledger/backend.py)
as their sums change, and a checkpoint (the station's state, serialized) is written before
the first message of every boot and every `ckpt_every` messages.

A late message (key below the processed one), or one that changes a boot-level fact the
processed readings used (the clock offset, a restored value), recomputes its station
only: from the last checkpoint before the affected key (its boot's first checkpoint for a
changed fact), falling back to an earlier one only when a later segment touched an
interval below that checkpoint's open intervals (a clock running backwards across boots).
The records from there on are deleted, the snapshot restored, and the raw messages from
the checkpoint's key on re-applied from the backend. Cost: the span, never the history.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from agent.ledger import reads, rules
from agent.ledger.backend import Backend, Checkpoint
from agent.ledger.inputs import MeterParams, RawMsg
from agent.ledger.records import (
    DAY_MS,
    F_ADJUSTMENT,
    F_ANOMALY_DOWN,
    F_BASELINE,
    F_GAP,
    F_HELD,
    F_HIST,
    F_INVALID,
    F_METER_RESET,
    F_NO_RESTORE,
    F_OCPP,
    F_REBOOT,
    F_TIME_EST,
    F_UNSIGNED,
    PROCESSING_VERSION,
    Record,
    flag_bits,
    flag_names,
    make_record,
    make_record_id,
)
from agent.ledger.sessions import end_session, note_start, ocpp_end, ocpp_start, session_record
from agent.ledger.state import MAX_RANGES, Acc, Boot, DaySum, Key, Station, Stream

log = logging.getLogger(__name__)

CKPT_MSGS = 512  # messages between checkpoints: a late message re-applies at most this many + later

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()

RULES_V2 = True  # CONTRACT v2's §6.0 and §6.3 checks (False: m1, for comparisons)

FULL = 0  # views: every message
LOCKED = 1  # the messages received by a rule-8 lock


def dump_station(st: Station) -> bytes:
    return _enc.encode(st.dump())


def load_station(blob: bytes) -> Station:
    return Station.load(_dec.decode(blob))


def _int(x: Any) -> int | None:
    return x if type(x) is int else None


class _Fact(Exception):
    """A message changed a boot-level fact processed readings used."""


class Engine:
    """The rules over the stations' messages, for one view (all, or those received by a
    lock). `stations` holds the live state; `loader` (if any) fetches a persisted one."""

    def __init__(
        self,
        params: MeterParams,
        backend: Backend,
        view: int = FULL,
        *,
        ckpt_every: int | None = None,
        loader: Callable[[str, int], Station | None] | None = None,
    ) -> None:
        self.params = params
        self.backend = backend
        self.view = view
        self.every = ckpt_every if ckpt_every is not None else CKPT_MSGS
        self.loader = loader
        self.v2 = RULES_V2
        self.iv = params.interval_ms
        self.max_power = (params.max_power_w_meter, params.max_power_w_slot)  # [slot > 0]
        self.ocpp_power = (params.max_power_w_meter, params.max_power_w_ocpp)  # §11 connectors
        self.window_ms = params.cross_boot_window_ms
        self.spread_max = params.spread_max_intervals
        # intervals k < first_open are locked (they end at or before locked_until_ms)
        self.first_open = rules.first_open_interval(params.locked_until_ms, self.iv)
        self.locked_at = (
            params.locked_at_ms if params.locked_at_ms is not None else params.locked_until_ms
        )
        # the intervals whose records this view makes: [k_lo, k_hi)
        fo = self.first_open
        self.k_lo = fo if (fo is not None and view == FULL) else None
        self.k_hi = fo if view == LOCKED else None
        # the intervals the per-reading fast path may credit (a segment wholly inside one),
        # and the days the state rolls up (DaySum): every one without a lock; with one, the
        # full view's open intervals, and its days after the day of the first open interval
        # (that day also rolls up the rule-8 adjustment record, made apart). Live traffic
        # falls there: without this a lock more than halved the messages metered a second.
        # None: no interval, no day (the locked view meters only messages that came late).
        self.fast_from: int | None = None
        self.days_from: int | None = None
        if fo is None:
            self.fast_from = self.days_from = -(2**62)
        elif view == FULL:
            self.fast_from = fo
            self.days_from = fo * self.iv // DAY_MS + 1
        self.stations: dict[str, Station] = {}
        self.days: dict[str, set[tuple[int, int]]] = {}  # sid -> (slot, day) to roll up
        self.changed: set[str] = set()
        self._skip: Key | None = None  # a checkpoint not to write again (re-apply start)
        self._pre: tuple[str, int] | None = None  # (sid, boot) whose facts were read first
        # (sid, facts of its live boot over all that boot's messages in the backend), while
        # late messages are re-applied: entering that boot needs no pass over its messages
        self._known: tuple[str, Boot] | None = None
        self.rows_read = 0  # raw messages read back from the backend (re-applies)

    # ---- which messages, which records -------------------------------------------------

    def accepts(self, m: RawMsg) -> bool:
        return self.view == FULL or m.recv_ms <= (self.locked_at or 0)

    def in_view(self, k: int) -> bool:
        return (self.k_lo is None or k >= self.k_lo) and (self.k_hi is None or k < self.k_hi)

    def station(self, sid: str) -> Station:
        st = self.stations.get(sid)
        if st is None:
            st = self.loader(sid, self.view) if self.loader is not None else None
            if st is None:
                st = Station(sid)
            self.stations[sid] = st
        return st

    # ---- arrivals ------------------------------------------------------------------------

    def process(self, sid: str, msgs: list[RawMsg], boot_start: int | None = None) -> None:
        """New messages of one station (already in the backend), sorted by key.
        `boot_start`: a boot whose facts changed without a new message (an earlier copy
        of a message arrived): recompute from its start."""
        st = self.station(sid)
        self.changed.add(sid)
        if st.key is not None and msgs and (msgs[0].boot, msgs[0].seq) <= st.key:
            # the last processed message again (a caller's retry): nothing new (sorted:
            # when the first key is above it, every key is)
            msgs = [m for m in msgs if (m.boot, m.seq) != st.key]
        k0 = (msgs[0].boot, msgs[0].seq) if msgs else None
        if boot_start is not None:
            if k0 is not None and st.key is not None and k0 < st.key and k0[0] < boot_start:
                # late messages of an earlier boot: the re-apply from there enters
                # boot_start afresh (its facts read over all its messages)
                self._recompute(st, k0, [m for m in msgs if (m.boot, m.seq) < st.key], False)
            else:
                self._recompute(st, (boot_start, -1), [], True)
            return  # the re-apply took every message in the backend
        if k0 is None:
            return
        if st.key is not None and k0 < st.key:
            late = [m for m in msgs if (m.boot, m.seq) < st.key]
            self._known = (sid, self._boot_facts(st, msgs)) if st.boot is not None else None
            try:
                self._recompute(st, k0, late, False)
            finally:
                self._known = None
            return
        for m in msgs:
            try:
                self._apply(st, m, False)
            except _Fact:
                self._recompute(self.stations[sid], (m.boot, -1), [], True)
                return

    def _boot_facts(self, st: Station, msgs: list[RawMsg]) -> Boot:
        """The facts of the station's live boot over every message of it in the backend:
        those it has processed (merged into it as they came) and this batch's (facts are a
        minimum or the lowest seq's: the order of merging does not matter). Not valid when
        a stored message's receive time changed (an earlier copy: process' boot_start)."""
        assert st.boot is not None
        b = st.boot.facts()
        for m in msgs:
            if m.boot == b.no and self.accepts(m) and usable(m):
                b.merge(m.seq, m.recv_ms, m.body)
        return b

    def rebuild(self, sid: str) -> None:
        """Meter a station from all its raw messages in the backend (no state, no records,
        no checkpoints of it there): streamed, in key order."""
        self.stations.pop(sid, None)
        st = self.stations[sid] = Station(sid)
        self.changed.add(sid)
        for m in self.backend.raw_from(sid, (-1, -1)):
            self.rows_read += 1
            if not self.accepts(m) or not usable(m):
                continue
            try:
                self._apply(st, m, False)
            except _Fact:  # as on arrival: that boot again, its facts read first
                self._recompute(st, (m.boot, -1), [], True)
                return

    # ---- recomputation -------------------------------------------------------------------

    def _recompute(self, live: Station, key: Key, late: list[RawMsg], boot_start: bool) -> None:
        sid = live.sid
        be = self.backend
        view = self.view
        ck = (
            be.first_checkpoint_of_boot(sid, view, key[0])
            if boot_start
            else be.checkpoint_before(sid, view, key)
        )
        if ck is None and boot_start:
            ck = be.checkpoint_before(sid, view, key)
        snap: Station | None = None
        while True:
            snap = load_station(ck.blob) if ck is not None else None
            if (
                ck is not None
                and not boot_start
                and snap is not None
                and snap.boot is not None
                and snap.boot.no == key[0]
            ):
                # a mid-boot checkpoint: do the late messages change its boot's facts?
                facts = Boot.load(snap.boot.dump())
                if any(
                    facts.merge(m.seq, m.recv_ms, m.body)
                    for m in late
                    if m.boot == key[0] and usable(m)
                ):
                    boot_start = True
                    ck = be.first_checkpoint_of_boot(sid, view, key[0]) or be.checkpoint_before(
                        sid, view, (key[0], -1)
                    )
                    continue
            if ck is None or self._horizon_ok(live, ck, snap):
                break
            ck = be.checkpoint_prior(sid, view, ck.key)
        st = snap if snap is not None else Station(sid)
        # the snapshot holds for any key after the last one it had processed: re-apply from
        # there (a message of its boot with a lower seq than the checkpoint's may have come)
        after: Key = st.key if st.key is not None else (-1, -1)
        start: Key = (after[0], after[1] + 1)
        # take back everything made from the checkpoint on
        for n in set(live.streams) | set(st.streams):
            s = st.streams.get(n)
            if s is None or s.floor is None:
                self._delete_intervals(sid, n, None)
            else:
                self._delete_intervals(sid, n, s.floor)
                for k, a in s.accs.items():
                    if self.in_view(k):
                        a.dirty = True
        if view == FULL:
            be.delete_sessions_from(sid, start)
        be.drop_checkpoints_after(sid, view, after)
        self.stations[sid] = st
        first = True
        try:
            for m in be.raw_from(sid, start):
                self.rows_read += 1
                if not self.accepts(m) or not usable(m):
                    continue
                if first:
                    first = False
                    if ck is not None:
                        # the checkpoint again, at the first message it now precedes
                        mk = (m.boot, m.seq)
                        be.put_checkpoint(sid, view, Checkpoint(mk, ck.blob, ck.lows))
                        self._skip = mk
                try:
                    self._apply(st, m, True)
                except _Fact:  # a fact the snapshot did not have yet: from its boot start
                    self._skip = None
                    self._pre = None
                    self._recompute(live, (m.boot, -1), [], True)
                    return
        finally:
            self._skip = None
            self._pre = None

    def _horizon_ok(self, live: Station, ck: Checkpoint, snap: Station | None) -> bool:
        """Did every segment after the checkpoint stay at or above its open intervals?"""
        lows: dict[int, int] = {}
        for c in self.backend.checkpoints_after(live.sid, self.view, ck.key):
            for n, k in c.lows.items():
                if n not in lows or k < lows[n]:
                    lows[n] = k
        for n, s in live.streams.items():
            if s.low is not None and (n not in lows or s.low < lows[n]):
                lows[n] = s.low
        for n, k in lows.items():
            s0 = snap.streams.get(n) if snap is not None else None
            if s0 is not None and s0.floor is not None and k < s0.floor and self._any_view(k, s0):
                return False
        return True

    def _any_view(self, k: int, s: Stream) -> bool:
        # a touch below the floor matters only for records this view makes
        return self.in_view(k)

    def _delete_intervals(self, sid: str, n: int, k_from: int | None) -> None:
        lo = k_from
        if self.k_lo is not None and (lo is None or lo < self.k_lo):
            lo = self.k_lo
        if self.k_hi is not None and lo is not None and lo >= self.k_hi:
            return
        start = lo * self.iv if lo is not None else -(1 << 62)
        end = self.k_hi * self.iv if self.k_hi is not None else None
        # the days those records were in are rolled up again from their new contents
        days = self.days.setdefault(sid, set())
        for d in self.backend.delete_intervals(sid, n, start, end):
            days.add((n, d))

    # ---- one message ---------------------------------------------------------------------

    def _checkpoint(self, st: Station, key: Key) -> None:
        lows: dict[int, int] = {}
        for s in st.streams.values():
            if s.low is not None:
                lows[s.slot] = s.low
                s.low = None
        st.since = 0
        if key == self._skip:
            return  # the checkpoint a re-apply starts from: it stands as it is
        self.backend.put_checkpoint(st.sid, self.view, Checkpoint(key, dump_station(st), lows))

    def _new_boot(self, st: Station, no: int, prepass: bool) -> None:
        old = st.boot
        if old is not None:
            tail = (old.last_seq, old.count, old.sync_seq is None)
            for s in st.streams.values():
                if s.boot == old.no:
                    s.tail = tail
            st.prev = (old.no, old.clock)
            if st.pending:  # their end boot is over: final
                self._sessions(st, final=True)
        b = Boot(no)
        if prepass:
            # the boot's facts over all its messages, before any reading uses them
            known = self._known
            if known is not None and known[0] == st.sid and known[1].no == no:
                b = known[1].facts()  # (the live state had them: no pass over the boot)
            else:
                for m in self.backend.raw_boot(st.sid, no):
                    self.rows_read += 1
                    if self.accepts(m) and usable(m):
                        b.merge(m.seq, m.recv_ms, m.body)
            self._pre = (st.sid, no)
        st.boot = b

    def _apply(self, st: Station, m: RawMsg, prepass: bool) -> None:
        body: Any = m.body
        # a clean telemetry's reads, packed (inputs.RawMsg), or a whole body
        v = reads.unpack(body) if type(body) is bytes else None
        up = v[reads.UP] if v is not None else body.get("up")
        seq = m.seq
        if type(up) is not int or type(seq) is not int or seq < 0:
            log.warning("metering: %s/%s/%s without a usable up/seq ignored", m.sid, m.boot, seq)
            return
        key = (m.boot, seq)
        b = st.boot
        if b is None or m.boot != b.no:
            self._checkpoint(st, key)
            self._new_boot(st, m.boot, prepass)
            b = st.boot
            assert b is not None
        elif st.since >= self.every:
            self._checkpoint(st, key)
        merged = (
            b.merge_reads(seq, m.recv_ms, v) if v is not None else b.merge(seq, m.recv_ms, body)
        )
        if merged and b.count and self._pre != (st.sid, b.no):
            raise _Fact  # (a boot whose facts were read first cannot change them)
        i = b.count
        b.count = i + 1
        b.last_seq = seq
        st.key = key
        st.since += 1
        ev = None
        if v is None:
            if body.get("ocpp") == 1:
                self._ocpp(st, b, i, key, body, up)
                return
            ev = body.get("ev")
            if ev is not None and ev != "meter_reset":
                if ev == "session_end":
                    if self.view == FULL:
                        st.pending.append(end_session(st, b, key, body))
                elif ev == "session_start":
                    note_start(st, b, key, body)
                return
        off, est = b.clock
        base = F_TIME_EST if est else 0
        if (v[reads.HIST] if v is not None else body.get("hist")) == 1:
            base |= F_HIST
        t = rules.reading_time(up, off)
        if ev is not None:
            self._meter_reset(st, b, i, key, body, up, t, base)
            return
        spoiled = m.spoiled
        has_meter, readings = _packed_readings(v) if v is not None else _dict_readings(body)
        if not has_meter and spoiled and 0 in spoiled:
            self._invalid(st, 0, t)
        if readings:
            self._readings(st, b, i, key, up, t, base, readings)
        if spoiled:
            for n in spoiled:
                if n:
                    self._invalid(st, n, t)

    def _ocpp(self, st: Station, b: Boot, i: int, key: Key, body: Any, up: int) -> None:
        """CONTRACT §11: an OCPP frame (agent/ocpp/frames.py): its register readings under
        the same rules (the connectors' own max power), then its transaction event."""
        off, est = b.clock
        fl = F_OCPP | (F_TIME_EST if est else 0) | (0 if body.get("signed") == 1 else F_UNSIGNED)
        t = rules.reading_time(up, off)
        tx = body.get("tx")
        slot = _int(body.get("slot")) or 0
        if tx is not None and not slot:
            o = st.tx.get(str(tx))
            slot = o[0] if o is not None else 0
        readings: list[tuple[int, int, Any]] = []
        for n, v in body.get("reg") or ():
            n = n or slot
            if n > 0 and type(v) is int:
                readings.append((n, v, None))
        if readings:
            own, self.max_power = self.max_power, self.ocpp_power
            try:
                self._readings(st, b, i, key, up, t, fl, readings)
            finally:
                self.max_power = own
        for n in body.get("invalid") or ():
            if n or slot:
                self._invalid(st, n or slot, t, F_OCPP)
        ev = body.get("ev")
        if ev == "session_start" and tx is not None and slot:
            ocpp_start(st, key, body, slot, t, fl)
        elif ev == "session_end" and tx is not None:
            p = ocpp_end(st, key, body, t, fl)
            if p is not None and self.view == FULL:
                st.pending.append(p)

    def _invalid(self, st: Station, n: int, t: int, fl: int = 0) -> None:
        """§6.9: a spoiled source is omitted; the record of the interval it fell in (and,
        through the stream's next segment, the records that segment touches) say
        `invalid`."""
        s = st.streams.get(n)
        if s is None or s.boot is None:
            return
        # the interval holding the spoiled reading's time gets the flag
        self._add(
            st,
            s,
            t // self.iv,
            0,
            0,
            F_INVALID | fl,
            s.last_key,
            s.last_value,
            s.last_key,
            s.last_value,
        )

    # ---- one reading: the rule steps -------------------------------------------------

    def _reading(
        self,
        st: Station,
        b: Boot,
        i: int,
        key: Key,
        n: int,
        v: int,
        up: int,
        t: int,
        fl: int,
        serial: Any,
    ) -> None:
        """Reading v (uptime up, time t) of stream n at position i of boot b."""
        s = st.streams.get(n)
        if s is None:
            s = st.streams[n] = Stream(n)
        if s.boot == b.no:
            if s.last_key == key:
                return  # the same slot twice in one message: the first stands
            if key[1] - s.last_key[1] != i - s.last_pos:
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
                        s.mark = held
                        s.mark_up = s.held_up
                        fl |= F_HELD
                credit, below = rules.against_mark(v, s.mark)
                if below:
                    fl |= F_ANOMALY_DOWN
                elif not credit:
                    s.mark_up = up
                elif rules.implausible(credit, max_power, up - s.mark_up):
                    s.held_value = v
                    s.held_up = up
                    held_mwh = credit
                    credit = 0
                    fl |= F_HELD
                else:
                    if n:
                        _range(s, b.no, s.mark, v)
                    s.mark = v
                    s.mark_up = up
            self._emit(st, s, credit, held_mwh, fl, s.last_t, t, s.last_key, s.last_value, key, v)
        elif s.boot is None:
            self._first_of_stream(st, b, s, key, v, up, t, fl)
        else:
            self._first_of_boot(st, b, s, i, key, v, up, t, fl, serial)
        if serial is not None:
            s.serial = serial
        s.boot = b.no
        s.last_t = t
        s.last_key = key
        s.last_value = v
        s.last_pos = i

    def _readings(
        self,
        st: Station,
        b: Boot,
        i: int,
        key: Key,
        up: int,
        t: int,
        fl: int,
        readings: list[tuple[int, int, Any]],
    ) -> None:
        """The readings of the message at position i of boot b, in message order: the
        usual one in one step here, any other by the general path (_reading).

        The usual reading: a later reading of the stream's boot (not its first, not the
        same slot again), nothing pending or held, no meter serial change, at or above
        the mark and plausible, its segment wholly inside the stream's current open
        interval, which no lock covers (no spread, no interval closed). The step does exactly
        what _reading (against_mark, implausible, _emit, _add, _range) would do with it;
        the whole message shares t, so its home interval is worked out once."""
        streams = st.streams
        bno = b.no
        seq = key[1]
        iv = self.iv
        home = (t - 1) // iv  # the home interval of a segment ending at t (t > its start)
        fast = self.fast_from is not None and home >= self.fast_from
        lo = home * iv  # a segment starting at or after lo is inside it
        max_meter, max_slot = self.max_power
        for n, v, serial in readings:
            s = streams.get(n)
            acc = None
            if (
                fast
                and s is not None
                and s.boot == bno
                and s.floor == home
                and s.held_value is None
                and s.last_key != key
            ):
                c = v - s.mark
                t0 = s.last_t
                ok = (
                    c >= 0 and t0 < t and (serial is None or s.serial is None or serial == s.serial)
                )
                if ok and c:
                    el = up - s.mark_up
                    ok = (
                        t0 >= lo
                        and c <= (max_slot if n else max_meter) * (el if el > 0 else 0) // 3600
                    )
                if ok:
                    acc = s.accs.get(home)
            if acc is None or s is None:
                self._reading(st, b, i, key, n, v, up, t, fl, serial)
                continue
            f = fl if seq - s.last_key[1] == i - s.last_pos else fl | F_GAP
            if c:
                if n:
                    rh = s.rhist
                    rs = rh[-1][1] if rh and rh[-1][0] == bno else None
                    if rs and rs[-1][1] == s.mark:
                        rs[-1][1] = v  # the credited range goes on from the mark
                    else:
                        _range(s, bno, s.mark, v)
                s.mark = v
            s.mark_up = up  # a credit sets the mark; a reading equal to it refreshes its uptime
            acc.mwh += c
            acc.flags |= f
            acc.to_key = key
            acc.to_value = v
            acc.dirty = True
            low = s.low
            if low is None or home < low:
                s.low = home
            if serial is not None:
                s.serial = serial
            s.last_t = t
            s.last_key = key
            s.last_value = v
            s.last_pos = i

    def _first_of_stream(
        self, st: Station, b: Boot, s: Stream, key: Key, v: int, up: int, t: int, base: int
    ) -> None:
        """Rule 0: the stream's first reading is its baseline."""
        n = s.slot
        s.ranges(b.no)
        r = None
        if n:
            b.r_used.add(n)
            r = b.r(n)
        s.held_value = None
        if r is not None:
            credit, below = rules.baseline(v, r)
            fl = base | F_BASELINE | (F_ANOMALY_DOWN if below else 0)
            self._since_restore(st, s, b, key, v, up, t, r, credit, fl)
            return
        self._emit(st, s, 0, 0, base | F_BASELINE, t, t, key, v, key, v)
        s.mark = v
        s.mark_up = up

    def _since_restore(
        self, st: Station, s: Stream, b: Boot, key: Key, v: int, up: int, t: int, r: int,
        credit: int, fl: int,
    ) -> None:  # fmt: skip
        """Rules 0 and 3 with v2's rule 6: the energy made since boot b restored r, judged
        as a reading at uptime `up` against r at uptime 0, spread over [offset(b), t]."""
        held = 0
        if credit and self.v2 and rules.implausible(credit, self.max_power[1 if s.slot else 0], up):
            held, credit = credit, 0
            fl |= F_HELD
        self._emit(st, s, credit, held, fl, t - up, t, (b.no, -1), r, key, v)
        if credit:
            _range(s, b.no, r, v)
        if held:
            # the mark stays at r: the next reading is judged from the restored value
            s.mark = r
            s.mark_up = 0
            s.held_value = v
            s.held_up = up
        else:
            s.mark = v
            s.mark_up = up

    def _first_of_boot(
        self,
        st: Station,
        b: Boot,
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
        s.ranges(b.no)
        cross = self._cross_flags(s, b, i, key)
        mark = s.mark
        max_power = self.max_power[1 if n else 0]
        s.held_value = None
        if n == 0 and rules.serial_swapped(s.serial, serial):
            fl = base | (cross & ~F_TIME_EST) | F_METER_RESET
            self._emit(st, s, 0, 0, fl, s.last_t, t, s.last_key, s.last_value, key, v)
            s.mark = v
            s.mark_up = up
            return
        r = None
        if n:
            b.r_used.add(n)
            r = b.r(n)
        x = rules.across_boots(mark, v, r)
        if r is not None:
            if x.persisted:
                held = 0
                c = x.persisted
                fl = cross
                if self.v2 and rules.implausible(c, max_power, self.window_ms):
                    held, c = c, 0
                    fl |= F_HELD
                self._emit(
                    st, s, c, held, fl, s.last_t, s.last_t, s.last_key, s.last_value, (b.no, -1), r
                )
                if c:
                    _range(s, b.no, mark, r)
            fl = base | F_REBOOT | (cross & F_GAP) | (F_ANOMALY_DOWN if x.below else 0)
            self._since_restore(st, s, b, key, v, up, t, r, x.credit, fl)
            return
        # no restored value: over the whole gap [t_last(b), t]
        fl = base | cross | (F_NO_RESTORE if n else 0)
        if x.below:
            fl |= F_ANOMALY_DOWN
        c = x.credit
        held = 0
        if c and self.v2 and rules.implausible(c, max_power, t - s.last_t):
            held, c = c, 0
            fl |= F_HELD
        self._emit(st, s, c, held, fl, s.last_t, t, s.last_key, s.last_value, key, v)
        if c:
            _range(s, b.no, mark, v)
        if n == 0:
            # the grid meter's register never goes back: its mark in b' is
            # max(mark(b), first(b')) (a held jump keeps the old mark)
            if held:
                s.mark = mark
                s.mark_up = up
                s.held_value = v
                s.held_up = up
            else:
                s.mark = max(mark, v) if self.v2 else v
                s.mark_up = up
        elif held:
            s.mark = mark
            s.mark_up = up
            s.held_value = v
            s.held_up = up
        else:
            s.mark = v
            s.mark_up = up

    def _cross_flags(self, s: Stream, b: Boot, i: int, key: Key) -> int:
        """Flags of a segment from the last point of an earlier boot to position i of b."""
        fl = F_REBOOT
        tail = s.tail
        if tail is not None:
            last_seq, count, unsynced = tail
            if last_seq - s.last_key[1] != count - 1 - s.last_pos:
                fl |= F_GAP
            if unsynced:
                fl |= F_TIME_EST
        if key[1] != i:  # a hole before position i in this boot (seqs start at 0)
            fl |= F_GAP
        return fl

    def _meter_reset(
        self,
        st: Station,
        b: Boot,
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
            self._emit(st, s, 0, 0, base | F_BASELINE | F_METER_RESET, t, t, key, tv, key, tv)
        else:
            if s.boot == b.no:
                fl = base | F_METER_RESET
                if key[1] - s.last_key[1] != i - s.last_pos:
                    fl |= F_GAP
            else:
                fl = base | F_METER_RESET | self._cross_flags(s, b, i, key)
            c = rules.meter_reset_credit(fv, s.mark)
            self._emit(st, s, c, 0, fl, s.last_t, t, s.last_key, s.last_value, key, fv)
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

    def _emit(
        self,
        st: Station,
        s: Stream,
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
        iv = self.iv
        if t1 > t0:
            home = (t1 - 1) // iv
            if c and t0 // iv != home:
                if home - t0 // iv < self.spread_max:
                    for k, share in rules.spread(c, t0, t1, iv):
                        if k == home:
                            c = share
                        elif share:
                            self._add(
                                st, s, k, share, 0, fl, from_key, from_value, to_key, to_value
                            )
                # else: a segment over more intervals than spread_max_intervals goes
                # whole to its home interval (docs/metering.md, rule 5)
        else:
            home = t1 // iv
        self._add(st, s, home, c, h, fl, from_key, from_value, to_key, to_value)
        floor = s.floor
        if floor is None or home > floor:
            # intervals below the new home are closed: written, and dropped from memory
            closed: list[tuple[int, Acc]] = []
            if s.accs:
                for k in [k for k in s.accs if k < home]:
                    a = s.accs.pop(k)
                    if a.dirty:
                        self._write_interval(st.sid, s.slot, k, a)
                    closed.append((k, a))
            if self._rolls_up(home * self.iv // DAY_MS):
                self._close_day(s, floor, home, closed)
            s.floor = home

    def _rolls_up(self, d: int) -> bool:
        """The state keeps day d's roll-up (`days_from`)."""
        return self.days_from is not None and d >= self.days_from

    def _close_day(
        self, s: Stream, floor: int | None, home: int, closed: list[tuple[int, Acc]]
    ) -> None:
        """The floor moves from `floor` to `home`, closing the accumulators `closed`: the
        roll-up of the closed records of home's day follows. Every record of the stream at
        or above the floor is an open accumulator, so when home starts a new day its
        closed records are exactly those just closed in it."""
        iv = self.iv
        d = home * iv // DAY_MS
        if floor is None or floor * iv // DAY_MS < d:
            day: DaySum | None = DaySum(d)
        else:
            day = s.day if s.day is not None and s.day.d == d else None
        if day is not None:
            for k, a in sorted(closed, key=_first):
                if k * iv // DAY_MS == d:
                    day.add(a)
        s.day = day

    def day_record(self, sid: str, n: int, d: int) -> tuple[bool, Record | None]:
        """Stream n's day record of day d from the state alone: the closed records of its
        floor's day rolled up, then its open accumulators of that day (the records of
        the day at or above the floor), in interval order: (True, the record or None
        when the day has none), or (False, None) when the state does not know (the
        backend rolls the day's records up)."""
        st = self.stations.get(sid)
        s = st.streams.get(n) if st is not None else None
        if s is None or s.day is None or s.day.d != d or not self._rolls_up(d):
            return False, None
        iv = self.iv
        day = DaySum.load(s.day.dump())
        for k in sorted(k for k in s.accs if k * iv // DAY_MS == d):
            day.add(s.accs[k])
        if not day.n:
            return True, None
        return True, make_record(
            "day",
            sid,
            n,
            d * DAY_MS,
            d * DAY_MS + DAY_MS,
            day.mwh,
            day.held,
            flag_names(day.flags),
            day.from_key,
            day.to_key,
            day.from_value,
            day.to_value,
        )

    def _add(
        self,
        st: Station,
        s: Stream,
        k: int,
        c: int,
        h: int,
        fl: int,
        from_key: Key,
        from_value: int,
        to_key: Key,
        to_value: int,
    ) -> None:
        """Add a share (and held amount) to stream s's sum in interval k."""
        fo = self.first_open
        if fo is not None and k < fo:
            s.locked_mwh += c
            s.locked_held += h
            lo = s.lk_lo
            if lo is None or k < lo[0]:
                s.lk_lo = (k, from_key, from_value)
            hi = s.lk_hi
            if hi is None or k >= hi[0]:
                s.lk_hi = (k, to_key, to_value)
        if s.low is None or k < s.low:
            s.low = k
        if not self.in_view(k):
            return
        acc = s.accs.get(k)
        if acc is None:
            if s.floor is not None and k < s.floor:
                # an interval closed before (a clock running backwards): its record holds
                # every earlier contribution
                acc = self._reopen(st.sid, s.slot, k)
                if s.day is not None and k * self.iv // DAY_MS == s.day.d:
                    s.day = None  # the floor's day has a closed record changing
            if acc is None:
                s.accs[k] = Acc(c, h, fl, from_key, from_value, to_key, to_value)
                return
            s.accs[k] = acc
        acc.mwh += c
        acc.held += h
        acc.flags |= fl
        acc.to_key = to_key
        acc.to_value = to_value
        acc.dirty = True

    def _reopen(self, sid: str, n: int, k: int) -> Acc | None:
        r = self.backend.get_record(make_record_id("interval", sid, n, start_ms=k * self.iv))
        if r is None:
            return None
        return Acc(r.mwh, r.held_mwh, flag_bits(r.flags), r.from_key, r.e_from, r.to_key, r.e_to)

    # ---- writing records -----------------------------------------------------------------

    def _write_interval(self, sid: str, n: int, k: int, a: Acc) -> None:
        iv = self.iv
        a.dirty = False
        self.backend.put_record(
            make_record(
                "interval",
                sid,
                n,
                k * iv,
                k * iv + iv,
                a.mwh,
                a.held,
                flag_names(a.flags),
                a.from_key,
                a.to_key,
                a.from_value,
                a.to_value,
            )
        )
        self.days.setdefault(sid, set()).add((n, k * iv // DAY_MS))

    def flush(self, sid: str) -> None:
        """Write the station's changed interval records and its pending sessions."""
        st = self.stations.get(sid)
        if st is None:
            return
        for s in st.streams.values():
            for k, a in s.accs.items():
                if a.dirty:
                    self._write_interval(sid, s.slot, k, a)
        if st.pending:
            self._sessions(st, final=False)

    def _sessions(self, st: Station, final: bool) -> None:
        keep = []
        for p in st.pending:
            r, ok = session_record(st, p)
            self.backend.put_record(r)
            if not ok and not final:
                keep.append(p)
        st.pending = keep


def adjustment_record(
    params: MeterParams, sid: str, n: int, full: Stream | None, locked: Stream | None
) -> Record | None:
    """Rule 8: stream n's adjustment record: revised − locked totals of the locked
    intervals, in the first open interval (None when they agree)."""
    iv = params.interval_ms
    first_open = rules.first_open_interval(params.locked_until_ms, iv)
    assert first_open is not None
    f_sum, f_held = (full.locked_mwh, full.locked_held) if full is not None else (0, 0)
    l_sum, l_held = (locked.locked_mwh, locked.locked_held) if locked is not None else (0, 0)
    if f_sum == l_sum and f_held == l_held:
        return None
    lo = full.lk_lo if full is not None else None
    hi = full.lk_hi if full is not None else None
    return Record(
        kind="interval",
        sid=sid,
        slot=n,
        start_ms=first_open * iv,
        end_ms=first_open * iv + iv,
        mwh=f_sum - l_sum,
        held_mwh=f_held - l_held,
        flags=flag_names(F_ADJUSTMENT),
        from_key=lo[1] if lo else (0, 0),
        to_key=hi[1] if hi else (0, 0),
        e_from=lo[2] if lo else 0,
        e_to=hi[2] if hi else 0,
        version=PROCESSING_VERSION,
        extra={
            "locked_until_ms": params.locked_until_ms,
            "locked_mwh": l_sum,
            "revised_mwh": f_sum,
            "locked_held_mwh": l_held,
            "revised_held_mwh": f_held,
        },
    )


def _range(s: Stream, boot: int, lo: int, hi: int) -> None:
    """Remember that register range [lo, hi] of the stream was credited in `boot`."""
    if not s.slot:
        return
    rs = s.ranges(boot)
    if rs and rs[-1][1] == lo:
        rs[-1][1] = hi
    else:
        rs.append([lo, hi])
        if len(rs) > MAX_RANGES:
            del rs[0]


def _first(x: tuple[int, Acc]) -> int:
    return x[0]


# A telemetry's readings: (stream, register value in mWh, meter serial), and whether it
# has a meter. Of its body as decoded (a Mapping), and of its reads (a Struct, whose keys
# left out are UNSET: a serial left out is None, as in a body).


def _dict_readings(body: Mapping[str, Any]) -> tuple[bool, list[tuple[int, int, Any]]]:
    readings: list[tuple[int, int, Any]] = []
    meter = body.get("meter")
    if meter:
        e = meter.get("e_wh")
        if type(e) is int:
            readings.append((0, e * 1000, meter.get("sn")))
    slots = body.get("slots")
    if slots:
        for sl in slots:
            n = sl.get("n")
            e = sl.get("e_mwh")
            if type(e) is int and type(n) is int and n > 0:
                readings.append((n, e, None))
    return bool(meter), readings


def _packed_readings(v: tuple[int, ...]) -> tuple[bool, list[tuple[int, int, Any]]]:
    readings: list[tuple[int, int, Any]] = []
    e = v[reads.E_WH]
    if e >= 0:
        sn = v[reads.SN]
        readings.append((0, e * 1000, sn if sn >= 0 else None))
    for i in range(reads.SLOTS, len(v), 3):
        n = v[i]
        if n > 0:
            readings.append((n, v[i + 1], None))
    return e >= 0, readings


def usable(m: RawMsg) -> bool:
    """A message metering can place: an integer `up` and a sequence number."""
    body: Any = m.body
    up = 0 if type(body) is bytes else body.get("up")  # (packed reads: always an integer)
    return type(up) is int and type(m.seq) is int and m.seq >= 0


def iter_sorted(msgs: Iterable[RawMsg]) -> list[RawMsg]:
    return sorted(msgs, key=lambda m: (m.boot, m.seq))
