"""Session records (docs/metering.md "Records"): one per `session_end` event, matched with
its `session_start`, timed by rule 5, and cross-checked against the register ranges its
slot's stream credited in the session's boots. Also which session records need making
again after the engine processed or re-ran messages.
"""

from __future__ import annotations

import bisect
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
from agent.ledger.state import Key, Station


def _int(x: Any) -> int | None:
    return x if type(x) is int else None


def _hi(r: list[int]) -> int:
    return r[1]


def session_record(st: Station, key: Key) -> tuple[Record, bool]:
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
        off, est = sb.clock
        t0 = off + (_int(body.get("up0")) or 0)
        if est or (skey is None and why == "reboot"):
            fl |= F_TIME_EST
    t1 = _int(body.get("t1"))
    if t1 is None:
        off, est = ub.clock
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


def note_rerun(st: Station, boot: int, marks: dict[int, int] | None) -> None:
    """Remember that a re-run from `boot` may change the session records ending from it
    on; in `boot` itself only those above `marks` (slot -> register), None: all."""
    cur = st.sess_rerun
    if cur is None or boot < cur[0]:
        st.sess_rerun = (boot, marks)
    elif boot == cur[0]:
        old = cur[1]
        if old is None or marks is None:
            st.sess_rerun = (boot, None)
        else:
            st.sess_rerun = (boot, {n: min(old[n], marks[n]) for n in old.keys() & marks})


def sessions_to_remake(st: Station) -> set[Key]:
    """The keys of the session_end events whose records may have changed since the last
    call: ends just processed (or matched by a new start), ends a re-run reached, and the
    ends whose register check was not "ok" yet."""
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
    return keys
