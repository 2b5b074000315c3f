"""`stationctl dashboard`: the web dashboard as its own server beside an agent.

stationctl dashboard --db sqlite:///agent.db --port 8080
stationctl dashboard --db postgresql://host/agent --port 8080 --login on --users-db users.db

`--login` as `[dashboard] login` (docs/dashboard.md, Login): "off" (the default) only on a
loopback address; "on" and "remote" need the users database (`stationctl users add`).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    d = sub.add_parser("dashboard", help="serve the web dashboard over an agent database")
    d.add_argument(
        "--db",
        metavar="URL",
        required=True,
        help="agent database (a path, sqlite:///PATH or postgresql://…)",
    )
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    d.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free)")
    d.add_argument("--carbon-params", metavar="FILE", help="carbon parameter file")
    d.add_argument(
        "--login",
        choices=["off", "on", "remote"],
        default="off",
        help="off (loopback only; the default), on (everyone logs in), remote (loopback "
        "clients need not)",
    )
    d.add_argument(
        "--local-role",
        choices=["viewer", "operator", "admin"],
        default="operator",
        help="role of loopback clients with --login remote or off (default operator)",
    )
    d.add_argument(
        "--users-db", metavar="FILE", help="accounts (default: users.db beside a SQLite --db)"
    )
    d.set_defaults(func=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    import logging

    from agent.config import ConfigError, DashboardConfig
    from agent.dashboard import DashboardServer, make_app
    from agent.dashboard.auth import from_config
    from stationctl.dbopen import name

    name(args.db)  # a URL of another scheme is bad usage; the database may appear later
    if not 0 <= args.port <= 65535:
        raise UsageError(f"bad port {args.port}")
    try:
        dc = DashboardConfig(
            host=args.host,
            port=args.port,
            login=args.login,
            local_role=args.local_role,
            users_db=args.users_db,
        )
        auth = from_config(dc, args.db)
    except (ConfigError, ValueError) as e:
        raise UsageError(str(e)) from None
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        server = DashboardServer(
            make_app(args.db, carbon_params=args.carbon_params, auth=auth), args.host, args.port
        )
        try:
            await server.start()
        except OSError as e:
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
        print(f"dashboard: {server.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(s, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(main())
    return 0
