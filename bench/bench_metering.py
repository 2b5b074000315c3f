"""Metering cost per message and what it keeps, on the agent's path (agent/ledger/agent_meter.py:
raw rows, the records they change and the station states in one SQLite transaction per
batch), plus the pure compute() an auditor runs.

Prints: µs per message in order; µs per message with late arrivals (every `--late-every`th
message of each station delayed by `--late-by` messages, an outbox replaying while live
data flows) and µs per late message; the engine state retained per station (serialized
size and Python memory) after N messages; the raw rows a restart reads; compute() µs per
message; metering alone (the engine's meter.add inside the batch's transaction, messages
decoded beforehand) in µs per message and the SQL statements it runs per batch. No
assertion.

    .venv/bin/python bench/bench_metering.py [--stations 20] [--messages 2000] [--slots 8]
        [--batch 200]   (the agent's batches: e.g. --stations 100 --messages 300 --batch 3000)
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.ledger import MeterParams, compute
from agent.ledger.agent_meter import StoreMeter, decode_row
from agent.ledger.engine import dump_station
from agent.ledger.inputs import RawMsg
from agent.store import RawRow, Store

T0 = 1_767_225_600_000
SIG = b',"sig":"' + b"0" * 64 + b'"}'


def station_rows(sid: str, n: int, slots: int, rnd: random.Random) -> list[RawRow]:
    reg = [rnd.randint(0, 10**9) for _ in range(slots)]
    wh = rnd.randint(0, 10**7)
    out = []
    for seq in range(n):
        up = 10_000 * (seq + 1)
        body: dict[str, Any] = {"v": 1, "sid": sid, "kid": 1, "boot": 1, "seq": seq, "up": up}
        body["ts"] = T0 + up
        if seq == 0:
            body.update(ev="boot", fw="1", reset="power")
            body["restored"] = {str(i + 1): reg[i] for i in range(slots)}
        else:
            for i in range(slots):
                reg[i] += rnd.randint(0, 8000)
            wh += rnd.randint(0, 100)
            body["meter"] = {"e_wh": wh, "p_w": 1000, "sn": 1}
            body["slots"] = [
                {"n": i + 1, "st": "C", "mv": 67000, "ma": 15000, "e_mwh": reg[i], "b_mwh": 0}
                for i in range(slots)
            ]
        payload = json.dumps(body, separators=(",", ":")).encode()[:-1] + SIG
        kind = "event" if seq == 0 else "telemetry"
        out.append(RawRow(sid, 1, seq, kind, "t", T0 + up + 300, 1, payload))
    return out


def interleave(per: list[list[RawRow]]) -> list[RawRow]:
    return [r for group in zip(*per, strict=True) for r in group]


def delay(rows: list[RawRow], every: int, by: int) -> list[RawRow]:
    """Every `every`th row of each station arrives `by` rows later. (Counted per station:
    every `every`th row of an interleaved feed would hit the same few stations, all of
    whose rows, when `every` divides the number of stations: none would be late.)"""
    out: list[RawRow] = []
    held: list[tuple[int, RawRow]] = []
    count: dict[str, int] = {}
    for i, r in enumerate(rows):
        c = count[r.sid] = count.get(r.sid, 0) + 1
        if c % every == 0:
            held.append((i + by, r))
        else:
            out.append(r)
        while held and held[0][0] <= i:
            out.append(held.pop(0)[1])
    out.extend(r for _, r in held)
    return out


def ingest(store: Store, meter: StoreMeter, rows: list[RawRow], batch: int) -> float:
    t = time.perf_counter()
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]

        def then(res: Any, part: list[RawRow] = part) -> None:
            meter.add([decode_row(part[j]) for j in res.new])

        store.write_batch(part, then=then)
    return time.perf_counter() - t


def meter_alone(
    store: Store, meter: StoreMeter, rows: list[RawRow], batch: int
) -> tuple[float, int]:
    """(seconds in meter.add, SQL statements it ran) over `rows` in batches, the rows
    decoded beforehand (decode and §2 ranges run at ingest, on the event loop)."""
    msgs = [decode_row(r) for r in rows]
    count = [0, False]  # statements, counting

    def trace(_sql: str) -> None:
        if count[1]:
            count[0] += 1

    store.db.set_trace_callback(trace)
    secs = 0.0
    for i in range(0, len(rows), batch):

        def then(res: Any, part: list[RawMsg] = msgs[i : i + batch]) -> None:
            nonlocal secs
            count[1] = True
            t = time.perf_counter()
            meter.add([part[j] for j in res.new])
            secs += time.perf_counter() - t
            count[1] = False

        store.write_batch(rows[i : i + batch], then=then)
    store.db.set_trace_callback(None)
    return secs, int(count[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stations", type=int, default=20)
    ap.add_argument("--messages", type=int, default=2000, help="per station")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--late-every", type=int, default=50)
    ap.add_argument("--late-by", type=int, default=400)
    a = ap.parse_args()
    rnd = random.Random(1)
    per = [station_rows(f"KH-B-{i:04d}", a.messages, a.slots, rnd) for i in range(a.stations)]
    rows = interleave(per)
    n = len(rows)
    tmp = Path(tempfile.mkdtemp())
    params = MeterParams()
    print(
        f"{a.stations} stations x {a.messages} messages ({a.slots} slots + meter, 10 s), "
        f"batches of {a.batch}, SQLite synchronous=off"
    )

    # in order
    store = Store(f"sqlite:///{tmp}/order.db", synchronous="off")
    meter = StoreMeter(params, store)
    gc.collect()
    tracemalloc.start()
    m0 = tracemalloc.get_traced_memory()[0]
    secs = ingest(store, meter, rows, a.batch)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - m0
    tracemalloc.stop()
    store2 = Store(f"sqlite:///{tmp}/order2.db", synchronous="off")
    secs = min(secs, ingest(store2, StoreMeter(params, store2), rows, a.batch))
    store2.close()
    print(f"in order:            {secs / n * 1e6:8.1f} µs/message (raw + records + state)")
    store3 = Store(f"sqlite:///{tmp}/order3.db", synchronous="off")
    alone, stmts = meter_alone(store3, StoreMeter(params, store3), rows, a.batch)
    store3.close()
    batches = (n + a.batch - 1) // a.batch
    print(
        f"metering alone:      {alone / n * 1e6:8.1f} µs/message (meter.add in the transaction, "
        f"its SQL included: {stmts / batches:.0f} statements per batch)"
    )
    sizes = [len(dump_station(st)) for st in meter.ledger.full.stations.values()]
    print(
        f"state per station:   {sum(sizes) / len(sizes):8.0f} bytes serialized, "
        f"{held / a.stations:8.0f} bytes of Python memory retained (tracemalloc, "
        f"after {a.messages} messages each)"
    )
    ck = store.db.execute("SELECT COUNT(*), SUM(LENGTH(blob)) FROM ledger_checkpoint").fetchone()
    print(f"checkpoints:         {ck[0]} ({ck[1] / max(1, ck[0]):.0f} bytes each)")
    store.close()

    # late arrivals
    late_rows = delay(rows, a.late_every, a.late_by * a.stations)
    store = Store(f"sqlite:///{tmp}/late.db", synchronous="off")
    meter = StoreMeter(params, store)
    secs_late = ingest(store, meter, late_rows, a.batch)
    n_late = n // a.late_every
    print(
        f"with late arrivals:  {secs_late / n * 1e6:8.1f} µs/message; "
        f"{(secs_late - secs) / max(1, n_late) * 1e6:8.0f} µs per late message "
        f"({n_late} late by {a.late_by} of their station's messages; "
        f"{meter.rows_read} raw rows re-read)"
    )
    same = sorted(store.record_rows()) == sorted(
        Store(f"sqlite:///{tmp}/order.db", readonly=True).record_rows()
    )
    print(f"                     records equal to in-order arrival: {same}")
    store.close()

    # restart
    store = Store(f"sqlite:///{tmp}/late.db")
    t = time.perf_counter()
    meter = StoreMeter(params, store)
    rebuilt, read = meter.start(sorted({r.sid for r in rows}))
    print(
        f"restart:             {read} raw rows read, {rebuilt} stations rebuilt, "
        f"{(time.perf_counter() - t) * 1e3:.0f} ms"
    )
    store.close()

    # the auditor's compute(), all in memory
    msgs = [decode_row(r) for r in rows]
    t = time.perf_counter()
    compute(msgs, params)
    print(f"compute():           {(time.perf_counter() - t) / n * 1e6:8.1f} µs/message")


if __name__ == "__main__":
    main()
