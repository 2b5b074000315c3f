"""Session records (docs/metering.md "Records"): one per `session_end` event, matched with
its `session_start`, timed by rule 5, and cross-checked against the register ranges its
slot's stream credited in the session's boots.

Bounded: the engine remembers the latest `session_start` per (slot, bat, register) (at
most MAX_STARTS of them) and the register ranges of each stream's last two boots with
readings. A session whose check is not "ok" yet stays *pending* while its end boot is the
current one (later readings of that boot may still cover it) and is re-made after each
batch; when the next boot starts it is final.

OCPP transactions (CONTRACT §11, agent/ocpp/frames.py) make the same records: a start
opens the transaction under its id (at most MAX_STARTS open), the end closes it. An end
whose transaction is not open (a retried StopTransaction, CitrineOS #880; or one whose
start was never received) makes no record: a transaction is counted once.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

from agent.ledger.records import (
    F_ANOMALY_DOWN,
    F_HIST,
    F_REBOOT,
    F_TIME_EST,
    PROCESSING_VERSION,
    Record,
    flag_names,
)
from agent.ledger.state import MAX_STARTS, Boot, Key, Station


def _int(x: Any) -> int | None:
    return x if type(x) is int else None


def _hi(r: list[int]) -> int:
    return r[1]


def note_start(st: Station, b: Boot, key: Key, body: Mapping[str, Any]) -> None:
    """A session_start: the latest one per (slot, bat, register) is what an end matches."""
    sig = (body.get("slot"), body.get("bat"), body.get("e_mwh"))
    st.starts.pop(sig, None)
    st.starts[sig] = (key, b.clock)
    if len(st.starts) > MAX_STARTS:
        del st.starts[next(iter(st.starts))]


def end_session(st: Station, b: Boot, key: Key, body: Mapping[str, Any]) -> list[Any]:
    """The pending entry of a session_end: the record's fields except the check, which
    `session_record` adds from the ranges (re-made while the end boot is current)."""
    n = _int(body.get("slot")) or 0
    bat = body.get("bat")
    e0 = _int(body.get("e0_mwh")) or 0
    e1 = _int(body.get("e1_mwh")) or 0
    why = body.get("why")
    start = st.starts.get((body.get("slot"), bat, body.get("e0_mwh")))
    # the boot whose uptime up0 counts in (a session closed "reboot" began before)
    if start is not None:
        skey: Key | None = start[0]
        sb_no, s_clock = start[0][0], start[1]
    elif why == "reboot" and st.prev is not None:
        skey = None
        sb_no, s_clock = st.prev
    else:
        skey = None
        sb_no, s_clock = b.no, b.clock
    u_clock = s_clock if why == "reboot" else b.clock  # boot of up1
    fl = 0
    t0 = _int(body.get("t0"))
    if t0 is None:
        off, est = s_clock
        t0 = off + (_int(body.get("up0")) or 0)
        if est or (skey is None and why == "reboot"):
            fl |= F_TIME_EST
    t1 = _int(body.get("t1"))
    if t1 is None:
        off, est = u_clock
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
    fk = skey if skey is not None else key
    extra = {"bat": bat, "soc0": body.get("soc0"), "soc1": body.get("soc1"), "why": why}
    return [
        list(key),
        n,
        sb_no,
        e0,
        e1,
        t0,
        t1,
        mwh,
        fl,
        list(fk),
        extra,
    ]


def session_record(st: Station, p: list[Any]) -> tuple[Record, bool]:
    """The session record of a pending entry; bool: its register check is "ok"."""
    key, n, sb_no, e0, e1, t0, t1, mwh, fl, fk, extra = p
    eb_no = key[0]
    reg = 0
    seen = False
    s = st.streams.get(n)
    if s is not None:
        for bno, rs in s.rhist:
            if not sb_no <= bno <= eb_no:
                continue
            seen = True
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
        from_key=(fk[0], fk[1]),
        to_key=(key[0], key[1]),
        e_from=e0,
        e_to=e1,
        version=PROCESSING_VERSION,
        extra={**extra, "reg_mwh": reg, "reg_check": check},
    )
    return rec, check == "ok"


def _reg(body: Mapping[str, Any], slot: int) -> int | None:
    """The frame's register value of `slot` (0 in `reg`: the transaction's connector)."""
    for n, v in body.get("reg") or ():
        if (n or slot) == slot and type(v) is int:
            return int(v)
    return None


def ocpp_start(st: Station, key: Key, body: Mapping[str, Any], slot: int, t: int, fl: int) -> None:
    """An OCPP transaction starts: its register is the frame's value, else the connector's
    latest reading."""
    tx = str(body.get("tx"))
    e0 = _reg(body, slot)
    if e0 is None and slot in st.streams:
        e0 = st.streams[slot].last_value
    st.tx.pop(tx, None)
    st.tx[tx] = [slot, e0, t, list(key), body.get("id_tag"), fl]
    if len(st.tx) > MAX_STARTS:
        del st.tx[next(iter(st.tx))]


def ocpp_end(st: Station, key: Key, body: Mapping[str, Any], t: int, fl: int) -> list[Any] | None:
    """An OCPP transaction ends: the pending entry of its session record (as end_session
    makes), or None when it is not open. Without a final value in the frame (2.0.1 lets
    an Ended event carry none) the connector's latest reading ends it."""
    o = st.tx.pop(str(body.get("tx")), None)
    if o is None:
        return None
    n, e0, t0, fk, tag, fl0 = o
    e1 = _reg(body, n)
    s = st.streams.get(n)
    if e1 is None and s is not None:
        e1 = s.last_value
    if e0 is None:
        e0 = e1
    if e0 is None or e1 is None:
        return None  # no reading of the connector at all: nothing to say
    fl |= fl0
    mwh = e1 - e0
    if mwh < 0:
        mwh = 0
        fl |= F_ANOMALY_DOWN
    extra = {"tx": body.get("tx"), "id_tag": tag, "why": body.get("why")}
    return [list(key), n, fk[0], e0, e1, t0, max(t, t0), mwh, fl, fk, extra]
