"""Ingest throughput and latency: publisher → Mosquitto → agent → raw rows and records.

Prints:
1. drain: a QoS 1 backlog of N signed telemetry messages waiting in the agent's persistent
   session is drained, verified, committed (raw), acknowledged and metered (records
   committed); messages/s with the agent pinned to one core. The same backlog is queued
   for two bare subscribers that only count, drained on the same core in the same run:
   one of the agent's own client (agent/sources/mqtt.py, every delivery acknowledged as
   soon as read) — the ratio agent / bare — and a paho one (loop_forever, auto-ack), the
   comparator of the figures taken while the agent ran on paho.
2. latency: a publisher paced at RATE msg/s (another core) while the agent runs live;
   publish-to-commit latency p50/p99 (publish time taken just before `publish()`, commit
   time when the batch's transaction returned).

Mosquitto and the publisher run on core 1, the agent and the bare subscriber on core 0
(when the machine has two cores). Targets (issue 12): ≥ 25,000 msg/s with 8 slots, ratio to
bare paho ≥ 0.6 (with 2 slots too), p99 < 50 ms at 5,000 msg/s. REC_MS and SWITCH_S set the
agent's records_interval_ms and switch_interval_s (its defaults otherwise). The ratio to
the agent's own bare client says how much of the agent's time is the pipeline (verify,
SQLite, metering) rather than MQTT: that client alone drains ~100-270k msg/s here, about
what Mosquitto can send.

    .venv/bin/python bench/bench_ingest.py [--n 100000] [--stations 100] [--rate 5000]
        [--seconds 10] [--slots 2|8] [--sync full|normal] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig, DbConfig, IngestConfig
from agent.keys import KeyStore
from agent.service import Service
from agent.sources.mqtt import BrokerConfig, Delivery, MqttSource
from agent.store import RawRow, Store
from tests.agent_helpers import Station, key_for
from tools.machine import warn_if_busy
from tools.mosquitto import Mosquitto

AGENT_CPU = {0}
OTHER_CPU = {1} if (os.cpu_count() or 1) > 1 else {0}


def sids(n: int) -> list[str]:
    return [f"KH-BEN-{i:04d}" for i in range(n)]


def messages(stations: int, n: int, slots: int = 2) -> list[tuple[str, bytes]]:
    """n signed telemetry messages, round robin over the stations (`slots` slots + meter)."""
    sts = [Station(s, slots=slots) for s in sids(stations)]
    out = []
    for i in range(n):
        st = sts[i % stations]
        st.advance(10_000, 1500)
        kind, p = st.telemetry()
        out.append((st.topic(kind), p))
    return out


def pin(pid: int, cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(pid, cpus)
    except OSError:
        pass


# ---- publisher (a subprocess on the other core) --------------------------------------------


def publish_main(args: argparse.Namespace) -> None:
    """--publish: the backlog as fast as possible, or paced at --rate for --seconds with
    send times written to --times (JSON: [[sid, seq, t], ...])."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", args.port)
    c.loop_start()
    if args.rate:
        total = args.rate * args.seconds
        msgs = messages(args.stations, total, args.slots)
        # each message gets a fresh boot so that it never repeats the drain phase's keys
        times: list[tuple[str, int, float]] = []
        sent: list[mqtt.MQTTMessageInfo] = []
        t0 = time.perf_counter()
        step = 1.0 / args.rate
        for i, (topic, payload) in enumerate(msgs):
            due = t0 + i * step
            d = due - time.perf_counter()
            if d > 0.0005:
                time.sleep(d)
            times.append((topic.split("/")[1], i // args.stations, time.time()))
            sent.append(c.publish(topic, payload, qos=1))
        for inf in sent:
            inf.wait_for_publish(30)
        pathlib.Path(args.times).write_text(json.dumps(times))
    else:
        msgs = messages(args.stations, args.n, args.slots)
        # a window: paho mixes up QoS 1 messages beyond 65,535 outstanding (DESIGN.md)
        infos: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
        for t, p in msgs:
            infos.append(c.publish(t, p, qos=1))
            if len(infos) > 20_000:
                infos.popleft().wait_for_publish(60)
        for inf in infos:
            inf.wait_for_publish(60)
    c.disconnect()
    c.loop_stop()


def run_publisher(port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, __file__, "--publish", "--port", str(port), *extra])
    pin(p.pid, OTHER_CPU)
    return p


# ---- bare subscriber ---------------------------------------------------------------------


def bare_session(port: int) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", clean_session=False)
    c.connect("127.0.0.1", port)
    c.subscribe("stations/+/telemetry", 1)
    c.loop(1.0)
    c.disconnect()


def bare_drain(port: int, n: int) -> float:
    count = 0

    def on_message(cl: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        nonlocal count
        count += 1
        if count >= n:
            cl.disconnect()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", clean_session=False)
    c.on_message = on_message
    t0 = time.perf_counter()
    c.connect("127.0.0.1", port)
    c.loop_forever()
    rate = n / (time.perf_counter() - t0)
    if count < n:
        raise RuntimeError(f"bare subscriber got {count} of {n}")
    # end the session: else the broker queues (and saves every second) all later traffic
    # for it, which stalls the broker during the latency run
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", clean_session=True)
    c.connect("127.0.0.1", port)
    c.disconnect()
    return rate


async def bare_own(port: int, n: int) -> float:
    """The agent's MQTT client alone: count, acknowledge each read chunk at once. n=0 only
    registers the persistent session."""
    count = 0
    pending: list[Delivery] = []
    done = asyncio.Event()

    def on_message(topic: str, payload: bytes, d: Delivery) -> None:
        nonlocal count
        count += 1
        pending.append(d)

    def on_drained() -> None:
        src.ack(pending)
        pending.clear()
        if count >= n:
            done.set()

    src = MqttSource(
        BrokerConfig(port=port, client_id="bench-own"), on_message, on_drained=on_drained
    )
    t0 = time.perf_counter()
    task = asyncio.create_task(src.run())
    await (done.wait() if n else src.connected.wait())
    rate = n / (time.perf_counter() - t0)
    src.stop()
    await task
    if n:
        # end the session (see bare_drain)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-own", clean_session=True)
        c.connect("127.0.0.1", port)
        c.disconnect()
    return rate


# ---- agent ---------------------------------------------------------------------------------


def agent_cfg(port: int, db: str, sync: str) -> AgentConfig:
    return AgentConfig(
        db=DbConfig(url=db, synchronous=sync),
        broker=BrokerConfig(port=port, client_id="bench-agent"),
        # the agent's defaults unless REC_MS / SWITCH_S say otherwise (to compare settings)
        ingest=IngestConfig(
            records_interval_ms=int(os.environ.get("REC_MS", IngestConfig.records_interval_ms)),
            switch_interval_s=float(os.environ.get("SWITCH_S", IngestConfig.switch_interval_s)),
        ),
    )


async def agent_drain(
    port: int, db: str, n: int, sync: str
) -> tuple[float, float, dict[str, int], dict[str, float]]:
    """msg/s raw committed, msg/s records too, the agent's counters, and CPU µs a message
    of each of its threads (and of the whole process) over the drain."""
    committed = 0
    t_raw = 0.0

    def on_commit(rows: list[RawRow]) -> None:
        nonlocal committed, t_raw
        committed += len(rows)
        if committed >= n and not t_raw:
            t_raw = time.perf_counter()

    svc = Service(agent_cfg(port, db, sync), on_commit=on_commit)
    stop = asyncio.Event()
    loop_cpu, proc = time.thread_time(), os.times()
    t0 = time.perf_counter()
    task = asyncio.create_task(svc.run(stop))
    deadline = time.monotonic() + 300
    while committed < n:
        await asyncio.sleep(0.005)
        if task.done():
            task.result()
        if time.monotonic() > deadline:
            raise TimeoutError(f"agent committed {committed} of {n}")
    # records: everything metered is written (a periodic flush may be under way: ours
    # queues behind it on the one database thread)
    await svc.flush_records()
    t_rec = time.perf_counter()
    # the writer threads were started by this run: their CPU time is all the drain's
    loop = asyncio.get_running_loop()
    cpu = {
        "loop (MQTT, verify)": time.thread_time() - loop_cpu,
        "database (raw, metering)": await loop.run_in_executor(svc._db, time.thread_time),
        "checkpoints, health": await loop.run_in_executor(svc._ckpt, time.thread_time),
    }
    p1 = os.times()
    cpu["in all (process)"] = p1.user + p1.system - proc.user - proc.system
    stop.set()
    await task
    us = {k: v / n * 1e6 for k, v in cpu.items()}
    return n / (t_raw - t0), n / (t_rec - t0), dict(svc.counters), us


async def agent_live(
    port: int,
    db: str,
    sync: str,
    rate: int,
    seconds: int,
    stations: int,
    slots: int,
    tmp: pathlib.Path,
) -> list[float]:
    commit_t: dict[tuple[str, int], float] = {}
    recv_t: dict[tuple[str, int], float] = {}

    def on_commit(rows: list[RawRow]) -> None:
        t = time.time()
        for r in rows:
            commit_t[(r.sid, r.seq)] = t
            recv_t[(r.sid, r.seq)] = r.recv_ms / 1000

    svc = Service(agent_cfg(port, db, sync), on_commit=on_commit)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    await svc.ready.wait()
    await asyncio.sleep(0.5)
    times = tmp / "times.json"
    pub = run_publisher(
        port,
        [
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--stations",
            str(stations),
            "--slots",
            str(slots),
            "--times",
            str(times),
        ],
    )
    while pub.poll() is None:
        await asyncio.sleep(0.05)
    total = rate * seconds
    end = time.monotonic() + 30
    while len(commit_t) < total and time.monotonic() < end:
        await asyncio.sleep(0.05)
    stop.set()
    await task
    sent = json.loads(times.read_text())
    lat = [commit_t[(sid, seq)] - t for sid, seq, t in sent if (sid, seq) in commit_t]
    if len(lat) != total:
        print(f"  WARNING: {total - len(lat)} of {total} messages not committed")
    to_recv = [recv_t[(sid, seq)] - t for sid, seq, t in sent if (sid, seq) in recv_t]
    if os.environ.get("LATDUMP"):
        pathlib.Path(os.environ["LATDUMP"]).write_text(
            json.dumps(
                [[t, commit_t.get((sid, seq)), recv_t.get((sid, seq))] for sid, seq, t in sent]
            )
        )
    print(
        f"  publish → agent receive (ms clock): p50 {pct(to_recv, 50) * 1000:.1f} ms, "
        f"p99 {pct(to_recv, 99) * 1000:.1f} ms"
    )
    return lat


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--stations", type=int, default=100)
    ap.add_argument("--slots", type=int, default=2, help="slots per message (2 or 8: size)")
    ap.add_argument("--rate", type=int, default=0)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--sync", default="full", choices=["full", "normal"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--publish", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--times", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publish:
        publish_main(args)
        return
    warn_if_busy()
    rate = args.rate or 5000
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))  # so that `finally` stops the broker
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    broker = Mosquitto(tmp / "mq", insecure=True)
    if os.environ.get("INFLIGHT"):
        broker.conf.write_text(
            broker.conf.read_text().replace(
                "max_inflight_messages 100", f"max_inflight_messages {os.environ['INFLIGHT']}"
            )
        )
    broker.start()
    assert broker.proc is not None
    pin(broker.proc.pid, OTHER_CPU)
    pin(0, AGENT_CPU)
    try:
        db = f"sqlite:///{tmp}/agent.db"
        live_db = f"sqlite:///{tmp}/live.db"
        for url in (db, live_db):
            with KeyStore(url) as ks:
                for s in sids(args.stations):
                    ks.add(s, key_for(s))
        # persistent sessions for both subscribers, then the backlog
        asyncio.run(_register(broker.port, db, args.sync))
        bare_session(broker.port)
        asyncio.run(bare_own(broker.port, 0))
        size = len(messages(1, 1, args.slots)[0][1])
        t0 = time.perf_counter()
        pub = run_publisher(
            broker.port,
            ["--n", str(args.n), "--stations", str(args.stations), "--slots", str(args.slots)],
        )
        pub.wait()
        print(
            f"backlog: {args.n} messages ({args.stations} stations, {args.slots} slots, "
            f"{size} B each) published in "
            f"{time.perf_counter() - t0:.1f}s"
        )
        time.sleep(1.0)
        bare = bare_drain(broker.port, args.n)
        own = asyncio.run(bare_own(broker.port, args.n))
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            # the database thread's share (commits, metering) apart from the event loop's
            db_prof = cProfile.Profile()
            write = Service._write_guarded

            def profiled(self: Service, *a: Any) -> Any:
                return db_prof.runcall(write, self, *a)

            Service._write_guarded = profiled  # type: ignore[method-assign]
        raw_rate, rec_rate, counters, cpu = asyncio.run(
            agent_drain(broker.port, db, args.n, args.sync)
        )
        if args.profile:
            prof.disable()
            prof.dump_stats(str(pathlib.Path(tempfile.gettempdir()) / "bench_ingest.prof"))
            Service._write_guarded = write  # type: ignore[method-assign]
            print("== event loop thread")
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            print("== database thread (commits and metering)")
            pstats.Stats(db_prof).sort_stats("tottime").print_stats(40)
        with Store(db) as st:
            nraw = st.raw_count()
            nrec = len(st.record_rows())
        print(f"drain, one core, synchronous={args.sync}:")
        print(f"  bare paho subscriber (count only) {bare:10,.0f} msg/s")
        print(f"  bare agent client (count, ack)    {own:10,.0f} msg/s")
        print(f"  agent: raw committed + acked      {raw_rate:10,.0f} msg/s")
        print(
            f"  agent: raw + records committed    {rec_rate:10,.0f} msg/s   "
            f"ratio to bare {rec_rate / own:.2f} (to bare paho {rec_rate / bare:.2f})"
        )
        print(
            f"  raw rows {nraw}, records {nrec}, commits {counters.get('commits')}, "
            f"mean batch {counters.get('received', 0) / max(1, counters.get('commits', 1)):.0f}"
        )
        print("  CPU µs a message: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
        lat = asyncio.run(
            agent_live(
                broker.port, live_db, args.sync, rate, args.seconds, args.stations, args.slots, tmp
            )
        )
        print(
            f"latency at {rate} msg/s paced for {args.seconds}s ({len(lat)} messages): "
            f"p50 {pct(lat, 50) * 1000:.1f} ms, p99 {pct(lat, 99) * 1000:.1f} ms, "
            f"max {max(lat) * 1000:.1f} ms"
        )
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def _register(port: int, db: str, sync: str) -> None:
    svc = Service(agent_cfg(port, db, sync))
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    await svc.ready.wait()
    await asyncio.sleep(0.3)
    stop.set()
    await task


if __name__ == "__main__":
    main()
