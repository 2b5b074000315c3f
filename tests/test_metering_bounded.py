"""The metering engine's cost does not grow with history: memory retained per station is
flat, a restart reads no raw row the states have seen, one reading spanning years costs
no more than any other, and a late message re-applies only its span. The tests that meter
into a store run on both engines (`db_url`: SQLite, PostgreSQL)."""

from __future__ import annotations

import gc
import time
import tracemalloc
from typing import Any

from agent.keys import KeyStore
from agent.ledger import MeterParams, RawMsg, compute
from agent.ledger.agent_meter import StoreMeter, decode_row
from agent.ledger.inputs import raw_msg
from agent.store import RawRow, Store, record_to_row
from tests.agent_helpers import Station, key_for

SID = "KH-BND-0001"


def _rows(st: Station, n: int, recv0: int) -> list[RawRow]:
    out = []
    for i in range(n):
        st.advance(10_000, 1500)
        kind, payload = st.telemetry()
        seq = st.seq - 1
        out.append(RawRow(st.sid, st.boot, seq, kind, "t", recv0 + i * 10_000, 1, payload))
    return out


def _ingest(store: Store, meter: StoreMeter, rows: list[RawRow], batch: int = 200) -> None:
    """What the agent's _write does: raw rows and their metering in one transaction."""
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]

        def then(res: Any, part: list[RawRow] = part) -> None:
            meter.add([decode_row(part[j]) for j in res.new])

        store.write_batch(part, then=then)


def _retained_after(url: str, n: int, sid: str) -> int:
    """Python memory retained by the agent's metering after n in-order 4-slot messages of
    one station (tracemalloc, after a full collection)."""
    store = Store(url, synchronous="off")
    meter = StoreMeter(MeterParams(), store)
    st = Station(sid, slots=4)
    rows = _rows(st, n, 1_767_225_600_000)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    _ingest(store, meter, rows)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    store.close()
    return held


def test_memory_does_not_grow_with_history(db_url: str) -> None:
    small = _retained_after(db_url, 10_000, "KH-BND-0001")
    large = _retained_after(db_url, 50_000, "KH-BND-0002")  # (same database, another station)
    # the rows themselves are the caller's (created before the measurement starts); what
    # stays is the station's state (~15 KB) plus a few KB of the driver's caches
    assert large <= small * 1.2 or large - small < 16_384, (small, large)
    assert large < 100_000, large  # (m1 kept ~5 KB per 8-slot message: 250 MB here)


def test_a_reading_spanning_ten_years_is_instant() -> None:
    up = 320_000_000_000  # CONTRACT §2: the largest uptime, ten years of ms
    t0 = 1_767_225_600_000
    msgs = [
        RawMsg(
            sid=SID,
            boot=1,
            seq=0,
            recv_ms=t0,
            body={"up": 0, "ts": t0 - up, "meter": {"e_wh": 0}},
        ),
        RawMsg(
            sid=SID,
            boot=2,
            seq=0,
            recv_ms=t0,
            body={"up": up, "ts": t0, "meter": {"e_wh": 10**11}},
        ),
        RawMsg(
            sid=SID,
            boot=2,
            seq=1,
            recv_ms=t0,
            body={
                "up": up + 10_000,
                "ts": t0 + 10_000,
                "slots": [{"n": 1, "e_mwh": 10**15, "b_mwh": 0}],
            },
        ),
    ]
    t = time.perf_counter()
    recs = compute(msgs)
    assert time.perf_counter() - t < 0.5
    assert len(recs) < 20
    # nothing created or lost: the meter's credit (or held amount) is one segment's
    meter = [r for r in recs if r.kind == "interval" and r.slot == 0]
    assert sum(r.mwh + r.held_mwh for r in meter) == 10**14


def test_restart_reads_no_raw_row_the_states_have_seen(db_url: str) -> None:
    url = db_url
    sids = [f"KH-RST-{i:04d}" for i in range(4)]
    with KeyStore(url) as ks:
        for sid in sids:
            ks.add(sid, key_for(sid))
    store = Store(url, synchronous="off")
    meter = StoreMeter(MeterParams(), store, ckpt_every=64)
    rows: list[RawRow] = []
    for i, sid in enumerate(sids):
        st = Station(sid, slots=3)
        rows += _rows(st, 600, 1_767_225_600_000 + i)
        st.reboot()
        rows += _rows(st, 300, 1_767_240_000_000 + i)
    rows.sort(key=lambda r: r.recv_ms)
    # arrival with some late messages: an outbox replaying behind live data
    late = rows[100:160]
    rows = rows[:100] + rows[160:1500] + late + rows[1500:]
    _ingest(store, meter, rows, batch=50)
    stored = {r.rid: r for r in store.record_rows()}
    store.close()
    want = {
        r.rid: r
        for r in map(
            record_to_row,
            compute([raw_msg(r.sid, r.boot, r.seq, r.recv_ms, _body(r)) for r in rows]),
        )
    }
    assert stored == want

    # restart: the states are resumed, no raw row is read
    store = Store(url)
    meter = StoreMeter(MeterParams(), store)
    rebuilt, read = meter.start(store.key_sids())
    assert (rebuilt, read, store.raw_rows_read) == (0, 0, 0)
    # ... and metering goes on from them exactly
    st = Station(sids[0], slots=3, boot=3)
    more = _rows(st, 50, 1_767_300_000_000)
    _ingest(store, meter, more)
    assert store.raw_rows_read == 0
    got = {r.rid: r for r in store.record_rows()}
    want = {
        r.rid: r
        for r in map(
            record_to_row,
            compute([raw_msg(r.sid, r.boot, r.seq, r.recv_ms, _body(r)) for r in rows + more]),
        )
    }
    assert got == want

    # a station whose state is gone (an older database) is metered from its raw rows once
    store.db.execute("DELETE FROM ledger_state WHERE sid = ?", (sids[1],))
    store.db.execute("UPDATE records SET mwh = mwh + 1 WHERE sid = ?", (sids[1],))
    store.close()
    store = Store(url)
    meter = StoreMeter(MeterParams(), store)
    rebuilt, read = meter.start(store.key_sids())
    assert (rebuilt, read) == (1, 900)  # its own rows, once
    assert {r.rid: r for r in store.record_rows()} == want
    store.close()


