"""OCPP frames per second one agent takes from many chargers (CONTRACT §11).

    .venv/bin/python bench/bench_ocpp.py [--chargers 100] [--seconds 20] [--db URL]

The agent runs as `stationctl agent` in its own process ([ocpp] on loopback, SQLite by
default); this process runs N charge points (the `ocpp` library's 1.6 ChargePoint over
real WebSockets, all 1.6: 2.0.1 frames cost the same), each
sending MeterValues in a closed loop (the next once the last is answered, as OCPP
allows one call in flight). Every answer comes after the frame was committed, so the
rate is committed frames per second. Printed: frames/s, answer latency percentiles, the
rows counted in raw afterwards, and the same load against a bare CSMS of the library that
stores nothing, a process of its own too, run first (the ratio is what storing and
metering cost; the load generator shares the 2 cores with the server).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import pathlib
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any

import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call, call_result

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.machine import proc_cpu_s  # noqa: E402

PASSWORD = "bench-password-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def charger(url: str, sid: str, stop: float, lat: list[float], n: list[int]) -> None:
    auth = base64.b64encode(f"{sid}:{PASSWORD}".encode()).decode()
    async with websockets.connect(
        f"{url}/{sid}",
        subprotocols=["ocpp1.6"],
        additional_headers={"Authorization": "Basic " + auth},
    ) as ws:
        cp = ChargePoint(sid, ws, response_timeout=30)
        reader = asyncio.create_task(cp.start())
        await cp.call(call.BootNotification(charge_point_model="B", charge_point_vendor="B"))
        wh = 1000
        while time.monotonic() < stop:
            wh += 7
            mv = [
                {
                    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "sampledValue": [
                        {"value": str(wh), "measurand": "Energy.Active.Import.Register"}
                    ],
                }
            ]
            t = time.perf_counter()
            await cp.call(
                call.MeterValues(connector_id=1, meter_value=mv), skip_schema_validation=True
            )
            lat.append(time.perf_counter() - t)
            n[0] += 1
        reader.cancel()


async def load(url: str, chargers: int, seconds: float) -> tuple[int, float, list[float]]:
    lat: list[float] = []
    n = [0]
    t0 = time.monotonic()
    await asyncio.gather(
        *(charger(url, f"BENCH-{i:03d}", t0 + seconds, lat, n) for i in range(chargers))
    )
    return n[0], time.monotonic() - t0, lat


class _Bare(ChargePoint):  # type: ignore[misc]
    @on("BootNotification")
    def boot(self, **_: Any) -> Any:
        return call_result.BootNotification(
            current_time="2026-01-01T00:00:00Z", interval=300, status="Accepted"
        )

    @on("MeterValues")
    def mv(self, **_: Any) -> Any:
        return call_result.MeterValues()


async def serve_bare(port: int) -> None:
    """The baseline: the library's own CSMS answering at once, storing nothing (run as a
    process of its own, as the agent is)."""

    async def handler(ws: Any) -> None:
        cp = _Bare(ws.request.path.rsplit("/", 1)[-1], ws)
        try:
            await cp.start()
        except Exception:  # noqa: BLE001  (the client went)
            pass

    async with websockets.serve(handler, "127.0.0.1", port, subprotocols=["ocpp1.6"]):  # type: ignore[list-item]
        await asyncio.Future()


def run_server(cmd: list[str], port: int, chargers: int, seconds: float) -> tuple[Any, float]:
    """Start a server process, load it, stop it: ((frames, seconds, latencies), its CPU s)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        cpu0 = proc_cpu_s(proc.pid)
        res = asyncio.run(load(f"ws://127.0.0.1:{port}", chargers, seconds))
        cpu = proc_cpu_s(proc.pid) - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return res, cpu


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] * 1000 if s else float("nan")


def show(name: str, n: int, dt: float, lat: list[float]) -> float:
    rate = n / dt
    print(
        f"{name:<28} {n:>7} frames in {dt:5.1f} s = {rate:8.0f} frames/s; answer p50 "
        f"{pct(lat, 50):6.1f} ms p99 {pct(lat, 99):6.1f} ms max {pct(lat, 100):6.1f} ms"
    )
    return rate


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chargers", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--db", default=None, help="agent database URL (default: a temp SQLite)")
    ap.add_argument("--serve-bare", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_bare is not None:
        asyncio.run(serve_bare(a.serve_bare))
        return 0
    from agent.ocpp.points import Points
    from agent.store import Store

    bport = free_port()
    base, bcpu = run_server(
        [sys.executable, __file__, "--serve-bare", str(bport)], bport, a.chargers, a.seconds
    )
    r0 = show("bare library CSMS (no store)", *base)
    print(f"  its CPU: {bcpu / max(base[0], 1) * 1e6:.0f} µs per frame")
    with tempfile.TemporaryDirectory() as tmp:
        db = a.db or f"sqlite:///{tmp}/agent.db"
        Store(db, create=True).close()
        with Points(Store(db)) as pts:
            for i in range(a.chargers):
                sid = f"BENCH-{i:03d}"
                if pts.get(sid) is None:
                    pts.add(sid, PASSWORD)
        port = free_port()
        cfg = pathlib.Path(tmp) / "agent.toml"
        cfg.write_text(
            f'[db]\nurl = "{db}"\n[broker]\nhost = "127.0.0.1"\nport = 9\n'
            f'[ocpp]\nlisten = "127.0.0.1:{port}"\n'
        )
        os.chmod(cfg, 0o600)
        agent = [sys.executable, "-m", "stationctl", "agent", "--config", str(cfg)]
        res, cpu = run_server([*agent, "--log-level", "error"], port, a.chargers, a.seconds)
        r1 = show(f"agent ({'PostgreSQL' if db.startswith('postgres') else 'SQLite'})", *res)
        print(f"  its CPU: {cpu / max(res[0], 1) * 1e6:.0f} µs per frame")
        if not db.startswith("postgres"):
            rows = (
                sqlite3.connect(db[len("sqlite:///") :])
                .execute("SELECT COUNT(*) FROM raw WHERE kind = 'ocpp'")
                .fetchone()[0]
            )
            print(
                f"raw rows (ocpp) after the run: {rows} (frames answered + boots: {res[0] + a.chargers})"
            )
    print(f"ratio agent / bare library CSMS: {r1 / r0:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
