"""The agent on SQLite against PostgreSQL, and one, two, three agents sharing PostgreSQL
(agent/cluster.py), 8-slot telemetry through Mosquitto. Figures only, no assertion.

Prints:
1. engines: one agent drains a QoS 1 backlog of N messages (msg/s, records committed) and
   then runs live at RATE msg/s (publish-to-commit p50/p99), on SQLite and on PostgreSQL
   (a private cluster started here), in the same run;
2. agents: a backlog of N messages drained by 1, 2 and 3 `stationctl agent` processes with
   [cluster] on one PostgreSQL: msg/s in all, and CPU seconds per 1,000 messages of each
   agent process, of Mosquitto and of PostgreSQL (the point is no shared bottleneck; on
   this 2-core machine the three share the cores with the broker and the database);
3. fan-out: what the broker pays for shard sessions that each take every message (the
   design's cost): Mosquitto CPU per 1,000 published messages with 1, 4 and 8 sessions
   subscribed to the fleet's topics.

    .venv/bin/python bench/bench_cluster.py [--n 30000] [--stations 100] [--rate 2000]
        [--seconds 5] [--shards 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

import paho.mqtt.client as mqtt
import psycopg
from bench_ingest import _register, agent_drain, agent_live, pct, run_publisher, sids
from paho.mqtt.enums import CallbackAPIVersion

from agent.cluster import shard_client_id
from agent.keys import KeyStore
from agent.store import Store
from tests.agent_helpers import AgentProcess, key_for
from tools.machine import proc_cpu_s
from tools.mosquitto import Mosquitto
from tools.postgres import PgCluster


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children that were waited for."""
    return proc_cpu_s(pid, children=True)


def pg_cpu_s(pg: PgCluster) -> float:
    """CPU seconds of every PostgreSQL process of the cluster."""
    pid = int((pg.data / "postmaster.pid").read_text().split()[0])
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return sum(
        cpu_s(p) for p in [pid, *map(int, out.split())] if pathlib.Path(f"/proc/{p}").exists()
    )


def raw_bytes(url: str) -> float:
    """Bytes per raw message as stored: the table with its indexes (and TOAST)."""
    with Store(url, create=False) as st:
        n = max(1, st.raw_count())
        if st.engine == "postgresql":
            row = st.db.execute("SELECT pg_total_relation_size('raw')").fetchone()
            return int(row[0]) / n
        try:
            row = st.db.execute(
                "SELECT SUM(pgsize) FROM dbstat WHERE name IN ('raw', 'sqlite_autoindex_raw_1')"
            ).fetchone()
            return int(row[0]) / n
        except Exception:  # no dbstat in this SQLite: the whole file
            assert st.path is not None
            return os.path.getsize(st.path) / n


def keys(url: str, stations: int) -> None:
    with KeyStore(url) as ks:
        for s in sids(stations):
            ks.add(s, key_for(s))


def backlog(port: int, n: int, stations: int) -> None:
    run_publisher(port, ["--n", str(n), "--stations", str(stations), "--slots", "8"]).wait()


def engines(a: argparse.Namespace, broker: Mosquitto, pg: PgCluster, tmp: pathlib.Path) -> None:
    print(f"== one agent, SQLite vs PostgreSQL: {a.n} 8-slot messages, {a.stations} stations")
    for name in ("sqlite", "postgresql"):
        db = f"sqlite:///{tmp}/{name}.db" if name == "sqlite" else pg.create_db(f"one_{name}")
        live = f"sqlite:///{tmp}/{name}-live.db" if name == "sqlite" else pg.create_db("live")
        for u in (db, live):
            keys(u, a.stations)
        asyncio.run(_register(broker.port, db, "full"))
        backlog(broker.port, a.n, a.stations)
        time.sleep(0.5)
        raw_rate, rec_rate, c, _cpu = asyncio.run(agent_drain(broker.port, db, a.n, "full"))
        lat = asyncio.run(
            agent_live(broker.port, live, "full", a.rate, a.seconds, a.stations, 8, tmp)
        )
        size = raw_bytes(db)
        print(
            f"  {name:10s} raw stored {size:,.0f} B/message (table and indexes); "
            f"drain {rec_rate:8,.0f} msg/s (commits {c.get('commits')}); live at "
            f"{a.rate} msg/s: publish→commit p50 {pct(lat, 50) * 1e3:.0f} ms, "
            f"p99 {pct(lat, 99) * 1e3:.0f} ms"
        )


