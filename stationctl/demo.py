"""`stationctl demo`: broker, virtual stations (real firmware), agent and dashboard in one
command (tools/demo.py). Prints where to look; Ctrl-C stops everything cleanly."""

from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import sys
import threading
from types import FrameType
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="broker, virtual stations, agent and dashboard in one command")
    p.add_argument("--stations", type=int, default=8, help="virtual stations (default 8)")
    p.add_argument("--slots", type=int, default=8, help="slots per station (default 8)")
    p.add_argument(
        "--accel",
        type=float,
        default=60.0,
        help="time acceleration of the charging scenario (default 60: a day in "
        "24 min; 1 = real time)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=8080,
        help="dashboard port (default 8080, a free one if busy; 0 = any)",
    )
    p.add_argument("--host", default="127.0.0.1", help="dashboard address (default 127.0.0.1)")
    p.add_argument(
        "--workdir",
        type=pathlib.Path,
        default=pathlib.Path("var/demo"),
        help="database, broker and station flash folders (default ./var/demo; kept between runs)",
    )
    p.add_argument("--fresh", action="store_true", help="wipe the workdir first")
    p.add_argument(
        "--broker",
        metavar="URL",
        help="use this broker (mqtt://HOST:PORT) instead of a private Mosquitto",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="an anonymous broker without accounts or ACL (default: the deployment's "
        "configuration, an account per station)",
    )
    p.add_argument(
        "--telemetry-s", type=int, default=1, help="station telemetry period in seconds (default 1)"
    )
    p.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        help="injected serial/Modbus faults per transaction (default 0)",
    )
    p.add_argument(
        "--ocpp",
        type=int,
        default=2,
        metavar="N",
        help="simulated OCPP chargers beside the stations (default 2; 0: none)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--duration", type=float, default=None, metavar="S", help="stop by itself after S seconds"
    )
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tools.demo import Demo, DemoConfig, DemoError, DemoFolderError, demo_env_ok

    try:
        cfg = DemoConfig(
            stations=args.stations,
            slots=args.slots,
            accel=args.accel,
            host=args.host,
            port=args.port,
            workdir=args.workdir,
            broker=args.broker,
            telemetry_s=args.telemetry_s,
            seed=args.seed,
            fault_rate=args.fault_rate,
            fresh=args.fresh,
            insecure=args.insecure,
            ocpp=args.ocpp,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.broker:
        from tools.demo import parse_broker

        try:
            parse_broker(args.broker)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be > 0")
    why = demo_env_ok()
    if why:
        print(f"stationctl demo: {why}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()

    demo = Demo(cfg)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        demo.halt()  # first of all: no station restarts from now on
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    print("stationctl demo: starting (the first start compiles the firmware)…", flush=True)
    try:
        try:
            demo.start()
        except DemoError as e:
            print(f"stationctl demo: {e}", file=sys.stderr)
            return 2 if isinstance(e, DemoFolderError) else 1
        print(demo.banner(), flush=True)
        stop.wait(args.duration)
        print("\nstationctl demo: stopping…", flush=True)
    finally:
        demo.stop()
        for s, h in old.items():
            signal.signal(s, h)
    res = demo.summary
    if res:
        print(
            f"stationctl demo: stopped; database {res['integrity']}: {res['raw']} signed "
            f"messages, {res['records']} records, {res['quarantine']} quarantined "
            f"({demo.db_url})",
            flush=True,
        )
        print(f"  export: stationctl export --db {demo.db_url} --by day --format csv", flush=True)
        return 0 if res["integrity"] == "ok" else 1
    return 0
