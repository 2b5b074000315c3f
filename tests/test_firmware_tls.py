"""Stations verify the broker (issue 14 item 2 and its attack test "a station refuses a
broker with the wrong certificate"), on the MicroPython unix port against a real Mosquitto
started from a `stationctl broker init` deployment (its TLS listener for stations, its
accounts; server certificate for localhost and 127.0.0.1):

- the firmware's MQTT client (tests/mp_scripts/tls_client.py, on MicroPython and CPython):
  with the deployment's CA it logs in and its QoS 1 publishes reach the agent's account;
  with another deployment's CA, or towards an address the certificate does not name, every
  attempt is refused as a certificate failure (cert_errors, not io_errors), reported once
  (on_cert_error), nothing is published, and no socket is left open behind the attempts;
- the whole firmware: a broker presenting another CA's certificate on the right address is
  refused with exactly one `tls_cert` alarm however many retries; nothing is published; once
  the broker is restarted with the deployment's certificate the same station process
  connects and drains its outbox: the alarm, and every message made while refused, in order.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.wire import StaticKeys, verify
from tests.helpers import micropython_bin
from tools.flash import broker_setup
from tools.mosquitto import Mosquitto
from tools.rig.rig import Rig
from tools.station_proc import StationProcess, station_config

SID = "KH-TLS-0001"
KEY = bytes(range(32))
SCRIPT = pathlib.Path(__file__).parent / "mp_scripts" / "tls_client.py"
INTERPRETERS = ["micropython", "cpython"]


def ca_der(setup: pathlib.Path) -> bytes:
    ca = x509.load_pem_x509_certificate((setup / "ca.crt").read_bytes())
    return ca.public_bytes(Encoding.DER)


def password(setup: pathlib.Path, user: str) -> str:
    sub = "stations/" if user.isupper() else ""
    return (setup / "passwords" / f"{sub}{user}").read_text().strip()


@pytest.fixture
def deployment(tmp_path: pathlib.Path) -> Iterator[Mosquitto]:
    m = Mosquitto.deployment(tmp_path / "mosq", stations=[SID])
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def other_ca(tmp_path: pathlib.Path) -> pathlib.Path:
    """A second deployment (another CA, another server certificate, same names)."""
    d = tmp_path / "other"
    broker_setup.init(d, broker_setup.Options(stations=[SID]))
    return d


class Agent:
    """A paho client logged in as the deployment's agent on its loopback listener,
    subscribed to the station's topics (again after a broker restart)."""

    def __init__(self, m: Mosquitto) -> None:
        assert m.setup_dir is not None
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="agent-tls-test")
        self.c.username_pw_set("agent", password(m.setup_dir, "agent"))
        self.c.on_connect = lambda c, *_: c.subscribe(f"stations/{SID}/#", 1)
        self.c.on_subscribe = lambda *_: self.subscribed.set()
        self.c.on_message = self._on
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.connect("127.0.0.1", m.port)
        self.c.loop_start()
        assert self.subscribed.wait(10), "the agent account could not subscribe"

    def _on(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def messages(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def run_client(interp: str, tmp_path: pathlib.Path, **opts: Any) -> list[dict[str, Any]]:
    """tls_client.py to its end: its JSON lines."""
    n = len(list(tmp_path.glob("ca-*")))
    ca = tmp_path / f"ca-{n}.der"
    ca.write_bytes(opts.pop("ca"))
    # options in a file: the unix port's PyPI wrapper dies on an argument of 256+ characters
    args = tmp_path / f"opts-{n}.json"
    args.write_text(json.dumps({**opts, "ca": str(ca)}))
    cmd = (
        [micropython_bin(), "-X", "heapsize=256k"] if interp == "micropython" else [sys.executable]
    )
    r = subprocess.run(
        [*cmd, str(SCRIPT), f"@{args}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in r.stdout.splitlines()]


# ---- the client ------------------------------------------------------------------------


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_client_with_the_deployment_ca_publishes_to_the_agent(
    interp: str, tmp_path: pathlib.Path, deployment: Mosquitto
) -> None:
    m = deployment
    assert m.setup_dir is not None
    agent = Agent(m)
    try:
        lines = run_client(
            interp,
            tmp_path,
            host="127.0.0.1",
            port=m.tls_port,
            ca=ca_der(m.setup_dir),
            user=SID,
            password=password(m.setup_dir, SID),
            n=5,
            topic=f"stations/{SID}/telemetry",
            deadline_ms=15000,
        )
        done = lines[-1]
        assert done["ev"] == "done" and done["refs"] == 5, lines
        assert done["c"]["connects"] == 1 and done["c"]["cert_errors"] == 0, done
        assert [x for x in lines if x["ev"] == "cert"] == []
        deadline = time.monotonic() + 10
        while len(agent.messages()) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(p for _t, p in agent.messages()) == [b"%06d" % i for i in range(5)]
    finally:
        agent.close()


def _refused(lines: list[dict[str, Any]], why: str) -> dict[str, Any]:
    done = lines[-1]
    c = done["c"]
    assert done["ev"] == "timeout" and done["refs"] == 0 and c["connects"] == 0, done
    # every attempt the certificate check (the last may be cut by the deadline mid-handshake)
    assert c["attempts"] >= 3 and c["attempts"] - 1 <= c["cert_errors"] <= c["attempts"], c
    assert c["io_errors"] == c["refused"] == c["internal_errors"] == 0, c
    assert done["err"].startswith("CertError: broker certificate refused"), done
    certs = [x for x in lines if x["ev"] == "cert"]
    assert len(certs) == 1 and re.search(why, certs[0]["msg"]), certs  # once per streak
    # no descriptor left behind by the refused handshakes (MicroPython's TLS socket lets go
    # of its TCP socket unclosed when the handshake fails)
    assert done["fds"] == done["fds0"], done
    return done


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_client_refuses_a_broker_signed_by_another_ca(
    interp: str, tmp_path: pathlib.Path, deployment: Mosquitto, other_ca: pathlib.Path
) -> None:
    m = deployment
    assert m.setup_dir is not None
    agent = Agent(m)
    try:
        lines = run_client(
            interp,
            tmp_path,
            host="127.0.0.1",
            port=m.tls_port,
            ca=ca_der(other_ca),  # the station trusts another deployment's CA
            user=SID,
            password=password(m.setup_dir, SID),
            n=1,
            topic=f"stations/{SID}/telemetry",
            deadline_ms=2500,
        )
        _refused(lines, "not correctly signed by the trusted CA|CERTIFICATE_VERIFY_FAILED")
        time.sleep(0.3)
        assert agent.messages() == []
    finally:
        agent.close()


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_client_refuses_a_certificate_for_another_name(
    interp: str, tmp_path: pathlib.Path, deployment: Mosquitto
) -> None:
    """The deployment's own broker, reached at 127.0.0.2 (a loopback address its
    certificate, for localhost and 127.0.0.1, does not name): a certificate valid for some
    other host is refused as one from an impostor would be."""
    m = deployment
    assert m.setup_dir is not None
    try:
        import socket

        socket.create_connection(("127.0.0.2", m.tls_port or 0), 2).close()
    except OSError:
        pytest.skip("127.0.0.2 does not reach the loopback listener here")
    lines = run_client(
        interp,
        tmp_path,
        host="127.0.0.2",
        port=m.tls_port,
        ca=ca_der(m.setup_dir),
        user=SID,
        password=password(m.setup_dir, SID),
        n=1,
        topic=f"stations/{SID}/telemetry",
        deadline_ms=2500,
    )
    _refused(lines, "does not match with the expected CN|IP address mismatch")


# ---- the whole firmware ----------------------------------------------------------------


def _wait(pred: Callable[[], bool], timeout: float, what: str, st: StationProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        assert st.alive, f"station exited waiting for {what}: " + "\n".join(st.output[-30:])
        time.sleep(0.1)
    raise TimeoutError(f"{what}: " + "\n".join(st.output[-30:]))


def _tls_connections(m: Mosquitto, since: int) -> tuple[int, int]:
    """(TLS connections opened, station logins) in the broker's log after offset `since`."""
    log = m.log.read_text(errors="replace")[since:]
    opened = len(re.findall(rf"New connection from \S+ on port {m.tls_port}\b", log))
    logins = len(re.findall(rf"New client connected from \S+ as {SID}\b", log))
    return opened, logins


def test_station_refuses_a_broker_with_the_wrong_certificate_then_reaches_the_right_one(
    tmp_path: pathlib.Path, other_ca: pathlib.Path
) -> None:
    m = Mosquitto.deployment(tmp_path / "mosq", stations=[SID])
    setup = m.setup_dir
    assert setup is not None and m.tls_port is not None
    # the impostor: the deployment's address, port and accounts, but a server certificate
    # from another CA (what someone on the network answering for the broker can present)
    good = {f: (setup / f).read_bytes() for f in ("server.crt", "server.key")}
    for f in good:
        shutil.copyfile(other_ca / f, setup / f)
    m.start()
    agent = None
    st = None
    try:
        agent = Agent(m)
        with Rig(slots=1, seed=21, workdir=tmp_path / "rig") as rig:
            rig.insert(1, pack="72V", power_w=1200, capacity_wh=50, soc=0.4)
            cfg = station_config(
                SID,
                rig.charger_path,
                rig.bus_path,
                slots=1,
                key_hex=KEY.hex(),
                broker={
                    "host": "127.0.0.1",
                    "port": m.tls_port,
                    "tls": True,
                    "ca": base64.b64encode(ca_der(setup)).decode(),
                    "user": SID,
                    "password": password(setup, SID),
                },
                sample_ms=500,
                stale_s=3,
                telemetry_s=1,
            )
            st = StationProcess(tmp_path / "flash", cfg, heap="256k")
            log0 = m.log.stat().st_size
            st.start()
            pid = st.proc.pid if st.proc else None
            # refused, retried with backoff (250 ms doubling), never logged in
            _wait(lambda: _tls_connections(m, log0)[0] >= 5, 40, "five TLS attempts", st)
            time.sleep(1)
            opened, logins = _tls_connections(m, log0)
            assert opened >= 5 and logins == 0, (opened, logins)
            assert agent.messages() == []  # nothing published through the impostor
            # the broker gets its own certificate back (restarted): the same process
            # connects at its next retry, without a restart, and drains its outbox
            m.stop()
            for f, data in good.items():
                (setup / f).write_bytes(data)
            m.start()
            keys = StaticKeys({(SID, 1): KEY})

            def bodies(kind: str) -> list[dict[str, Any]]:
                got = [p for t, p in agent.messages() if t == f"stations/{SID}/{kind}"]
                return [verify(kind, SID, p, keys).body for p in got]

            def live_telemetry() -> bool:
                return any("hist" not in b for b in bodies("telemetry"))

            _wait(live_telemetry, 40, "telemetry from the station once the broker is right", st)
            time.sleep(1.5)
            assert st.proc is not None and st.proc.pid == pid and st.alive
    finally:
        if st is not None:
            st.stop()
        if agent is not None:
            agent.close()
        m.stop()
    events, tel = bodies("event"), bodies("telemetry")
    alarms = [e for e in events if e["ev"] == "alarm" and e["code"] == "tls_cert"]
    # one alarm for the whole streak of refusals, made while the link was down
    assert len(alarms) == 1, alarms
    a = alarms[0]
    assert a["level"] == "crit" and a.get("hist") == 1, a
    assert "not correctly signed by the trusted CA" in a["msg"], a
    # the outbox kept everything made while refused: the boot event, the alarm and the
    # telemetry of those seconds, every seq of the boot from 0 with no gap
    seqs = sorted(b["seq"] for b in events + tel)
    assert seqs == list(range(len(seqs))), seqs
    assert any(e["ev"] == "boot" and e["seq"] == 0 for e in events)
    held = [b for b in tel if b.get("hist") == 1]
    assert len(held) >= 3, len(held)  # telemetry_s=1 over the ~8 s of refusals
    assert all(b["boot"] == events[0]["boot"] for b in events + tel)
