"""The dashboard served by the agent itself (`[dashboard]` in its config): messages through
Mosquitto into the agent appear in the API; the agent stops cleanly; a taken port or a
bad key is a usage error."""

from __future__ import annotations

import json
import pathlib
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import ConfigError, load_config
from agent.keys import KeyStore
from tests.helpers import free_port
from tests.test_dashboard_state import KEY, Sim, slot
from tests.test_dashboard_watch import ENV, STATIONCTL
from tools.mosquitto import Mosquitto

SID = "KH-AGT-0001"


def config(tmp: pathlib.Path, broker_port: int, http_port: int) -> pathlib.Path:
    p = tmp / "agent.toml"
    p.write_text(
        f'[db]\nurl = "sqlite:///agent.db"\nsynchronous = "normal"\n'
        f'[broker]\nport = {broker_port}\nclient_id = "dash-test-{http_port}"\n'
        f'[dashboard]\nhost = "127.0.0.1"\nport = {http_port}\n'
    )
    return p


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except OSError:
            v = None
        if v:
            return v
        time.sleep(0.1)
    raise TimeoutError(what)


@pytest.fixture
def agent(
    tmp_path: pathlib.Path, mosquitto: Mosquitto
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    with KeyStore(f"sqlite:///{tmp_path}/agent.db") as ks:
        ks.add(SID, KEY, 1)
    port = free_port()
    p = subprocess.Popen(
        [*STATIONCTL, "agent", "--config", str(config(tmp_path, mosquitto.port, port))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        wait(lambda: get(base + "api/health")["ok"], 30, "the agent's dashboard")
        yield p, base
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_agent_serves_the_dashboard(
    agent: tuple[subprocess.Popen[str], str], mosquitto: Mosquitto
) -> None:
    p, base = agent
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dash-test-station")
    c.connect("127.0.0.1", mosquitto.port)
    c.loop_start()
    sim = Sim(SID, t0=int(time.time() * 1000) - 5000)
    status = {"v": 1, "sid": SID, "boot": 1, "state": "online", "fw": "t", "cfg": "0" * 12}
    c.publish(f"stations/{SID}/status", json.dumps(status), qos=1, retain=True).wait_for_publish(5)
    body = sim.tel([slot(1, "C", 84000, 10000), slot(2, "I", 0, 0)])
    c.publish(f"stations/{SID}/telemetry", Sim.payload(body), qos=1).wait_for_publish(5)
    row = wait(
        lambda: [s for s in get(base + "api/fleet")["stations"] if s["power_w"]],
        20,
        "the station in the API",
    )[0]
    assert row["sid"] == SID and row["state"] == "online" and row["power_w"] == 840
    # a forged message: quarantined by the agent, an alarm on the dashboard
    good = Sim.payload(sim.tel([slot(1)]))
    forged = good[:-3] + (b"1" if good[-3:-2] != b"1" else b"2") + b'"}'  # one hex digit off
    c.publish(f"stations/{SID}/telemetry", forged, qos=1).wait_for_publish(5)
    wait(
        lambda: any(a["id"] == f"{SID}:signature" for a in get(base + "api/alarms")["active"]),
        20,
        "the signature alarm",
    )
    c.loop_stop()
    c.disconnect()
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out


def test_a_taken_port_is_a_usage_error(tmp_path: pathlib.Path, mosquitto: Mosquitto) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [*STATIONCTL, "agent", "--config", str(config(tmp_path, mosquitto.port, port))],
            capture_output=True,
            text=True,
            timeout=60,
            env=ENV,
            check=False,
        )
    assert r.returncode == 2 and "dashboard: cannot listen" in r.stderr


def test_dashboard_section_keys_are_checked(tmp_path: pathlib.Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[dashboard]\nport = 9000\n")
    c = load_config(cfg)
    assert c.dashboard is not None and (c.dashboard.host, c.dashboard.port) == ("127.0.0.1", 9000)
    assert load_config(config(tmp_path, 1883, 1)).dashboard is not None
    cfg.write_text("[broker]\nport = 1\n")
    assert load_config(cfg).dashboard is None
    cfg.write_text("[dashboard]\nprot = 9000\n")
    with pytest.raises(ConfigError, match="dashboard.prot"):
        load_config(cfg)
    cfg.write_text('[dashboard]\nport = "9000"\n')
    with pytest.raises(ConfigError, match="dashboard.port must be int"):
        load_config(cfg)
