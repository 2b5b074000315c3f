"""Login for the dashboard and its API (agent/dashboard/auth.py, users.py; docs/dashboard.md,
Login): a real uvicorn server over a real SQLite agent database and a real users database.
Sessions, roles, CSRF, the login rate limit, read-only tokens, the three modes, alarm
acknowledgements, `stationctl users` and the refusal to serve other machines without login.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import pathlib
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.config import ConfigError, DashboardConfig, load_config
from agent.dashboard import DashboardServer, Live, make_app
from agent.dashboard.auth import Auth, RateLimit, ensure_users_db, from_config
from agent.dashboard.users import UserStore
from stationctl.cli import main
from tests.test_dashboard_api import make_db, wait
from tests.test_dashboard_watch import ENV, STATIONCTL
from tools.mosquitto import Mosquitto

PASSWORDS = {"root": "admin-pass-1", "ana": "operator-pass", "vic": "viewer-pass"}
ROLES = {"root": "admin", "ana": "operator", "vic": "viewer"}


class Resp:
    def __init__(self, r: http.client.HTTPResponse) -> None:
        self.status = r.status
        self.headers = r.headers
        self.body = r.read()

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Server:
    """The dashboard app with `auth`, served by uvicorn in a background loop."""

    def __init__(self, db_url: str, auth: Auth | None) -> None:
        self.live = Live(db_url, poll_s=0.2, records_s=0.5)
        self.app = make_app(db_url, live=self.live, auth=auth)
        self.auth: Any = auth
        self.loop = asyncio.new_event_loop()
        self.server = DashboardServer(self.app, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(20)
        self.port = self.server.port
        self.origin = f"http://127.0.0.1:{self.port}"

    def req(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        cookie: str | None = None,
        csrf: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Resp:
        h = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        if cookie:
            h["Cookie"] = f"stationctl_session={cookie}"
        if csrf:
            h["X-CSRF-Token"] = csrf
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.request(method, path, body=data, headers=h)
            return Resp(c.getresponse())
        finally:
            c.close()

    def login(self, user: str, password: str | None = None) -> tuple[str, str]:
        """(session cookie, CSRF token) of a successful login."""
        r = self.req("POST", "/login", {"user": user, "password": password or PASSWORDS[user]})
        assert r.status == 200, r.body
        assert r.json == {"user": user, "role": ROLES[user]}
        cookie = r.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
        me = self.req("GET", "/api/me", cookie=cookie)
        assert me.status == 200 and me.json["user"] == user
        return cookie, me.json["csrf"]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def make_users(path: pathlib.Path) -> None:
    with UserStore.open(path, create=True) as st:
        for name, pw in PASSWORDS.items():
            st.add_user(name, ROLES[name], pw)


@pytest.fixture
def agent_db(tmp_path: pathlib.Path) -> Iterator[str]:
    yield from (url for url, *_ in make_db(f"sqlite:///{tmp_path}/agent.db"))


def serve(agent_db: str, tmp_path: pathlib.Path, mode: str) -> Server:
    users = tmp_path / "users.db"
    if not users.exists():
        make_users(users)
    s = Server(agent_db, Auth(UserStore.open(users), mode=mode))
    return s


@pytest.fixture
def on(agent_db: str, tmp_path: pathlib.Path) -> Iterator[Server]:
    s = serve(agent_db, tmp_path, "on")
    # the first poll has read the database: the quarantined forgery's alarm is active
    cookie, _ = s.login("vic")
    wait(lambda: s.req("GET", "/api/alarms", cookie=cookie).json["active"], 10, "an alarm")
    yield s
    s.stop()


def first_alarm(s: Server, cookie: str) -> dict[str, Any]:
    active: list[dict[str, Any]] = s.req("GET", "/api/alarms", cookie=cookie).json["active"]
    return active[0]


def test_without_credentials_the_api_is_401_and_pages_redirect_to_login(on: Server) -> None:
    for path in ("/api/fleet", "/api/alarms", "/api/me", "/api/live?topic=fleet"):
        r = on.req("GET", path)
        assert r.status == 401 and r.json == {"error": "login required"}, path
    for path in ("/", "/alarms", "/stations/KH-PNH-0001"):
        r = on.req("GET", path)
        assert r.status == 303 and r.headers["Location"] == "/login?next=" + path
    assert on.req("POST", "/api/alarms/ack", {"id": "x"}).status == 401
    # the login page and its files need no login; /healthz-style routes are not ours here
    page = on.req("GET", "/login")
    assert page.status == 200 and b'id="login"' in page.body
    assert on.req("GET", "/static/login.js").status == 200
    assert on.auth.counters["unauthenticated"] >= 8


def test_login_sets_a_strict_httponly_session_and_logout_ends_it(on: Server) -> None:
    r = on.req("POST", "/login", {"user": "root", "password": PASSWORDS["root"]})
    assert r.status == 200 and r.json == {"user": "root", "role": "admin"}
    flags = [f.strip().lower() for f in r.headers["Set-Cookie"].split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "secure" not in flags  # served over plain http here
    cookie = r.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    assert len(cookie) >= 40
    me = on.req("GET", "/api/me", cookie=cookie).json
    assert me["user"] == "root" and me["role"] == "admin" and me["via"] == "session"
    fleet = on.req("GET", "/api/fleet", cookie=cookie)
    assert fleet.status == 200 and [s["sid"] for s in fleet.json["stations"]] == [
        "KH-PNH-0001",
        "KH-PNH-0002",
    ]
    page = on.req("GET", "/", cookie=cookie)
    assert page.status == 200 and b"userbar" in page.body
    # only the id's hash is stored: the cookie's value is nowhere in the users database
    assert cookie.encode() not in (pathlib.Path(on.auth.store.path).read_bytes())
    out = on.req("POST", "/logout", {}, cookie=cookie, csrf=me["csrf"])
    assert out.status == 200 and "stationctl_session=" in out.headers["Set-Cookie"]
    assert on.req("GET", "/api/fleet", cookie=cookie).status == 401
    assert on.req("GET", "/", cookie=cookie).status == 303


def test_wrong_passwords_and_unknown_users_are_refused(on: Server) -> None:
    for user, pw in (("root", "wrong-password"), ("nobody", "whatever-pass"), ("root", "")):
        r = on.req("POST", "/login", {"user": user, "password": pw})
        assert r.status == 401 and r.json == {"error": "wrong user name or password"}
        assert "Set-Cookie" not in r.headers
    # a login form posted from another site (no JSON) or a bad body
    form = on.req(
        "POST",
        "/login",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status == 415
    assert on.req("POST", "/login", {"user": "root"}).status == 400
    assert on.auth.counters["login_failed"] == 3


def test_repeated_wrong_passwords_are_rate_limited(on: Server) -> None:
    for _ in range(5):
        assert on.req("POST", "/login", {"user": "ana", "password": "guess-guess"}).status == 401
    r = on.req("POST", "/login", {"user": "ana", "password": "guess-guess"})
    assert r.status == 429 and 50 <= int(r.headers["Retry-After"]) <= 60
    # the right password now too, and another user from the same address
    assert on.req("POST", "/login", {"user": "ana", "password": PASSWORDS["ana"]}).status == 429
    assert on.req("POST", "/login", {"user": "root", "password": PASSWORDS["root"]}).status == 429
    assert on.auth.counters["login_throttled"] == 3 and on.auth.counters["login_failed"] == 5


def test_the_rate_limit_counts_per_address_and_per_user() -> None:
    rl = RateLimit(limit=5, window_s=60)
    for i in range(5):  # one user tried from five addresses
        assert rl.wait_s([f"addr:10.0.0.{i}", "user:ana"], now=100.0 + i) == 0
        rl.fail([f"addr:10.0.0.{i}", "user:ana"], now=100.0 + i)
    assert rl.wait_s(["addr:10.0.0.9", "user:ana"], now=110) == pytest.approx(50)
    assert rl.wait_s(["addr:10.0.0.9", "user:bob"], now=110) == 0
    assert rl.wait_s(["addr:10.0.0.9", "user:ana"], now=160.5) == 0  # the window moved on


def test_state_changing_requests_need_the_csrf_token_and_this_origin(on: Server) -> None:
    cookie, csrf = on.login("ana")
    a = first_alarm(on, cookie)
    body = {"id": a["id"], "since_ms": a["since_ms"]}
    missing = on.req("POST", "/api/alarms/ack", body, cookie=cookie)
    assert missing.status == 403 and "CSRF" in missing.json["error"]
    wrong = on.req("POST", "/api/alarms/ack", body, cookie=cookie, csrf=csrf[:-2] + "xx")
    assert wrong.status == 403
    other_site = on.req(
        "POST",
        "/api/alarms/ack",
        body,
        cookie=cookie,
        csrf=csrf,
        headers={"Origin": "https://evil.example"},
    )
    assert other_site.status == 403 and other_site.json["error"] == "cross-site request refused"
    assert on.req("POST", "/logout", {}, cookie=cookie).status == 403  # logout too
    assert first_alarm(on, cookie)["acked_by"] is None
    ok = on.req(
        "POST", "/api/alarms/ack", body, cookie=cookie, csrf=csrf, headers={"Origin": on.origin}
    )
    assert ok.status == 200 and ok.json["acked_by"] == "ana"
    assert on.auth.counters["csrf_refused"] == 4


def test_viewers_may_not_acknowledge_operators_may_and_everyone_sees_who(on: Server) -> None:
    vc, vcsrf = on.login("vic")
    a = first_alarm(on, vc)
    assert a["acked_by"] is None and a["acked_at"] is None
    body = {"id": a["id"], "since_ms": a["since_ms"]}
    r = on.req("POST", "/api/alarms/ack", body, cookie=vc, csrf=vcsrf)
    assert r.status == 403 and "operator" in r.json["error"]
    assert first_alarm(on, vc)["acked_by"] is None
    oc, ocsrf = on.login("ana")
    t0 = int(time.time() * 1000)
    r = on.req("POST", "/api/alarms/ack", body, cookie=oc, csrf=ocsrf)
    assert r.status == 200
    assert r.json["id"] == a["id"] and r.json["acked_by"] == "ana"
    seen = first_alarm(on, vc)
    assert seen["acked_by"] == "ana" and t0 <= seen["acked_at"] <= int(time.time() * 1000)
    # again by someone else: the first acknowledgement stays
    rc, rcsrf = on.login("root")
    again = on.req("POST", "/api/alarms/ack", body, cookie=rc, csrf=rcsrf)
    assert again.status == 200 and again.json["acked_by"] == "ana"
    # the live alarms topic carries it too
    c = http.client.HTTPConnection("127.0.0.1", on.port, timeout=10)
    c.request("GET", "/api/live?topic=alarms", headers={"Cookie": f"stationctl_session={vc}"})
    stream = c.getresponse()
    line = b""
    while not line.startswith(b"data: "):
        line = stream.readline()
    c.close()
    live = {x["id"]: x for x in json.loads(line[6:])["active"]}
    assert live[a["id"]]["acked_by"] == "ana"
    # what is not an active alarm, or an occurrence that is over, is refused
    nope = on.req("POST", "/api/alarms/ack", {"id": "KH-X-0001:offline"}, cookie=oc, csrf=ocsrf)
    assert nope.status == 404
    old = on.req(
        "POST", "/api/alarms/ack", {**body, "since_ms": a["since_ms"] - 1}, cookie=oc, csrf=ocsrf
    )
    assert old.status == 409
    assert on.req("POST", "/api/alarms/ack", [1], cookie=oc, csrf=ocsrf).status == 400
    with UserStore.open(on.auth.store.path) as st:
        rec = st.acks([(a["id"], a["since_ms"])])[(a["id"], a["since_ms"])]
    assert rec.user == "ana" and rec.at_ms == seen["acked_at"]


def test_api_tokens_read_only_and_revocable(on: Server) -> None:
    with UserStore.open(on.auth.store.path) as st:
        token = st.add_token("grafana")
    bearer = {"Authorization": f"Bearer {token}"}
    r = on.req("GET", "/api/fleet", headers=bearer)
    assert r.status == 200 and len(r.json["stations"]) == 2
    me = on.req("GET", "/api/me", headers=bearer).json
    assert me["via"] == "token" and me["role"] == "viewer" and me["csrf"] is None
    a = on.req("GET", "/api/alarms", headers=bearer).json["active"][0]
    post = on.req("POST", "/api/alarms/ack", {"id": a["id"]}, headers=bearer)
    assert post.status == 403 and post.json["error"] == "API tokens are read-only"
    assert on.req("GET", "/", headers=bearer).status == 303  # pages are for people
    wrong = on.req("GET", "/api/fleet", headers={"Authorization": "Bearer stk_nottherightone"})
    assert wrong.status == 401
    with UserStore.open(on.auth.store.path) as st:
        st.revoke_token("grafana")
    r = on.req("GET", "/api/fleet", headers=bearer)
    assert r.status == 401 and r.json == {"error": "unknown or revoked token"}


def test_role_changes_and_removal_take_effect_on_open_sessions(on: Server) -> None:
    cookie, csrf = on.login("vic")
    a = first_alarm(on, cookie)
    with UserStore.open(on.auth.store.path) as st:
        st.set_role("vic", "operator")
    r = on.req("POST", "/api/alarms/ack", {"id": a["id"]}, cookie=cookie, csrf=csrf)
    assert r.status == 200 and r.json["acked_by"] == "vic"
    with UserStore.open(on.auth.store.path) as st:
        st.remove_user("vic")
    assert on.req("GET", "/api/fleet", cookie=cookie).status == 401


def test_remote_mode_lets_loopback_in_and_makes_others_log_in(
    agent_db: str, tmp_path: pathlib.Path
) -> None:
    s = serve(agent_db, tmp_path, "remote")
    try:
        me = s.req("GET", "/api/me")  # from 127.0.0.1, no login
        assert me.status == 200
        assert me.json["via"] == "local" and me.json["role"] == "operator"
        assert me.json["user"] == "local@127.0.0.1"
        assert s.req("GET", "/").status == 200
        a = wait(lambda: s.req("GET", "/api/alarms").json["active"], 10, "an alarm")[0]
        # a local principal still needs the CSRF token (a page elsewhere cannot read it)
        assert s.req("POST", "/api/alarms/ack", {"id": a["id"]}).status == 403
        r = s.req("POST", "/api/alarms/ack", {"id": a["id"]}, csrf=me.json["csrf"])
        assert r.status == 200 and r.json["acked_by"] == "local@127.0.0.1"
        # a name of another site pointed at 127.0.0.1 (DNS rebinding) is not local
        rebound = s.req("GET", "/api/fleet", headers={"Host": f"evil.example:{s.port}"})
        assert rebound.status == 401
        # a logged-in user on loopback is that user
        cookie, _ = s.login("vic")
        assert s.req("GET", "/api/me", cookie=cookie).json["role"] == "viewer"
        # from another address: the same middleware wants a login
        assert asgi_get(s.app, "/api/fleet", ("192.0.2.7", 40000)) == 401
        assert asgi_get(s.app, "/api/me", ("127.0.0.1", 40000)) == 200
        assert asgi_get(s.app, "/api/me", ("::ffff:127.0.0.1", 40000)) == 200
        assert asgi_get(s.app, "/api/me", ("::1", 40000), host="[::1]:8080") == 200
        assert asgi_get(s.app, "/alarms", ("203.0.113.9", 40000)) == 303
        assert asgi_get(s.app, "/healthz", ("203.0.113.9", 40000)) == 404  # not guarded
    finally:
        s.stop()


def asgi(
    app: Any,
    method: str,
    path: str,
    client: tuple[str, int],
    *,
    host: str = "127.0.0.1:8080",
    scheme: str = "http",
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str]]:
    """The app's answer (status, headers) to a request from `client` over `scheme`: what a
    test cannot connect as (another address, https)."""
    sent: list[dict[str, Any]] = []
    h = {"host": host, **(headers or {})}
    data = b""
    if body is not None:
        data = json.dumps(body).encode()
        h["content-type"] = "application/json"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in h.items()],
        "client": client,
        "server": ("127.0.0.1", 8080),
        "state": {},
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    asyncio.run(app(scope, receive, send))
    out = {k.decode().lower(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], out


def asgi_get(app: Any, path: str, client: tuple[str, int], host: str = "127.0.0.1:8080") -> int:
    return asgi(app, "GET", path, client, host=host)[0]


def test_over_https_the_cookie_is_secure(on: Server) -> None:
    site = {"host": "dash.example", "scheme": "https"}
    creds = {"user": "ana", "password": PASSWORDS["ana"]}
    status, h = asgi(
        on.app,
        "POST",
        "/login",
        ("198.51.100.4", 5000),
        body=creds,
        headers={"origin": "https://dash.example"},
        **site,
    )
    assert status == 200
    flags = [f.strip().lower() for f in h["set-cookie"].split(";")]
    assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags
    # the same login posted from a page of another site, or of the http site
    for origin in ("https://evil.example", "http://dash.example"):
        status, _ = asgi(
            on.app,
            "POST",
            "/login",
            ("198.51.100.4", 5000),
            body=creds,
            headers={"origin": origin},
            **site,
        )
        assert status == 403, origin


def test_an_app_without_auth_is_the_read_only_dashboard(agent_db: str) -> None:
    s = Server(agent_db, None)
    try:
        assert s.req("GET", "/api/fleet").status == 200
        me = s.req("GET", "/api/me").json
        assert me == {"user": None, "role": None, "via": None, "csrf": None, "login": None}
        assert s.req("POST", "/api/alarms/ack", {"id": "x"}).status == 404
        assert s.req("POST", "/login", {"user": "a", "password": "b"}).status == 404
        assert "acked_by" not in str(s.req("GET", "/api/alarms").json)
    finally:
        s.stop()


def test_login_off_serves_loopback_only(tmp_path: pathlib.Path, agent_db: str) -> None:
    with pytest.raises(ValueError, match='login = "off" needs a loopback host'):
        DashboardConfig(host="0.0.0.0")
    DashboardConfig(host="::1")
    DashboardConfig(host="localhost")
    DashboardConfig(host="0.0.0.0", login="on")
    toml = tmp_path / "agent.toml"
    toml.write_text('[dashboard]\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match="loopback"):
        load_config(toml)
    assert main(["agent", "--config", str(toml)]) == 2
    assert main(["dashboard", "--db", agent_db, "--host", "192.0.2.1"]) == 2
    toml.write_text('[dashboard]\nhost = "0.0.0.0"\nlogin = "maybe"\n')
    with pytest.raises(ConfigError, match="login must be off, on or remote"):
        load_config(toml)


def test_login_on_needs_the_users_database_and_never_makes_it(
    tmp_path: pathlib.Path, agent_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users.db"
    with pytest.raises(ConfigError, match="no users database .*users.db"):
        from_config(DashboardConfig(login="on"), agent_db)
    with pytest.raises(ConfigError, match="users_db"):
        from_config(DashboardConfig(login="remote"), "postgresql://u@h/agent")
    # "off" without a users database: the read-only dashboard, no acknowledgements
    assert from_config(DashboardConfig(), agent_db).store is None
    assert main(["dashboard", "--db", agent_db, "--login", "on", "--port", "0"]) == 2
    assert "no users database" in capsys.readouterr().err
    assert not users.exists()
    # the default file is users.db beside the agent's database; relative paths in the TOML
    # are the file's folder's
    make_users(users)
    auth = from_config(DashboardConfig(login="on"), agent_db)
    assert auth.store is not None and auth.store.path == str(users)
    auth.close()
    toml = tmp_path / "agent.toml"
    toml.write_text('[db]\nurl = "sqlite:///x.db"\n[dashboard]\nlogin = "on"\nusers_db = "u2.db"\n')
    dc = load_config(toml).dashboard
    assert dc is not None and dc.users_db == str(tmp_path / "u2.db")


def test_ensure_users_db_for_the_demo(tmp_path: pathlib.Path, agent_db: str) -> None:
    path = tmp_path / "users.db"
    ensure_users_db(path, "first-password")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ensure_users_db(path, "second-password")  # again: the password is the new one
    with UserStore.open(path) as st:
        assert [(u.name, u.role) for u in st.users()] == [("admin", "admin")]
        assert st.check_password("admin", "first-password") is None
        assert st.check_password("admin", "second-password") is not None


def users(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STATIONCTL, "users", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=False,
    )


def test_the_users_command(tmp_path: pathlib.Path) -> None:
    db = tmp_path / "u" / "users.db"
    db.parent.mkdir()
    # reading never creates the file
    for args in (["list"], ["token", "list"], ["remove", "ana"], ["set-role", "ana", "admin"]):
        r = users("--users-db", str(db), *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"no users database {db}" in r.stderr
        assert not db.exists()
    r = users("--users-db", str(db), "add", "ana", "--role", "operator", stdin="pw-of-ana\n")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    pw = tmp_path / "pw"
    pw.write_text("pw-of-root\n")
    r = users("add", "root", "--role", "admin", "--password-file", str(pw), "--users-db", str(db))
    assert r.returncode == 0, r.stderr
    r = users(
        "--users-db", str(db), "add", "bob", "--role", "viewer", "--password-stdin", stdin="x"
    )
    assert r.returncode == 2 and "at least 8" in r.stderr
    r = users("--users-db", str(db), "add", "ana", "--role", "viewer", stdin="another-pw\n")
    assert r.returncode == 2 and "exists" in r.stderr
    assert users("--users-db", str(db), "list").stdout == "ana\toperator\nroot\tadmin\n"
    assert users("--users-db", str(db), "set-role", "ana", "viewer").returncode == 0
    r = users("--users-db", str(db), "passwd", "ana", "--password-stdin", stdin="new-pw-ana\n")
    assert r.returncode == 0, r.stderr
    with UserStore.open(db) as st:
        assert st.check_password("ana", "pw-of-ana") is None
        u = st.check_password("ana", "new-pw-ana")
        assert u is not None and u.role == "viewer"
        assert st.check_password("root", "pw-of-root") is not None
    tok = users("--users-db", str(db), "token", "add", "grafana")
    assert tok.returncode == 0 and tok.stdout.startswith("stk_")
    token = tok.stdout.strip()
    assert token.encode() not in db.read_bytes()  # only its hash is kept
    r = users("--users-db", str(db), "token", "list")
    assert r.stdout.startswith("grafana\t") and token not in r.stdout
    with UserStore.open(db) as st:
        assert st.token_name(token) == "grafana"
    assert users("--users-db", str(db), "token", "revoke", "grafana").returncode == 0
    assert users("--users-db", str(db), "token", "revoke", "grafana").returncode == 2
    assert users("--users-db", str(db), "remove", "ana").returncode == 0
    assert users("--users-db", str(db), "list").stdout == "root\tadmin\n"
    r = users("--users-db", str(db), "add", "x", "--role", "boss", stdin="whatever-pw\n")
    assert r.returncode == 2  # argparse: a role that is none
    # without --users-db: [dashboard] users_db of --config, else users.db beside its database
    toml = tmp_path / "agent.toml"
    toml.write_text('[db]\nurl = "sqlite:///u/agent.db"\n')
    assert users("--config", str(toml), "list").stdout == "root\tadmin\n"
    assert users("--db", str(tmp_path / "u" / "agent.db"), "list").stdout == "root\tadmin\n"
    assert users("list").returncode == 2
    assert not (tmp_path / "users.db").exists() and sorted(os.listdir(db.parent)) == ["users.db"]


def test_agent_with_login_on_refuses_to_start_without_users(
    tmp_path: pathlib.Path, mosquitto: Mosquitto
) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'[db]\nurl = "sqlite:///agent.db"\n[broker]\nport = {mosquitto.port}\n'
        '[dashboard]\nhost = "0.0.0.0"\nport = 0\nlogin = "on"\n'
    )
    r = subprocess.run(
        [*STATIONCTL, "agent", "--config", str(toml)],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=False,
    )
    assert r.returncode == 2 and "no users database" in r.stderr, r.stderr
    assert not (tmp_path / "users.db").exists()
