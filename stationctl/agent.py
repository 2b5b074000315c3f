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


async def _open(cfg: Any, stop: asyncio.Event) -> Any:
    """The service, once its database can be opened: a database that is down or unreachable
    at start (PostgreSQL restarting, a network cut) is tried again with backoff until it
    answers or the agent is stopped (None then). A database this agent cannot use (another
    schema version, a bad URL) is bad usage: exit 2 at once, with the reason."""
    from agent.service import Service, _is_env
    from agent.store.sql import describe, is_postgres

    log = logging.getLogger("stationctl.agent")
    delay = 0.5
    while True:
        try:
            return await asyncio.to_thread(Service, cfg)
        except Exception as e:
            # a SQLite file that cannot be opened is a setting to fix, not a server to wait for
            if not (is_postgres(cfg.db.url) and _is_env(e)):
                raise UsageError(f"database {describe(cfg.db.url)}: {e}") from None
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.error(
                "database %s unreachable (%s): retrying in %.1fs",
                describe(cfg.db.url),
                why,
                delay,
            )
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return None
        except TimeoutError:
            delay = min(delay * 2, 5.0)


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

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if not stop.is_set():
                stop.set()
                _watchdog()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        svc = await _open(cfg, stop)
        if svc is not None:
            await svc.run(stop)

    try:
        asyncio.run(main())
    except ConfigError as e:  # found only once running (the dashboard's port is taken)
        raise UsageError(str(e)) from None
    return 0
