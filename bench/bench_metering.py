"""Metering cost per message: in-order incremental (the live path), out-of-order arrival
(an outbox replaying while live data flows), and a full recompute (an auditor's run).

Prints microseconds per message; no assertion. Telemetry every 10 s with the meter and
N slots charging; the ingest side is modelled as add() per batch of messages from many
stations followed by changes() for each station the batch touched.

    .venv/bin/python bench/bench_metering.py [--stations 50] [--minutes 60] [--slots 8]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.ledger import IncrementalMeter, RawMsg, compute

T0 = 1_767_225_600_000


def fleet(stations: int, minutes: int, slots: int, seed: int = 1) -> list[RawMsg]:
    rnd = random.Random(seed)
    out: list[RawMsg] = []
    for i in range(stations):
        sid = f"KH-B-{i:04d}"
        reg = [rnd.randint(0, 10**9) for _ in range(slots)]
        wh = rnd.randint(0, 10**7)
        out.append(
            RawMsg(
                sid=sid,
                boot=1,
                seq=0,
                recv_ms=T0 + 100,
                body={
                    "v": 1,
                    "sid": sid,
                    "kid": 1,
                    "boot": 1,
                    "seq": 0,
                    "up": 100,
                    "ts": T0 + 100,
                    "ev": "boot",
                    "fw": "1",
                    "reset": "power",
                    "restored": {str(n + 1): reg[n] for n in range(slots)},
                },
            )
        )
        b = list(reg)
        for k in range(minutes * 6):
            seq = k + 1
            up = 10_000 * seq
            for n in range(slots):
                reg[n] += rnd.randint(0, 8000)
            wh += rnd.randint(0, 20)
            body: dict[str, Any] = {
                "v": 1,
                "sid": sid,
                "kid": 1,
                "boot": 1,
                "seq": seq,
                "up": up,
                "ts": T0 + up,
                "meter": {"e_wh": wh, "p_w": 2150, "sn": 12345678},
                "slots": [
                    {
                        "n": n + 1,
                        "st": "C",
                        "mv": 67200,
                        "ma": 15250,
                        "e_mwh": reg[n],
                        "b_mwh": b[n],
                    }
                    for n in range(slots)
                ],
            }
            out.append(RawMsg(sid=sid, boot=1, seq=seq, recv_ms=T0 + up + 50, body=body))
    # interleave stations by time, as they arrive at the broker
    out.sort(key=lambda m: (m.recv_ms, m.sid))
    return out


def run(
    msgs: list[RawMsg], batch: int, with_changes: bool, days_every: int = 1
) -> tuple[float, int]:
    """add() per batch, then changes() for the stations it touched; day roll-ups every
    days_every batches (and once at the end)."""
    im = IncrementalMeter()
    nrec = 0
    t = time.perf_counter()
    for j, i in enumerate(range(0, len(msgs), batch)):
        sids = im.add(msgs[i : i + batch])
        if with_changes:
            days = j % days_every == 0
            for sid in sids:
                ups, _ = im.changes(sid, days=days)
                nrec += len(ups)
    if with_changes:
        for sid in im.sids():
            nrec += len(im.changes(sid)[0])
    return time.perf_counter() - t, nrec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stations", type=int, default=50)
    ap.add_argument("--minutes", type=int, default=60)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    msgs = fleet(a.stations, a.minutes, a.slots)
    n = len(msgs)
    print(
        f"{n} messages, {a.stations} stations, {a.slots} slots + meter, batches of {a.batch}"
        f" (best of {a.repeat})"
    )

    def show(label: str, secs: float, extra: str = "") -> None:
        print(f"  {label:<46} {secs / n * 1e6:8.1f} µs/message {extra}", flush=True)

    def best(*args: Any, **kw: Any) -> tuple[float, int]:
        # best of 3: the machine is shared, the minimum is the least disturbed run
        return min(run(*args, **kw) for _ in range(a.repeat))

    dt, _ = best(msgs, a.batch, False)
    show("in order, add()", dt)
    dt, nrec = best(msgs, a.batch, True)
    show("in order, add() + changes()", dt, f"({nrec / n:.1f} records/message)")

    dt, nrec = best(msgs, a.stations, True)
    show("live: changes() after each station's message", dt, f"({nrec / n:.1f} records/message)")
    dt, nrec = best(msgs, a.stations, True, days_every=60)
    show("live, day roll-ups every 60th call", dt, f"({nrec / n:.1f} records/message)")

    rnd = random.Random(2)
    late = list(msgs)
    # 5 % arrive late: each one re-runs its station's boot (here: the whole history)
    for _ in range(n // 20):
        j = rnd.randrange(len(late))
        late.insert(min(len(late), j + rnd.randint(1, 2000)), late.pop(j))
    dt, _ = best(late, a.batch, True)
    show("5 % late (up to 2000 messages), + changes()", dt)

    shuffled = list(msgs)
    rnd.shuffle(shuffled)
    dt, _ = best(shuffled, a.batch * 10, True)
    show(f"shuffled, batches of {a.batch * 10}, + changes()", dt)

    dts = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        recs = compute(msgs)
        dts.append(time.perf_counter() - t)
    show("compute() from scratch", min(dts), f"({len(recs)} records)")

    # one station with a long boot (a day at 10 s): a late message costs the re-run of
    # its checkpoint part and what follows, not the whole history
    day = fleet(1, 24 * 60, a.slots, seed=3)
    im = IncrementalMeter()
    im.add(day[:-20])
    im.changes(day[0].sid)
    t = time.perf_counter()
    for m in reversed(day[-20:]):  # the last 20 arrive newest first
        im.add([m])
        im.changes(m.sid)
    dt = time.perf_counter() - t
    print(f"  {'1 station, 1-day boot, 20 late (reversed)':<46} {dt / 20 * 1e6:8.1f} µs/message")


if __name__ == "__main__":
    main()