def _body(r: RawRow) -> Any:
    from agent import wire

    return wire.decode_record(r.record)


def _tel(boot: int, seq: int, up: int, off: int, e: int, wh: int) -> RawMsg:
    body = {
        "up": up,
        "ts": off + up,
        "meter": {"e_wh": wh},
        "slots": [{"n": 1, "e_mwh": e, "b_mwh": 0}],
    }
    return RawMsg(sid=SID, boot=boot, seq=seq, recv_ms=off + up + 100, body=body)


def test_a_late_message_re_applies_only_its_span() -> None:
    from agent.ledger import IncrementalMeter

    t0 = 1_767_225_600_000
    msgs = [_tel(1, i, 10_000 * i, t0, 1000 * i, i) for i in range(3000)]
    late = msgs.pop(2900)
    im = IncrementalMeter(ckpt_every=100)
    im.add(msgs)
    read = im.ledger.rows_read
    im.add([late])
    # from the checkpoint before seq 2900 to the end: at most 100 + 100 rows, not 3000
    assert im.ledger.rows_read - read <= 201
    assert im.records(SID) == compute([*msgs, late])


def test_a_clock_running_backwards_across_boots_recomputes_exactly() -> None:
    from agent.ledger import IncrementalMeter

    t0 = 1_767_225_600_000
    # boot 2's clock is a day behind boot 1's: its segments land in intervals boot 1
    # closed long ago; a late message of boot 2 must fall back to an earlier checkpoint
    b1 = [_tel(1, i, 10_000 * i, t0 + 86_400_000, 1000 * i, i) for i in range(400)]
    b2 = [_tel(2, i, 10_000 * i, t0, 400_000 + 900 * i, 400 + i) for i in range(400)]
    everything = b1 + b2
    want = compute(everything)
    for late_at in (5, 150, 399):
        rest = [m for m in b2 if m.seq != late_at]
        im = IncrementalMeter(ckpt_every=64)
        im.add(b1)
        im.add(rest)
        im.add([b2[late_at]])
        assert im.records(SID) == want, late_at


def test_a_clock_running_backwards_on_the_store(db_url: str) -> None:
    """The same through the agent's store backend (closed intervals read back from the
    records table, checkpoints and raw rows from theirs)."""
    t0 = 1_767_225_600_000
    b1 = [_tel(1, i, 10_000 * i, t0 + 86_400_000, 1000 * i, i) for i in range(300)]
    b2 = [_tel(2, i, 10_000 * i, t0, 400_000 + 900 * i, 400 + i) for i in range(300)]
    want = {r.rid: r for r in map(record_to_row, compute(b1 + b2))}
    store = Store(db_url, synchronous="off")
    meter = StoreMeter(MeterParams(), store, ckpt_every=32)

    def put(msgs: list[RawMsg]) -> None:
        rows = [
            RawRow(SID, m.boot, m.seq, "telemetry", "t", m.recv_ms, 1, _payload(m.body))
            for m in msgs
        ]
        store.write_batch(rows, then=lambda res: meter.add([decode_row(rows[j]) for j in res.new]))

    put(b1)
    put([m for m in b2 if m.seq not in (7, 200)])
    put([b2[200]])
    put([b2[7]])
    assert {r.rid: r for r in store.record_rows()} == want
    store.close()


def _payload(body: Any) -> bytes:
    import json

    return json.dumps(body, separators=(",", ":")).encode()[:-1] + b',"sig":"' + b"0" * 64 + b'"}'


def test_messages_given_again_change_nothing(db_url: str) -> None:
    """The agent may meter a stored message twice (a retried write): the last one, or an
    earlier one, given again leaves the records as they are."""
    t0 = 1_767_225_600_000
    msgs = [_tel(1, i, 10_000 * i, t0, 1000 * i, i) for i in range(0, 40, 2)]  # gaps
    want = {r.rid: r for r in map(record_to_row, compute(msgs))}
    store = Store(db_url, synchronous="off")
    meter = StoreMeter(MeterParams(), store, ckpt_every=4)
    rows = [
        RawRow(SID, m.boot, m.seq, "telemetry", "t", m.recv_ms, 1, _payload(m.body)) for m in msgs
    ]
    store.write_batch(rows, then=lambda res: meter.add([decode_row(rows[j]) for j in res.new]))
    with store.transaction():
        meter.add([decode_row(rows[-1])])
        meter.add([decode_row(rows[5]), decode_row(rows[-1])])
    with store.transaction():
        meter.add([decode_row(rows[-1])])
    assert {r.rid: r for r in store.record_rows()} == want
    store.close()
