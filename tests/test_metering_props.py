"""Property tests of the metering engine (agent/ledger/) against tests/metering_reference.py.

Random station histories (several stations and slots, reboots with and without restore,
with and without the boot event, b_mwh present or absent, power cuts before and after the
last persist, gaps, glitches down and back up, meter resets with and without events, serial
swaps, spikes and level shifts, hist and unsynced boots), delivered in random orders with
duplicates: totals equal the reference, records are independent of arrival, and the
incremental meter equals compute().
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent.ledger.engine
from agent.ledger import (
    IncrementalMeter,
    MeterParams,
    RawMsg,
    Record,
    compute,
    record_id,
)
from agent.ledger.inputs import raw_msg
from tests.agent_helpers import assert_days_roll_up
from tests.metering_reference import reference_totals

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def gen_station(rnd: random.Random, sid: str) -> list[RawMsg]:
    """One station's messages, as the firmware would send them (then some lost)."""
    nslots = rnd.randint(1, 3)
    with_meter = rnd.random() < 0.7
    sends_b_mwh = rnd.random() < 0.6
    reg = {n: rnd.choice([0, rnd.randint(0, 10**8)]) for n in range(1, nslots + 1)}
    persisted = dict(reg)
    meter_wh = rnd.randint(0, 10**6)
    sn = 5000
    wall = T0 + rnd.randint(0, 3 * 86_400_000)
    boot = rnd.randint(1, 4)
    lose = rnd.choice([0.0, 0.05, 0.2])
    out: list[RawMsg] = []
    for _ in range(rnd.randint(1, 4)):
        up = rnd.randint(0, 3000)
        offset = wall - up
        restored = dict(persisted)
        if rnd.random() < 0.1 and restored:
            # a restored value far above what was sent (§6.3: r − mark against the window)
            n = rnd.choice(list(restored))
            restored[n] += rnd.randint(10**6, 10**10)
        reg = dict(restored)
        if rnd.random() < 0.15 and reg:
            # the first reading of the boot claims a huge gain since the restore (§6.0, §6.3)
            n = rnd.choice(list(reg))
            reg[n] += rnd.randint(10**7, 10**12)
        if with_meter and rnd.random() < 0.15:
            # the grid meter jumps (or reads low) across the restart
            meter_wh = max(0, meter_wh + rnd.choice([-1, 1]) * rnd.randint(10**3, 10**7))
        synced_from = rnd.choice([0, 0, 3, 10**9])  # seq from which ts is sent
        msgs: list[dict[str, Any]] = []
        if rnd.random() < 0.75:
            msgs.append(
                {
                    "ev": "boot",
                    "fw": "1",
                    "reset": "power",
                    "up": up,
                    "restored": {str(n): v for n, v in restored.items()},
                }
            )
        open_sess: dict[int, tuple[int, int]] = {}
        for _ in range(rnd.randint(1, 25)):
            dt = rnd.choice([1000, 10_000, 10_000, 10_000, 60_000, 900_000])
            up += dt
            for n in reg:
                if rnd.random() < 0.7:
                    reg[n] += rnd.randint(0, 3000 * dt // 3600)
            meter_wh += rnd.randint(0, 50_000 * dt // 3_600_000)
            if rnd.random() < 0.3:
                persisted = dict(reg)
            x = rnd.random()
            if with_meter and x < 0.05:
                new_sn = sn + rnd.choice([0, 1])
                to = rnd.randint(0, 100)
                msgs.append(
                    {"ev": "meter_reset", "from_wh": meter_wh, "to_wh": to, "sn": new_sn, "up": up}
                )
                meter_wh, sn = to, new_sn
            elif with_meter and x < 0.08:
                sn += 1  # swapped without an event
                meter_wh = rnd.randint(0, 10**6)
            elif x < 0.12:
                msgs.append({"ev": "alarm", "code": "x", "level": "warn", "msg": "m", "up": up})
            elif x < 0.2 and reg:
                n = rnd.choice(list(reg))
                if n in open_sess:
                    e0, u0 = open_sess.pop(n)
                    msgs.append(
                        {
                            "ev": "session_end",
                            "slot": n,
                            "bat": "B1",
                            "e0_mwh": e0,
                            "e1_mwh": reg[n],
                            "soc0": 100,
                            "soc1": 900,
                            "up0": u0,
                            "up1": up,
                            "why": "full",
                            "up": up,
                        }
                    )
                else:
                    open_sess[n] = (reg[n], up)
                    msgs.append(
                        {
                            "ev": "session_start",
                            "slot": n,
                            "bat": "B1",
                            "e_mwh": reg[n],
                            "soc": 100,
                            "up": up,
                        }
                    )
            body: dict[str, Any] = {"up": up}
            if with_meter and rnd.random() < 0.9:
                e = meter_wh
                y = rnd.random()
                if y < 0.04:
                    e = max(0, e - rnd.randint(1, 1000))  # glitch down
                elif y < 0.07:
                    e += rnd.randint(1000, 10**6)  # spike
                elif y < 0.09:
                    meter_wh += rnd.randint(1000, 10**6)  # level shift
                    e = meter_wh
                body["meter"] = {"e_wh": e, "p_w": 0, "sn": sn}
                if rnd.random() < 0.03:
                    body["meter"]["e_wh"] = rnd.choice([-1, 10**11 + 1, "12"])  # §6.9
            slots = []
            for n, v in reg.items():
                y = rnd.random()
                if y < 0.04:
                    v = max(0, v - rnd.randint(1, 10**6))
                elif y < 0.07:
                    v += rnd.randint(10**5, 10**8)
                elif y < 0.09:
                    reg[n] += rnd.randint(10**5, 10**8)
                    v = reg[n]
                s: dict[str, Any] = {"n": n, "st": "C", "e_mwh": v}
                if rnd.random() < 0.03:
                    s["e_mwh"] = rnd.choice([-5, 2**53, None])  # §6.9: the slot is spoiled
                if sends_b_mwh:
                    s["b_mwh"] = restored[n]
                slots.append(s)
            body["slots"] = slots
            msgs.append(body)
        u = up
        for seq, body in enumerate(msgs):
            body.update({"v": 1, "sid": sid, "kid": 1, "boot": boot, "seq": seq})
            u = body["up"]
            if body["seq"] >= synced_from:
                body["ts"] = offset + u
            if rnd.random() < 0.1:
                body["hist"] = 1
            if rnd.random() >= lose:
                delay = rnd.randint(0, 5000) + (rnd.randint(0, 10**6) if body.get("hist") else 0)
                # as metering reads it: §6.9's clean, spoiled sources named
                out.append(raw_msg(sid, boot, body["seq"], offset + u + delay, body))
        wall = offset + u + rnd.randint(1000, 5 * 3_600_000)
        boot += rnd.randint(1, 2)
    return out


def gen_fleet(rnd: random.Random) -> list[RawMsg]:
    msgs: list[RawMsg] = []
    for i in range(rnd.randint(1, 3)):
        msgs.extend(
            gen_station(
                rnd,
                f"KH-T-{i:04d}",
            )
        )
    return msgs


def totals(records: list[Record], kind: str = "interval") -> dict[tuple[str, int], tuple[int, int]]:
    out: dict[tuple[str, int], tuple[int, int]] = {}
    for r in records:
        if r.kind == kind:
            c, h = out.get((r.sid, r.slot), (0, 0))
            out[(r.sid, r.slot)] = (c + r.mwh, h + r.held_mwh)
    return out


def arrival(rnd: random.Random, msgs: list[RawMsg]) -> list[RawMsg]:
    """A random order with duplicates (some received again later: same bytes)."""
    out = list(msgs)
    for m in rnd.sample(msgs, k=len(msgs) // 5):
        out.append(
            RawMsg(
                sid=m.sid,
                boot=m.boot,
                seq=m.seq,
                recv_ms=m.recv_ms + 1000,
                body=m.body,
                spoiled=m.spoiled,
            )
        )
        out.append(m)
    rnd.shuffle(out)
    return out


@SETTINGS
@given(st.randoms(use_true_random=False))
def test_totals_match_reference(rnd: random.Random) -> None:
    msgs = gen_fleet(rnd)
    recs = compute(msgs)
    ref = reference_totals(msgs)
    got = totals(recs)
    # a stream with readings always has records; both sides agree on which streams exist
    assert {k: v for k, v in got.items()} == {k: v for k, v in ref.items()}
    # the day roll-ups carry exactly the interval totals
    assert totals(recs, "day") == got


@SETTINGS
@given(st.randoms(use_true_random=False))
def test_arrival_order_and_duplicates_do_not_matter(rnd: random.Random) -> None:
    msgs = gen_fleet(rnd)
    want = compute(msgs)
    assert compute(arrival(rnd, msgs)) == want
    assert compute(list(reversed(msgs))) == want


def feed(
    rnd: random.Random,
    meter: IncrementalMeter,
    msgs: list[RawMsg],
    seen: dict[str, dict[str, Record]],
) -> None:
    """Feed msgs in random batches, applying changes() to a mirror after each batch (day
    roll-ups deferred at random)."""
    i = 0
    while i < len(msgs):
        n = rnd.choice([1, 1, 2, 5, 20])
        batch = msgs[i : i + n]
        i += n
        for sid in meter.add(batch):
            apply(seen, sid, *meter.changes(sid, days=rnd.random() < 0.5))
    for sid in meter.sids():
        apply(seen, sid, *meter.changes(sid))  # the day roll-ups left pending


def apply(seen: dict[str, dict[str, Record]], sid: str, ups: list[Record], gone: list[str]) -> None:
    mirror = seen.setdefault(sid, {})
    for g in gone:
        mirror.pop(g, None)
    for r in ups:
        mirror[record_id(r)] = r


@SETTINGS
@given(st.randoms(use_true_random=False))
def test_incremental_equals_compute(rnd: random.Random) -> None:
    msgs = gen_fleet(rnd)
    want = compute(msgs)
    orders = [
        sorted(msgs, key=lambda m: (m.sid, m.boot, m.seq)),  # in order: the fast path
        arrival(rnd, msgs),  # any order
    ]
    # mostly in order, a few late (an outbox replaying while live data flows)
    late = sorted(msgs, key=lambda m: (m.boot, m.seq))
    for _ in range(len(late) // 10):
        j = rnd.randrange(len(late))
        late.append(late.pop(j))
    orders.append(late)
    part_msgs = agent.ledger.engine.CKPT_MSGS
    try:
        for order in orders:
            # checkpoints every few messages, so that late messages re-run from within a boot
            agent.ledger.engine.CKPT_MSGS = rnd.choice([1, 2, 5, 256])
            im = IncrementalMeter()
            seen: dict[str, dict[str, Record]] = {}
            feed(rnd, im, order, seen)
            got = [r for sid in im.sids() for r in im.records(sid)]
            assert sorted(got, key=_k) == sorted(want, key=_k)
            for sid in im.sids():
                assert seen.get(sid, {}) == {record_id(r): r for r in im.records(sid)}
    finally:
        agent.ledger.engine.CKPT_MSGS = part_msgs


def _k(r: Record) -> tuple[Any, ...]:
    return (r.kind, r.sid, r.slot, r.start_ms, r.end_ms, r.from_key, r.to_key)


@SETTINGS
@given(st.randoms(use_true_random=False))
def test_interval_shares_conserve_energy(rnd: random.Random) -> None:
    """Per boot-crossing or not, no mWh is created or lost by the attribution: the sum of
    the interval shares of every stream equals its credits, even with 1-minute intervals
    (many more boundaries) and with a lock."""
    msgs = gen_fleet(rnd)
    ref = reference_totals(msgs)
    got = totals(compute(msgs, MeterParams(interval_ms=60_000)))
    assert got == ref
    times = sorted(m.recv_ms for m in msgs) or [T0]
    lock_until = times[len(times) // 2]
    p = MeterParams(locked_until_ms=lock_until, locked_at_ms=lock_until + 3_600_000)
    locked = compute(msgs, p)
    assert totals(locked) == ref  # adjustments carry exactly the revisions
    # a locked interval is what the messages received by the lock gave, nothing later
    early = compute([m for m in msgs if m.recv_ms <= lock_until + 3_600_000])
    lk = {
        (r.sid, r.slot, r.start_ms): r
        for r in early
        if r.kind == "interval" and r.end_ms <= lock_until
    }
    assert {
        (r.sid, r.slot, r.start_ms): r
        for r in locked
        if r.kind == "interval" and r.end_ms <= lock_until
    } == lk
    # and the incremental meter agrees with the lock too
    im = IncrementalMeter(p)
    feed(rnd, im, arrival(rnd, msgs), {})
    assert sorted((r for s in im.sids() for r in im.records(s)), key=_k) == sorted(locked, key=_k)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.randoms(use_true_random=False), st.sampled_from([None, 0, 1, 7]))
def test_the_agents_store_meter_equals_compute(rnd: random.Random, lock: int | None) -> None:
    """The agent's path (agent/ledger/agent_meter.py on the SQLite store: raw rows, records
    and states per transaction, checkpoints and re-applies from the tables), random
    arrival with duplicates, a restart half-way: the stored records are compute()'s over
    the stored messages (the first copy of each key)."""
    import json
    import tempfile

    from agent.ledger.agent_meter import StoreMeter, decode_row
    from agent.store import RawRow, Store, record_to_row

    msgs = gen_fleet(rnd)
    order = arrival(rnd, msgs)
    params = MeterParams()
    if lock is not None and msgs:
        times = sorted(m.recv_ms for m in msgs)
        at = times[len(times) * lock // 10]
        params = MeterParams(locked_until_ms=at, locked_at_ms=at + 600_000)

    def row(m: RawMsg) -> RawRow:
        body = {k: v for k, v in m.body.items()}
        payload = json.dumps(body, separators=(",", ":")).encode()[:-1]
        payload += b',"sig":"' + b"0" * 64 + b'"}'
        return RawRow(m.sid, m.boot, m.seq, "telemetry", "t", m.recv_ms, 1, payload)

    # (the stored bytes are the cleaned bodies: both sides read the same bytes)
    with tempfile.TemporaryDirectory() as d:
        url = f"sqlite:///{d}/p.db"
        store = Store(url, synchronous="off")
        meter = StoreMeter(params, store, ckpt_every=rnd.choice([2, 5, 64]))
        i = 0
        half = len(order) // 2
        restarted = False
        while i < len(order):
            n = rnd.choice([1, 2, 5, 20])
            rows = [row(m) for m in order[i : i + n]]
            i += n

            def then(res: Any, rows: list[RawRow] = rows, meter: StoreMeter = meter) -> None:
                meter.add([decode_row(rows[j]) for j in res.new])

            store.write_batch(rows, then=then)
            if not restarted and i >= half:
                restarted = True
                store.close()
                store = Store(url, synchronous="off")
                meter = StoreMeter(params, store, ckpt_every=rnd.choice([2, 5, 64]))
                assert meter.start({m.sid for m in msgs}) == (0, 0)
        stored = [decode_row(r) for rs in store.iter_raw() for r in rs]
        got = {r.rid: r for r in store.record_rows()}
        store.close()
    want = {r.rid: r for r in map(record_to_row, compute(stored, params))}
    assert got == want
    assert_days_roll_up(list(got.values()))
