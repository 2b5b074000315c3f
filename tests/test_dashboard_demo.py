"""`stationctl demo` as a user runs it: it prints where to look, serves a live fleet, stops
cleanly on Ctrl-C (SIGINT) leaving a consistent database and no process behind, and a second
run in the same folder carries on (boot counters continue, keys are reused)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import paho.mqtt.client as mqtt

from tests.test_dashboard_watch import ENV, STATIONCTL
from tools.demo import Demo, DemoConfig
from tools.flash import broker_setup
from tools.mosquitto import Mosquitto

BANNERS: list[str] = []  # what each start() printed up to the banner's end


def start(workdir: pathlib.Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen(
        [
            *STATIONCTL,
            "demo",
            "--stations",
            "2",
            "--slots",
            "2",
            "--port",
            "0",
            "--workdir",
            str(workdir),
            "--accel",
            "10",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        start_new_session=True,
    )  # its own process group, as in a terminal
    assert p.stdout is not None
    lines = []
    url = ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"dashboard\s+(http://\S+)", line)
        if m:
            url = m.group(1)
        if line.startswith("Ctrl-C") and url:  # the banner's last line
            BANNERS.append("".join(lines))
            return p, url
    p.kill()
    raise AssertionError("no dashboard URL printed:\n" + "".join(lines))


def fleet(url: str) -> Any:
    with urllib.request.urlopen(url + "api/fleet", timeout=5) as r:
        return json.load(r)


def stop(p: subprocess.Popen[str]) -> str:
    """Ctrl-C in a terminal: SIGINT to the whole foreground process group (the firmware
    processes too)."""
    os.killpg(p.pid, signal.SIGINT)
    out, _ = p.communicate(timeout=90)
    return out


def leftovers(workdir: pathlib.Path) -> list[str]:
    """Processes still running in (cwd) or on (command line) the demo's folder."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cwd.startswith(str(workdir)) or str(workdir) in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def test_demo_runs_stops_cleanly_and_carries_on(tmp_path: pathlib.Path) -> None:
    work = tmp_path / "demo"
    p, url = start(work)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            f = fleet(url)
            own = [s for s in f["stations"] if s.get("source", "own") == "own"]
            ocpp = [s for s in f["stations"] if s.get("source") == "ocpp"]
            if (
                sum(s["state"] == "online" for s in own) == 2
                and all(s["power_w"] is not None for s in own)
                and sum(s["state"] == "online" for s in ocpp) == 2
            ):
                break
            time.sleep(0.5)
        assert [s["sid"] for s in own] == ["KH-DEMO-0001", "KH-DEMO-0002"]
        # the two simulated OCPP chargers beside them, marked (docs/ocpp.md)
        assert [s["sid"] for s in ocpp] == ["KH-DEMO-OCPP-01", "KH-DEMO-OCPP-02"]
        assert {s["mark"] for s in ocpp} == {"OCPP 1.6", "OCPP 2.0.1"}
        assert f["totals"]["online"] == 4
        broker_rules_hold(work)
        login_from_elsewhere(url, work)
        # a second demo in the same folder would run the same stations twice: refused
        r = subprocess.run(
            [*STATIONCTL, "demo", "--stations", "2", "--slots", "2", "--workdir", str(work)],
            capture_output=True,
            text=True,
            timeout=60,
            env=ENV,
            check=False,
        )
        assert r.returncode == 2 and "another demo is running" in r.stderr, r.stderr
    finally:
        out = stop(p)
    assert p.returncode == 0, out
    assert "database ok" in out and "stationctl export --db" in out
    assert "an account per station" in BANNERS[-1]
    assert not leftovers(work)
    db = sqlite3.connect(work / "agent.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    boots1 = dict(db.execute("SELECT sid, MAX(boot) FROM raw GROUP BY sid").fetchall())
    last_ts1 = max(ts_of(db, "telemetry").values())
    db.close()
    assert set(boots1) == {"KH-DEMO-0001", "KH-DEMO-0002", "KH-DEMO-OCPP-01", "KH-DEMO-OCPP-02"}
    # the OCPP chargers' registers and clock are kept for the next run (tools/ocpp_fleet.py)
    ocpp1 = json.loads((work / "ocpp_state.json").read_text())
    assert set(ocpp1["registers"]) == {"KH-DEMO-OCPP-01", "KH-DEMO-OCPP-02"}

    # the same folder again: the stations boot on (a boot number never repeats)
    p, url = start(work)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and fleet(url)["totals"]["online"] < 4:
            time.sleep(0.5)
        time.sleep(3)
    finally:
        out = stop(p)
    assert p.returncode == 0, out
    db = sqlite3.connect(work / "agent.db")
    boots2 = dict(db.execute("SELECT sid, MAX(boot) FROM raw GROUP BY sid").fetchall())
    q = db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
    db.close()
    assert all(boots2[s] > boots1[s] for s in boots1), (boots1, boots2)
    ocpp2 = json.loads((work / "ocpp_state.json").read_text())
    assert ocpp2["unix_ms"] > ocpp1["unix_ms"]  # the second run's clock went on from the first's
    assert q == 0  # the keys were reused: nothing failed verification
    # the simulated clock and the grid meters carried on: the second run's messages come
    # after the first's (no interval metered twice) and no meter went back (meter_reset)
    db = sqlite3.connect(work / "agent.db")
    second = ts_of(db, "telemetry", after_boot=boots1)
    resets = [b for b in bodies(db, "event") if b.get("ev") == "meter_reset"]
    db.close()
    assert second and min(second.values()) > last_ts1
    assert resets == []


def bodies(db: sqlite3.Connection, kind: str) -> list[dict[str, Any]]:
    rows = db.execute("SELECT record FROM raw WHERE kind = ?", (kind,)).fetchall()
    return [json.loads(bytes(r[0])) for r in rows]


def ts_of(
    db: sqlite3.Connection, kind: str, after_boot: dict[str, int] | None = None
) -> dict[tuple[str, int, int], int]:
    """(sid, boot, seq) -> ts of the stored messages of `kind` (of later boots only)."""
    out = {}
    for b in bodies(db, kind):
        if "ts" in b and (after_boot is None or b["boot"] > after_boot[b["sid"]]):
            out[(b["sid"], b["boot"], b["seq"])] = b["ts"]
    return out


def login_from_elsewhere(url: str, work: pathlib.Path) -> None:
    """The demo's dashboard asks for a login when reached under another name than this
    host's (login = "remote"); on loopback it does not."""
    host = {"Host": "stations.example"}
    req = urllib.request.Request(url + "api/fleet", headers=host)
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("the API answered a request from elsewhere without a login")
    except urllib.error.HTTPError as e:
        assert e.code == 401
    password = (work / "dashboard-admin.password").read_text().strip()
    assert (work / "dashboard-admin.password").stat().st_mode & 0o077 == 0
    body = json.dumps({"user": "admin", "password": password}).encode()
    req = urllib.request.Request(
        url + "login",
        data=body,
        headers={**host, "Content-Type": "application/json", "Origin": "http://stations.example"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        cookie = r.headers["Set-Cookie"].split(";")[0]
    req = urllib.request.Request(url + "api/fleet", headers={**host, "Cookie": cookie})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert len(json.load(r)["stations"]) == 4  # 2 stations, 2 OCPP chargers
    assert len(fleet(url)["stations"]) == 4  # loopback: no login


def _login(port: int, user: str | None, password: str | None) -> tuple[int, mqtt.Client]:
    rc: list[int] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{len(str(user))}-{port}")
    c.on_connect = lambda _c, _u, _f, r, _p: rc.append(int(getattr(r, "value", r)))
    if user:
        c.username_pw_set(user, password)
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    deadline = time.monotonic() + 10
    while not rc and time.monotonic() < deadline:
        time.sleep(0.02)
    return (rc[0] if rc else -1), c


def broker_rules_hold(work: pathlib.Path) -> None:
    """The demo's broker is the deployment's configuration: no anonymous client, each
    station only under its own name (CONTRACT §5)."""
    setup = work / "mosquitto" / "broker"
    m = Mosquitto.deployment(work / "mosquitto", stations=[])  # reads the running one back
    assert m.station_port is not None and "allow_anonymous true" not in m.conf.read_text()
    for port in (m.port, m.station_port):
        rc, c = _login(port, None, None)
        c.loop_stop()
        assert rc in (5, 135), f"anonymous on port {port}: {rc}"
    # a station account of our own (a running station would take its client id back),
    # added as `stationctl broker add-station` does, and the broker told to re-read
    intruder = "KH-TEST-0009"
    password = broker_setup.add_station(setup, intruder).read_text().strip()
    (pid,) = [p for p in leftovers(work) if "mosquitto" in p and str(m.conf) in p]
    os.kill(int(pid.split(":")[0]), signal.SIGHUP)
    time.sleep(0.5)
    rc, op = _login(m.port, "operator", (setup / "passwords" / "operator").read_text().strip())
    assert rc == 0
    got: list[str] = []
    op.on_message = lambda _c, _u, msg: got.append(msg.topic)
    op.subscribe("stations/KH-DEMO-0002/event", 1)
    rc, st = _login(m.station_port, intruder, password)
    assert rc == 0
    time.sleep(0.3)
    st.publish("stations/KH-DEMO-0002/event", b"forged", 1).wait_for_publish(5)
    time.sleep(0.5)
    for c in (st, op):
        c.disconnect()
        c.loop_stop()
    assert got == []


def test_demo_insecure_says_so(tmp_path: pathlib.Path) -> None:
    d = Demo(DemoConfig(workdir=tmp_path / "demo", insecure=True, stations=1, slots=1))
    host, port = d._broker()
    try:
        assert "INSECURE" in d.broker_note
        rc, c = _login(port, None, None)  # anonymous: let in, as asked
        c.disconnect()
        c.loop_stop()
        assert rc == 0
    finally:
        assert d._mosq is not None
        d._mosq.stop()


def test_demo_refuses_another_layout_in_the_same_folder(tmp_path: pathlib.Path) -> None:
    work = tmp_path / "demo"
    work.mkdir()
    (work / "demo.json").write_text(
        json.dumps({"layout": {"stations": 8, "slots": 8, "sid_prefix": "KH-DEMO"}})
    )
    r = subprocess.run(
        [
            *STATIONCTL,
            "demo",
            "--stations",
            "2",
            "--slots",
            "2",
            "--workdir",
            str(work),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=False,
    )
    assert r.returncode == 2 and "--fresh" in r.stderr
    r = subprocess.run(
        [*STATIONCTL, "demo", "--slots", "17"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=False,
    )
    assert r.returncode == 2 and "slots" in r.stderr
    r = subprocess.run(
        [*STATIONCTL, "demo", "--broker", "http://x"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=False,
    )
    assert r.returncode == 2 and "mqtt://" in r.stderr
