"""Dashboard cost per live client: the agent (`stationctl agent` with `[dashboard]`) ingesting
8 stations × 8 slots (64 slots) of signed telemetry once a second through Mosquitto, with
0 and then 100 concurrent SSE clients (station pages, then the fleet page).

Prints the agent process's CPU (% of one core) and resident memory in each phase, the cost
per client, messages delivered per client per second, and the delay from a station's
timestamp to the browser-side receipt (publish → broker → agent commit → dashboard poll →
SSE). The clients run in this process (asyncio sockets), not in the agent.

    .venv/bin/python bench/bench_dashboard.py [--clients 100] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import wire
from agent.keys import KeyStore
from tools.machine import proc_cpu_s
from tools.mosquitto import Mosquitto


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_rss_kb(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Publisher(threading.Thread):
    """`stations` × `slots` signed telemetry, once a second per station, like the firmware."""

    def __init__(self, port: int, sids: list[str], keys: dict[str, bytes], slots: int) -> None:
        super().__init__(daemon=True)
        self.sids, self.keys, self.slots = sids, keys, slots
        self.stop = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-stations")
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.sent = 0

    def run(self) -> None:
        up0 = time.monotonic()
        seq = {s: 0 for s in self.sids}
        e = {s: [0] * self.slots for s in self.sids}
        for sid in self.sids:
            birth = {
                "v": 1,
                "sid": sid,
                "boot": 1,
                "state": "online",
                "fw": "bench",
                "cfg": "0" * 12,
            }
            self.c.publish(f"stations/{sid}/status", json.dumps(birth), qos=1, retain=True)
        k = 0
        while not self.stop.is_set():
            t_next = up0 + k + 1
            for i, sid in enumerate(self.sids):
                up = int((time.monotonic() - up0) * 1000)
                slots = []
                for n in range(1, self.slots + 1):
                    ma = 10_000 + 500 * ((k + n + i) % 10)  # power changes every second
                    e[sid][n - 1] += 84 * ma // 3600
                    slots.append(
                        {
                            "n": n,
                            "st": "C",
                            "mv": 84000,
                            "ma": ma,
                            "e_mwh": e[sid][n - 1],
                            "b_mwh": 0,
                            "bat": {
                                "id": f"B{i:03d}{n:04d}",
                                "soc": 500,
                                "soh": 990,
                                "mv": 83900,
                                "ma": ma,
                                "t": 300,
                                "tmin": 280,
                                "cyc": 10,
                                "flt": 0,
                                "life_wh": 1000,
                            },
                        }
                    )
                body = {
                    "v": 1,
                    "sid": sid,
                    "kid": 1,
                    "boot": 1,
                    "seq": seq[sid],
                    "up": up,
                    "ts": int(time.time() * 1000),
                    "meter": {"e_wh": 100_000 + k, "p_w": 9000, "sn": 1234},
                    "slots": slots,
                    "err": {
                        "mb_to": 0,
                        "mb_crc": 0,
                        "mb_exc": 0,
                        "mb_addr": 0,
                        "ser_cs": 0,
                        "ser_to": 0,
                        "ser_bad": 0,
                    },
                }
                seq[sid] += 1
                payload = wire.sign(
                    json.dumps(body, separators=(",", ":")).encode(), self.keys[sid]
                )
                self.c.publish(f"stations/{sid}/telemetry", payload, qos=1)
                self.sent += 1
            k += 1
            self.stop.wait(max(0.0, t_next - time.monotonic()))
        self.c.loop_stop()
        self.c.disconnect()


class Clients:
    def __init__(self) -> None:
        self.msgs = 0
        self.delays: list[float] = []
        self.errors = 0
        self.connected = 0


async def sse_client(port: int, topic: str, st: Clients, stop: asyncio.Event) -> None:
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    except OSError:
        st.errors += 1
        return
    w.write(
        f"GET /api/live?topic={topic} HTTP/1.1\r\nHost: bench\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    await w.drain()
    status = await r.readline()
    if b" 200 " not in status:
        st.errors += 1
        w.close()
        return
    while (await r.readline()) not in (b"\r\n", b""):
        pass
    st.connected += 1
    seen: dict[str, int] = {}
    try:
        while not stop.is_set():
            try:
                line = await asyncio.wait_for(r.readline(), 1.0)
            except TimeoutError:
                continue
            if not line:
                break
            if not line.startswith(b"data: "):
                continue  # chunk sizes, blank lines, keepalives
            st.msgs += 1
            obj = json.loads(line[6:])
            now = time.time() * 1000
            tel = obj.get("telemetry")
            if tel and tel.get("seq") != seen.get(obj["sid"]):  # a station page: new reading
                seen[obj["sid"]] = tel["seq"]
                st.delays.append(now - tel["t_ms"])
    finally:
        w.close()


async def phase(port: int, topics: list[str], seconds: float, pid: int) -> dict[str, Any]:
    st = Clients()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(sse_client(port, t, st, stop)) for t in topics]
    t_conn = time.monotonic()
    while st.connected + st.errors < len(topics) and time.monotonic() - t_conn < 30:
        await asyncio.sleep(0.05)
    await asyncio.sleep(3)  # settle
    st.msgs = 0
    st.delays.clear()
    c0, t0 = proc_cpu_s(pid), time.monotonic()
    rss = []
    while time.monotonic() - t0 < seconds:
        await asyncio.sleep(1)
        rss.append(proc_rss_kb(pid))
    c1, t1 = proc_cpu_s(pid), time.monotonic()
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "cpu_pct": 100 * (c1 - c0) / (t1 - t0),
        "rss_kb": statistics.median(rss),
        "msgs_per_client_s": st.msgs / max(1, len(topics)) / (t1 - t0) if topics else 0.0,
        "delays": sorted(st.delays),
        "connected": st.connected,
        "errors": st.errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--stations", type=int, default=8)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    broker = Mosquitto(tmp / "mq", insecure=True)
    broker.start()
    sids = [f"KH-BEN-{i + 1:04d}" for i in range(a.stations)]
    keys = {s: os.urandom(32) for s in sids}
    with KeyStore(f"sqlite:///{tmp}/agent.db") as ks:
        for s in sids:
            ks.add(s, keys[s], 1)
    http = free_port()
    (tmp / "agent.toml").write_text(
        f'[db]\nurl = "sqlite:///agent.db"\nsynchronous = "normal"\n'
        f'[broker]\nport = {broker.port}\nclient_id = "bench-dashboard"\n'
        f"[dashboard]\nport = {http}\n"
    )
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stationctl",
            "agent",
            "--config",
            str(tmp / "agent.toml"),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
    )
    pub: Publisher | None = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/api/health", timeout=2) as r:
                    if json.load(r)["ok"]:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the agent's dashboard did not come up")
            time.sleep(0.2)
        pub = Publisher(broker.port, sids, keys, a.slots)
        pub.start()
        time.sleep(5)
        print(
            f"agent pid {agent.pid}: {a.stations} stations × {a.slots} slots = "
            f"{a.stations * a.slots} slots, telemetry every second per station; "
            f"{a.seconds:.0f} s per phase; 2 cores shared with the clients and the broker"
        )
        base = asyncio.run(phase(http, [], a.seconds, agent.pid))
        station_topics = [f"station:{sids[i % len(sids)]}" for i in range(a.clients)]
        pages = asyncio.run(phase(http, station_topics, a.seconds, agent.pid))
        fleet = asyncio.run(phase(http, ["fleet"] * a.clients, a.seconds, agent.pid))
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/api/health", timeout=5) as r:
            health = json.load(r)
        print(
            f"{'phase':<28}{'agent CPU %':>12}{'RSS MB':>9}{'msg/client/s':>15}"
            f"{'CPU/client':>13}{'RSS/client':>12}"
        )
        print(f"{'0 clients':<28}{base['cpu_pct']:>12.1f}{base['rss_kb'] / 1024:>9.1f}")
        for name, ph in (
            (f"{a.clients} station pages", pages),
            (f"{a.clients} fleet pages", fleet),
        ):
            per_cpu = (ph["cpu_pct"] - base["cpu_pct"]) / a.clients
            per_rss = (ph["rss_kb"] - base["rss_kb"]) / a.clients
            print(
                f"{name:<28}{ph['cpu_pct']:>12.1f}{ph['rss_kb'] / 1024:>9.1f}"
                f"{ph['msgs_per_client_s']:>15.2f}{per_cpu:>12.3f}%{per_rss:>9.1f} KB"
            )
            if ph["errors"]:
                print(f"  {ph['errors']} clients could not connect")
        d = pages["delays"]
        if d:
            print(
                f"station timestamp → SSE receipt (station pages): p50 {d[len(d) // 2]:.0f} ms, "
                f"p95 {d[int(len(d) * 0.95)]:.0f} ms, max {d[-1]:.0f} ms over {len(d)} readings"
            )
        print(
            f"dashboard poll {health['poll_ms']} ms; {health['polls']} polls, "
            f"{health['rows']} rows read, {health['sent']} SSE messages written; "
            f"published {pub.sent}"
        )
    finally:
        if pub is not None:
            pub.stop.set()
            pub.join(5)
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
        broker.stop()


if __name__ == "__main__":
    main()
