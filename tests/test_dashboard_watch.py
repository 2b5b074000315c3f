"""`stationctl watch` (terminal view) and `stationctl dashboard` (standalone server), run
as a user runs them: the console script in a subprocess, over a database of either engine
(`db_url`: SQLite, PostgreSQL)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from agent.store import Store
from tests.test_dashboard_api import SID, SID2, Served, make_db
from tests.test_dashboard_state import Sim
from tools.mosquitto import free_port
from tools.postgres import PgCluster

STATIONCTL = [str(pathlib.Path(sys.executable).parent / "stationctl")]
ENV = {**os.environ, "COLUMNS": "160", "TERM": "dumb"}


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STATIONCTL, *args], capture_output=True, text=True, timeout=timeout, env=ENV, check=False
    )


@pytest.fixture
def db(db_url: str) -> Iterator[tuple[str, Store, Sim, Sim]]:
    yield from make_db(db_url)


def test_watch_db_once_shows_every_station_and_the_alarms(db: tuple[str, Store, Sim, Sim]) -> None:
    url = db[0]
    r = run("watch", "--db", url, "--once")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert SID in out and SID2 in out and "online" in out
    assert "840 W" in out  # KH-PNH-0001 charging at 84 V × 10 A
    assert "signature" in out and "crit" in out  # the quarantined bad signature


def test_watch_one_station_slot_by_slot(db: tuple[str, Store, Sim, Sim]) -> None:
    r = run("watch", "--db", db[0], "--station", SID, "--once")
    assert r.returncode == 0, r.stderr
    assert "charging CC" in r.stdout and "B0012345" in r.stdout and "empty" in r.stdout
    r = run("watch", "--db", db[0], "--station", "KH-NOPE-0001", "--once")
    assert r.returncode == 0 and "no station KH-NOPE-0001" in r.stdout


def test_watch_api_once(db: tuple[str, Store, Sim, Sim]) -> None:
    s = Served(db[0])
    try:
        deadline = time.monotonic() + 10
        while not s.get("/api/health")[1]["ok"] and time.monotonic() < deadline:
            time.sleep(0.05)
        r = run("watch", "--api", s.base, "--once")
        assert r.returncode == 0, r.stderr
        assert SID in r.stdout and SID2 in r.stdout
        r = run("watch", "--api", s.base, "--station", SID, "--once")
        assert r.returncode == 0 and "B0012345" in r.stdout
    finally:
        s.stop()


def test_watch_bad_usage_and_unreachable(tmp_path: pathlib.Path, pg_cluster: PgCluster) -> None:
    r = run("watch", "--once")
    assert r.returncode == 2
    r = run("watch", "--db", f"sqlite:///{tmp_path}/none.db", "--once")
    assert r.returncode == 2 and "cannot read an agent database" in r.stderr
    assert not (tmp_path / "none.db").exists()  # a reader never creates a database
    r = run("watch", "--db", "mysql://x/y", "--once")
    assert r.returncode == 2 and "mysql" in r.stderr
    # PostgreSQL: a server that is not there, a database that does not exist, one with no
    # agent tables: exit 2, one line naming the database, never its password
    gone = f"postgresql://agent:s3cret@127.0.0.1:{free_port()}/agent"
    empty = pg_cluster.create_db()
    missing = empty.rsplit("/", 1)[0].replace("postgres@", "postgres:s3cret@") + "/nope"
    for url, needle in (
        (gone, f"agent:***@127.0.0.1:{gone.split(':')[3]}"),
        (missing, "/nope"),
        (empty, empty),
    ):
        r = run("watch", "--db", url, "--once")
        assert r.returncode == 2 and "cannot read an agent database at" in r.stderr, r.stderr
        assert needle in r.stderr and "s3cret" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run("watch", "--db", f"sqlite:///{tmp_path}/none.db", "--station", "bad id", "--once")
    assert r.returncode == 2 and "bad station id" in r.stderr
    r = run("watch", "--api", "http://127.0.0.1:9/", "--once")
    assert r.returncode == 1 and "cannot read" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_watch_live_refreshes_until_interrupted(db: tuple[str, Store, Sim, Sim]) -> None:
    p = subprocess.Popen(
        [*STATIONCTL, "watch", "--db", db[0], "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    time.sleep(2.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert SID in out and "stationctl watch" in out  # (no terminal: rich prints the last frame)


@pytest.fixture
def dashboard_proc(db: tuple[str, Store, Sim, Sim]) -> Iterator[tuple[subprocess.Popen[str], str]]:
    p = subprocess.Popen(
        [*STATIONCTL, "dashboard", "--db", db[0], "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("dashboard: http://"), (line, p.poll())
    yield p, line.split()[1]
    if p.poll() is None:
        p.kill()
        p.wait()


def test_dashboard_command_serves_and_stops_on_sigterm(
    dashboard_proc: tuple[subprocess.Popen[str], str],
) -> None:
    p, url = dashboard_proc
    with urllib.request.urlopen(url + "api/fleet", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(url, timeout=10) as r:
        assert b"/static/app.js" in r.read()
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0


def test_watch_db_shows_a_failing_or_silent_agent(db: tuple[str, Store, Sim, Sim]) -> None:
    import json

    from agent.store import now_ms

    url, store = db[0], db[1]
    r = run("watch", "--db", url, "--once")
    assert r.returncode == 0 and "agent" not in r.stdout.split("\n")[1]
    t = now_ms()
    state = {
        "failing_since_ms": t - 3000,
        "last_error": "OperationalError: database or disk is full",
    }
    store.put_agent_health(t, json.dumps(state))
    r = run("watch", "--db", url, "--once")
    assert "agent failing since " in r.stdout and "database or disk is full" in r.stdout
    store.put_agent_health(t - 120_000, json.dumps({"status": "ok"}))
    r = run("watch", "--db", url, "--once")
    assert "agent silent for 12" in r.stdout, r.stdout


@pytest.mark.parametrize("columns", ["80", "60"])
def test_watch_at_a_narrow_terminal_keeps_station_ids_whole(
    db: tuple[str, Store, Sim, Sim], columns: str
) -> None:
    """At 80 columns the Station column was cut (KH-PNH-00…): ids are never cut; the other
    columns wrap."""
    r = subprocess.run(
        [*STATIONCTL, "watch", "--db", db[0], "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**ENV, "COLUMNS": columns},
        check=False,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for sid in (SID, SID2):
        assert any(sid in ln for ln in lines), r.stdout
    assert max(len(ln) for ln in lines) <= int(columns)


def test_watch_shows_the_fleets_firmware_versions(db: tuple[str, Store, Sim, Sim]) -> None:
    """Fleet versions (issue 15) in watch's header lines, from the stations' boot events."""
    url, store, a, _b = db
    r = run("watch", "--db", url, "--once")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("firmware "))
    assert "×" in line
