"""The dashboard's Starlette application: pages, static files, the JSON API and live updates.

    app = make_app("sqlite:///agent.db")          # serve with uvicorn, or:
    server = DashboardServer(app, "127.0.0.1", 8080); await server.start(); …; await server.stop()

The app reads the agent's database only (read-only connection); its poller thread starts
and stops with the app's lifespan. Pages are plain HTML, CSS and JavaScript from
agent/dashboard/static (no build step, no CDN).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import socket
from collections.abc import AsyncIterator, Iterator, Sequence

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from . import api
from .auth import Auth, AuthMiddleware
from .auth import routes as auth_routes
from .live import Live
from .state import ViewConfig

log = logging.getLogger(__name__)

STATIC = pathlib.Path(__file__).resolve().parent / "static"


def _page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def make_app(
    db_url: str,
    *,
    cfg: ViewConfig | None = None,
    carbon_params: str | None = None,
    poll_s: float = 1.0,
    live: Live | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    auth: Auth | None = None,
) -> Starlette:
    """The dashboard over the agent database at `db_url` (a path, sqlite:///PATH or
    postgresql://…). `app.state.live` is the `Live` poller (call `.nudge()` after a
    commit). `extra_routes`: more endpoints on the same server (the agent's /healthz and
    /metrics). `auth`: login, roles and alarm acknowledgements (agent/dashboard/auth.py);
    None: no login and nothing to change (the read-only dashboard). The app closes `auth`
    when it stops."""
    lv = live or Live(db_url, cfg, carbon_params=carbon_params, poll_s=poll_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        lv.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            lv.stop()
            if auth is not None:
                auth.close()

    app = Starlette(
        routes=[
            Route("/", _page, methods=["GET"]),
            Route("/stations/{sid}", _page, methods=["GET"]),
            Route("/alarms", _page, methods=["GET"]),
            Route("/sessions", _page, methods=["GET"]),
            Route("/energy", _page, methods=["GET"]),
            *api.routes(),
            *(auth_routes() if auth is not None else ()),
            *(api.ack_routes() if auth is not None and auth.store is not None else ()),
            *extra_routes,
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(AuthMiddleware, auth=auth)] if auth is not None else [],
        lifespan=lifespan,
    )
    app.state.live = lv
    app.state.auth = auth
    return app


class _Server(uvicorn.Server):
    """uvicorn inside someone else's event loop: the host program owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DashboardServer:
    """Serve an app on host:port (0: a free port) in the running event loop."""

    def __init__(
        self,
        app: Starlette,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        stop_timeout: float = 10.0,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.stop_timeout = stop_timeout  # longest wait for open requests at stop
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=max(1, min(3, int(self.stop_timeout))),
            access_log=False,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what went wrong
                raise RuntimeError("dashboard server stopped during start-up")
            await asyncio.sleep(0.02)
        log.info("dashboard on %s", self.url)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        live: Live = self.app.state.live
        live.hub.close()  # ends every live stream, so no connection holds the shutdown
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, self.stop_timeout)
        except TimeoutError:
            self._task.cancel()
        self._server = None
        self._task = None
