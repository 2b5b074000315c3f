"""Chaos run: a fleet of virtual stations for a simulated day under broker restarts, agent
SIGKILLs, station power cuts and bus faults; then the books must balance. Not part of the
default test run (`make chaos`, or `python bench/chaos.py`); prints figures and a fault log.

    python bench/chaos.py [--stations 50] [--slots 8] [--hours 24] [--accel 90]
        [--fault-rate 0.02] [--broker-restarts 10] [--agent-kills 10] [--power-cuts 60]
        [--workdir DIR] [--seed 1]

Pieces, all real: Mosquitto (persistence on), `stationctl agent --config` in a subprocess
(SQLite WAL, synchronous=full), N firmware processes on MicroPython against their rigs
(tools/fleet.py), and an independent collector (a paho client with its own persistent
session) that keeps every signed message it is delivered.

At the end, per station and slot (0 = the grid meter):
1. the agent's credited + held energy (`stationctl export`) equals an independent reference
   of CONTRACT §6 (tests/metering_reference.py) over the raw messages the agent stored,
   and the same reference over what the collector received (nothing lost on the way);
2. the credited battery energy equals the rig's ground truth within the integration bound
   (tools/fleet.integration_bound: sampling error at abrupt changes, what a power cut took
   before the station could save or send it);
3. no (sid, boot, seq) is stored twice, and every boot's seq runs 0..n without a gap;
4. the quarantine holds exactly the messages injected to be quarantined (bad signatures,
   unknown stations, conflicting copies), nothing else.
Exit status 0 when every check holds, 1 otherwise. A JSON report goes to WORKDIR.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.keys import KeyStore
from agent.store import Store
from agent.wire import StaticKeys, WireError, decode_record, sign, verify
from tests.metering_reference import reference_totals
from tools.fleet import Fleet
from tools.machine import proc_cpu_s, thread_cpu_s
from tools.mosquitto import Mosquitto

ROOT = pathlib.Path(__file__).resolve().parent.parent
STATIONCTL = [sys.executable, "-m", "stationctl"]


class Msg:
    __slots__ = ("body", "boot", "recv_ms", "seq", "sid")

    def __init__(self, sid: str, boot: int, seq: int, recv_ms: int, body: dict[str, Any]) -> None:
        self.sid, self.boot, self.seq, self.recv_ms, self.body = sid, boot, seq, recv_ms, body


class FaultLog:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.t0 = time.monotonic()
        self.entries: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def add(self, what: str, target: str = "", **kw: Any) -> None:
        e = {
            "t_s": round(time.monotonic() - self.t0, 1),
            "sim_h": round(self.fleet.clock.elapsed() / 3600, 3),
            "what": what,
            "target": target,
            **kw,
        }
        with self.lock:
            self.entries.append(e)
        print(
            f"  [{e['t_s']:7.1f} s | {e['sim_h']:6.2f} h] {what} {target} "
            f"{' '.join(f'{k}={v}' for k, v in kw.items())}",
            flush=True,
        )


class Agent:
    def __init__(self, workdir: pathlib.Path, port: int) -> None:
        self.dir = workdir
        self.db_url = f"sqlite:///{workdir / 'agent.db'}"
        self.conf = workdir / "agent.toml"
        self.conf.write_text(
            f'[db]\nurl = "{self.db_url}"\n\n[broker]\nport = {port}\nclient_id = "chaos-agent"\n'
            "\n[ingest]\nstats_interval_s = 30.0\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu_s = 0.0
        self.starts = 0
        Store(self.db_url).close()

    def start(self) -> None:
        with open(self.dir / "agent.log", "ab") as log:
            self.proc = subprocess.Popen(
                [*STATIONCTL, "agent", "--config", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self.starts += 1

    def _cpu(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.cpu_s += proc_cpu_s(self.proc.pid)

    def kill(self) -> None:
        assert self.proc is not None
        self._cpu()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._cpu()
            self.proc.terminate()
            self.proc.wait(60)


class Collector:
    """An independent subscriber (persistent session): every delivery, duplicates included."""

    def __init__(self, port: int) -> None:
        self.got: list[tuple[str, bytes, int]] = []  # topic, payload, receive ms
        self.lock = threading.Lock()
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="chaos-collector", clean_session=False
        )
        self.c.on_connect = lambda c, *_: c.subscribe(
            [("stations/+/telemetry", 1), ("stations/+/event", 1)]
        )
        self.c.on_message = self._on
        self.c.reconnect_delay_set(1, 2)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload), int(time.time() * 1000)))

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def publish(port: int, items: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"chaos-inject-{os.getpid()}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    for topic, payload in items:
        c.publish(topic, payload, qos=1).wait_for_publish(10)
    c.loop_stop()
    c.disconnect()


def inject(fleet: Fleet, agent: Agent, port: int, n: int, rng: random.Random) -> list[bytes]:
    """Messages the agent must quarantine: n with a bad signature, n from an unknown
    station, n conflicting copies (validly signed, a key the agent already holds)."""
    st = Store(agent.db_url, readonly=True)
    raw = [r for rows in st.iter_raw() for r in rows if r.kind == "telemetry"][:2000]
    st.close()
    keys = {s.sid: s.key for s in fleet.stations}
    out: list[tuple[str, bytes]] = []
    for r in rng.sample(raw, n):  # bad signature: one hex digit of sig changed
        p = bytearray(r.record)
        i = len(p) - 3
        p[i] = ord("0") if p[i] != ord("0") else ord("1")
        out.append((r.topic, bytes(p)))
    for k in range(n):  # unknown station
        rogue = {
            "v": 1,
            "sid": f"KH-ROGUE-{k:02d}",
            "kid": 1,
            "boot": 0,
            "seq": k,
            "up": 1000,
            "slots": [],
            "err": {},
        }
        out.append(
            (
                f"stations/KH-ROGUE-{k:02d}/telemetry",
                sign(json.dumps(rogue, separators=(",", ":")).encode(), os.urandom(32)),
            )
        )
    for r in rng.sample(raw, n):  # conflict: same key, other bytes, valid signature
        body = decode_record(r.record)
        body["up"] = int(body["up"]) + 1
        out.append((r.topic, sign(json.dumps(body, separators=(",", ":")).encode(), keys[r.sid])))
    publish(port, out)
    return [p for _, p in out]


def wait(pred: Any, timeout: float, every: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


def schedule(rng: random.Random, n: int, t_end: float, margin: float) -> list[float]:
    """n times spread over [margin, t_end - margin], jittered, sorted."""
    if n <= 0:
        return []
    span = (t_end - 2 * margin) / n
    return sorted(margin + span * (i + rng.uniform(0.1, 0.9)) for i in range(n))


def export_totals(db_url: str) -> dict[tuple[str, int], tuple[int, int]]:
    r = subprocess.run(
        [*STATIONCTL, "export", "--db", db_url, "--by", "interval", "--format", "json"],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    out: dict[tuple[str, int], tuple[int, int]] = {}
    for line in r.stdout.decode().splitlines():
        rec = json.loads(line)
        k = (rec["sid"], rec["slot"])
        c, h = out.get(k, (0, 0))
        out[k] = (c + rec["mwh"], h + rec["held_mwh"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--stations", type=int, default=50)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--hours", type=float, default=24.0, help="simulated hours")
    p.add_argument("--accel", type=float, default=90.0)
    p.add_argument("--fault-rate", type=float, default=0.02)
    p.add_argument("--broker-restarts", type=int, default=10)
    p.add_argument("--agent-kills", type=int, default=10)
    p.add_argument("--power-cuts", type=int, default=60)
    p.add_argument("--inject", type=int, default=3, help="bad messages of each kind")
    p.add_argument("--telemetry-s", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    work = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    duration = a.hours * 3600 / a.accel
    print(
        f"chaos: {a.stations} stations × {a.slots} slots, {a.hours:g} h simulated at ×{a.accel:g} "
        f"= {duration / 60:.1f} min, faults {a.fault_rate:.1%}, workdir {work}",
        flush=True,
    )

    broker = Mosquitto(work / "broker", insecure=True)
    broker.start()
    agent = Agent(work, broker.port)
    agent.start()
    collector = Collector(broker.port)
    keys = KeyStore(agent.db_url)
    fleet = Fleet(
        n_stations=a.stations,
        slots=a.slots,
        broker_port=broker.port,
        workdir=work / "fleet",
        keys=keys,
        accel=a.accel,
        fault_rate=a.fault_rate,
        seed=a.seed,
        telemetry_s=a.telemetry_s,
    )
    log = FaultLog(fleet)
    t_setup = time.monotonic()
    fleet.start()
    print(f"chaos: fleet up in {time.monotonic() - t_setup:.1f} s", flush=True)
    log.t0 = time.monotonic()
    broker_at = schedule(rng, a.broker_restarts, duration, 20)
    agent_at = schedule(rng, a.agent_kills, duration, 25)
    cut_at = schedule(rng, a.power_cuts, duration, 10)
    inject_at = duration * 0.5
    injected: list[bytes] = []
    broker_down = 0.0
    stop = threading.Event()

    def cutter() -> None:
        for t in cut_at:
            if stop.wait(max(0.0, log.t0 + t - time.monotonic())):
                return
            st = rng.choice(fleet.stations)
            down = round(rng.uniform(0.0, 2.0), 1)
            try:
                fleet.power_cut(st.sid, down_s=down)
                log.add("power_cut", st.sid, down_s=down)
            except RuntimeError as e:
                log.add("power_cut_skipped", st.sid, why=str(e))

    cuts = threading.Thread(target=cutter, daemon=True)
    cuts.start()
    events = sorted(
        [(t, "broker") for t in broker_at]
        + [(t, "agent") for t in agent_at]
        + [(inject_at, "inject")]
    )
    try:
        for t, what in events:
            time.sleep(max(0.0, log.t0 + t - time.monotonic()))
            if what == "broker":
                down = round(rng.uniform(2.0, 6.0), 1)
                t_b = time.monotonic()
                broker.stop()
                time.sleep(down)
                broker.start()
                broker_down += time.monotonic() - t_b
                log.add("broker_restart", down_s=down)
            elif what == "agent":
                agent.kill()
                down = round(rng.uniform(0.5, 4.0), 1)
                time.sleep(down)
                agent.start()
                log.add("agent_sigkill", down_s=down)
            else:
                injected = inject(fleet, agent, broker.port, a.inject, rng)
                log.add("inject", n=len(injected))
        time.sleep(max(0.0, log.t0 + duration - time.monotonic()))
        stop.set()
        cuts.join(30)
        print(f"chaos: {duration / 60:.1f} min done; settling", flush=True)
        settled = fleet.settle(180)
        truth = fleet.ground_truth()
        grid_truth = fleet.grid_truth()
        bound = fleet.integration_bound()
        stats = fleet.stats()
        fault_totals = fleet.fault_totals()
        th = fleet.host._thread
        rig_cpu = thread_cpu_s(th.native_id) if th is not None and th.native_id else None
        fleet.stop()
    except BaseException:
        stop.set()
        fleet.stop()
        raise

    # -- the books --------------------------------------------------------------------------
    got = collector.snapshot()
    injected_set = set(injected)
    ring = StaticKeys({(s.sid, s.kid): s.key for s in fleet.stations})
    col_msgs: dict[tuple[str, int, int], Msg] = {}
    deliveries = 0
    for topic, payload, recv_ms in got:
        if payload in injected_set:
            continue
        deliveries += 1
        _, sid, kind = topic.split("/")
        try:
            v = verify(kind, sid, payload, ring)
        except WireError:
            continue
        col_msgs.setdefault((sid, v.boot, v.seq), Msg(sid, v.boot, v.seq, recv_ms, v.body))

    def agent_keys() -> set[tuple[str, int, int]]:
        st = Store(agent.db_url, readonly=True)
        try:
            return {(r.sid, r.boot, r.seq) for rows in st.iter_raw() for r in rows}
        finally:
            st.close()

    caught_up = wait(lambda: set(col_msgs) <= agent_keys(), 180, 2.0)
    ref_agent: dict[tuple[str, int], tuple[int, int]] = {}
    exported: dict[tuple[str, int], tuple[int, int]] = {}

    def books_agree() -> bool:
        nonlocal ref_agent, exported
        st = Store(agent.db_url, readonly=True)
        try:
            msgs = [
                Msg(r.sid, r.boot, r.seq, r.recv_ms, decode_record(r.record))
                for rows in st.iter_raw()
                for r in rows
            ]
        finally:
            st.close()
        ref_agent = reference_totals(msgs)
        exported = export_totals(agent.db_url)
        return all(exported.get(k, (0, 0)) == v for k, v in ref_agent.items())

    records_ok = wait(books_agree, 120, 3.0)
    agent.stop()
    broker.stop()
    collector.close()
    keys.close()

    st = Store(agent.db_url, readonly=True)
    raw_rows = [r for rows in st.iter_raw() for r in rows]
    quarantine = st.quarantine_rows()
    st.close()
    raw_keys = Counter((r.sid, r.boot, r.seq) for r in raw_rows)
    dup_stored = sum(n - 1 for n in raw_keys.values() if n > 1)
    gaps = []
    by_boot: dict[tuple[str, int], list[int]] = {}
    for sid, boot, seq in raw_keys:
        by_boot.setdefault((sid, boot), []).append(seq)
    for k, seqs in by_boot.items():
        seqs.sort()
        if seqs != list(range(len(seqs))):
            gaps.append((k, len(seqs), seqs[-1]))
    ref_col = reference_totals(list(col_msgs.values()))
    q_reasons = Counter(q.reason for q in quarantine)
    q_unexpected = [q for q in quarantine if bytes(q.record) not in injected_set]
    q_missing = len(injected_set - {bytes(q.record) for q in quarantine})

    # per slot: credited vs ground truth
    rows = []
    worst = (0.0, "")
    over = []
    for sim in fleet.stations:
        for n in range(1, a.slots + 1):
            c, h = exported.get((sim.sid, n), (0, 0))
            t = truth[sim.sid][n]
            d = c - t
            rows.append((sim.sid, n, c, h, t, d, bound[sim.sid][n]))
            if abs(d) > bound[sim.sid][n] or h:
                over.append((sim.sid, n, c, h, t, bound[sim.sid][n]))
            if t and abs(d) / t > worst[0]:
                worst = (abs(d) / t, f"{sim.sid}/{n}")
    tot_c = sum(r[2] for r in rows)
    tot_t = sum(r[4] for r in rows)
    tot_abs = sum(abs(r[5]) for r in rows)
    grid_c = sum(exported.get((s.sid, 0), (0, 0))[0] for s in fleet.stations)
    grid_t = sum(grid_truth.values())
    cpu = stats["cpu_s"]
    cpu_pct = sum(cpu.values()) / len(cpu) / duration * 100

    checks = {
        "settled (final telemetry from every station)": settled,
        "agent has every message the collector got": caught_up,
        "agent records == §6 reference over its raw (every stream)": records_ok,
        "§6 reference over the collector's messages == over the agent's raw": ref_col == ref_agent,
        "credited == ground truth within the bound, nothing held (every slot)": not over,
        "no (sid, boot, seq) stored twice": dup_stored == 0,
        "no seq gap in any boot": not gaps,
        "quarantine == exactly the injected messages": not q_unexpected and q_missing == 0,
        f"≥{a.broker_restarts} broker restarts, ≥{a.agent_kills} agent SIGKILLs, "
        f"≥{a.power_cuts} power cuts": (
            sum(e["what"] == "broker_restart" for e in log.entries) >= a.broker_restarts
            and sum(e["what"] == "agent_sigkill" for e in log.entries) >= a.agent_kills
            and stats["cuts"] >= a.power_cuts
        ),
    }
    print("\n== figures")
    print(
        f"simulated {stats['virtual_s'] / 3600:.2f} h in {duration / 60:.1f} min; "
        f"{a.stations} stations × {a.slots} slots; {stats['starts']} firmware starts, "
        f"{stats['cuts']} power cuts, {stats['crashes']} crashes"
    )
    print(f"scenario: {stats['actions']}; riders turned away {stats['turned_away']}")
    print(
        f"messages: {len(raw_rows)} stored by the agent, {len(col_msgs)} unique at the collector, "
        f"{deliveries - len(col_msgs)} duplicate deliveries to the collector, "
        f"{dup_stored} stored twice, {len(gaps)} boots with seq gaps"
    )
    print(
        f"link faults injected by the rigs: {fault_totals} "
        f"({sum(fault_totals.values())} failed transactions)"
    )
    print(
        f"battery energy: credited {tot_c / 1e6:.3f} kWh, ground truth {tot_t / 1e6:.3f} kWh, "
        f"difference {(tot_c - tot_t) / 1e3:+.1f} Wh ({(tot_c - tot_t) / max(1, tot_t):+.4%}); "
        f"Σ|per-slot error| {tot_abs / 1e3:.1f} Wh ({tot_abs / max(1, tot_t):.3%}); worst slot "
        f"{worst[1]} {worst[0]:.3%}; slots over their bound: {len(over)}"
    )
    print(
        f"grid meters: credited {grid_c / 1e6:.3f} kWh (from the first reading each), rigs' grid "
        f"energy since start {grid_t / 1e6:.3f} kWh"
    )
    print(f"quarantine: {dict(q_reasons)} (injected {len(injected)})")
    rig_pct = f"{rig_cpu / duration * 100:.1f} %" if rig_cpu is not None else "?"
    print(
        f"CPU: firmware {cpu_pct:.2f} % of a core per station (mean), rig host thread "
        f"{rig_pct} of a core for all rigs, agent {agent.cpu_s:.0f} s over {agent.starts} runs; "
        f"broker down {broker_down:.0f} s in total; load average {os.getloadavg()[0]:.2f}"
    )
    print("\n== checks")
    ok = True
    for name, passed in checks.items():
        ok &= bool(passed)
        print(f"  {'PASS' if passed else 'FAIL'}  {name}")
    if over:
        print("  slots over their bound (sid, slot, credited, held, truth, bound):")
        for o in over[:20]:
            print("   ", o)
    if gaps:
        print("  seq gaps (sid/boot, count, last seq):", gaps[:10])
    if q_unexpected:
        print("  unexpected quarantine:", [(q.reason, q.detail) for q in q_unexpected[:10]])
    report = {
        "args": vars(a),
        "checks": checks,
        "fault_log": log.entries,
        "stats": stats,
        "fault_totals": fault_totals,
        "quarantine": dict(q_reasons),
        "energy": {
            "credited_mwh": tot_c,
            "truth_mwh": tot_t,
            "abs_error_mwh": tot_abs,
            "grid_credited_mwh": grid_c,
            "grid_truth_mwh": grid_t,
            "slots": [
                dict(
                    zip(
                        ("sid", "slot", "credited", "held", "truth", "diff", "bound"),
                        r,
                        strict=False,
                    )
                )
                for r in rows
            ],
        },
        "messages": {
            "stored": len(raw_rows),
            "collector_unique": len(col_msgs),
            "collector_duplicates": deliveries - len(col_msgs),
            "stored_twice": dup_stored,
            "gaps": len(gaps),
        },
        "cpu": {"firmware_pct_per_station": cpu_pct, "agent_s": agent.cpu_s, "rig": rig_cpu},
    }
    (work / "chaos_report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nreport: {work / 'chaos_report.json'}; result: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
