"""Secrets at rest stay there (issue 14 item 5): a station's HMAC key and the broker
passwords never appear in the agent's log (at debug level), its dashboard and metrics, the
exports, `verify`, `keys list`, or a traceback, through a run that has a good stream, a
forged signature and garbage on a locked-down broker."""

from __future__ import annotations

import base64
import os
import pathlib
import signal
import sqlite3
import subprocess
import time
import urllib.request

from agent.keys import KeyStore
from tests.agent_helpers import STATIONCTL, AgentProcess, Publisher, Station, key_for
from tests.helpers import ROOT, free_port
from tools.mosquitto import Mosquitto

SID = "KH-SEC-0001"


def forms(secret: bytes | str) -> list[str]:
    """The ways a secret could be written out."""
    if isinstance(secret, str):
        return [secret]
    return [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(), repr(secret)]


def run(*args: str) -> str:
    r = subprocess.run(
        [*STATIONCTL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    return f"{args}: exit {r.returncode}\n{r.stdout}{r.stderr}"


def get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())
    except urllib.error.HTTPError as e:
        return f"{url}: HTTP {e.code} {e.read().decode(errors='replace')}"


def test_no_secret_in_any_output(tmp_path: pathlib.Path, locked_broker: Mosquitto) -> None:
    m = locked_broker
    station_pw = m.add_station(SID)
    agent_pw = m.password("agent")
    db = tmp_path / "agent.db"
    url = f"sqlite:///{db}"
    key = key_for(SID)
    with KeyStore(url) as ks:
        ks.add(SID, key)
    assert os.stat(db).st_mode & 0o077 == 0  # created 0600
    (tmp_path / "agent.pw").write_text(agent_pw + "\n")
    dash = free_port()
    agent = AgentProcess(
        tmp_path,
        url,
        m.port,
        broker_extra=f'user = "agent"\npassword_file = "{tmp_path / "agent.pw"}"\n',
        extra=f"[dashboard]\nport = {dash}\n",
        log_level="debug",
    ).start()
    st = Station(SID, key=key)
    forged = Station(SID, key=bytes(32))
    items = [st.event("boot", fw="1.0", reset="power", restored={})]
    items += [st.telemetry() for _ in range(5)]
    items += [forged.telemetry()]
    pub = Publisher(m.station_port or 0, client_id=SID, login=(SID, station_pw))
    out: list[str] = []
    try:
        agent.wait_log("subscribed", 30)
        pub.send([(f"stations/{SID}/{k}", p) for k, p in items])
        pub.c.publish(f"stations/{SID}/telemetry", b'{"v":1,"sid":"' + SID.encode() + b'",x', 1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            c = sqlite3.connect(db)
            n = c.execute("SELECT (SELECT COUNT(*) FROM raw), (SELECT COUNT(*) FROM quarantine)")
            raw, quarantined = n.fetchone()
            c.close()
            if raw == 6 and quarantined == 2:
                break
            time.sleep(0.2)
        assert (raw, quarantined) == (6, 2)
        base = f"http://127.0.0.1:{dash}/"
        for path in (
            "api/fleet",
            "api/alarms",
            f"api/stations/{SID}",
            f"api/stations/{SID}/energy",
            "api/daily",
            "metrics",
            "healthz",
            "api/stations/NOPE",
        ):
            out.append(get(base + path))
    finally:
        pub.c.loop_stop()
        agent.proc.send_signal(signal.SIGTERM)
        agent.proc.wait(30)
    out.append(agent.log_text())
    assert "DEBUG" in out[-1]  # the log was at debug level
    for fmt in ("csv", "json"):
        for by in ("interval", "session", "day"):
            out.append(run("export", "--db", url, "--format", fmt, "--by", by))
    out.append(run("verify", "--db", url))
    out.append(run("keys", "list", "--db", url))
    out.append(run("keys", "list", "--db", str(tmp_path / "missing.db")))  # an error path
    out.append(run("db", "version", "--db", url))
    # a traceback: the agent started on a broken database prints one line, not its locals
    db.write_bytes(b"not a database" * 100)
    out.append(run("verify", "--db", url))
    text = "\n".join(out)
    assert "quarantin" in text.lower() and SID in text  # the outputs did talk about it
    for secret in (key, station_pw, agent_pw):
        for f in forms(secret):
            assert f not in text, f"a secret in the output: {f[:8]}…"
