"""OCPP soak: many simulated chargers (half 1.6J, half 2.0.1) through random sessions at an
accelerated clock into `stationctl agent`; then every connector's credited energy against
the chargers' registers, and `stationctl verify`.

    .venv/bin/python bench/ocpp_soak.py [--chargers 100] [--seconds 60] [--accel 600]

Prints frames/s taken, the connectors whose credited mWh differs from what their register
rose over the transactions (expected: none), sessions against transactions, and verify's
verdict. A `make ocpp-soak` target runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_ocpp import free_port  # noqa: E402
from tools.ocpp_fleet import point_ids, register_points  # noqa: E402
from tools.ocpp_sim import PointSpec, SimClock, run_points  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chargers", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--accel", type=float, default=600.0)
    ap.add_argument("--sample-s", type=float, default=60.0)
    a = ap.parse_args()
    from agent.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/agent.db"
        Store(db, create=True).close()
        sids = point_ids("SOAK-", a.chargers)
        pw = register_points(db, sids)
        port = free_port()
        cfg = pathlib.Path(tmp) / "agent.toml"
        cfg.write_text(
            f'[db]\nurl = "{db}"\n[broker]\nhost = "127.0.0.1"\nport = 9\n'
            f'[ocpp]\nlisten = "127.0.0.1:{port}"\n'
        )
        os.chmod(cfg, 0o600)
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stationctl",
                "agent",
                "--config",
                str(cfg),
                "--log-level",
                "error",
            ],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(300):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.1)
            specs = [
                PointSpec(sid, pw[sid], "1.6" if i % 2 == 0 else "2.0.1", 2)
                for i, sid in enumerate(sids)
            ]
            # the simulated day starts well in the past: its times stay below the receive
            # time + 1 day (CONTRACT §2) however far the accelerated clock runs
            start = int(time.time() * 1000) - int(a.seconds * a.accel * 1000) - 86_400_000
            t0 = time.monotonic()
            truth = asyncio.run(_run(specs, port, a, start))
            took = time.monotonic() - t0
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(60)
        with Store(db, create=False, readonly=True) as st:
            frames = st.db.execute("SELECT COUNT(*) FROM raw WHERE kind = 'ocpp'").fetchone()[0]
            q = st.db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
            credited: dict[tuple[str, int], int] = {}
            for r in st.record_rows(kind="interval"):
                credited[(r.sid, r.slot)] = credited.get((r.sid, r.slot), 0) + r.mwh
            sessions = len(st.record_rows(kind="session"))
        bad, txs, conns = [], 0, 0
        for sid, gt in truth.items():
            for c in gt["connectors"]:
                want = sum(
                    t["energy_wh"] * 1000
                    for t in gt["transactions"]
                    if t["connector"] == int(c) and t["energy_wh"] is not None
                )
                conns += 1
                if credited.get((sid, int(c)), 0) != want:
                    bad.append((sid, c, credited.get((sid, int(c)), 0), want))
            txs += sum(1 for t in gt["transactions"] if t["stop"] is not None)
        print(
            f"{a.chargers} chargers ({a.chargers // 2 + a.chargers % 2} OCPP 1.6, "
            f"{a.chargers // 2} 2.0.1), {took:.0f} s at ×{a.accel:g} "
            f"({took * a.accel / 3600:.1f} simulated h)"
        )
        print(f"frames stored {frames} ({frames / took:.0f}/s), quarantined {q}")
        print(f"connectors {conns}: credited mWh differs from the register in {len(bad)}")
        for b in bad[:10]:
            print("  ", b)
        print(f"transactions ended {txs}, session records {sessions}")
        v = subprocess.run(
            [sys.executable, "-m", "stationctl", "verify", "--db", db],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        print("verify:", v.stdout.strip().splitlines()[-1] if v.stdout else v.stderr.strip())
        return 0 if not bad and v.returncode == 0 else 1


async def _run(specs: list[PointSpec], port: int, a: Any, start: int) -> dict[str, Any]:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(a.seconds, stop.set)
    return await run_points(
        f"ws://127.0.0.1:{port}",
        specs,
        accel=a.accel,
        stop=stop,
        sample_s=a.sample_s,
        clock=SimClock(start, accel=a.accel),
        seed=1,
    )


if __name__ == "__main__":
    raise SystemExit(main())
