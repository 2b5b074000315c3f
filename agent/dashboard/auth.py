"""Who may use the dashboard: login sessions, read-only API tokens, roles, CSRF checks and
a login rate limit, as one ASGI middleware in front of the app (docs/dashboard.md, Login).

    auth = Auth(UserStore.open("users.db"), mode="on")
    app = make_app(db_url, auth=auth)

Modes: "off" (no login; the dashboard must bind a loopback address), "on" (everyone logs
in), "remote" (clients on loopback are let in as `local_role`, others log in). `/healthz`,
`/metrics` and `/static/` are never guarded.

Every state-changing request (POST, PUT, PATCH, DELETE) needs an Origin (or Referer) of
this very site when it sends one, and the principal's CSRF token in `X-CSRF-Token` (the
page reads it from `GET /api/me`; a cross-site page cannot). POST /login has no session
yet: it takes JSON only (a cross-site form cannot send that without a CORS preflight,
which this app never grants) and the same Origin check.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import pathlib
import secrets
import time
import urllib.parse
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from agent.config import ConfigError, DashboardConfig, is_loopback

from .users import ROLES, NoUsersDb, Session, UserStore, role_rank

log = logging.getLogger(__name__)

COOKIE: Final = "stationctl_session"
CSRF_HEADER: Final = "x-csrf-token"
UNGUARDED: Final = ("/healthz", "/metrics")
SAFE_METHODS: Final = ("GET", "HEAD", "OPTIONS")
STATIC = pathlib.Path(__file__).resolve().parent / "static"
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Principal:
    """Who a request comes from. `via`: session, token (read-only) or local (loopback in
    "remote" mode, anyone in "off" mode)."""

    name: str
    role: str
    via: str
    csrf: str | None  # what a state-changing request must carry (None: it may not)

    def may(self, role: str) -> bool:
        return role_rank(self.role) >= role_rank(role)


class RateLimit:
    """At most `limit` failures per `window_s` per key; the keys are client addresses and
    user names, so neither many names from one address nor one name from many addresses
    gets more guesses."""

    def __init__(self, limit: int = 5, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails.get(key, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def wait_s(self, keys: list[str], now: float | None = None) -> float:
        """0 when a login may be tried now, else the seconds until one may."""
        t = time.monotonic() if now is None else now
        wait = 0.0
        for k in keys:
            q = self._recent(k, t)
            if len(q) >= self.limit:
                wait = max(wait, q[-self.limit] + self.window_s - t)
        return wait

    def fail(self, keys: list[str], now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        if len(self._fails) > 10_000:  # bounded: forget keys with nothing recent
            self._fails = {k: q for k, q in self._fails.items() if self._recent(k, t)}
        for k in keys:
            q = self._recent(k, t)
            q.append(t)
            self._fails[k] = q

    def forget(self, key: str) -> None:
        self._fails.pop(key, None)


class Auth:
    """The login mode, the users store (None: no accounts, only possible with "off") and
    what the middleware counts (`counters`: login_ok, login_failed, login_throttled,
    csrf_refused, unauthenticated)."""

    def __init__(
        self,
        store: UserStore | None,
        *,
        mode: str = "on",
        local_role: str = "operator",
        rate_limit: RateLimit | None = None,
    ) -> None:
        if mode not in ("off", "on", "remote"):
            raise ValueError(f"login mode must be off, on or remote, not {mode!r}")
        if local_role not in ROLES:
            raise ValueError(f"local_role must be one of {', '.join(ROLES)}")
        if store is None and mode != "off":
            raise ValueError(f'login = "{mode}" needs a users database')
        self.store = store
        self.mode = mode
        self.local_role = local_role
        self.limit = rate_limit or RateLimit()
        self.counters: Counter[str] = Counter()
        self._local_csrf = secrets.token_urlsafe(32)  # for loopback principals (no session)

    def local(self, scope: Scope) -> Principal | None:
        """The principal of a request trusted for where it comes from, else None. The Host
        header must name loopback too: a page of another site whose name an attacker
        points at 127.0.0.1 (DNS rebinding) sends its own name."""
        if self.mode == "on" or not _loopback_host(scope):
            return None
        client = scope.get("client")
        addr = client[0] if client else ""
        if self.mode == "remote" and not is_loopback(_unmapped(addr)):
            return None
        return Principal(f"local@{addr}", self.local_role, "local", self._local_csrf)

    async def principal(self, scope: Scope, headers: dict[str, str]) -> Principal | None:
        sid = _cookie(headers.get("cookie", ""), COOKIE)
        if sid and self.store is not None:
            s: Session | None = await run_in_threadpool(self.store.session, sid)
            if s is not None:
                return Principal(s.user, s.role, "session", s.csrf)
        local = self.local(scope)
        if local is not None:
            return local
        authz = headers.get("authorization", "")
        if authz[:7].lower() == "bearer " and self.store is not None:
            name = await run_in_threadpool(self.store.token_name, authz[7:].strip())
            if name is not None:
                return Principal(f"token:{name}", "viewer", "token", None)
        return None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def principal(request: Request) -> Principal | None:
    """The request's principal as the middleware found it (None: no Auth on this app)."""
    p: Principal | None = request.scope.get("state", {}).get("principal")
    return p


