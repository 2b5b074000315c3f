"""`stationctl agent --config FILE`: the ingest service (agent/service.py).

SIGTERM or SIGINT stops it within 5 s whatever it is doing: the service commits and
acknowledges what it read for up to 2 s and interrupts a commit still running; should
anything still hold the process (a database call that does not return), a watchdog ends it
at STOP_DEADLINE_S with exit status 1. Nothing is lost either way: a message is
acknowledged only after its commit, and SQLite's WAL survives an exit at any point.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sqlite3
import sys
import threading
from typing import Any

from stationctl.errors import UsageError

STOP_DEADLINE_S = 4.5  # after SIGTERM, the process is gone by then at the latest


def _watchdog() -> None:
    def expire() -> None:
        logging.getLogger(__name__).error(
            "not stopped %.1fs after the signal: exiting now (nothing acknowledged is lost)",
            STOP_DEADLINE_S,
        )
        logging.shutdown()
        sys.stderr.flush()
        os._exit(1)

    t = threading.Timer(STOP_DEADLINE_S, expire)
    t.daemon = True
    t.start()


def register(sub: Any) -> None:
    p = sub.add_parser("agent", help="run the agent: MQTT ingest, raw store, metering records")
    p.add_argument(
        "--config",
        required=True,
        metavar="FILE",
        help="TOML configuration (see agent/config.example.toml)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config
    from agent.service import Service

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        svc = Service(cfg)
    except (ValueError, sqlite3.Error, OSError) as e:
        raise UsageError(f"database {cfg.db.url}: {e}") from None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if not stop.is_set():
                stop.set()
                _watchdog()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await svc.run(stop)

    try:
        asyncio.run(main())
    except ConfigError as e:  # found only once running (the dashboard's port is taken)
        raise UsageError(str(e)) from None
    return 0
