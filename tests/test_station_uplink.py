"""The whole station firmware on MicroPython against the rig and a real Mosquitto:
signed telemetry that the agent's verifier accepts, broker outages, power cuts with a
non-empty outbox, a full outbox, and signed commands."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pathlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.wire import StaticKeys, verify
from tools.mosquitto import Mosquitto
from tools.rig.rig import Rig
from tools.station_proc import StationProcess, station_config

SID = "KH-TST-0002"
KEY = bytes(range(32))
HEAP = "256k"  # see firmware/README: 64-bit objects and non-frozen bytecode on the unix port


class Collector:
    """A paho subscriber on stations/# that keeps every delivery, duplicates included."""

    def __init__(self, port: int, login: tuple[str, str]) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="collector", clean_session=False
        )
        self.c.on_message = self._on
        self.c.on_connect = lambda c, *_: c.subscribe("stations/#", 1)
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.username_pw_set(*login)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload)))

    def signed(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return [(t, p) for t, p in self.got if t.endswith(("/telemetry", "/event"))]

    def bodies(self) -> list[dict[str, Any]]:
        out = []
        for t, p in self.signed():
            kind = t.rsplit("/", 1)[1]
            out.append(verify(kind, SID, p, StaticKeys({(SID, 1): KEY})).body)
        return out

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def mosquitto(locked_broker: Mosquitto) -> Mosquitto:
    """The deployment's broker rules: the station logs in with its own account on the
    stations' listener; the collector and the command sender with the agent's."""
    locked_broker.add_station(SID)
    return locked_broker


def agent_login(broker: Mosquitto) -> tuple[str, str]:
    return ("agent", broker.password("agent"))


@pytest.fixture
def rig(tmp_path: pathlib.Path) -> Iterator[Rig]:
    with Rig(slots=2, seed=9, workdir=tmp_path / "rig") as r:
        yield r


def start_station(
    tmp_path: pathlib.Path, rig: Rig, broker: Mosquitto, **over: Any
) -> StationProcess:
    cfg = station_config(
        SID,
        rig.charger_path,
        rig.bus_path,
        slots=2,
        key_hex=KEY.hex(),
        broker_port=broker.port,
        broker={"port": broker.station_port, "user": SID, "password": broker.password(SID)},
        sample_ms=500,
        stale_s=3,
        telemetry_s=1,
        ntp="host",
        **over,
    )
    st = StationProcess(tmp_path / "flash", cfg, heap=HEAP)
    st.start()
    return st


def keys_of(bodies: list[dict[str, Any]]) -> set[tuple[int, int]]:
    return {(b["boot"], b["seq"]) for b in bodies}


def wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def test_telemetry_verifies_and_validates(
    tmp_path: pathlib.Path, rig: Rig, mosquitto: Mosquitto
) -> None:
    col = Collector(mosquitto.port, agent_login(mosquitto))
    rig.insert(1, pack="72V", power_w=1200, capacity_wh=2, soc=0.6)
    st = start_station(tmp_path, rig, mosquitto)
    try:
        wait(lambda: any(b.get("ev") == "session_end" for b in col.bodies()), 60, "a whole session")
        wait(lambda: sum(1 for b in col.bodies() if "slots" in b) >= 5, 20, "telemetry")
    finally:
        st.stop()
        col.close()
    bodies = col.bodies()  # verify() raises on any bad signature or schema
    evs = [b["ev"] for b in bodies if "ev" in b]
    assert evs[0] == "boot" and "session_start" in evs and "session_end" in evs
    tel = [b for b in bodies if "slots" in b]
    assert all(b["sid"] == SID and b["kid"] == 1 and "ts" in b for b in bodies)
    assert tel[-1]["slots"][0]["e_mwh"] > 0 and tel[-1]["meter"]["sn"] > 0
    seqs = sorted(b["seq"] for b in bodies)
    assert seqs == list(range(len(seqs)))  # one sequence over telemetry and events, no gap
    # an independent check of §5.5 with the standard library
    for _t, p in col.signed():
        i = p.rindex(b',"sig":"')
        assert hmac.new(KEY, p[:i] + b"}", hashlib.sha256).hexdigest().encode() == p[i + 8 : -2]
    status = [json.loads(p) for t, p in col.got if t.endswith("/status")]
    assert status[0]["state"] == "online" and len(status[0]["cfg"]) == 12


def test_broker_outage_loses_nothing_and_drains_oldest_first(
    tmp_path: pathlib.Path, rig: Rig, mosquitto: Mosquitto
) -> None:
    col = Collector(mosquitto.port, agent_login(mosquitto))
    rig.insert(1, pack="72V", power_w=1000, capacity_wh=50, soc=0.2)
    st = start_station(tmp_path, rig, mosquitto)
    try:
        wait(lambda: len(col.signed()) >= 3, 30, "first messages")
        mosquitto.stop()
        outage_s = int(os.environ.get("OUTAGE_S", "25"))
        time.sleep(outage_s)  # telemetry every second: ~25 messages wait in the outbox
        mosquitto.start()
        mark = len(col.signed())
        # the station's backoff reaches 10 s during the outage: allow it a few tries
        wait(
            lambda: sum(1 for b in col.bodies() if b.get("hist")) >= outage_s - 5, 60, "the backlog"
        )
        time.sleep(3)
        st.stop()
        time.sleep(1)
    finally:
        col.close()
    bodies = col.bodies()
    got = keys_of(bodies)
    boot = bodies[0]["boot"]
    top = max(s for b, s in got if b == boot)
    assert {(boot, s) for s in range(top + 1)} <= got, "a (boot, seq) is missing"
    hist = [b["seq"] for b in bodies if b.get("hist")]
    assert len(hist) >= outage_s - 5
    # the backlog arrives oldest first
    after = [
        verify(t.rsplit("/", 1)[1], SID, p, StaticKeys({(SID, 1): KEY})).body["seq"]
        for t, p in col.signed()[mark:]
    ]
    backlog = [s for s in after if s in set(hist)]
    assert backlog == sorted(backlog)
    # every copy of a (boot, seq) is the same bytes (a resend after a lost PUBACK included)
    copies: dict[tuple[int, int], set[bytes]] = {}
    for t, p in col.signed():
        b = verify(t.rsplit("/", 1)[1], SID, p, StaticKeys({(SID, 1): KEY})).body
        copies.setdefault((b["boot"], b["seq"]), set()).add(p)
    assert all(len(v) == 1 for v in copies.values())


def test_power_cut_during_outage_keeps_the_backlog(
    tmp_path: pathlib.Path, rig: Rig, mosquitto: Mosquitto
) -> None:
    col = Collector(mosquitto.port, agent_login(mosquitto))
    rig.insert(1, pack="72V", power_w=1000, capacity_wh=50, soc=0.2)
    st = start_station(tmp_path, rig, mosquitto)
    wait(lambda: len(col.signed()) >= 2, 30, "first messages")
    mosquitto.stop()
    time.sleep(8)
    st.kill()  # power cut with messages waiting in the outbox
    assert any((tmp_path / "flash").iterdir())
    mosquitto.start()
    st.start()
    try:
        wait(lambda: len({b["boot"] for b in col.bodies()}) == 2, 60, "second boot")
        time.sleep(3)
    finally:
        st.stop()
        col.close()
    bodies = col.bodies()
    first = min(b["boot"] for b in bodies)
    seqs = sorted(b["seq"] for b in bodies if b["boot"] == first)
    assert len(seqs) >= 8 and seqs == list(range(len(seqs))), seqs  # the whole first boot
    assert sum(1 for b in bodies if b["boot"] == first and b.get("hist")) >= 5
    boot_evs = [b for b in bodies if b.get("ev") == "boot"]
    assert len(boot_evs) == 2 and boot_evs[1]["boot"] == first + 1


def test_full_outbox_drops_oldest_telemetry_and_keeps_energy(
    tmp_path: pathlib.Path, rig: Rig, mosquitto: Mosquitto
) -> None:
    col = Collector(mosquitto.port, agent_login(mosquitto))
    rig.insert(1, pack="72V", power_w=1500, capacity_wh=50, soc=0.2)
    st = start_station(tmp_path, rig, mosquitto, outbox={"max_bytes": 8192})
    try:
        wait(lambda: len(col.signed()) >= 2, 30, "first messages")
        mosquitto.stop()
        time.sleep(20)  # ~20 telemetry of ~800 bytes into an 8 KB outbox
        mosquitto.start()
        wait(lambda: any(b.get("ev") == "outbox_drop" for b in col.bodies()), 60, "outbox_drop")
        time.sleep(3)
        truth = rig.ground_truth_mwh()[1]
    finally:
        st.stop()
        col.close()
    bodies = col.bodies()
    drops = sum(b["n"] for b in bodies if b.get("ev") == "outbox_drop")
    assert drops > 0
    boot = bodies[0]["boot"]
    top = max(b["seq"] for b in bodies)
    missing = top + 1 - len({b["seq"] for b in bodies if b["boot"] == boot})
    assert missing == drops  # exactly the dropped ones are gone, all telemetry
    assert any(b.get("ev") == "boot" for b in bodies)  # a boot event is never dropped
    last = max((b for b in bodies if "slots" in b), key=lambda b: b["seq"])
    # the register kept the energy of the dropped period: it tracks the truth
    assert last["slots"][0]["e_mwh"] >= truth * 0.95


def sign_cmd(obj: dict[str, Any]) -> bytes:
    b = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    return b[:-1] + b',"sig":"' + hmac.new(KEY, b, hashlib.sha256).hexdigest().encode() + b'"}'


def test_signed_commands_and_refusals(
    tmp_path: pathlib.Path, rig: Rig, mosquitto: Mosquitto
) -> None:
    col = Collector(mosquitto.port, agent_login(mosquitto))
    st = start_station(tmp_path, rig, mosquitto)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="operator")
    pub.username_pw_set(*agent_login(mosquitto))  # commands: the agent's account may send
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    topic = f"stations/{SID}/cmd"
    now = int(time.time() * 1000)
    try:
        wait(lambda: any(t.endswith("/status") for t, _ in col.got), 30, "birth")
        time.sleep(1)
        good = {
            "v": 1,
            "sid": SID,
            "kid": 1,
            "cmd": "config",
            "telemetry_s": 2,
            "exp": now + 60000,
            "nonce": "n1",
        }
        pub.publish(topic, sign_cmd(good), qos=1).wait_for_publish(5)
        pub.publish(topic, sign_cmd(good), qos=1).wait_for_publish(5)  # replay
        expired = dict(good, nonce="n2", exp=now - 1000)
        pub.publish(topic, sign_cmd(expired), qos=1).wait_for_publish(5)
        unsigned = json.dumps(dict(good, nonce="n3"), separators=(",", ":")).encode()
        pub.publish(topic, unsigned, qos=1).wait_for_publish(5)
        pub.publish(topic, b"\xff garbage", qos=1).wait_for_publish(5)
        wait(lambda: sum(1 for b in col.bodies() if b.get("ev") == "alarm") >= 5, 20, "alarms")
    finally:
        pub.loop_stop()
        st.stop()
        col.close()
    codes = [b["code"] for b in col.bodies() if b.get("ev") == "alarm"]
    assert "config_set" in codes and "cmd_replay" in codes and "cmd_expired" in codes
    assert "cmd_unsigned" in codes
    assert sum(1 for c in codes if c.startswith("cmd_")) == 4