class AuthMiddleware:
    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path in UNGUARDED or path.startswith("/static/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        unsafe = method not in SAFE_METHODS
        if unsafe and not _same_origin(scope, headers):
            self.auth.counters["csrf_refused"] += 1
            await _json(403, "cross-site request refused")(scope, receive, send)
            return
        if path == "/login":
            await self.app(scope, receive, send)
            return
        p = await self.auth.principal(scope, headers)
        if p is None:
            if headers.get("authorization", "") and path.startswith("/api/"):
                resp = _json(401, "unknown or revoked token")
            elif path.startswith("/api/") or unsafe:
                resp = _json(401, "login required")
            else:
                resp = RedirectResponse("/login?next=" + urllib.parse.quote(path), 303)
            self.auth.counters["unauthenticated"] += 1
            await resp(scope, receive, send)
            return
        if unsafe:
            sent = headers.get(CSRF_HEADER, "")
            if p.csrf is None:
                await _json(403, "API tokens are read-only")(scope, receive, send)
                return
            if not hmac.compare_digest(sent.encode(), p.csrf.encode()):
                self.auth.counters["csrf_refused"] += 1
                await _json(403, "missing or wrong CSRF token")(scope, receive, send)
                return
        if p.via == "token" and not path.startswith("/api/"):
            await RedirectResponse("/login?next=" + urllib.parse.quote(path), 303)(
                scope, receive, send
            )
            return
        scope.setdefault("state", {})["principal"] = p
        await self.app(scope, receive, send)


# ---- routes -------------------------------------------------------------------------------


def _auth(request: Request) -> Auth:
    a: Auth = request.app.state.auth
    return a


def login_page(request: Request) -> Response:
    return FileResponse(STATIC / "login.html", headers={"Cache-Control": "no-cache"})


async def login(request: Request) -> Response:
    auth = _auth(request)
    if auth.store is None:
        return _json(404, "there are no accounts (login is off)")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return _json(415, 'send JSON: {"user": …, "password": …}')
    try:
        body = msgspec.json.decode(await request.body())
        user, password = body["user"], body["password"]
        if not isinstance(user, str) or not isinstance(password, str):
            raise TypeError
    except (msgspec.DecodeError, KeyError, TypeError):
        return _json(400, 'send JSON: {"user": …, "password": …}')
    addr = request.client.host if request.client else "-"
    keys = [f"addr:{_unmapped(addr)}", f"user:{user.lower()[:64]}"]  # names are ≤ 64
    wait = auth.limit.wait_s(keys)
    if wait > 0:
        auth.counters["login_throttled"] += 1
        log.warning("login: %s from %s throttled (too many failures)", user, addr)
        resp = _json(429, f"too many failed logins: try again in {math.ceil(wait)} s")
        resp.headers["Retry-After"] = str(math.ceil(wait))
        return resp
    u = await run_in_threadpool(auth.store.check_password, user, password)
    if u is None:
        auth.limit.fail(keys)
        auth.counters["login_failed"] += 1
        log.warning("login: failed for %r from %s", user, addr)
        return _json(401, "wrong user name or password")
    auth.limit.forget(keys[1])
    s = await run_in_threadpool(auth.store.new_session, u)
    auth.counters["login_ok"] += 1
    log.info("login: %s (%s) from %s", u.name, u.role, addr)
    resp = _json(200, None, {"user": u.name, "role": u.role})
    resp.set_cookie(
        COOKIE,
        s.id,
        max_age=7 * 86_400,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return resp


async def logout(request: Request) -> Response:
    auth = _auth(request)
    sid = request.cookies.get(COOKIE)
    if sid and auth.store is not None:
        await run_in_threadpool(auth.store.end_session, sid)
    resp = _json(200, None, {"ok": True})
    resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return resp


def me(request: Request) -> Response:
    """Who the request comes from; all null on an app without Auth (no login, no
    changes)."""
    p = principal(request)
    auth: Auth | None = request.app.state.auth
    who: dict[str, str | None] = {"user": None, "role": None, "via": None, "csrf": None}
    if p is not None:
        who = {"user": p.name, "role": p.role, "via": p.via, "csrf": p.csrf}
    return _json(200, None, {**who, "login": None if auth is None else auth.mode})


def routes() -> list[Route]:
    return [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]


# ---- set-up -------------------------------------------------------------------------------


def users_db_path(users_db: str | None, db_url: str) -> str:
    """The users database: `users_db`, else users.db beside a SQLite agent database."""
    from agent.store.sql import is_postgres
    from agent.store.sqlite import sqlite_path

    if users_db:
        return users_db
    if is_postgres(db_url):
        raise ConfigError(
            "a PostgreSQL agent database has no folder for users.db: "
            "name the users database (dashboard.users_db, --users-db)"
        )
    return os.path.join(os.path.dirname(os.path.abspath(sqlite_path(db_url))), "users.db")


def from_config(dc: DashboardConfig, db_url: str) -> Auth:
    """The Auth of a [dashboard] section. Login "on"/"remote" needs the users database to
    exist (`stationctl users add` makes it); with "off" an existing one still records
    acknowledgements. Never creates the file. ConfigError names what is wrong."""
    try:
        path = users_db_path(dc.users_db, db_url)
    except ConfigError:
        if dc.login != "off":
            raise
        return Auth(None, mode="off", local_role=dc.local_role)
    try:
        store: UserStore | None = UserStore.open(path)
    except NoUsersDb:
        if dc.login != "off":
            raise ConfigError(
                f"dashboard.login = {dc.login!r} but there is no users database {path}: "
                "create it with `stationctl users add NAME --role admin`"
            ) from None
        store = None
    except Exception as e:  # sqlite3.Error and OSError: an unusable file
        raise ConfigError(f"users database {path}: {e}") from None
    return Auth(store, mode=dc.login, local_role=dc.local_role)


def ensure_users_db(
    path: str | os.PathLike[str], admin_password: str, admin: str = "admin"
) -> None:
    """A users database at `path` (made 0600 when missing) with the account `admin`
    (role admin) whose password is `admin_password` (set again if it exists): what the
    demo needs for login = "remote"."""
    with UserStore.open(path, create=True) as store:
        if store.user(admin) is None:
            store.add_user(admin, "admin", admin_password)
        else:
            store.set_role(admin, "admin")
            store.set_password(admin, admin_password)


# ---- helpers ------------------------------------------------------------------------------


def _json(status: int, error: str | None, obj: Any = None) -> Response:
    body = {"error": error} if error is not None else obj
    return Response(
        _encode(body),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name and v:
            return v
    return None


def _unmapped(addr: str) -> str:
    """An IPv4-mapped IPv6 address (::ffff:127.0.0.1) as the IPv4 address it is."""
    return addr[7:] if addr.lower().startswith("::ffff:") else addr


def _host_name(host: str) -> str:
    """The name in a Host header (without its port; IPv6 in brackets)."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _loopback_host(scope: Scope) -> bool:
    for k, v in scope["headers"]:
        if k == b"host":
            return is_loopback(_host_name(v.decode("latin-1")))
    return False


def _same_origin(scope: Scope, headers: dict[str, str]) -> bool:
    """A browser's state-changing request names the page it comes from (Origin, else
    Referer): it must be this site. Clients that send neither (curl, scripts) pass here
    and still need the CSRF token or a login."""
    source = headers.get("origin") or headers.get("referer")
    if not source:
        return True
    u = urllib.parse.urlsplit(source)
    scheme = scope.get("scheme", "http")
    return (u.scheme, u.netloc.lower()) == (scheme, headers.get("host", "").lower())
