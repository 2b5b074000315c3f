"""`stationctl agent --config FILE`: the ingest service (agent/service.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sqlite3
from typing import Any

from stationctl.errors import UsageError


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
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await svc.run(stop)

    try:
        asyncio.run(main())
    except ConfigError as e:  # found only once running (the dashboard's port is taken)
        raise UsageError(str(e)) from None
    return 0
