"""The database thread's work per message, apart from MQTT and the loop: raw insert,
metering, records and states, commit (Service._write on one thread, no broker, on
messages decoded beforehand as the agent's loop decodes them: Service._verified), with
each station metered at every commit and, as the agent does by default, held back for its
next step (agent/service.py `_plan`).

Prints CPU µs per 8-slot message for batches holding ~30, 3 and 1 message(s) per station
(what a commit costs is mostly one step per station in it: docs/agent.md), without and
with a period lock in force before the traffic (received after the lock, as live traffic
is), then re-metering every station from raw (what picking a new lock up does, StoreMeter
.start) without and with a lock.

    .venv/bin/python bench/bench_meter_step.py [--n 30000]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import wire  # noqa: E402
from agent.config import AgentConfig, DbConfig, IngestConfig  # noqa: E402
from agent.keys import KeyStore  # noqa: E402
from agent.ledger.agent_meter import StoreMeter  # noqa: E402
from agent.ledger.inputs import MeterParams  # noqa: E402
from agent.service import Service, _Batch  # noqa: E402
from agent.store import RawRow, Store  # noqa: E402
from bench.bench_ingest import messages  # noqa: E402  (the same 8-slot fleet)
from tests.agent_helpers import T0_MS, key_for  # noqa: E402

DAY = 86_400_000


def lock_params(params: MeterParams) -> MeterParams:
    """A lock ending the day before the streams start (T0_MS), taken an hour later."""
    until = (T0_MS // DAY - 1) * DAY
    return dataclasses.replace(params, locked_until_ms=until, locked_at_ms=until + 3_600_000)


def write_cost(
    tmp: pathlib.Path, stations: int, n: int, batch: int, lock: bool, hold: bool = False
) -> float:
    """CPU µs per message of Service._write over n messages in batches of `batch`: each
    station metered at every commit (records_interval_ms 0), or (hold) as the agent does
    by default, its messages held for its next step (then the rest metered, counted)."""
    url = f"sqlite:///{tmp}/w-{stations}-{batch}-{int(lock)}-{int(hold)}.db"
    with KeyStore(url) as ks:
        for i in range(stations):
            ks.add(f"KH-BEN-{i:04d}", key_for(f"KH-BEN-{i:04d}"))
    ingest = IngestConfig() if hold else IngestConfig(records_interval_ms=0)
    svc = Service(AgentConfig(db=DbConfig(url=url), ingest=ingest))
    if lock:
        svc.meter = StoreMeter(lock_params(svc.meter.params), svc.store)
    recv = int(time.time() * 1000)  # after the lock: live traffic
    # decoded as the agent's loop does (a clean telemetry: its typed reads, not a dict)
    prepared = []
    for topic, p in messages(stations, n, slots=8):
        sid, kind = wire.parse_topic(topic, "stations")
        prepared.append(svc._verified(sid, kind, topic, p, recv))
    t = time.thread_time()
    for i in range(0, n, batch):
        b = _Batch()
        for row, cleaned in prepared[i : i + batch]:
            b.rows.append(row)
            b.cleaned.append(cleaned)
        svc._write(b)
    svc._meter_all = True  # what is still held
    svc._write(_Batch())
    assert svc._held_n == 0
    cost = (time.thread_time() - t) / n * 1e6
    svc.store.close()
    return cost


def remeter_cost(tmp: pathlib.Path, n: int) -> tuple[float, float]:
    """µs per message to meter 10 stations' n stored messages again from raw (no lock, lock)."""
    url = f"sqlite:///{tmp}/r.db"
    rows = []
    for topic, p in messages(10, n, slots=8):
        b = wire.decode_record(p)
        rows.append(RawRow(b["sid"], b["boot"], b["seq"], "telemetry", topic, b["ts"], 1, p))
    out = []
    with Store(url) as st:
        for i in range(0, n, 5000):
            st.write_batch(rows[i : i + 5000])
        for lock in (False, True):
            with st.transaction() as db:
                db.execute("DELETE FROM ledger_state")
                db.execute("DELETE FROM records")
            params = lock_params(MeterParams()) if lock else MeterParams()
            t = time.perf_counter()
            StoreMeter(params, st).start(sorted({r.sid for r in rows}))
            out.append((time.perf_counter() - t) / n * 1e6)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=30_000)
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-step-"))
    try:
        print("database thread, CPU µs per 8-slot message (raw, metering, records, commit):")
        print(f"  {'messages per station per commit':34} {'no lock':>9} {'lock':>9} "
              f"{'held':>9} {'held+lock':>9}")  # fmt: skip
        for stations, batch in ((100, 3000), (100, 300), (100, 100), (2000, 2000)):
            per = batch // stations
            n = args.n if stations == 100 else max(args.n // 2, 2 * stations)
            c = [write_cost(tmp, stations, n, batch, lock, hold) for hold in (False, True)
                 for lock in (False, True)]  # fmt: skip
            print(f"  {f'~{per} ({stations} stations, batches of {batch})':34} "
                  + " ".join(f"{x:9.1f}" for x in c))  # fmt: skip
        print("  (held: each station metered ~records_interval_ms after its first message "
              "held, as the agent does; else at every commit)")  # fmt: skip
        a, b = remeter_cost(tmp, args.n)
        print(f"re-metering from raw (10 stations, {args.n} messages): {a:.1f} µs a message, "
              f"{b:.1f} with a lock in force (both views)")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