def agents(a: argparse.Namespace, broker: Mosquitto, pg: PgCluster, tmp: pathlib.Path) -> None:
    print(f"== 1, 2, 3 agents on one PostgreSQL, {a.shards} shards, a backlog of {a.n}")
    assert broker.proc is not None
    for n_agents in (1, 2, 3):
        db = pg.create_db(f"agents{n_agents}")
        keys(db, a.stations)
        procs = []
        for i in range(n_agents):
            d = tmp / f"n{n_agents}-a{i}"
            d.mkdir()
            extra = f'[cluster]\nshards = {a.shards}\nbalance_s = 0.5\nagent_id = "a{i}"\n'
            cid = f"agents{n_agents}"
            procs.append(AgentProcess(d, db, broker.port, client_id=cid, extra=extra).start())
        with Store(db, create=False) as st:
            for p in procs:
                p.wait_log("shards held", 60)
            deadline = time.monotonic() + 60
            while sum(p.log_text().count("subscribed to") for p in procs) < a.shards:
                if time.monotonic() > deadline:
                    raise TimeoutError("shard sessions")
                time.sleep(0.1)
            time.sleep(1.0)  # settled: every agent holds its share
            for p in procs:  # sessions exist: stop them, queue the backlog, start again
                p.stop()
            backlog(broker.port, a.n, a.stations)
            for p in procs:
                p.start()
            # timed from the first commit: process start-up and the shard rounds apart
            t_start = time.perf_counter()
            while (n0 := st.raw_count()) == 0:
                time.sleep(0.01)
                if time.perf_counter() - t_start > 120:
                    raise TimeoutError("no commit")
            t0 = time.perf_counter()
            c0 = (cpu_s(broker.proc.pid), pg_cpu_s(pg), [cpu_s(p.proc.pid) for p in procs])
            while st.raw_count() < a.n:
                time.sleep(0.05)
                if time.perf_counter() - t0 > 600:
                    raise TimeoutError("drain")
            dt = time.perf_counter() - t0
            agent_cpu = [cpu_s(p.proc.pid) - x for p, x in zip(procs, c0[2], strict=True)]
            c1 = (cpu_s(broker.proc.pid), pg_cpu_s(pg))
        for p in procs:
            p.stop()
        m = a.n - n0
        per = ", ".join(f"{x / m * 1e3:.2f}" for x in agent_cpu)
        print(
            f"  {n_agents} agent(s): {m / dt:8,.0f} msg/s (first commit to all raw committed, "
            f"{dt:.1f} s); CPU s per 1,000 msgs: agents {per}, Mosquitto "
            f"{(c1[0] - c0[0]) / m * 1e3:.2f}, PostgreSQL {(c1[1] - c0[1]) / m * 1e3:.2f}"
        )


def fanout(a: argparse.Namespace, tmp: pathlib.Path) -> None:
    print("== the broker's cost of shard sessions that each take every message")
    for sessions in (1, 4, 8):
        _fan(sessions, a.n // 3, a.stations, tmp / f"fan{sessions}")


def _fan(sessions: int, n: int, stations: int, where: pathlib.Path) -> None:
    broker = Mosquitto(where, insecure=True)
    broker.start()
    assert broker.proc is not None
    got = [0]

    def count(*_: Any) -> None:
        got[0] += 1

    subs: list[Any] = []
    try:
        for k in range(sessions):
            c = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=shard_client_id("fan", k),
                clean_session=False,
            )
            c.on_message = count
            c.connect("127.0.0.1", broker.port)
            c.subscribe("stations/+/telemetry", 1)
            c.loop_start()
            subs.append(c)
        time.sleep(0.5)
        c0 = cpu_s(broker.proc.pid)
        t0 = time.perf_counter()
        backlog(broker.port, n, stations)
        while got[0] < sessions * n and time.perf_counter() - t0 < 300:
            time.sleep(0.05)
        dt = time.perf_counter() - t0
        used = cpu_s(broker.proc.pid) - c0
        print(
            f"  {sessions} session(s): Mosquitto {used / n * 1e3:.2f} CPU s per 1,000 "
            f"published ({got[0]:,} deliveries in {dt:.1f} s)"
        )
    finally:
        for c in subs:
            c.loop_stop()
            c.disconnect()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("--stations", type=int, default=100)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--only", choices=["engines", "agents", "fanout"])
    a = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    broker = Mosquitto(tmp / "mq", insecure=True)
    broker.start()
    try:
        with PgCluster() as pg:
            if a.only in (None, "engines"):
                engines(a, broker, pg, tmp)
            if a.only in (None, "agents"):
                agents(a, broker, pg, tmp)
        if a.only in (None, "fanout"):
            fanout(a, tmp)
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    _ = psycopg  # the PostgreSQL driver the agents use (imported: fail early if missing)


if __name__ == "__main__":
    main()
