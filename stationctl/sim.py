"""`stationctl sim`: a fleet of virtual stations (tools/fleet.py) for load tests and demos.

    stationctl sim --stations 20 --slots 8 --broker mqtt://127.0.0.1:1883 --accel 60 \\
        --fault-rate 0.02 --duration 600 --workdir sim --agent-db sqlite:///agent.db

Each station runs the real firmware on MicroPython against its own simulated charger, BMS
and grid meter; riders swap batteries; `--accel 60` makes a simulated hour a real minute.
With --agent-db the stations' keys are registered there (the agent then verifies them).
Ground truth (energy delivered per station and slot) goes to WORKDIR/ground_truth.json,
the scenario's actions to WORKDIR/actions.jsonl. Runs until --duration or Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sim", help="a fleet of virtual stations (real firmware, simulated hardware)"
    )
    p.add_argument("--stations", type=int, default=8, metavar="N")
    p.add_argument("--slots", type=int, default=8, metavar="M")
    p.add_argument("--broker", required=True, metavar="URL", help="mqtt://host:port")
    p.add_argument(
        "--accel",
        type=float,
        default=1.0,
        metavar="X",
        help="time acceleration (60: an hour a minute; 1: real time)",
    )
    p.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="link faults per transaction on each station's charger line and bus",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="real seconds to run (default: until Ctrl-C)",
    )
    p.add_argument(
        "--workdir",
        default=None,
        metavar="DIR",
        help="flash folders, rig files, ground truth (default: a new temp folder)",
    )
    p.add_argument(
        "--agent-db",
        default=None,
        metavar="URL",
        help="register the stations' keys in this agent database",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prefix", default="stations", help="MQTT topic prefix")
    p.add_argument("--sample-ms", type=int, default=1000, help="sampling period, real ms")
    p.add_argument("--telemetry-s", type=int, default=10, help="telemetry period, real s")
    p.add_argument("--sid-prefix", default="KH-SIM-")
    p.add_argument(
        "--cut-every",
        type=float,
        default=None,
        metavar="S",
        help="cut the power of a random station every S real seconds",
    )
    p.add_argument("--status-every", type=float, default=10.0, metavar="S")
    p.add_argument(
        "--ocpp",
        type=int,
        default=0,
        metavar="N",
        help="add N simulated OCPP chargers (half 1.6J, half 2.0.1) connecting to --ocpp-url",
    )
    p.add_argument(
        "--ocpp-url",
        default=None,
        metavar="URL",
        help="the agent's OCPP endpoint, ws://host:port (its [ocpp] listen)",
    )
    p.set_defaults(func=run)


def parse_broker(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url)
    if u.scheme != "mqtt" or not u.hostname:
        raise UsageError(f"--broker {url!r}: expected mqtt://host[:port] (TLS is not simulated)")
    try:
        port = u.port or 1883
    except ValueError:
        raise UsageError(f"--broker {url!r}: bad port") from None
    return u.hostname, port


def run(args: argparse.Namespace) -> int:
    from agent.keys import KeyStore
    from tools.fleet import Fleet

    host, port = parse_broker(args.broker)
    if args.ocpp and not args.ocpp_url:
        raise UsageError("--ocpp N needs --ocpp-url ws://HOST:PORT (the agent's [ocpp] listen)")
    if args.ocpp and not args.agent_db:
        raise UsageError("--ocpp N needs --agent-db (where the chargers' passwords are registered)")
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be > 0")
    if args.cut_every is not None and args.cut_every <= 0:
        raise UsageError("--cut-every must be > 0")
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        with socket.create_connection((host, port), timeout=3):
            pass
    except OSError as e:
        print(f"stationctl sim: cannot reach the broker at {host}:{port}: {e}", file=sys.stderr)
        return 1
    keys = None
    if args.agent_db:
        try:
            keys = KeyStore(args.agent_db)
        except (ValueError, sqlite3.Error, OSError) as e:
            raise UsageError(f"--agent-db {args.agent_db}: {e}") from None
    try:
        fleet = Fleet(
            n_stations=args.stations,
            slots=args.slots,
            broker_host=host,
            broker_port=port,
            workdir=args.workdir,
            keys=keys,
            accel=args.accel,
            fault_rate=args.fault_rate,
            seed=args.seed,
            prefix=args.prefix,
            sample_ms=args.sample_ms,
            telemetry_s=args.telemetry_s,
            sid_prefix=args.sid_prefix,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    t0 = time.monotonic()
    fleet.start()
    ocpp = None
    if args.ocpp:
        from tools.ocpp_fleet import OCPP_STATE_FILE, OcppFleet

        ocpp = OcppFleet(
            args.ocpp,
            args.ocpp_url,
            db=args.agent_db,
            accel=args.accel,
            seed=args.seed,
            sid_prefix=args.sid_prefix + "OCPP-",
            truth_path=fleet.workdir / "ocpp_ground_truth.json",
            state_path=fleet.workdir / OCPP_STATE_FILE,
            clock_ms=fleet.clock.unix_ms(),
        )
        ocpp.start()
        print(f"stationctl sim: {args.ocpp} OCPP chargers on {args.ocpp_url}", flush=True)
    print(
        f"stationctl sim: {args.stations} stations × {args.slots} slots on {host}:{port}, "
        f"accel {args.accel:g}, workdir {fleet.workdir}",
        flush=True,
    )
    rng = random.Random(args.seed)
    next_cut = t0 + args.cut_every if args.cut_every else None
    next_status = t0 + args.status_every
    try:
        while not stop.is_set():
            now = time.monotonic()
            if args.duration is not None and now - t0 >= args.duration:
                break
            if next_cut is not None and now >= next_cut:
                next_cut = now + args.cut_every
                sid = rng.choice(fleet.stations).sid
                try:
                    fleet.power_cut(sid)
                except RuntimeError:
                    pass
            if now >= next_status:
                next_status = now + args.status_every
                print(_status(fleet), flush=True)
            stop.wait(0.2)
        print(_status(fleet), flush=True)
    finally:
        if ocpp is not None:
            ocpp.stop()
        fleet.stop()
        if keys is not None:
            keys.close()
    truth = fleet.ground_truth()
    total = sum(sum(m.values()) for m in truth.values())
    print(
        f"stationctl sim: delivered {total / 1e6:.3f} kWh into batteries; ground truth in "
        f"{fleet.workdir / 'ground_truth.json'}",
        flush=True,
    )
    return 0


def _status(fleet: Any) -> str:
    s = fleet.stats()
    cpu = s["cpu_s"]
    real = max(1e-9, s["virtual_s"] / fleet.accel)
    per = sum(cpu.values()) / max(1, len(cpu)) / real * 100
    return (
        f"sim: {s['virtual_s'] / 3600:.2f} h simulated, {s['powered']}/{s['stations']} up, "
        f"{s['telemetry_seen']} telemetry seen, {s['cuts']} cuts, {s['crashes']} crashes, "
        f"swaps {s['actions'].get('take', 0)}, firmware CPU {per:.1f} % of a core per station"
    )
