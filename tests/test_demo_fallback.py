"""Where Mosquitto cannot be had, `stationctl demo` falls back to the embedded pure-Python
broker, says so, and the fleet's signed telemetry still reaches the agent."""

from __future__ import annotations

import pathlib
import re
import sqlite3
import subprocess
import time

from tests.test_dashboard_demo import ENV, STATIONCTL, stop


def test_demo_falls_back_to_the_embedded_broker_and_says_so(tmp_path: pathlib.Path) -> None:
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
            str(tmp_path / "demo"),
            "--accel",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**ENV, "STATIONCTL_NO_MOSQUITTO": "1"},
        start_new_session=True,
    )
    assert p.stdout is not None
    banner = []
    try:
        for line in p.stdout:
            banner.append(line)
            if re.search(r"dashboard\s+http://", line):
                break
        time.sleep(15)
    finally:
        out = "".join(banner) + stop(p)
    assert "Mosquitto not found" in out and "embedded pure-Python broker" in out, out
    assert not (tmp_path / "demo" / "mosquitto").exists()
    db = next((tmp_path / "demo").rglob("*.db"))
    with sqlite3.connect(db) as c:
        n = c.execute("SELECT count(*) FROM raw").fetchone()[0]
        sids = {r[0] for r in c.execute("SELECT DISTINCT sid FROM raw")}
    assert n > 4 and len({x for x in sids if "OCPP" not in x}) == 2
